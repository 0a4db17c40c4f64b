//! The fleet (CONTRACT §10) through the real thing: several gateway replicas in front of one
//! Bill24 simulator, sharing a real `redis-server` (Debian's package; `.ci/run` installs it)
//! or a 3-master Redis Cluster made with `redis-cli --cluster create`. Redis is killed,
//! stopped (SIGSTOP) and given a wrong password mid-test; entries and the token are tampered
//! with in Redis directly.
//!
//! Two ways to run the replicas:
//! - **On a frozen clock** ([`Frozen`]), for everything that takes time (a TTL, a cool-down, a
//!   token's lifetime, heartbeats, the ceiling's rate): the replicas are real gateways with
//!   their own listeners, run in the test's process on its paused tokio clock, with the
//!   simulator; `redis-server` runs with its wall clock read from a file that the test moves
//!   with tokio's ([`FROZEN_TIME_C`]), so entry expiry, `PTTL`, `TIME`, heartbeats and the
//!   ceiling's buckets move exactly as far as the test says, and no test waits for them.
//! - **The built binary**, for the faults (Redis paused, stopped and killed under load, a
//!   Cluster failover, a replica killed outright, clocks skewed with libfaketime), which happen
//!   in real time.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bill24_sim::{Fault, SimConfig, Simulator};
use common::process::*;
use common::*;
use http::{Method, StatusCode};
use tokio::time::Instant;

// ---------------------------------------------------------------------------------------------
// A real redis-server
// ---------------------------------------------------------------------------------------------

/// A free loopback port whose cluster bus port (port + 10000) is free too.
fn free_port() -> u16 {
    for _ in 0..200 {
        let port = 20_000 + rand::random::<u16>() % 25_000;
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
    panic!("no free port pair");
}

/// One `redis-server` on a loopback port, with its own directory; killed when dropped.
struct Redis {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    /// `redis.conf` lines (ACL users, TLS files), and command-line arguments.
    conf: String,
    args: Vec<String>,
    /// `redis-cli` arguments to reach it (TLS, password).
    cli: Vec<String>,
    /// The file its wall clock is read from, on a frozen clock.
    time_file: Option<PathBuf>,
}

impl Redis {
    fn start(args: &[&str]) -> Redis {
        Redis::start_with(args, &[])
    }

    fn start_with(args: &[&str], cli: &[&str]) -> Redis {
        Redis::start_conf("", args, cli)
    }

    fn start_conf(conf: &str, args: &[&str], cli: &[&str]) -> Redis {
        Redis::start_full(conf, args, cli, None)
    }

    /// A standalone server whose wall clock is `clock`'s.
    fn frozen(clock: &Frozen) -> Redis {
        let redis = Redis::start_full("", &[], &[], Some(clock.time_file.clone()));
        clock.watch(&redis);
        redis
    }

    fn start_full(conf: &str, args: &[&str], cli: &[&str], time_file: Option<PathBuf>) -> Redis {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut redis = Redis {
            child: None,
            port: free_port(),
            dir,
            conf: conf.to_string(),
            args: args.iter().map(|a| a.to_string()).collect(),
            cli: cli.iter().map(|a| a.to_string()).collect(),
            time_file,
        };
        redis.launch();
        redis
    }

    fn launch(&mut self) {
        let port = self.port.to_string();
        let tls = self.conf.contains("tls-port");
        let conf = self.dir.path().join("redis.conf");
        std::fs::write(&conf, self.conf.replace("{port}", &port)).expect("write redis.conf");
        let mut cmd = Command::new("redis-server");
        cmd.current_dir(self.dir.path())
            .arg(&conf)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", if tls { "0" } else { &port }])
            .args(self.args.iter().map(|a| a.replace("{port}", &port)))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(file) = &self.time_file {
            cmd.env("LD_PRELOAD", frozen_time_library())
                .env("FROZEN_TIME_FILE", file);
        }
        self.child = Some(
            cmd.spawn()
                .expect("redis-server runs (apt install redis-server)"),
        );
        // Counted in real time (tokio's clock may be frozen): 10 s.
        for _ in 0..500 {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on {port} did not answer");
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// `redis-cli` against this server; its standard output.
    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.cli)
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn signal(&self, signal: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Back on the same port, empty.
    fn restart(&mut self) {
        self.kill();
        self.launch();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.signal("CONT");
        self.kill();
    }
}

/// Runs `command` to its end; panics with its output unless it succeeded.
fn succeed(command: &mut Command) {
    let out = command.output().expect("runs");
    assert!(
        out.status.success(),
        "{command:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Redis Cluster of three masters, made with `redis-cli --cluster create`.
struct Cluster {
    nodes: Vec<Redis>,
}

impl Cluster {
    fn start() -> Cluster {
        Cluster::with_replicas(0)
    }

    /// Three masters, each with `replicas` replicas that take over when it dies.
    fn with_replicas(replicas: usize) -> Cluster {
        let nodes: Vec<Redis> = (0..3 * (1 + replicas))
            .map(|_| {
                Redis::start(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        succeed(
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"]),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            // Up, and every replica synced with its master (one that has not cannot take
            // over from it).
            let replicas_synced = nodes
                .iter()
                .map(|n| n.cli(&["INFO", "replication"]))
                .filter(|i| i.contains("role:slave"))
                .filter(|i| i.contains("master_link_status:up"))
                .count()
                == 3 * replicas;
            if replicas_synced
                && nodes
                    .iter()
                    .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
            {
                return Cluster { nodes };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the cluster did not come up");
    }

    fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway replicas
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// The frozen clock: tokio's and Redis's
// ---------------------------------------------------------------------------------------------

/// The C source of the wall clock that a frozen test's `redis-server` reads (see the file).
const FROZEN_TIME_C: &str = include_str!("common/frozen_time.c");

/// [`FROZEN_TIME_C`] built once (with the C compiler every Rust build on Linux has: `cc`),
/// under a name of its own content so a run never overwrites a library a server has loaded.
fn frozen_time_library() -> &'static Path {
    static LIBRARY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    LIBRARY.get_or_init(|| {
        use std::hash::{Hash, Hasher};
        let mut hash = std::collections::hash_map::DefaultHasher::new();
        FROZEN_TIME_C.hash(&mut hash);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        let library = dir.join(format!("frozen_time-{:016x}.so", hash.finish()));
        if library.exists() {
            return library;
        }
        let source = dir.join(format!("frozen_time-{}.c", std::process::id()));
        let built = dir.join(format!("frozen_time-{}.so", std::process::id()));
        std::fs::write(&source, FROZEN_TIME_C).expect("write the C source");
        succeed(
            Command::new("cc")
                .args(["-shared", "-fPIC", "-O2", "-o"])
                .arg(&built)
                .arg(&source),
        );
        std::fs::rename(&built, &library).expect("rename");
        let _ = std::fs::remove_file(&source);
        library
    })
}

/// How far the frozen clock moves at a time: well under `redis.timeout` (50 ms), so a Redis
/// call never sees its deadline pass between two moments at which the test waited for Redis.
const STEP: Duration = Duration::from_millis(10);

/// Tokio's clock frozen ([`FrozenClock`]) and the wall clock of the test's `redis-server`s
/// with it: [`Frozen::advance`] moves both by the same amount, a step at a time, and waits at
/// each step for what the step set going (timers that fired, the Redis calls they made, the
/// answers) before the next. The replicas run in this process ([`Fleet::on`]); their wall
/// clock is tokio's too (`clock::now_utc`). Create it first thing in a
/// `#[tokio::test(start_paused = true)]`.
struct Frozen {
    _clock: FrozenClock,
    _dir: tempfile::TempDir,
    time_file: PathBuf,
    /// Redis's time (µs since the epoch) when tokio's clock stood at `start`.
    start_us: u64,
    start: Instant,
    /// The frozen servers, to wait on at each step (their URLs, and a connection once made).
    servers: std::sync::Mutex<Vec<(String, Option<redis::aio::MultiplexedConnection>)>>,
    access: Access,
    _log: tracing::subscriber::DefaultGuard,
}

impl Frozen {
    fn start() -> Frozen {
        let clock = FrozenClock::start();
        let dir = tempfile::tempdir().expect("tempdir");
        let access = Access::default();
        // The replicas' access lines, from this thread (the runtime's only one).
        let log = tracing::subscriber::set_default(tracing_subscriber::layer::SubscriberExt::with(
            tracing_subscriber::Registry::default(),
            access.clone(),
        ));
        let frozen = Frozen {
            _clock: clock,
            time_file: dir.path().join("time"),
            _dir: dir,
            start_us: u64::try_from(clock::now_utc().unix_timestamp_nanos() / 1_000)
                .expect("after 1970"),
            start: Instant::now(),
            servers: std::sync::Mutex::new(Vec::new()),
            access,
            _log: log,
        };
        frozen.write_time();
        frozen
    }

    /// Redis's wall clock, in step with tokio's.
    fn write_time(&self) {
        let us = self.start_us + u64::try_from(self.start.elapsed().as_micros()).expect("us");
        let next = self.time_file.with_extension("next");
        std::fs::write(&next, us.to_string()).expect("write the time");
        // Whole or not at all: a server reads the file at every clock call.
        std::fs::rename(&next, &self.time_file).expect("rename the time");
    }

    fn watch(&self, redis: &Redis) {
        self.servers
            .lock()
            .expect("servers")
            .push((redis.url(), None));
    }

    /// Moves both clocks by `by`, a [`STEP`] at a time.
    async fn advance(&self, by: Duration) {
        let mut left = by;
        while !left.is_zero() {
            let step = left.min(STEP);
            left -= step;
            // Redis's clock first: the tasks the step wakes find it moved.
            tokio::time::advance(step).await;
            self.write_time();
            self.settle().await;
        }
    }

    /// Runs `work` to its end, moving both clocks a step at a time whenever it is still
    /// waiting once everything under way has settled (a timeout, the simulator's latency, a
    /// place under the ceiling): time passes as far as the work needs, no further.
    async fn run<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        let mut work = std::pin::pin!(work);
        loop {
            tokio::select! {
                biased;
                done = &mut work => return done,
                () = self.settle() => {}
            }
            tokio::select! {
                biased;
                done = &mut work => return done,
                () = self.advance(STEP) => {}
            }
        }
    }

    /// Moves both clocks a step at a time until `check` holds; panics past `within`.
    async fn advance_until(
        &self,
        within: Duration,
        what: &str,
        mut check: impl AsyncFnMut() -> bool,
    ) {
        let start = Instant::now();
        while !check().await {
            assert!(start.elapsed() < within, "{what}: not within {within:?}");
            self.advance(STEP).await;
        }
    }

    /// Lets everything under way finish before the clock moves again: the tasks that are
    /// ready run, and two `PING`s to each frozen server come back (Redis answers in order, so
    /// by then it has answered every command sent before, and the replies are here), twice
    /// over for the commands those answers lead to.
    async fn settle(&self) {
        for _ in 0..3 {
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let count = self.servers.lock().expect("servers").len();
            for i in 0..count {
                let (url, conn) = self.servers.lock().expect("servers")[i].clone();
                let mut conn = match conn {
                    Some(conn) => conn,
                    None => match redis::Client::open(url.as_str())
                        .expect("url")
                        .get_multiplexed_async_connection()
                        .await
                    {
                        Ok(conn) => conn,
                        // Down: nothing to wait for.
                        Err(_) => continue,
                    },
                };
                let mut ok = true;
                for _ in 0..2 {
                    let pong: redis::RedisResult<String> =
                        redis::cmd("PING").query_async(&mut conn).await;
                    ok &= pong.is_ok();
                }
                self.servers.lock().expect("servers")[i].1 = ok.then_some(conn);
            }
        }
    }
}

/// The access lines of the replicas run in this process, as JSON objects.
#[derive(Clone, Default)]
struct Access(Arc<std::sync::Mutex<Vec<serde_json::Value>>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Access {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Fields(serde_json::Map<String, serde_json::Value>);
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0.insert(field.name().into(), value.into());
            }
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                self.0.insert(field.name().into(), value.into());
            }
            fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
                self.0.insert(field.name().into(), value.into());
            }
            fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
                self.0.insert(field.name().into(), value.into());
            }
            fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
                self.0
                    .insert(field.name().into(), format!("{value:?}").into());
            }
        }
        if event.metadata().target() != "access" {
            return;
        }
        let mut fields = Fields(serde_json::Map::new());
        event.record(&mut fields);
        self.0
            .lock()
            .expect("access lines")
            .push(serde_json::Value::Object(fields.0));
    }
}

// ---------------------------------------------------------------------------------------------
// Gateway replicas
// ---------------------------------------------------------------------------------------------

/// A gateway replica of the fleet.
struct Replica {
    main: SocketAddr,
    admin: SocketAddr,
    run: Run,
    /// Its config file.
    dir: tempfile::TempDir,
}

/// How a replica runs.
enum Run {
    /// The built binary.
    Process(Running),
    /// In the test's process, on its frozen clock.
    Local {
        access: Access,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: Option<tokio::task::JoinHandle<Result<(), bill24_gateway::StartError>>>,
    },
}

impl Drop for Replica {
    fn drop(&mut self) {
        if let Run::Local { stop, .. } = &mut self.run
            && let Some(stop) = stop.take()
        {
            let _ = stop.send(());
        }
    }
}

impl Replica {
    /// The process of a replica run from the built binary.
    fn running(&self) -> &Running {
        match &self.run {
            Run::Process(running) => running,
            Run::Local { .. } => panic!("a replica run in the test's process has no process"),
        }
    }

    /// A clean stop (what SIGTERM does to the binary), waited for.
    async fn stop(&mut self) {
        match &mut self.run {
            Run::Process(running) => {
                running.signal("TERM");
                assert!(running.wait_exit(Duration::from_secs(10)).await.success());
            }
            Run::Local { stop, task, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(task) = task.take() {
                    task.await
                        .expect("the gateway task did not panic")
                        .expect("the gateway ran");
                }
            }
        }
    }

    async fn balance(&self, code: &str) -> Reply {
        balance(self.main, ORDERS_KEY, code).await
    }

    async fn metrics(&self) -> String {
        let reply = get(self.admin, "/metrics").await;
        String::from_utf8_lossy(&reply.body).into_owned()
    }

    async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series)
    }

    /// The access log line of the request with this id.
    async fn access_line(&self, request_id: &str) -> serde_json::Value {
        let access = match &self.run {
            Run::Process(running) => {
                let line = running
                    .wait_for_line(&format!("\"request_id\":\"{request_id}\""))
                    .await;
                return serde_json::from_str(&line).expect("json");
            }
            Run::Local { access, .. } => access,
        };
        // Written when the exchange is over, which may be just after the answer arrived.
        for _ in 0..1_000 {
            let lines = access.0.lock().expect("access lines").clone();
            if let Some(line) = lines.into_iter().find(|l| l["request_id"] == request_id) {
                return line;
            }
            real_sleep(Duration::from_millis(2)).await;
        }
        panic!("no access line for {request_id}");
    }

    fn kill(&mut self) {
        self.running().signal("KILL");
    }
}

/// What a fleet test starts from: the simulator and the replicas' shared settings.
struct Fleet {
    sim: Simulator,
    urls: Vec<String>,
    /// More TOML for every replica (`[redis]` keys, `[cache]`, `[upstream]` sections...).
    extra: String,
    envs: Vec<(String, String)>,
    /// `[[callers]]` blocks in place of the default two (orders, billing).
    callers: Option<String>,
    /// Replicas run in the test's process on a frozen clock, their access lines here.
    local: Option<Access>,
}

impl Fleet {
    async fn new(urls: Vec<String>, extra: &str) -> Fleet {
        Fleet::with_sim(SimConfig::default(), urls, extra).await
    }

    async fn with_sim(sim: SimConfig, urls: Vec<String>, extra: &str) -> Fleet {
        init_test_log();
        Fleet {
            sim: Simulator::bind("127.0.0.1:0".parse().expect("addr"), sim)
                .await
                .expect("sim"),
            urls,
            extra: extra.to_string(),
            envs: Vec::new(),
            callers: None,
            local: None,
        }
    }

    /// The replicas' config: `extra` holds `section.key = value` lines.
    fn toml(&self) -> String {
        let urls: Vec<String> = self.urls.iter().map(|u| format!("\"{u}\"")).collect();
        let section = |name: &str| -> String {
            self.extra
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{name}.")))
                .map(|l| format!("{l}\n"))
                .collect()
        };
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}\n\
             [redis]\nurls = [{}]\n{}\n[cache]\n{}\n\
             [upstream]\nbase_url = \"{}\"\nmerchant_token = \"{}\"\nclient_id = \"{}\"\n\
             client_secret = \"{}\"\n{}\n{}{}",
            section("server"),
            urls.join(", "),
            section("redis"),
            section("cache"),
            self.sim.base_url(),
            bill24_sim::DEMO_MERCHANT_TOKEN,
            bill24_sim::DEMO_CLIENT_ID,
            bill24_sim::DEMO_CLIENT_SECRET,
            section("upstream"),
            self.callers
                .clone()
                .unwrap_or_else(|| caller_block("orders", ORDERS_KEY)),
            if self.callers.is_some() {
                String::new()
            } else {
                caller_block("billing", BILLING_KEY)
            },
        )
    }

    /// Replicas from now on run in the test's process on `clock` (the simulator already does).
    fn on(mut self, clock: &Frozen) -> Fleet {
        self.local = Some(clock.access.clone());
        self
    }

    /// Starts one more replica and waits until it serves: in this process on a frozen clock
    /// ([`Fleet::on`]), else the built binary.
    async fn replica(&self) -> Replica {
        let Some(access) = &self.local else {
            return self.replica_with_env(&[]).await;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gw.toml");
        std::fs::write(&path, self.toml()).expect("write config");
        let config = bill24_gateway::config::load(Some(&path))
            .expect("the replicas' config loads")
            .config;
        let gateway = bill24_gateway::Gateway::bind(config)
            .await
            .expect("gateway binds");
        let (main, admin) = (gateway.main_addr(), gateway.admin_addr());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gateway.run(async move {
            let _ = stopped.await;
        }));
        Replica {
            main,
            admin,
            run: Run::Local {
                access: access.clone(),
                stop: Some(stop),
                task: Some(task),
            },
            dir,
        }
    }

    /// A replica from the built binary, with more environment variables (a faked clock).
    async fn replica_with_env(&self, more: &[(&str, &str)]) -> Replica {
        let mut envs: Vec<(&str, &str)> = self
            .envs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        envs.extend_from_slice(more);
        let (running, dir) = Running::start(&[], &self.toml(), &envs);
        let (main, admin) = running.addresses().await;
        Replica {
            main,
            admin,
            run: Run::Process(running),
            dir,
        }
    }

    /// `n` replicas, each having answered one request (so each holds the fleet's token).
    async fn warm_replicas(&self, n: usize) -> Vec<Replica> {
        let replicas = self.replicas(n).await;
        for (i, r) in replicas.iter().enumerate() {
            assert_eq!(
                r.balance(&format!("warm-up-{i}")).await.status,
                StatusCode::OK
            );
        }
        replicas
    }

    async fn replicas(&self, n: usize) -> Vec<Replica> {
        let mut all = Vec::new();
        for _ in 0..n {
            all.push(self.replica().await);
        }
        all
    }
}

