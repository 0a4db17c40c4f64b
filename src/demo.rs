//! `--demo`: the gateway in front of an embedded Bill24 simulator on loopback, with a demo
//! caller key and a ready-to-paste `curl`. Needs no credentials and no network.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpListener;

use bill24::{BALANCE_PATH, Secret};
use bill24_sim::{self as sim, SimConfig, Simulator};

use crate::auth::hash_key;
use crate::config::{CallerConfig, Config};
use crate::{Gateway, StartError};

/// The demo caller's key (its SHA-256 is added to `[[callers]]` as caller `demo`).
pub const DEMO_CALLER_KEY: &str = "demo-caller-key";
pub const DEMO_CALLER: &str = "demo";
/// A customer the simulator knows.
pub const DEMO_CUSTOMER: &str = "M005T";

/// Runs the demo until `shutdown` resolves. The listeners use the configured ports on
/// 127.0.0.1, or any free port when those are taken.
pub async fn run(
    mut config: Config,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), StartError> {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let simulator = Simulator::bind(loopback, SimConfig::default())
        .await
        .map_err(|source| StartError::Bind {
            addr: loopback,
            key: "the demo's Bill24 simulator",
            source,
        })?;
    config.upstream.base_url = simulator.base_url();
    config.upstream.merchant_token = Secret::new(sim::DEMO_MERCHANT_TOKEN);
    config.upstream.client_id = sim::DEMO_CLIENT_ID.into();
    config.upstream.client_secret = Secret::new(sim::DEMO_CLIENT_SECRET);
    config.callers.retain(|c| &*c.name != DEMO_CALLER);
    config.callers.push(CallerConfig {
        name: Arc::from(DEMO_CALLER),
        key_sha256: vec![hash_key(DEMO_CALLER_KEY.as_bytes())],
        spiffe_id: None,
        jwt_subject: None,
        rate_limit_rps: 0.0,
        burst: 0,
        max_concurrent: 0,
        limit_scope: Default::default(),
    });
    let main = bind_loopback(config.server.listen.port(), "server.listen")?;
    let admin = bind_loopback(config.server.admin_listen.port(), "server.admin_listen")?;
    let gateway = Gateway::from_listeners(config, main, admin)?;
    println!(
        "{}",
        banner(gateway.main_addr(), gateway.admin_addr(), simulator.addr())
    );
    let result = gateway.run(shutdown).await;
    drop(simulator);
    result
}

fn bind_loopback(port: u16, key: &'static str) -> Result<TcpListener, StartError> {
    let preferred = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    crate::server::listen(preferred).or_else(|_| {
        let any = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        crate::server::listen(any).map_err(|source| StartError::Bind {
            addr: any,
            key,
            source,
        })
    })
}

/// What the demo prints on start.
pub fn banner(main: SocketAddr, admin: SocketAddr, simulator: SocketAddr) -> String {
    format!(
        "\nbill24-gateway demo\n\
         \x20 gateway:   http://{main}{BALANCE_PATH}\n\
         \x20 admin:     http://{admin}/metrics  (/healthz, /readyz, DELETE /cache)\n\
         \x20 simulator: http://{simulator}  (a Bill24 stand-in; any customer_sync_code starting \
         with UNKNOWN is not found)\n\
         \x20 caller key: {DEMO_CALLER_KEY}\n\n\
         Try it (X-Cache: MISS the first time, HIT the second):\n\n\
         \x20 {}\n",
        curl_command(main)
    )
}

pub fn curl_command(main: SocketAddr) -> String {
    format!(
        "curl -i -X POST http://{main}{BALANCE_PATH} \
         -H 'Authorization: Bearer {DEMO_CALLER_KEY}' \
         -H 'Content-Type: application/json' \
         -d '{{\"customer_sync_code\":\"{DEMO_CUSTOMER}\"}}'"
    )
}
