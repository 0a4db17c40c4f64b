//! The gateway binary as a child process: started with a config file in a temporary
//! directory, its output collected line by line, signalled, and talked to over HTTP.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bill24_sim::{SimConfig, Simulator};

use super::{BILLING_KEY, ORDERS_KEY, PATH, Reply, body_for, client, send};

pub const BIN: &str = env!("CARGO_BIN_EXE_bill24-gateway");

/// The variables through which the environment names egress proxies.
pub const PROXY_VARS: [&str; 8] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// A `[[callers]]` block for `name` with `key`.
pub fn caller_block(name: &str, key: &str) -> String {
    format!(
        "[[callers]]\nname = \"{name}\"\nkey_sha256 = \"{}\"\n",
        hex::encode(bill24_gateway::hash_key(key.as_bytes()))
    )
}

pub struct Running {
    pub child: Child,
    pub lines: Arc<Mutex<Vec<String>>>,
}

impl Running {
    pub fn start(args: &[&str], config: &str, envs: &[(&str, &str)]) -> (Self, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("gw.toml"), config).expect("write config");
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .arg("--config")
            .arg("gw.toml")
            .current_dir(dir.path())
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Only the proxies a test names: the machine's own must not route the simulator.
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut l) = lines.lock() {
                        l.push(line);
                    }
                }
            });
        }
        (Running { child, lines }, dir)
    }

    pub fn output(&self) -> Vec<String> {
        self.lines.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The first output line with `needle`, waited for in real time (tokio's clock may be
    /// frozen); panics after 20 s.
    pub async fn wait_for_line(&self, needle: &str) -> String {
        for _ in 0..1_000 {
            if let Some(line) = self.output().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            super::real_sleep(Duration::from_millis(20)).await;
        }
        panic!("no line with {needle:?} in:\n{}", self.output().join("\n"));
    }

    /// The addresses from the "gateway started" line.
    pub async fn addresses(&self) -> (SocketAddr, SocketAddr) {
        let line = self.wait_for_line("gateway started").await;
        let json: serde_json::Value = serde_json::from_str(&line).expect("json log line");
        let main = json["listen"]
            .as_str()
            .expect("listen")
            .parse()
            .expect("addr");
        let admin = json["admin_listen"]
            .as_str()
            .expect("admin")
            .parse()
            .expect("addr");
        (main, admin)
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits in real time (tokio's clock may be frozen) for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let tick = Duration::from_millis(20);
        for _ in 0..=within.as_millis() / tick.as_millis() {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Let the reader threads drain the pipes.
                super::real_sleep(Duration::from_millis(100)).await;
                return status;
            }
            super::real_sleep(tick).await;
        }
        panic!("not exited within {within:?}");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn post(
    main: SocketAddr,
    key: Option<&str>,
    body: String,
    headers: &[(&str, &str)],
) -> Reply {
    let mut req = http::Request::post(format!("http://{main}{PATH}"))
        .header("content-type", "application/json");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    for (n, v) in headers {
        req = req.header(*n, *v);
    }
    send(&client(), req.body(body.into()).expect("request")).await
}

/// A GET to the gateway at `addr`.
pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Default::default())
        .expect("request");
    send(&client(), req).await
}

/// A balance request for `code` as `key`'s caller.
pub async fn balance(main: SocketAddr, key: &str, code: &str) -> Reply {
    post(main, Some(key), body_for(code), &[]).await
}

pub fn gateway_toml(sim: &Simulator, extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{extra}\n\
         [upstream]\nbase_url = \"{}\"\nmerchant_token = \"{}\"\nclient_id = \"{}\"\n\n{}{}",
        sim.base_url(),
        bill24_sim::DEMO_MERCHANT_TOKEN,
        bill24_sim::DEMO_CLIENT_ID,
        caller_block("orders", ORDERS_KEY),
        caller_block("billing", BILLING_KEY),
    )
}

/// The simulator, and the gateway binary in front of it with the config `config` builds (the
/// client secret in its environment, plus `envs`).
pub async fn gateway_with_sim(
    config: impl FnOnce(&Simulator) -> String,
    envs: &[(&str, &str)],
) -> (Simulator, Running, tempfile::TempDir) {
    let sim = Simulator::bind("127.0.0.1:0".parse().expect("addr"), SimConfig::default())
        .await
        .expect("sim");
    let mut all = vec![(
        "GATEWAY_UPSTREAM__CLIENT_SECRET",
        bill24_sim::DEMO_CLIENT_SECRET,
    )];
    all.extend_from_slice(envs);
    let (gateway, dir) = Running::start(&[], &config(&sim), &all);
    (sim, gateway, dir)
}