/// Waits (real time, whatever tokio's clock does) until `check` holds on the replica's
/// metrics; panics after 15 s.
async fn until_metric(replica: &Replica, series: &str, check: impl Fn(f64) -> bool) {
    for _ in 0..300 {
        let value = replica.metric(series).await;
        if check(value) {
            return;
        }
        real_sleep(Duration::from_millis(50)).await;
    }
    panic!("{series} = {}", replica.metric(series).await);
}

/// Whether `series` is `value` on every replica.
async fn all_at(replicas: &[Replica], series: &str, value: f64) -> bool {
    for r in replicas {
        if r.metric(series).await != value {
            return false;
        }
    }
    true
}

/// `DELETE path` on an admin listener.
async fn delete(admin: SocketAddr, path: &str) -> Reply {
    let req = http::Request::builder()
        .method(Method::DELETE)
        .uri(format!("http://{admin}{path}"))
        .body(Default::default())
        .expect("request");
    send(&client(), req).await
}

fn request_id(reply: &Reply) -> String {
    reply.header("x-request-id").unwrap_or_default().to_string()
}

// ---------------------------------------------------------------------------------------------
// Two tiers
// ---------------------------------------------------------------------------------------------

/// A customer asked through each of three replicas costs Bill24 one call per TTL window: the
/// first replica fetches, the others answer from Redis (HIT, `cache_tier` l2) with the same
/// `Age`, and the entry expires at the same moment everywhere.
#[tokio::test(start_paused = true)]
async fn one_bill24_call_per_customer_per_ttl_across_the_fleet() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], "cache.ttl = \"3s\"")
        .await
        .on(&clock);
    let replicas = fleet.replicas(3).await;
    let first = replicas[0].balance("SHARED1").await;
    assert_eq!((first.status, first.x_cache()), (StatusCode::OK, "MISS"));
    let line = replicas[0].access_line(&request_id(&first)).await;
    assert!(line["cache_tier"].is_null(), "from Bill24: {line}");
    clock.advance(Duration::from_millis(1_100)).await;
    for replica in &replicas[1..] {
        let r = replica.balance("SHARED1").await;
        assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "HIT"));
        assert_eq!(r.body, first.body, "Bill24's bytes");
        assert_eq!(
            r.header("age"),
            Some("1"),
            "counted from when it was stored"
        );
        let line = replica.access_line(&request_id(&r)).await;
        assert_eq!(line["cache_tier"], "l2");
        assert_eq!(line["cache"], "hit");
        // Now in that replica's own cache.
        let again = replica.balance("SHARED1").await;
        let line = replica.access_line(&request_id(&again)).await;
        assert_eq!(line["cache_tier"], "l1");
    }
    assert_eq!(fleet.sim.handle().balance_calls_for("SHARED1"), 1);
    assert_eq!(
        replicas[1]
            .metric(r#"gateway_cache_hits_total{tier="l2"}"#)
            .await,
        1.0
    );
    assert_eq!(
        replicas[1]
            .metric(r#"gateway_cache_hits_total{tier="l1"}"#)
            .await,
        1.0
    );
    assert_eq!(replicas[1].metric("gateway_redis_up").await, 1.0);
    // Short of the TTL counted from the first store, still the one call; past it, on every
    // replica, one more call in all.
    clock.advance(Duration::from_millis(1_890)).await;
    for replica in &replicas {
        assert_eq!(replica.balance("SHARED1").await.x_cache(), "HIT");
    }
    assert_eq!(fleet.sim.handle().balance_calls_for("SHARED1"), 1);
    clock.advance(Duration::from_millis(10)).await;
    for replica in &replicas {
        let r = replica.balance("SHARED1").await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(fleet.sim.handle().balance_calls_for("SHARED1"), 2);
}

/// `negative_ttl`, `stale_if_error` and `refresh_ahead` hold for the fleet: a "311" cached by
/// one replica answers on another; a replica that never saw a customer serves the expired
/// entry another one stored when Bill24 fails; and a hot key close to expiry on two replicas
/// is refreshed once.
#[tokio::test(start_paused = true)]
async fn negative_stale_and_refresh_ahead_hold_fleet_wide() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(
        vec![redis.url()],
        "cache.ttl = \"1s\"\ncache.negative_ttl = \"5s\"\ncache.stale_if_error = \"30s\"\n\
         upstream.retries = 0",
    )
    .await
    .on(&clock);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let sim = fleet.sim.handle();
    a.balance("UNKNOWN-NEG").await;
    let r = b.balance("UNKNOWN-NEG").await;
    assert_eq!(
        (r.x_cache(), r.json()["code"].as_str()),
        ("HIT", Some("311"))
    );
    assert_eq!(sim.balance_calls_for("UNKNOWN-NEG"), 1);

    a.balance("STALE-X").await;
    clock.advance(Duration::from_millis(1_200)).await;
    sim.set_balance_fault(Some(Fault::Status(503)));
    let r = b.balance("STALE-X").await;
    assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "STALE"));
    assert_eq!(r.header("age"), Some("1"));
    sim.set_balance_fault(None);

    let fleet = Fleet::new(
        vec![redis.url()],
        "cache.ttl = \"3s\"\ncache.refresh_ahead = \"1s\"\nredis.key_prefix = \"ahead\"",
    )
    .await
    .on(&clock);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let sim = fleet.sim.handle();
    a.balance("HOT").await;
    b.balance("HOT").await;
    assert_eq!(sim.balance_calls_for("HOT"), 1);
    clock.advance(Duration::from_millis(2_200)).await;
    // In the window on both replicas: hits, and one background refresh for the two (whose
    // own window opens 2 s later).
    for _ in 0..5 {
        assert_eq!(a.balance("HOT").await.x_cache(), "HIT");
        assert_eq!(b.balance("HOT").await.x_cache(), "HIT");
    }
    clock.advance(Duration::from_millis(300)).await;
    assert_eq!(sim.balance_calls_for("HOT"), 2, "one refresh for the fleet");
    // Past the first entry's expiry: still hits on both, from the refreshed entry.
    clock.advance(Duration::from_millis(1_000)).await;
    assert_eq!(a.balance("HOT").await.x_cache(), "HIT");
    assert_eq!(b.balance("HOT").await.x_cache(), "HIT");
    assert_eq!(sim.balance_calls_for("HOT"), 2);
}

/// Without a usable entry, concurrent requests for one cold customer spread over three
/// replicas cost Bill24 one call: one replica takes the key's fill lock, the others wait for
/// its message (not a poll) and answer from the entry it stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stampede_across_replicas_costs_one_bill24_call() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let replicas = Arc::new(fleet.replicas(3).await);
    fleet.sim.handle().set_latency(Duration::from_millis(300));
    let requests: Vec<_> = (0..60)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move { replicas[i % 3].balance("STAMPEDE").await })
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        let r = r.await.expect("request");
        assert_eq!(
            r.x_cache(),
            "MISS",
            "joined a fetch, here or on another replica"
        );
        statuses.push(r.status);
    }
    assert!(statuses.iter().all(|s| *s == StatusCode::OK));
    assert_eq!(fleet.sim.handle().balance_calls_for("STAMPEDE"), 1);
}

/// A replica that dies holding a fill lock delays the others only until the lock's lease runs
/// out (`redis.timeout` × 4, at least 200 ms; renewed only while its holder lives), not for a
/// whole fill's worth of retries; then each makes its own call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lock_holder_delays_the_others_only_until_its_lock_expires() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(
        vec![redis.url()],
        "upstream.timeout = \"1s\"\nupstream.retries = 0",
    )
    .await;
    let mut holder = fleet.replica().await;
    let other = fleet.replica().await;
    // Make sure both replicas have their token before the clock matters.
    holder.balance("warm-up-1").await;
    other.balance("warm-up-2").await;
    fleet.sim.handle().set_latency(Duration::from_secs(5));
    let main = holder.main;
    let doomed = tokio::spawn(async move { balance(main, ORDERS_KEY, "ORPHAN").await });
    let handle = fleet.sim.handle();
    assert!(
        eventually(Duration::from_secs(5), || handle
            .balance_calls_for("ORPHAN")
            == 1)
        .await
    );
    holder.kill();
    let _ = doomed.await;
    fleet.sim.handle().set_latency(Duration::ZERO);
    let start = Instant::now();
    let r = other.balance("ORPHAN").await;
    let waited = start.elapsed();
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        fleet.sim.handle().balance_calls_for("ORPHAN"),
        2,
        "its own call"
    );
    // The lease is 200 ms from the holder's last renewal: not `upstream.timeout` (1 s).
    assert!(waited < Duration::from_millis(900), "waited {waited:?}");
}

/// A fill that fails stores nothing: the replicas that waited for it each make one call of
/// their own, and no failure is ever served from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fill_is_not_shared_and_each_waiting_replica_calls_once() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "upstream.retries = 0").await;
    let replicas = Arc::new(fleet.warm_replicas(3).await);
    fleet.sim.handle().set_latency(Duration::from_millis(400));
    fleet.sim.handle().fail_next(1, Fault::Status(500));
    let leader = tokio::spawn({
        let replicas = replicas.clone();
        async move { replicas[0].balance("FAILS").await }
    });
    let handle = fleet.sim.handle();
    assert!(
        eventually(Duration::from_secs(5), || handle.balance_calls_for("FAILS")
            == 1)
        .await
    );
    let waiters: Vec<_> = (1..3)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move { replicas[i].balance("FAILS").await })
        })
        .collect();
    assert_eq!(
        leader.await.expect("leader").status,
        StatusCode::BAD_GATEWAY
    );
    for w in waiters {
        assert_eq!(w.await.expect("waiter").status, StatusCode::OK);
    }
    assert_eq!(
        fleet.sim.handle().balance_calls_for("FAILS"),
        3,
        "the failed call, then one per waiting replica"
    );
}

// ---------------------------------------------------------------------------------------------
// One token
// ---------------------------------------------------------------------------------------------

/// Replicas share one merchant token: three replicas cost one authorize, and a replica that
/// starts while the shared token is valid makes none. When Bill24 refuses it, one replica
/// refreshes for the fleet (compare-and-refresh) and the others take the new token; a refresh
/// token is never presented twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_shares_one_token_and_refreshes_it_once() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let replicas = fleet.replicas(3).await;
    for (i, r) in replicas.iter().enumerate() {
        assert_eq!(r.balance(&format!("T{i}")).await.status, StatusCode::OK);
    }
    let late = fleet.replica().await;
    assert_eq!(late.balance("T-late").await.status, StatusCode::OK);
    let sim = fleet.sim.handle();
    assert_eq!(sim.authorize_calls(), 1, "one token for four replicas");

    sim.revoke_access_tokens();
    let all = replicas.iter().chain(std::iter::once(&late));
    for (i, r) in all.enumerate() {
        let reply = r.balance(&format!("after-revoke-{i}")).await;
        assert_eq!(reply.status, StatusCode::OK);
    }
    assert_eq!(sim.refresh_calls(), 1, "one refresh for the fleet");
    assert_eq!(sim.authorize_calls(), 2);
    assert_eq!(sim.stats().reused_refresh_tokens, 0);
}

/// Background refresh of a short-lived token, on three replicas at once: one refresh per
/// token for the whole fleet (each replica due at the same moment), never a refresh token
/// presented twice, and no request sees a 401.
#[tokio::test(start_paused = true)]
async fn background_refreshes_happen_once_for_the_fleet() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::with_sim(
        SimConfig {
            token_lifetime: Duration::from_secs(3),
            ..SimConfig::default()
        },
        vec![redis.url()],
        "upstream.token_refresh_margin = \"1s\"",
    )
    .await
    .on(&clock);
    let replicas = fleet.replicas(3).await;
    let sim = fleet.sim.handle();
    // Refreshes due every 2 s (the 3 s tokens, 1 s before expiry): over 5 s, two.
    let start = Instant::now();
    let mut i = 0;
    while start.elapsed() < Duration::from_millis(5_000) {
        for r in &replicas {
            assert_eq!(r.balance(&format!("BG{i}")).await.status, StatusCode::OK);
            i += 1;
        }
        clock.advance(Duration::from_millis(100)).await;
    }
    assert_eq!(sim.refresh_calls(), 2, "one per token, not one per replica");
    assert_eq!(sim.authorize_calls(), 3);
    assert_eq!(sim.stats().reused_refresh_tokens, 0);
    assert_eq!(sim.stats().unauthorized_balance_calls, 0);
}

/// A replica that takes the fleet's token as it starts counts the token's age on the one
/// clock: Bill24 says when a token expires in wall time (`tokenExpireTime`), the refresh is a
/// monotonic timer, and both move together. So it refreshes when the token is due, not as if
/// the token had just been issued, and never presents an expired one.
#[tokio::test(start_paused = true)]
async fn a_replica_that_takes_the_fleets_token_refreshes_it_when_due() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let sim = SimConfig {
        token_lifetime: Duration::from_secs(4),
        ..SimConfig::default()
    };
    let fleet = Fleet::with_sim(
        sim,
        vec![redis.url()],
        "upstream.token_refresh_margin = \"1s\"",
    )
    .await
    .on(&clock);
    let mut first = fleet.replica().await;
    assert_eq!(first.balance("FIRST").await.status, StatusCode::OK);
    clock.advance(Duration::from_secs(2)).await;
    let late = fleet.replica().await;
    assert_eq!(clock.run(late.balance("LATE")).await.status, StatusCode::OK);
    let handle = fleet.sim.handle();
    assert_eq!(handle.authorize_calls(), 1, "the fleet's token, taken");
    first.stop().await;
    // Due 3 s after it was issued (1 s before its expiry), expired at 4 s: traffic on the late
    // replica, alone now, past both.
    for i in 0..30 {
        let reply = clock.run(late.balance(&format!("LATE{i}"))).await;
        assert_eq!(reply.status, StatusCode::OK);
        clock.advance(Duration::from_millis(100)).await;
    }
    assert_eq!(handle.refresh_calls(), 1, "refreshed once, when due");
    assert_eq!(
        handle.stats().unauthorized_balance_calls,
        0,
        "never expired"
    );
}

// ---------------------------------------------------------------------------------------------
// Confidential and authentic
// ---------------------------------------------------------------------------------------------

/// Someone who can write Redis but lacks the merchant credentials cannot plant a balance: a
/// tampered entry, and a genuine entry moved onto another customer's key, are misses (counted),
/// never served; the token is stored encrypted, and one that does not decrypt is not used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_and_moved_entries_and_tokens_are_never_used() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let writer = fleet.replica().await;
    writer.balance("REAL").await;
    let client = redis::Client::open(redis.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let key = |code: &str| format!("bill24gw:demo-client:{{{}}}:entry", hex::encode(code));
    let genuine: Vec<u8> = redis::cmd("GET")
        .arg(key("REAL"))
        .query_async(&mut con)
        .await
        .expect("stored");
    // Moved onto another customer's key.
    let _: () = redis::cmd("SET")
        .arg(key("VICTIM"))
        .arg(&genuine)
        .query_async(&mut con)
        .await
        .expect("set");
    // Tampered in place: the balance's digits changed.
    let text = String::from_utf8_lossy(&genuine).replace("\"balance\":", "\"balance\":9");
    let _: () = redis::cmd("SET")
        .arg(key("REAL"))
        .arg(text.as_bytes())
        .query_async(&mut con)
        .await
        .expect("set");
    // The token, readable by anyone with Redis access, is ciphertext.
    let token: Vec<u8> = redis::cmd("GET")
        .arg("bill24gw:demo-client:token")
        .query_async(&mut con)
        .await
        .expect("token stored");
    assert!(
        !String::from_utf8_lossy(&token).contains("eyJ"),
        "encrypted"
    );

    let reader = fleet.replica().await;
    let sim = fleet.sim.handle();
    for code in ["VICTIM", "REAL"] {
        let r = reader.balance(code).await;
        assert_eq!((r.status, r.x_cache()), (StatusCode::OK, "MISS"), "{code}");
        assert_eq!(
            sim.balance_calls_for(code),
            if code == "REAL" { 2 } else { 1 }
        );
    }
    assert!(
        reader
            .metric(r#"gateway_redis_requests_total{op="get",result="rejected"}"#)
            .await
            >= 2.0
    );

    // A token blob that does not decrypt: a new replica buys its own.
    let _: () = redis::cmd("SET")
        .arg("bill24gw:demo-client:token")
        .arg(b"\x01not-a-token".as_slice())
        .query_async(&mut con)
        .await
        .expect("set");
    let before = sim.authorize_calls();
    let late = fleet.replica().await;
    assert_eq!(late.balance("AFTER").await.status, StatusCode::OK);
    assert_eq!(sim.authorize_calls(), before + 1);
}

// ---------------------------------------------------------------------------------------------
// Purge
// ---------------------------------------------------------------------------------------------

/// `DELETE /cache/{code}` and `DELETE /cache` on one replica reach every replica's copies
/// within a second, and the entries in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purges_are_fleet_wide() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    for r in [&a, &b] {
        r.balance("P1").await;
        r.balance("P2").await;
        assert_eq!(r.balance("P1").await.x_cache(), "HIT");
    }
    let sim = fleet.sim.handle();
    assert_eq!(sim.balance_calls_for("P1"), 1);

    assert_eq!(
        delete(a.admin, "/cache/P1").await.status,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        b.balance("P1").await.x_cache(),
        "MISS",
        "gone on the other replica"
    );
    assert_eq!(sim.balance_calls_for("P1"), 2, "and in Redis");
    assert_eq!(b.balance("P2").await.x_cache(), "HIT", "only that customer");

    assert_eq!(
        delete(b.admin, "/cache").await.status,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.balance("P2").await.x_cache(), "MISS");
    assert_eq!(
        sim.balance_calls_for("P2"),
        2,
        "everything gone, Redis included"
    );
}

// ---------------------------------------------------------------------------------------------
// Redis is never a single point of failure
// ---------------------------------------------------------------------------------------------

/// Redis killed: requests are answered as without Redis, `gateway_redis_up` turns 0, and a
/// dead Redis is not asked on every request. Back (empty, same port): the tier resumes by
/// itself and entries are shared again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_then_back() {
    let mut redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    a.balance("K0").await;
    assert_eq!(b.balance("K0").await.x_cache(), "HIT");
    redis.kill();
    for i in 0..30 {
        let r = a.balance(&format!("DOWN{i}")).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    until_metric(&a, "gateway_redis_up", |v| v == 0.0).await;
    let calls_before = a
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_redis_requests_total{op=\"get\""))
        .filter(|l| !l.contains("skipped"))
        .map(|l| metric_value(l, l.split(' ').next().unwrap_or_default()))
        .sum::<f64>();
    for i in 0..30 {
        assert_eq!(
            a.balance(&format!("DOWN-MORE{i}")).await.status,
            StatusCode::OK
        );
    }
    let calls_after = a
        .metrics()
        .await
        .lines()
        .filter(|l| l.starts_with("gateway_redis_requests_total{op=\"get\""))
        .filter(|l| !l.contains("skipped"))
        .map(|l| metric_value(l, l.split(' ').next().unwrap_or_default()))
        .sum::<f64>();
    assert!(
        calls_after - calls_before <= 2.0,
        "a dead Redis is not asked per request: {calls_before} -> {calls_after}"
    );
    redis.restart();
    until_metric(&a, "gateway_redis_up", |v| v == 1.0).await;
    until_metric(&b, "gateway_redis_up", |v| v == 1.0).await;
    a.balance("BACK").await;
    assert_eq!(b.balance("BACK").await.x_cache(), "HIT", "shared again");
    assert_eq!(fleet.sim.handle().balance_calls_for("BACK"), 1);
}

/// Redis stopped (SIGSTOP: connections open, no answers): requests are answered, none later
/// than `redis.timeout` plus the usual; once it runs again the tier resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stalled_costs_at_most_its_timeout() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "redis.timeout = \"100ms\"").await;
    let a = fleet.replica().await;
    a.balance("S0").await;
    redis.signal("STOP");
    let mut slowest = Duration::ZERO;
    for i in 0..20 {
        let start = Instant::now();
        let r = a.balance(&format!("STALL{i}")).await;
        slowest = slowest.max(start.elapsed());
        assert_eq!(r.status, StatusCode::OK);
    }
    // Each Redis call is cut at 100 ms, and a miss makes at most three before the tier is
    // marked down (read, lock); generous room for a loaded machine.
    assert!(slowest < Duration::from_secs(2), "slowest {slowest:?}");
    until_metric(&a, "gateway_redis_up", |v| v == 0.0).await;
    redis.signal("CONT");
    until_metric(&a, "gateway_redis_up", |v| v == 1.0).await;
}

/// A wrong password and a full Redis (writes refused) are survived the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_and_full_redis_are_survived() {
    let locked = Redis::start_with(
        &["--requirepass", "right"],
        &["-a", "right", "--no-auth-warning"],
    );
    let fleet = Fleet::new(vec![locked.url()], "redis.password = \"wrong\"").await;
    let a = fleet.replica().await;
    for i in 0..5 {
        assert_eq!(a.balance(&format!("PW{i}")).await.status, StatusCode::OK);
    }
    until_metric(&a, "gateway_redis_up", |v| v == 0.0).await;
    // Never in the fleet, and it says so (once), without the password.
    let line = a
        .running()
        .wait_for_line("shared tier (Redis) is failing")
        .await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert!(line.to_lowercase().contains("password"), "{line}");
    assert!(!line.contains("\"wrong\""), "{line}");
    assert!(
        !a.running().output().iter().any(|l| l.contains("answering")),
        "never said to be answering"
    );

    let full = Redis::start(&["--maxmemory", "1mb", "--maxmemory-policy", "noeviction"]);
    // Filled with someone else's data up to its limit.
    let client = redis::Client::open(full.url()).expect("client");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let chunk = vec![b'x'; 64 * 1024];
    for i in 0..64 {
        let r: Result<(), _> = redis::cmd("SET")
            .arg(format!("other:{i}"))
            .arg(&chunk)
            .query_async(&mut con)
            .await;
        if r.is_err() {
            break;
        }
    }
    let fleet = Fleet::new(vec![full.url()], "").await;
    let b = fleet.replica().await;
    for i in 0..20 {
        assert_eq!(b.balance(&format!("FULL{i}")).await.status, StatusCode::OK);
    }
    // Redis answers, but refuses writes: the tier stays up (no flapping), said once.
    let line = b.running().wait_for_line("refuses writes").await;
    assert!(line.contains("\"level\":\"WARN\""), "{line}");
    assert_eq!(b.metric("gateway_redis_up").await, 1.0);
    let output = b.running().output();
    let count = |needle: &str| output.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("refuses writes"), 1, "{output:?}");
    assert_eq!(count("is failing"), 0, "{output:?}");
}

// ---------------------------------------------------------------------------------------------
// TLS, ACL users, Redis Cluster
// ---------------------------------------------------------------------------------------------

/// A test CA and a certificate for 127.0.0.1 and localhost signed by it, as PEM files.
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let pki = tls::Pki::new("bill24-gateway test CA");
    let leaf = pki.leaf(&["localhost", "127.0.0.1"], tls::Usage::Server, false);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write");
        path
    };
    (
        write("ca.pem", &pki.ca_pem),
        write("cert.pem", &leaf.cert),
        write("key.pem", &leaf.key),
    )
}

/// `rediss://` with an ACL user: the tier works over TLS (the test CA trusted through
/// `SSL_CERT_FILE`), with the user and password from the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_and_acl_users_work() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (ca, cert, key) = tls_files(certs.path());
    let (ca, cert, key) = (
        ca.to_string_lossy().into_owned(),
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let redis = Redis::start_conf(
        &format!(
            "tls-port {{port}}\ntls-cert-file {cert}\ntls-key-file {key}\n\
             tls-ca-cert-file {ca}\ntls-auth-clients no\n\
             user gateway on >s3cret-acl ~bill24gw:* &* +@all\nuser default off\n"
        ),
        &[],
        &[
            "--tls",
            "--cacert",
            &ca,
            "--user",
            "gateway",
            "--pass",
            "s3cret-acl",
            "--no-auth-warning",
        ],
    );
    let url = format!("rediss://127.0.0.1:{}", redis.port);
    let mut fleet = Fleet::new(
        vec![url],
        "redis.username = \"gateway\"\nredis.password = \"s3cret-acl\"",
    )
    .await;
    fleet.envs.push(("SSL_CERT_FILE".into(), ca.clone()));
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    // The TLS handshakes may take longer than a first request's wait on a loaded machine
    // (that request then goes on without the tier): share once both are on it.
    until_metric(&a, "gateway_redis_up", |v| v == 1.0).await;
    until_metric(&b, "gateway_redis_up", |v| v == 1.0).await;
    a.balance("TLS1").await;
    let r = b.balance("TLS1").await;
    assert_eq!(
        r.x_cache(),
        "HIT",
        "shared over TLS: {} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(fleet.sim.handle().balance_calls_for("TLS1"), 1);
    assert_eq!(fleet.sim.handle().authorize_calls(), 1);
    let output = a.running().output().join("\n");
    assert!(!output.contains("s3cret-acl"), "no password in the logs");
}

/// A 3-master Redis Cluster: entries, the token and purges are shared as with one node, and
/// different customers' keys spread over the slots (the hash tag is the customer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_shares_entries_token_and_purges() {
    let cluster = Cluster::start();
    let fleet = Fleet::new(cluster.urls(), "").await;
    let replicas = Arc::new(fleet.replicas(3).await);
    let sim = fleet.sim.handle();
    for i in 0..20 {
        replicas[0].balance(&format!("C{i}")).await;
    }
    for i in 0..20 {
        let r = replicas[1].balance(&format!("C{i}")).await;
        assert_eq!(r.x_cache(), "HIT", "C{i}");
    }
    assert_eq!(sim.balance_calls(), 20);
    assert_eq!(sim.authorize_calls(), 1, "one token for the fleet");
    // Every master holds some of the entries.
    for node in &cluster.nodes {
        let keys = node.cli(&["KEYS", "bill24gw:*:entry"]);
        assert!(keys.lines().count() >= 1, "{} holds no entry", node.port);
    }
    // A stampede across replicas and slots.
    sim.set_latency(Duration::from_millis(200));
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let replicas = replicas.clone();
            tokio::spawn(async move { replicas[i % 3].balance("CLUSTER-COLD").await })
        })
        .collect();
    for r in requests {
        assert_eq!(r.await.expect("request").status, StatusCode::OK);
    }
    assert_eq!(sim.balance_calls_for("CLUSTER-COLD"), 1);
    sim.set_latency(Duration::ZERO);
    // A purge on one replica, seen by another.
    assert_eq!(
        delete(replicas[2].admin, "/cache/C3").await.status,
        StatusCode::NO_CONTENT
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(replicas[1].balance("C3").await.x_cache(), "MISS");
}

/// `--check-config` in `dir` with `toml` as the config file.
fn check_config(dir: &Path, toml: &str) -> std::process::Output {
    std::fs::write(dir.join("gw.toml"), toml).expect("write");
    Command::new(BIN)
        .args(["--check-config", "--config", "gw.toml"])
        .current_dir(dir)
        .output()
        .expect("runs")
}

/// `--check-config` shows `[redis]` with its password, and the credentials in a URL,
/// `[redacted]`; a bad URL, or a brace in a part of the key names, is refused naming the key.
#[test]
fn check_config_redacts_redis_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("redis-password"), "pw-from-file\n").expect("write");
    let printed = |toml: &str| {
        let out = check_config(dir.path(), toml);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let text = printed(
        "[upstream]\nclient_id = \"c\"\n[redis]\nurls = [\"redis://user:url-secret@10.0.0.5:6379\", \
         \"rediss://only-secret@10.0.0.6:6379/0\"]\n",
    );
    assert!(
        !text.contains("url-secret") && !text.contains("only-secret"),
        "{text}"
    );
    assert!(
        text.contains("redis://user:[redacted]@10.0.0.5:6379"),
        "{text}"
    );
    assert!(
        text.contains("rediss://[redacted]@10.0.0.6:6379/0"),
        "{text}"
    );
    let text = printed(
        "[upstream]\nclient_id = \"c\"\n[redis]\nurls = [\"redis://10.0.0.5:6379\"]\n\
         password_file = \"redis-password\"\nusername = \"gw\"\n",
    );
    assert!(!text.contains("pw-from-file"), "{text}");
    assert!(
        text.contains("password_file = \"redis-password\""),
        "{text}"
    );

    for (toml, key) in [
        (
            "[upstream]\nclient_id = \"c\"\n[redis]\nurls = [\"http://x\"]\n",
            "redis.urls[0]",
        ),
        (
            "[upstream]\nclient_id = \"c{x}\"\n[redis]\nurls = [\"redis://x:1\"]\n",
            "upstream.client_id",
        ),
        (
            "[upstream]\nclient_id = \"c\"\n[redis]\nurls = [\"redis://x:1\"]\nkey_prefix = \"a b\"\n",
            "redis.key_prefix",
        ),
        (
            "[upstream]\nclient_id = \"c\"\n[redis]\nurls = [\"redis://:p@x:1\"]\npassword = \"q\"\n",
            "redis.urls[0]",
        ),
    ] {
        let out = check_config(dir.path(), toml);
        assert!(!out.status.success(), "{toml}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{toml}: {err}");
        assert!(!err.contains(":p@"), "no password in the message: {err}");
    }
}

// ---------------------------------------------------------------------------------------------
// Faults under load
// ---------------------------------------------------------------------------------------------

/// One answer of a load run.
struct Answered {
    status: StatusCode,
    took: Duration,
    /// When it was sent, from the start of the run.
    sent: Duration,
    code: String,
}

/// `workers` concurrent callers asking `customers` codes (the low ones most) over every
/// replica until `stop` is set; every answer.
fn load(
    replicas: Arc<Vec<Replica>>,
    customers: usize,
    workers: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Answered>> {
    tokio::spawn(async move {
        let start = Instant::now();
        let tasks: Vec<_> = (0..workers)
            .map(|w| {
                let (replicas, stop) = (replicas.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut answers = Vec::new();
                    let mut n = w as u64 * 7919;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        // Skewed: the square of a uniform draw favours the low codes.
                        let u = (n >> 33) as f64 / (1u64 << 31) as f64;
                        let code = format!("LOAD{}", (u * u * customers as f64) as usize);
                        let replica = &replicas[(n >> 20) as usize % replicas.len()];
                        let sent = start.elapsed();
                        let begun = Instant::now();
                        let r = replica.balance(&code).await;
                        answers.push(Answered {
                            status: r.status,
                            took: begun.elapsed(),
                            sent,
                            code,
                        });
                    }
                    answers
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("worker"));
        }
        all
    })
}

/// Every answer a 200 within `bound`; the offenders listed otherwise.
fn assert_all_answered(answers: &[Answered], bound: Duration, what: &str) {
    assert!(
        answers.len() > 50,
        "{what}: only {} requests",
        answers.len()
    );
    let bad: Vec<String> = answers
        .iter()
        .filter(|a| a.status != StatusCode::OK || a.took > bound)
        .map(|a| {
            format!(
                "{} {} in {:?} sent at {:?}",
                a.code, a.status, a.took, a.sent
            )
        })
        .collect();
    let slowest = answers.iter().map(|a| a.took).max().unwrap_or_default();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} requests failed or took longer than {bound:?} (slowest {slowest:?}): {:?}",
        bad.len(),
        answers.len(),
        &bad[..bad.len().min(10)]
    );
}

/// Fill locks left in a Redis node, with their remaining time (ms).
fn fill_locks(node: &Redis) -> Vec<(String, i64)> {
    node.cli(&["--scan", "--pattern", "bill24gw:*:fill"])
        .lines()
        .filter(|l| !l.is_empty())
        .map(|key| {
            let ttl = node.cli(&["PTTL", key]).trim().parse().unwrap_or(-3);
            (key.to_string(), ttl)
        })
        .collect()
}

/// Warms every replica's token, then runs the load around `fault`: all answers 200, none
/// slower than Bill24's latency twice (a wait, then an own call), `redis.timeout` and room
/// for a loaded machine; and no fill lock outlives its fill.
async fn survives_under_load(
    redis: &Redis,
    extra: &str,
    fault: impl AsyncFnOnce(&Redis),
) -> Vec<Answered> {
    let fleet = Fleet::new(vec![redis.url()], extra).await;
    let replicas = Arc::new(fleet.warm_replicas(3).await);
    fleet.sim.handle().set_latency(Duration::from_millis(50));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = load(replicas.clone(), 300, 12, stop.clone());
    real_sleep(Duration::from_millis(700)).await;
    fault(redis).await;
    // Requests after the fault, to the customers whose locks its late commands may have set
    // (a leaked lock also shows in Redis, below).
    real_sleep(Duration::from_millis(900)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = running.await.expect("load");
    assert_all_answered(&answers, Duration::from_millis(1_200), "under the fault");
    real_sleep(Duration::from_millis(400)).await;
    let left = fill_locks(redis);
    assert!(left.is_empty(), "fill locks outlived their fills: {left:?}");
    // The tier is back: a new customer is shared again.
    until_metric(&replicas[0], "gateway_redis_up", |v| v == 1.0).await;
    until_metric(&replicas[1], "gateway_redis_up", |v| v == 1.0).await;
    replicas[0].balance("AFTER").await;
    assert_eq!(replicas[1].balance("AFTER").await.x_cache(), "HIT");
    answers
}

/// `CLIENT PAUSE` (900 ms, eighteen times `redis.timeout`) under load: the `SET NX` a replica
/// gave up on runs when Redis resumes, and must not leave a lock that makes the customer's
/// next requests wait (they used to get 504 after 10 s, for up to 12 s after the resume).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_under_load_answers_everything_and_leaks_no_lock() {
    let redis = Redis::start(&[]);
    survives_under_load(&redis, "cache.ttl = \"1s\"", async |redis: &Redis| {
        assert_eq!(redis.cli(&["CLIENT", "PAUSE", "900", "ALL"]).trim(), "OK");
        real_sleep(Duration::from_millis(900)).await;
    })
    .await;
}

/// SIGSTOP for 900 ms under load, then SIGCONT: as for a pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_under_load_answers_everything_and_leaks_no_lock() {
    let redis = Redis::start(&[]);
    survives_under_load(&redis, "cache.ttl = \"1s\"", async |redis: &Redis| {
        redis.signal("STOP");
        real_sleep(Duration::from_millis(900)).await;
        redis.signal("CONT");
    })
    .await;
}

/// Replica B waits for A's fill when Redis is killed: B stops waiting at once (the tier is
/// down) and makes its own call, rather than waiting for a message that cannot come.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_are_released_when_redis_dies() {
    let mut redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "upstream.retries = 0").await;
    let (a, b) = (
        Arc::new(fleet.replica().await),
        Arc::new(fleet.replica().await),
    );
    a.balance("warm-up-a").await;
    b.balance("warm-up-b").await;
    let sim = fleet.sim.handle();
    sim.set_latency(Duration::from_secs(1));
    let on_a = tokio::spawn({
        let a = a.clone();
        async move { a.balance("X").await }
    });
    assert!(eventually(Duration::from_secs(5), || sim.balance_calls_for("X") == 1).await);
    real_sleep(Duration::from_millis(150)).await;
    let waiting: Vec<_> = (0..2)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move {
                let start = Instant::now();
                (b.balance("X").await, start.elapsed())
            })
        })
        .collect();
    real_sleep(Duration::from_millis(250)).await;
    assert_eq!(sim.balance_calls_for("X"), 1, "B waits for A's fill");
    redis.kill();
    assert_eq!(on_a.await.expect("a").status, StatusCode::OK);
    for w in waiting {
        let (reply, took) = w.await.expect("b");
        assert_eq!(reply.status, StatusCode::OK);
        // 250 ms of waiting, then its own 1 s call: not a request's whole timeout.
        assert!(took < Duration::from_millis(2_300), "took {took:?}");
    }
    assert_eq!(
        sim.balance_calls_for("X"),
        2,
        "B's own call, shared by both of its requests"
    );
}

/// A 6-node Cluster (3 masters, 3 replicas) with one master killed under load: answered
/// while the replica is promoted and after, with no lock left behind on the new master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_master_killed_under_load_is_survived() {
    let mut cluster = Cluster::with_replicas(1);
    let fleet = Fleet::new(cluster.urls(), "cache.ttl = \"1s\"").await;
    let replicas = Arc::new(fleet.warm_replicas(3).await);
    fleet.sim.handle().set_latency(Duration::from_millis(50));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let running = load(replicas.clone(), 300, 12, stop.clone());
    real_sleep(Duration::from_millis(700)).await;
    let master = cluster
        .nodes
        .iter()
        .position(|n| n.cli(&["ROLE"]).starts_with("master"))
        .expect("a master");
    cluster.nodes[master].kill();
    let survivors: Vec<&Redis> = cluster
        .nodes
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != master)
        .map(|(_, n)| n)
        .collect();
    // Promoted: three masters among the survivors, and the cluster ok again.
    let deadline = Instant::now() + Duration::from_secs(20);
    while survivors
        .iter()
        .filter(|n| n.cli(&["ROLE"]).starts_with("master"))
        .count()
        < 3
        || !survivors
            .iter()
            .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
    {
        assert!(Instant::now() < deadline, "no replica was promoted");
        real_sleep(Duration::from_millis(100)).await;
    }
    // Requests to the new master, and to the customers whose locks the failover may have left.
    real_sleep(Duration::from_millis(900)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = running.await.expect("load");
    assert_all_answered(&answers, Duration::from_millis(1_200), "master killed");
    real_sleep(Duration::from_millis(400)).await;
    for node in survivors {
        let left = fill_locks(node);
        assert!(
            left.is_empty(),
            "fill locks left on {}: {left:?}",
            node.port
        );
    }
}

/// With Redis down, each replica refreshes its token on its own: never with the refresh token
/// the fleet shared (single-use: presenting it twice can revoke the whole family).
#[tokio::test(start_paused = true)]
async fn no_refresh_token_is_presented_twice_while_redis_is_down() {
    let clock = Frozen::start();
    let mut redis = Redis::frozen(&clock);
    let sim = SimConfig {
        token_lifetime: Duration::from_secs(3),
        ..SimConfig::default()
    };
    let fleet = Fleet::with_sim(sim, vec![redis.url()], "").await.on(&clock);
    let replicas = fleet.warm_replicas(3).await;
    let handle = fleet.sim.handle();
    assert_eq!(handle.authorize_calls(), 1, "one token for the fleet");
    redis.kill();
    // Two refreshes' worth (at half the token's life), with traffic.
    let until = Instant::now() + Duration::from_millis(3_500);
    let mut i = 0;
    while Instant::now() < until {
        for r in &replicas {
            let reply = clock.run(r.balance(&format!("DOWN{i}"))).await;
            assert_eq!(reply.status, StatusCode::OK);
            i += 1;
        }
        clock.advance(Duration::from_millis(100)).await;
    }
    assert_eq!(
        handle.stats().reused_refresh_tokens,
        0,
        "a refresh token presented twice"
    );
    assert!(
        handle.authorize_calls() > 1,
        "the replicas did renew their tokens"
    );
}

/// A storm of `purge-all` messages on the fleet's channel (anyone who may publish there can
/// send them) costs one epoch read per 20 ms at most, not one a message; a real `DELETE /cache`
/// in the storm still reaches the other replica at once.
#[tokio::test(start_paused = true)]
async fn a_storm_of_purge_messages_costs_few_epoch_reads() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], "").await.on(&clock);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    a.balance("STORM").await;
    assert_eq!(b.balance("STORM").await.x_cache(), "HIT");
    let reads = r#"gateway_redis_requests_total{op="epoch",result="ok"}"#;
    let before = b.metric(reads).await;
    let mut conn = redis::Client::open(redis.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let channel = format!("bill24gw:{}:events", bill24_sim::DEMO_CLIENT_ID);
    let mut storm = redis::pipe();
    for _ in 0..20_000 {
        storm.cmd("PUBLISH").arg(&channel).arg("purge-all").ignore();
    }
    clock
        .run(storm.query_async::<()>(&mut conn))
        .await
        .expect("published");
    clock.advance(Duration::from_millis(500)).await;
    let storm_reads = b.metric(reads).await - before;
    assert!(
        storm_reads <= 500.0 / 20.0 + 2.0,
        "{storm_reads} epoch reads in 500 ms of 20 000 messages"
    );
    assert!(storm_reads >= 1.0, "the messages were heard");
    assert_eq!(b.balance("STORM").await.x_cache(), "HIT", "nothing purged");
    clock
        .run(storm.query_async::<()>(&mut conn))
        .await
        .expect("published");
    assert_eq!(
        delete(a.admin, "/cache").await.status,
        StatusCode::NO_CONTENT
    );
    clock.advance(Duration::from_millis(50)).await;
    assert_eq!(b.balance("STORM").await.x_cache(), "MISS", "the real purge");
}

/// `DELETE /cache` is honoured by a replica started after it (it reads the epoch before it
/// uses an entry) and after Redis restarts empty (the epoch is a value Redis holds, not a
/// count that starts again at 1).
#[tokio::test(start_paused = true)]
async fn purge_epochs_survive_a_late_replica_and_an_empty_redis() {
    let clock = Frozen::start();
    let mut redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], "").await.on(&clock);
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let sim = fleet.sim.handle();
    sim.set_balance("E1", 100);
    assert_eq!(a.balance("E1").await.json()["data"][0]["balance"], 100);
    sim.set_balance("E1", 200);
    assert_eq!(
        delete(a.admin, "/cache").await.status,
        StatusCode::NO_CONTENT
    );
    // (a) started after the purge.
    let late = fleet.replica().await;
    let r = late.balance("E1").await;
    assert_eq!(r.json()["data"][0]["balance"], 200, "no pre-purge answer");
    assert_eq!(r.x_cache(), "MISS");
    let r = a.balance("E1").await;
    assert_eq!(
        (r.x_cache(), r.json()["data"][0]["balance"].clone()),
        ("HIT", 200.into())
    );
    assert_eq!(
        sim.balance_calls_for("E1"),
        2,
        "the late replica's fill is shared"
    );

    // (b) Redis restarted empty, then a purge.
    redis.restart();
    let all = [a, b, late];
    clock
        .advance_until(Duration::from_secs(5), "back on Redis", async || {
            all_at(&all, "gateway_redis_up", 1.0).await
        })
        .await;
    let [a, b, late] = all;
    clock.advance(Duration::from_millis(300)).await;
    for r in [&a, &b, &late] {
        assert_eq!(r.balance("E1").await.json()["data"][0]["balance"], 200);
    }
    sim.set_balance("E1", 300);
    assert_eq!(
        delete(b.admin, "/cache").await.status,
        StatusCode::NO_CONTENT
    );
    clock.advance(Duration::from_millis(300)).await;
    for r in [&a, &b, &late] {
        let reply = r.balance("E1").await;
        assert_eq!(
            reply.json()["data"][0]["balance"],
            300,
            "a pre-purge answer ({}) after Redis restarted empty",
            reply.x_cache()
        );
    }
}

/// Purging other customers, again and again and 400 different ones, does not throw away
/// other customers' fills in flight: they are stored and answer as HITs afterwards, at one
/// Bill24 call each. (A purge remembered by a hash of its code in a fixed table would hit
/// one of these ten fills nearly every run.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_one_code_keeps_other_codes_fills() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let (a, b) = (Arc::new(fleet.replica().await), fleet.replica().await);
    a.balance("warm-up").await;
    let sim = fleet.sim.handle();
    sim.set_latency(Duration::from_millis(1_500));
    let fills: Vec<_> = (0..10)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.balance(&format!("F{i}")).await })
        })
        .collect();
    real_sleep(Duration::from_millis(100)).await;
    for _ in 0..5 {
        assert_eq!(
            delete(b.admin, "/cache/UNRELATED").await.status,
            StatusCode::NO_CONTENT
        );
        real_sleep(Duration::from_millis(40)).await;
    }
    let purges: Vec<_> = (0..8)
        .map(|lane| {
            let admin = b.admin;
            tokio::spawn(async move {
                for i in 0..50 {
                    let path = format!("/cache/OTHER-{lane}-{i}");
                    assert_eq!(delete(admin, &path).await.status, StatusCode::NO_CONTENT);
                }
            })
        })
        .collect();
    for p in purges {
        p.await.expect("purges");
    }
    assert!(
        fills.iter().all(|f| !f.is_finished()),
        "every purge came while the fills were in flight"
    );
    for f in fills {
        assert_eq!(f.await.expect("fill").status, StatusCode::OK);
    }
    sim.set_latency(Duration::ZERO);
    for i in 0..10 {
        let code = format!("F{i}");
        assert_eq!(a.balance(&code).await.x_cache(), "HIT", "{code} on A");
        assert_eq!(b.balance(&code).await.x_cache(), "HIT", "{code} on B");
        assert_eq!(sim.balance_calls_for(&code), 1, "{code}");
    }
}

const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// One replica's clock 5 s ahead and another's 5 s behind (libfaketime): no replica serves a
/// hit older than the TTL, and every `Age` is the answer's true age. The fleet's time is
/// Redis's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clock_skew_changes_no_answer_age() {
    assert!(
        Path::new(LIBFAKETIME).exists(),
        "libfaketime is installed (apt install faketime)"
    );
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(
        vec![redis.url()],
        "cache.ttl = \"2s\"\ncache.ttl_jitter = 0.0\ncache.refresh_ahead = \"0s\"",
    )
    .await;
    let skewed = |offset: &'static str| {
        [
            ("LD_PRELOAD", LIBFAKETIME),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("DONT_FAKE_MONOTONIC", "1"),
        ]
    };
    let replicas = [
        fleet.replica().await,
        fleet.replica_with_env(&skewed("+5s")).await,
        fleet.replica_with_env(&skewed("-5s")).await,
    ];
    let sim = fleet.sim.handle();
    // The balance Bill24 answers is the test's clock, in ms: an answer's true age is now minus
    // its balance.
    let start = Instant::now();
    let ms = move || start.elapsed().as_millis() as i64;
    let ttl = 2_000;
    let mut served = 0;
    let mut hits = 0;
    while ms() < 7_000 {
        for (i, r) in replicas.iter().enumerate() {
            sim.set_balance("SKEW", ms());
            let reply = r.balance("SKEW").await;
            assert_eq!(reply.status, StatusCode::OK);
            let fetched_at = reply.json()["data"][0]["balance"]
                .as_i64()
                .expect("balance");
            let true_age = ms() - fetched_at;
            served += 1;
            if reply.x_cache() != "HIT" {
                continue;
            }
            hits += 1;
            assert!(
                true_age <= ttl + 150,
                "replica {i} served a hit {true_age} ms old (ttl {ttl} ms)"
            );
            let age: i64 = reply.header("age").expect("Age").parse().expect("number");
            assert!(
                (age - true_age / 1000).abs() <= 1,
                "replica {i}: Age {age} for an answer {true_age} ms old"
            );
        }
        real_sleep(Duration::from_millis(50)).await;
    }
    assert!(hits > served / 2, "{hits} hits of {served}");
    // About one call per TTL for the fleet: the skewed replicas take their share from Redis.
    let calls = sim.balance_calls_for("SKEW");
    assert!(calls <= 7, "{calls} Bill24 calls in 7 s at a 2 s TTL");
}

// ---------------------------------------------------------------------------------------------
// The fleet's limits in bad times (CONTRACT §13)
// ---------------------------------------------------------------------------------------------

/// How long a caller of [`cold_traffic`] waits between an answer and its next request.
const PACE: Duration = Duration::from_millis(50);

/// `workers` callers asking a new customer each time ([`PACE`] after the last answer) over
/// every replica for `run` of the frozen clock (moved as the callers wait); the Bill24 balance
/// calls the simulator saw meanwhile, every status, and how long it took (to the last answer).
async fn cold_traffic(
    clock: &Frozen,
    fleet: &Fleet,
    replicas: &Arc<Vec<Replica>>,
    workers: usize,
    run: Duration,
    tag: &str,
) -> (u64, Vec<StatusCode>, Duration) {
    let sim = fleet.sim.handle();
    let before = sim.balance_calls();
    let start = Instant::now();
    let tasks: Vec<_> = (0..workers)
        .map(|w| {
            let replicas = replicas.clone();
            let tag = tag.to_string();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = 0;
                while start.elapsed() < run {
                    let r = replicas[(w + i) % replicas.len()]
                        .balance(&format!("{tag}-{w}-{i}"))
                        .await;
                    statuses.push(r.status);
                    i += 1;
                    // An answer that takes no time (an open circuit's) does not make the
                    // caller spin without the clock moving.
                    tokio::time::sleep(PACE).await;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in clock.run(futures_util::future::join_all(tasks)).await {
        statuses.extend(t.expect("worker"));
    }
    let took = start.elapsed();
    (sim.balance_calls() - before, statuses, took)
}

/// `upstream.fleet_max_rps = 20` over three replicas: cold traffic over many customers stays
/// within `20 × T + 20` Bill24 calls, every request answered (waiting its turn); the same
/// traffic without the ceiling makes several times more.
#[tokio::test(start_paused = true)]
async fn one_ceiling_on_bill24_calls_for_the_fleet() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let capped = Fleet::new(
        vec![redis.url()],
        "upstream.fleet_max_rps = 20\nupstream.queue_timeout = \"10s\"",
    )
    .await
    .on(&clock);
    let replicas = Arc::new(capped.warm_replicas(3).await);
    // Past the warm-ups' share of the burst.
    clock.advance(Duration::from_millis(1_100)).await;
    // Each call takes Bill24 50 ms, so a caller's rate does not depend on the machine's speed.
    capped.sim.handle().set_latency(Duration::from_millis(50));
    let three_seconds = Duration::from_secs(3);
    let (calls, statuses, took) =
        cold_traffic(&clock, &capped, &replicas, 12, three_seconds, "CAP").await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    let bound = 20.0 * took.as_secs_f64() + 20.0;
    assert!(
        (calls as f64) <= bound,
        "{calls} Bill24 calls in {took:?} (bound {bound})"
    );
    assert!(calls >= 40, "the ceiling is a rate, not a stop: {calls}");
    let waits = replicas[0]
        .metric("gateway_fleet_limit_wait_seconds_count")
        .await;
    assert!(waits > 0.0, "waits are measured");

    let free = Fleet::new(vec![redis.url()], "redis.key_prefix = \"free\"")
        .await
        .on(&clock);
    let others = Arc::new(free.warm_replicas(3).await);
    free.sim.handle().set_latency(Duration::from_millis(50));
    let (uncapped, _, _) =
        cold_traffic(&clock, &free, &others, 12, Duration::from_secs(3), "FREE").await;
    assert!(
        uncapped >= 3 * calls,
        "without the ceiling: {uncapped} calls, with it: {calls}"
    );
}

/// Over the ceiling, requests wait in line no longer than `upstream.queue_timeout`; past it
/// they get 503 `upstream_busy` with `Retry-After`.
#[tokio::test(start_paused = true)]
async fn past_the_queue_timeout_the_ceiling_answers_upstream_busy() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(
        vec![redis.url()],
        "upstream.fleet_max_rps = 5\nupstream.queue_timeout = \"200ms\"\nupstream.retries = 0",
    )
    .await
    .on(&clock);
    let (a, b) = (
        Arc::new(fleet.replica().await),
        Arc::new(fleet.replica().await),
    );
    a.balance("warm-up-a").await;
    b.balance("warm-up-b").await;
    clock.advance(Duration::from_millis(1_100)).await;
    let before = fleet.sim.handle().balance_calls();
    let requests: Vec<_> = (0..30)
        .map(|i| {
            let r = if i % 2 == 0 { a.clone() } else { b.clone() };
            tokio::spawn(async move { r.balance(&format!("BUSY{i}")).await })
        })
        .collect();
    let mut ok = 0;
    for reply in clock.run(futures_util::future::join_all(requests)).await {
        let reply = reply.expect("request");
        match reply.status {
            StatusCode::OK => ok += 1,
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(reply.error_code(), "upstream_busy");
                assert!(reply.header("retry-after").is_some());
            }
            other => panic!("{other}"),
        }
    }
    // A burst of 5, then one each 200 ms: one more within the queue timeout (a little
    // more if the requests' arrivals spread).
    assert!((6..=8).contains(&ok), "{ok} answered");
    assert_eq!(ok, 6, "on a frozen clock the arrivals do not spread");
    assert_eq!(fleet.sim.handle().balance_calls() - before, ok);
}

/// One circuit for the fleet: an outage over three replicas costs about `circuit_failures +
/// D / circuit_cooldown` Bill24 calls rather than three times that, and a replica that never
/// saw a failure answers `circuit_open` within 100 ms of the first opening.
#[tokio::test(start_paused = true)]
async fn one_circuit_for_the_fleet() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let settings = "upstream.circuit_failures = 3\nupstream.circuit_cooldown = \"1s\"\n\
                    upstream.retries = 0";
    // The calls of an outage: in all, and after its first 600 ms (once the circuits opened:
    // the probes).
    let outage = async |fleet: &Fleet, replicas: &Arc<Vec<Replica>>, tag: &str| {
        let sim = fleet.sim.handle();
        sim.set_latency(Duration::from_millis(30));
        sim.set_balance_fault(Some(Fault::Status(500)));
        let start = sim.balance_calls();
        let mark = tokio::spawn({
            let sim = fleet.sim.handle();
            async move {
                tokio::time::sleep(Duration::from_millis(600)).await;
                sim.balance_calls()
            }
        });
        let (calls, statuses, _) = cold_traffic(
            &clock,
            fleet,
            replicas,
            6,
            Duration::from_millis(4_600),
            tag,
        )
        .await;
        let opened = mark.await.expect("mark");
        sim.set_balance_fault(None);
        sim.set_latency(Duration::ZERO);
        assert!(statuses.iter().all(|s| s.is_server_error()), "{statuses:?}");
        (calls, start + calls - opened)
    };
    let shared = Fleet::new(vec![redis.url()], settings).await.on(&clock);
    let replicas = Arc::new(shared.warm_replicas(3).await);
    let (one, one_probes) = outage(&shared, &replicas, "ONE").await;

    let alone = Fleet::new(
        vec![redis.url()],
        &format!("{settings}\nupstream.fleet_circuit = false\nredis.key_prefix = \"alone\""),
    )
    .await
    .on(&clock);
    let others = Arc::new(alone.warm_replicas(3).await);
    let (each, each_probes) = outage(&alone, &others, "EACH").await;
    // 4 s of cool-downs of 1 s: one probe each for the fleet (one more at the edges), against
    // one per replica.
    assert!(
        one_probes <= 5,
        "{one_probes} probes with one circuit ({one} calls in all)"
    );
    assert!(
        each_probes >= 9,
        "{each_probes} probes with a circuit per replica ({each} calls in all)"
    );
    // In all: 3 failures counted for the fleet, the calls already in flight when it opened (6
    // callers), and the probes: about `circuit_failures + D / circuit_cooldown`.
    assert!(
        one <= 3 + 4 + 5,
        "{one} calls with one circuit ({each} with one per replica)"
    );
    assert!(
        each >= 2 * one,
        "{one} calls with one circuit, {each} with one per replica"
    );

    // A replica that never saw a failure.
    let sim = shared.sim.handle();
    clock.advance(Duration::from_millis(1_200)).await;
    for (i, r) in replicas.iter().enumerate() {
        clock.run(r.balance(&format!("closed-again-{i}"))).await;
    }
    sim.set_balance_fault(Some(Fault::Status(500)));
    for i in 0..3 {
        clock.run(replicas[0].balance(&format!("FAIL{i}"))).await;
    }
    let calls = sim.balance_calls();
    clock.advance(Duration::from_millis(100)).await;
    let quiet = clock.run(replicas[2].balance("NEVER-FAILED")).await;
    assert_eq!(quiet.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(quiet.error_code(), "circuit_open");
    assert_eq!(
        sim.balance_calls(),
        calls,
        "no call from the replica that never failed"
    );
    sim.set_balance_fault(None);
}

/// A caller with `limit_scope = "fleet"` gets its rate once over three replicas; one with
/// `limit_scope = "replica"` three times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fleet_scoped_callers_get_their_rate_once() {
    let redis = Redis::start(&[]);
    let mut fleet = Fleet::new(vec![redis.url()], "").await;
    let hash = |key: &str| hex::encode(bill24_gateway::hash_key(key.as_bytes()));
    fleet.callers = Some(format!(
        "[[callers]]\nname = \"orders\"\nkey_sha256 = \"{}\"\nrate_limit_rps = 5\nburst = 10\n\
         limit_scope = \"fleet\"\n\
         [[callers]]\nname = \"billing\"\nkey_sha256 = \"{}\"\nrate_limit_rps = 5\nburst = 10\n",
        hash(ORDERS_KEY),
        hash(BILLING_KEY)
    ));
    let replicas = fleet.replicas(3).await;
    let count = async |key: &str| {
        let mut ok = 0;
        let mut limited = 0;
        for i in 0..60 {
            let r = balance(replicas[i % 3].main, key, "SAME").await;
            match r.status {
                StatusCode::OK => ok += 1,
                StatusCode::TOO_MANY_REQUESTS => {
                    assert!(r.header("retry-after").is_some());
                    limited += 1;
                }
                other => panic!("{other}"),
            }
        }
        (ok, limited)
    };
    let start = Instant::now();
    let (fleet_ok, fleet_limited) = count(ORDERS_KEY).await;
    let refill = (start.elapsed().as_secs_f64() * 5.0).ceil() as usize;
    assert!(
        (10..=10 + refill).contains(&fleet_ok),
        "fleet-scoped: {fleet_ok} answered, {fleet_limited} limited in {:?}",
        start.elapsed()
    );
    let start = Instant::now();
    let (replica_ok, _) = count(BILLING_KEY).await;
    let refill = (start.elapsed().as_secs_f64() * 5.0).ceil() as usize * 3;
    assert!(
        (30..=30 + refill).contains(&replica_ok),
        "replica-scoped: {replica_ok} answered in {:?}",
        start.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// The view of the fleet (CONTRACT §13)
// ---------------------------------------------------------------------------------------------

/// `method path` on an admin listener.
async fn admin_call(admin: SocketAddr, method: Method, path: &str) -> Reply {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{admin}{path}"))
        .body(Default::default())
        .expect("request");
    send(&client(), req).await
}

impl Replica {
    /// `GET /fleet`: a 200 with a JSON body, parsed.
    async fn fleet(&self) -> serde_json::Value {
        let reply = get(self.admin, "/fleet").await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        reply.json()
    }

    /// This replica's id, as its own view says.
    async fn id(&self) -> String {
        let view = self.fleet().await;
        view["replica"].as_str().expect("replica").to_string()
    }
}

/// The ids a view lists.
fn listed_ids(view: &serde_json::Value) -> std::collections::BTreeSet<String> {
    view["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .map(|r| r["id"].as_str().expect("id").to_string())
        .collect()
}

/// A view's entry for one replica.
fn entry<'a>(view: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    view["replicas"]
        .as_array()
        .expect("replicas")
        .iter()
        .find(|r| r["id"] == id)
        .unwrap_or_else(|| panic!("{id} not listed in {view}"))
}

/// The environment of a replica whose wall clock is off by `offset` (libfaketime; its
/// monotonic clock is left alone).
fn clock_ahead(offset: &'static str) -> [(&'static str, &'static str); 4] {
    assert!(Path::new(LIBFAKETIME).exists(), "apt install faketime");
    [
        ("LD_PRELOAD", LIBFAKETIME),
        ("FAKETIME", offset),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("DONT_FAKE_MONOTONIC", "1"),
    ]
}

/// Polls the replica's `/fleet` until `check` holds; the view that passed.
async fn until_view(
    replica: &Replica,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let view = replica.fleet().await;
        if check(&view) {
            return view;
        }
        assert!(Instant::now() < deadline, "after {within:?}: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Three replicas, one of them with its clock ten minutes ahead, see each other: every view
/// lists the same three ids, each with its version, start time, listen address, Redis up, the
/// circuit closed, and the one digest they share; each heard from within the last seconds by
/// Redis's clock (the skewed one too). `gateway_fleet_replicas` is 3 on each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_of_the_fleet_lists_every_replica() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let ahead = clock_ahead("+600s");
    let replicas = [
        fleet.replica().await,
        fleet.replica().await,
        fleet.replica_with_env(&ahead).await,
    ];
    let mut ids = Vec::new();
    for r in &replicas {
        ids.push(r.id().await);
    }
    let all: std::collections::BTreeSet<String> = ids.iter().cloned().collect();
    assert_eq!(all.len(), 3, "an id per replica: {ids:?}");
    for (r, id) in replicas.iter().zip(&ids) {
        let view = until_view(r, Duration::from_secs(5), |v| listed_ids(v) == all).await;
        assert_eq!(view["replica"], id.as_str());
        assert_eq!(view["redis_up"], true);
        let digest = entry(&view, id)["config_digest"].clone();
        assert_eq!(digest.as_str().map(str::len), Some(16), "{view}");
        for (other, other_id) in replicas.iter().zip(&ids) {
            let e = entry(&view, other_id);
            assert_eq!(e["listen"], other.main.to_string().as_str(), "{e}");
            assert_eq!(e["version"], env!("CARGO_PKG_VERSION"));
            assert_eq!(e["config_digest"], digest, "{view}");
            assert_eq!(e["config_matches"], true, "{view}");
            assert_eq!(e["redis_up"], true, "{e}");
            assert_eq!(e["circuit"], "closed", "{e}");
            let started = e["started_at"].as_str().expect("started_at");
            time::OffsetDateTime::parse(started, &time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|err| panic!("{started}: {err}"));
            let last_seen = e["last_seen_ms"].as_u64().expect("last_seen_ms");
            assert!(last_seen < 3_000, "Redis's clock, not the replica's: {e}");
        }
        until_metric(r, "gateway_fleet_replicas", |v| v == 3.0).await;
    }
}

/// A fourth replica with another `cache.ttl` is flagged `config_matches: false` on every
/// replica's view, its own included; once a reload brings its config in line (SIGHUP, no
/// restart) it matches everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_config_is_flagged_on_every_view() {
    let redis = Redis::start(&[]);
    let mut fleet = Fleet::new(vec![redis.url()], "").await;
    let mut replicas = fleet.replicas(3).await;
    fleet.extra = "cache.ttl = \"30s\"".into();
    replicas.push(fleet.replica().await);
    let odd = replicas[3].id().await;
    for r in &replicas {
        let view = until_view(r, Duration::from_secs(5), |v| listed_ids(v).len() == 4).await;
        for e in view["replicas"].as_array().expect("replicas") {
            assert_eq!(e["config_matches"], e["id"] != odd.as_str(), "{view}");
        }
        let others: std::collections::BTreeSet<String> = view["replicas"]
            .as_array()
            .expect("replicas")
            .iter()
            .filter(|e| e["id"] != odd.as_str())
            .map(|e| e["config_digest"].to_string())
            .collect();
        assert_eq!(others.len(), 1, "the three agree: {view}");
        assert!(!others.contains(&entry(&view, &odd)["config_digest"].to_string()));
    }
    fleet.extra = String::new();
    let odd_replica = &replicas[3];
    std::fs::write(odd_replica.dir.path().join("gw.toml"), fleet.toml()).expect("config");
    odd_replica.running().signal("HUP");
    odd_replica.running().wait_for_line("config reloaded").await;
    for r in &replicas {
        until_view(r, Duration::from_secs(5), |v| {
            listed_ids(v).len() == 4
                && v["replicas"]
                    .as_array()
                    .is_some_and(|all| all.iter().all(|e| e["config_matches"] == true))
        })
        .await;
    }
}

/// A replica killed outright (SIGKILL) is listed until the kill and gone from every view
/// within five seconds of it (by Redis's clock), and `gateway_fleet_replicas` follows; one
/// stopped cleanly (SIGTERM) removes itself at once. The two that go are the built binary; the
/// two that watch run on the frozen clock, which moves Redis's.
#[tokio::test(start_paused = true)]
async fn a_replica_that_dies_leaves_the_view_within_five_seconds() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], "").await.on(&clock);
    let mut replicas = vec![
        fleet.replica().await,
        fleet.replica().await,
        fleet.replica_with_env(&[]).await,
        fleet.replica_with_env(&[]).await,
    ];
    let mut ids = Vec::new();
    for r in &replicas {
        ids.push(r.id().await);
    }
    let sees = async |r: &Replica, n: usize| {
        let watching = matches!(r.run, Run::Local { .. });
        clock
            .advance_until(Duration::from_secs(3), "the view", async || {
                listed_ids(&r.fleet().await).len() == n
                    && (!watching || r.metric("gateway_fleet_replicas").await == n as f64)
            })
            .await;
        if !watching {
            until_metric(r, "gateway_fleet_replicas", |v| v == n as f64).await;
        }
    };
    for r in &replicas {
        sees(r, 4).await;
    }
    let victim = ids[3].clone();
    assert!(listed_ids(&replicas[0].fleet().await).contains(&victim));
    replicas[3].kill();
    let killed = Instant::now();
    loop {
        let view = replicas[0].fleet().await;
        if !listed_ids(&view).contains(&victim) {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(6),
            "still listed {:?} after the kill: {view}",
            killed.elapsed()
        );
        clock.advance(Duration::from_millis(100)).await;
    }
    let gone_after = killed.elapsed();
    // Its last heartbeat was at most a second or so before the kill: not retired early.
    assert!(
        gone_after > Duration::from_secs(2),
        "gone after {gone_after:?}"
    );
    for r in &replicas[..3] {
        sees(r, 3).await;
    }

    let stopped = Instant::now();
    replicas[2].stop().await;
    let view = replicas[0].fleet().await;
    assert!(!listed_ids(&view).contains(&ids[2]), "{view}");
    assert!(
        stopped.elapsed() < Duration::from_secs(3),
        "removed by itself, not retired: {:?}",
        stopped.elapsed()
    );
    sees(&replicas[0], 2).await;
}

/// With Redis killed, `/fleet` still answers 200 at once, with this replica alone and
/// `redis_up: false`; `gateway_fleet_replicas` keeps the last size seen (the N of fleet-wide
/// limits). When Redis is back the view is whole again by itself. Without `[redis]`, a
/// replica's view is itself alone, and the gauge 1.
#[tokio::test(start_paused = true)]
async fn with_redis_down_the_view_is_this_replica_alone() {
    let clock = Frozen::start();
    let mut redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], "").await.on(&clock);
    let replicas = fleet.replicas(2).await;
    let id = replicas[0].id().await;
    clock
        .advance_until(Duration::from_secs(3), "both listed", async || {
            listed_ids(&replicas[0].fleet().await).len() == 2
                && listed_ids(&replicas[1].fleet().await).len() == 2
                && all_at(&replicas, "gateway_fleet_replicas", 2.0).await
        })
        .await;
    redis.kill();
    for _ in 0..5 {
        let asked = Instant::now();
        let view = clock.run(replicas[0].fleet()).await;
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(view["redis_up"], false, "{view}");
        assert_eq!(view["replica"], id.as_str());
        assert_eq!(listed_ids(&view), [id.clone()].into(), "{view}");
        let me = entry(&view, &id);
        assert_eq!(me["redis_up"], false);
        assert_eq!(me["config_matches"], true);
        assert_eq!(me["circuit"], "closed");
    }
    assert_eq!(replicas[0].metric("gateway_fleet_replicas").await, 2.0);
    let reply = clock.run(replicas[0].balance("DOWN")).await;
    assert_eq!(reply.status, StatusCode::OK);

    redis.restart();
    clock
        .advance_until(Duration::from_secs(15), "whole again", async || {
            for r in &replicas {
                let v = r.fleet().await;
                if v["redis_up"] != true || listed_ids(&v).len() != 2 {
                    return false;
                }
            }
            true
        })
        .await;

    let alone = Fleet::new(Vec::new(), "").await.on(&clock);
    let solo = alone.replica().await;
    let view = solo.fleet().await;
    assert_eq!(view["redis_up"], false, "{view}");
    assert_eq!(listed_ids(&view).len(), 1);
    assert_eq!(
        entry(&view, &solo.id().await)["listen"],
        solo.main.to_string().as_str()
    );
    assert_eq!(solo.metric("gateway_fleet_replicas").await, 1.0);
}

/// `/fleet` is open like `/metrics` (the admin key guards the purges only); a query string
/// is ignored, HEAD has the headers without the body, other methods are 405 with `Allow`, and
/// paths around it (a huge suffix among them) are 404: plain answers, and the replica serves on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_requests_to_the_fleet_view_get_plain_answers() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(
        vec![redis.url()],
        &format!(
            "server.admin_key_sha256 = \"{}\"",
            hex::encode(bill24_gateway::hash_key(b"admin-key"))
        ),
    )
    .await;
    let r = fleet.replica().await;
    assert_eq!(
        admin_call(r.admin, Method::GET, "/metrics").await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin_call(r.admin, Method::GET, "/fleet").await.status,
        StatusCode::OK
    );
    assert_eq!(
        admin_call(r.admin, Method::DELETE, "/cache").await.status,
        StatusCode::UNAUTHORIZED
    );

    let query = format!("/fleet?verbose=1&x={}", "y".repeat(4_000));
    let reply = admin_call(r.admin, Method::GET, &query).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(listed_ids(&reply.json()).len(), 1);

    let head = admin_call(r.admin, Method::HEAD, "/fleet").await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("content-type"), Some("application/json"));
    assert!(head.body.is_empty());

    for method in [
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::PATCH,
        Method::OPTIONS,
    ] {
        let reply = admin_call(r.admin, method.clone(), "/fleet").await;
        assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method}");
        assert_eq!(reply.header("allow"), Some("GET, HEAD"), "{method}");
        assert_eq!(reply.json()["code"], "method_not_allowed");
    }

    let huge = format!("/fleet/{}", "a".repeat(16_000));
    for path in [
        "/fleet/",
        "/fleet/x",
        "/FLEET",
        "/fleets",
        "/fleet%2F",
        huge.as_str(),
    ] {
        let reply = admin_call(r.admin, Method::GET, path).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{path:.40}");
        assert_eq!(reply.json()["code"], "not_found");
    }
    assert_eq!(get(r.admin, "/healthz").await.status, StatusCode::OK);
    assert_eq!(listed_ids(&r.fleet().await).len(), 1);
}

/// On a 3-master Redis Cluster the fleet is one key on one node: three replicas list each
/// other, and one killed is retired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_view_of_the_fleet_on_a_redis_cluster() {
    let cluster = Cluster::start();
    let fleet = Fleet::new(cluster.urls(), "").await;
    let mut replicas = fleet.replicas(3).await;
    for r in &replicas {
        until_view(r, Duration::from_secs(5), |v| {
            v["redis_up"] == true && listed_ids(v).len() == 3
        })
        .await;
    }
    let key = format!("bill24gw:{}:fleet", bill24_sim::DEMO_CLIENT_ID);
    let holders = cluster
        .nodes
        .iter()
        .filter(|n| n.cli(&["EXISTS", &key]).trim() == "1")
        .count();
    assert_eq!(holders, 1, "one key, on one node");
    replicas[2].kill();
    for r in &replicas[..2] {
        until_view(r, Duration::from_secs(7), |v| listed_ids(v).len() == 2).await;
    }
}

/// A replica whose circuit opens publishes it: every replica's view shows it `open` within
/// a heartbeat or two.
#[tokio::test(start_paused = true)]
async fn an_open_circuit_shows_on_every_view() {
    let opens_fast =
        "upstream.retries = 0\nupstream.circuit_failures = 2\nupstream.circuit_cooldown = \"60s\"";
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(vec![redis.url()], opens_fast).await.on(&clock);
    let replicas = fleet.replicas(2).await;
    let broken = replicas[0].id().await;
    fleet
        .sim
        .handle()
        .set_balance_fault(Some(Fault::Status(500)));
    for i in 0..3 {
        clock.run(replicas[0].balance(&format!("CIRCUIT{i}"))).await;
    }
    assert_eq!(replicas[0].metric("gateway_circuit_state").await, 1.0);
    clock
        .advance_until(Duration::from_secs(2), "open on every view", async || {
            for r in &replicas {
                let v = r.fleet().await;
                if !listed_ids(&v).contains(&broken) || entry(&v, &broken)["circuit"] != "open" {
                    return false;
                }
            }
            true
        })
        .await;
}

/// Redis killed under cold traffic that keeps the ceiling's queue full, and back (empty) a
/// few seconds later: neither switch hands out a new burst or a second queue, so the fleet's
/// Bill24 calls over the whole run stay within `20 × T + 20` (CONTRACT §13).
#[tokio::test(start_paused = true)]
async fn the_ceiling_holds_while_redis_goes_and_comes_back() {
    let clock = Frozen::start();
    let mut redis = Redis::frozen(&clock);
    let fleet = Fleet::new(
        vec![redis.url()],
        "upstream.fleet_max_rps = 20\nupstream.queue_timeout = \"2s\"",
    )
    .await
    .on(&clock);
    let replicas = Arc::new(fleet.warm_replicas(3).await);
    clock
        .advance_until(Duration::from_secs(3), "three replicas seen", async || {
            all_at(&replicas, "gateway_fleet_replicas", 3.0).await
        })
        .await;
    clock.advance(Duration::from_millis(1_100)).await;
    fleet.sim.handle().set_latency(Duration::from_millis(50));
    let (went, back) = (Duration::from_secs(2), Duration::from_secs(5));
    let fault = tokio::spawn(async move {
        tokio::time::sleep(went).await;
        redis.kill();
        tokio::time::sleep(back - went).await;
        redis.restart();
        redis
    });
    // 30 callers keep about 1.5 s of the ceiling's queue reserved when Redis goes.
    let run = Duration::from_secs(8);
    let (calls, statuses, took) = cold_traffic(&clock, &fleet, &replicas, 30, run, "SWITCH").await;
    let _redis = fault.await.expect("fault");
    // A caller whose turn is further off than `queue_timeout` hears 503 at once.
    let answered = statuses.iter().filter(|s| **s == StatusCode::OK).count();
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::OK, StatusCode::SERVICE_UNAVAILABLE].contains(s)),
        "{statuses:?}"
    );
    assert!(answered * 10 >= statuses.len() * 9, "{statuses:?}");
    let bound = 20.0 * took.as_secs_f64() + 20.0;
    assert!(
        (calls as f64) <= bound,
        "{calls} Bill24 calls in {took:?} (bound {bound})"
    );
    assert!(
        calls as f64 >= 0.6 * bound,
        "still a rate: {calls} of {bound}"
    );
    for r in replicas.iter() {
        assert_eq!(r.metric("gateway_redis_up").await, 1.0, "back on Redis");
    }
}

/// Redis killed mid-run: the ceiling falls back to `fleet_max_rps / N` on each replica (N = 3,
/// the fleet as last seen) and a fleet-scoped caller to `rate_limit_rps / N`; every request is
/// answered.
#[tokio::test(start_paused = true)]
async fn with_redis_killed_each_replica_keeps_its_share_of_the_limits() {
    let clock = Frozen::start();
    let mut redis = Redis::frozen(&clock);
    let mut fleet = Fleet::new(
        vec![redis.url()],
        "upstream.fleet_max_rps = 30\nupstream.queue_timeout = \"10s\"",
    )
    .await
    .on(&clock);
    let hash = |key: &str| hex::encode(bill24_gateway::hash_key(key.as_bytes()));
    fleet.callers = Some(format!(
        "[[callers]]\nname = \"orders\"\nkey_sha256 = \"{}\"\n\
         [[callers]]\nname = \"billing\"\nkey_sha256 = \"{}\"\nrate_limit_rps = 3\nburst = 9\n\
         limit_scope = \"fleet\"\n",
        hash(ORDERS_KEY),
        hash(BILLING_KEY)
    ));
    let replicas = Arc::new(fleet.replicas(3).await);
    clock
        .advance_until(Duration::from_secs(3), "three replicas seen", async || {
            all_at(&replicas, "gateway_fleet_replicas", 3.0).await
        })
        .await;
    redis.kill();
    for r in replicas.iter() {
        clock.run(r.balance("after-the-kill")).await;
    }
    clock
        .advance_until(Duration::from_secs(5), "Redis seen down", async || {
            all_at(&replicas, "gateway_redis_up", 0.0).await
        })
        .await;
    clock.advance(Duration::from_millis(1_100)).await;
    let three_seconds = Duration::from_secs(3);
    let (calls, statuses, took) =
        cold_traffic(&clock, &fleet, &replicas, 12, three_seconds, "ALONE").await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::OK),
        "{statuses:?}"
    );
    // Each replica 10/s with bursts of 10: the fleet's 30/s, not three times it.
    let bound = 30.0 * took.as_secs_f64() + 30.0;
    assert!(
        (calls as f64) <= bound,
        "{calls} calls in {took:?} (bound {bound})"
    );
    assert!(calls >= 45, "a share, not a stop: {calls}");
    // The fleet-scoped caller: 1/s and bursts of 3 on each replica.
    let mut ok = 0;
    let start = Instant::now();
    for i in 0..30 {
        let r = clock
            .run(balance(replicas[i % 3].main, BILLING_KEY, "SAME"))
            .await;
        if r.status == StatusCode::OK {
            ok += 1;
        } else {
            assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
        }
    }
    let refill = (start.elapsed().as_secs_f64()).ceil() as usize * 3;
    assert!((9..=9 + refill).contains(&ok), "{ok} answered of 30");
}

/// A purge made while Redis does not answer: this replica's copy goes at once (204, with
/// `X-Fleet-Purge: pending`), and the purge is sent again until the fleet has it, so the
/// other replicas stop serving the purged answer soon after Redis answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_redis_could_not_take_is_sent_again() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "cache.ttl = \"60s\"").await;
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    let sim = fleet.sim.handle();
    sim.set_balance("PEND", 100);
    a.balance("PEND").await;
    assert_eq!(b.balance("PEND").await.x_cache(), "HIT");
    sim.set_balance("PEND", 200);
    redis.signal("STOP");
    let reply = delete(a.admin, "/cache/PEND").await;
    assert_eq!(reply.status, StatusCode::NO_CONTENT);
    assert_eq!(reply.header("x-fleet-purge"), Some("pending"));
    let r = a.balance("PEND").await;
    assert_eq!(r.json()["data"][0]["balance"], 200, "gone here at once");
    real_sleep(Duration::from_millis(500)).await;
    redis.signal("CONT");
    until_metric(&a, "gateway_redis_up", |v| v == 1.0).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let r = b.balance("PEND").await;
        if r.json()["data"][0]["balance"] == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the other replica still serves the purged answer ({})",
            r.x_cache()
        );
        real_sleep(Duration::from_millis(100)).await;
    }
    let reply = delete(a.admin, "/cache/PEND").await;
    assert_eq!(reply.header("x-fleet-purge"), None, "told at once now");
}

/// A fill lock set by someone else with a long expiry (no live fill keeps one longer than a
/// lease) makes nobody wait: the customer is answered at once, on every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_long_fill_lock_makes_nobody_wait() {
    let redis = Redis::start(&[]);
    let fleet = Fleet::new(vec![redis.url()], "").await;
    let (a, b) = (fleet.replica().await, fleet.replica().await);
    a.balance("warm-up-a").await;
    b.balance("warm-up-b").await;
    let key = format!("bill24gw:demo-client:{{{}}}:fill", hex::encode("STUCK"));
    assert_eq!(redis.cli(&["SET", &key, "x", "PX", "3600000"]).trim(), "OK");
    for r in [&a, &b] {
        let start = Instant::now();
        let reply = r.balance("STUCK").await;
        assert_eq!(reply.status, StatusCode::OK);
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}

/// Calls over the ceiling wait their turn in the order they came, across replicas: each is
/// answered after the one sent before it.
#[tokio::test(start_paused = true)]
async fn over_the_ceiling_calls_wait_in_arrival_order() {
    let clock = Frozen::start();
    let redis = Redis::frozen(&clock);
    let fleet = Fleet::new(
        vec![redis.url()],
        "upstream.fleet_max_rps = 4\nupstream.queue_timeout = \"10s\"",
    )
    .await
    .on(&clock);
    let replicas = Arc::new(fleet.warm_replicas(2).await);
    clock.advance(Duration::from_millis(1_100)).await;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..10 {
        let replicas = replicas.clone();
        tasks.push(tokio::spawn(async move {
            let r = replicas[i % 2].balance(&format!("ORDER{i}")).await;
            (r.status, start.elapsed())
        }));
        // Sent one after another, each well after the one before reached Redis.
        clock.advance(Duration::from_millis(30)).await;
    }
    let mut answered = Vec::new();
    for t in clock.run(futures_util::future::join_all(tasks)).await {
        let (status, at) = t.expect("request");
        assert_eq!(status, StatusCode::OK);
        answered.push(at);
    }
    // A burst of 4, then one each 250 ms, in the order sent.
    for pair in answered[4..].windows(2) {
        assert!(pair[0] < pair[1], "answered out of order: {answered:?}");
    }
    assert!(
        answered[9] >= Duration::from_millis(1_400),
        "the last waited for its place: {answered:?}"
    );
}
