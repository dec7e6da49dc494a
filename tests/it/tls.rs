//! TLS (`rediss://`) end to end: a CA and a server certificate for
//! 127.0.0.1 made here (rcgen), a private `redis-server` that speaks only
//! TLS, and the store and the CLI trusting that CA through
//! `StoreConfig::tls_ca_file` / `--tls-ca`. Certificates are really
//! verified: no CA, or another CA, is refused.
//!
//! A redis-server built without TLS fails these tests with a message saying
//! so; they never skip.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use runledger::*;
use serde_json::{Value, json};

/// How long a redis-server gets to come up and answer.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of every single store call or connect.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A CA: its certificate (PEM) and the issuer that signs leaf certificates.
pub(crate) fn new_ca(name: &str) -> (String, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate().expect("CA key");
    let cert = params.self_signed(&key).expect("CA certificate");
    (cert.pem(), Issuer::new(params, key))
}

/// A server certificate for 127.0.0.1 signed by `ca`: (certificate PEM, key PEM).
pub(crate) fn server_cert(ca: &Issuer<'static, KeyPair>) -> (String, String) {
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("server key");
    let cert = params.signed_by(&key, ca).expect("server certificate");
    (cert.pem(), key.serialize_pem())
}

/// What a redis-server without TLS says when asked for a TLS port: Redis
/// 6 does not know the directive, 7.0 "TLS not supported", 7.2+ lacks the
/// connection type (or the TLS module).
fn built_without_tls(log: &str) -> bool {
    let lower = log.to_lowercase();
    lower.contains("tls not supported")
        || lower.contains("tls is not supported")
        || lower.contains("missing implement of connection type tls")
        || ((lower.contains("bad directive") || lower.contains("unrecognized")) && lower.contains("'tls-"))
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr").port()
}

/// A private redis-server listening only on a TLS port; killed (by PID) on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    /// The CA that signed the server's certificate (PEM file).
    ca: PathBuf,
    dir: tempfile::TempDir,
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsRedis {
    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// Starts one; `extra` are more redis-server arguments (e.g. cluster mode).
    fn start(extra: &[&str]) -> TlsRedis {
        let binary =
            runledger::embedded::find_redis_server().unwrap_or_else(|| panic!("{}", runledger::embedded::INSTALL_HINT));
        let mut last_log = String::new();
        // A free port can be taken between the check and the bind: a few tries.
        for _ in 0..3 {
            match TlsRedis::try_start(&binary, extra) {
                Ok(server) => return server,
                Err(log) if log.contains("Address already in use") => last_log = log,
                Err(log) if built_without_tls(&log) => panic!(
                    "{} was built without TLS support, and these tests need TLS: install a \
                     redis-server built with BUILD_TLS=yes (Debian's and Ubuntu's packages are). Its log:\n{log}",
                    binary.display()
                ),
                Err(log) => panic!("redis-server with TLS did not come up. Its log:\n{log}"),
            }
        }
        panic!("redis-server with TLS found no free port. Last log:\n{last_log}");
    }

    /// One try: new certificates, a new dir, a free port; `Err(log)` when it did not come up.
    fn try_start(binary: &Path, extra: &[&str]) -> std::result::Result<TlsRedis, String> {
        let dir = tempfile::Builder::new().prefix("runledger-tls-").tempdir().expect("temp dir");
        let (ca_pem, ca) = new_ca("runledger test CA");
        let (cert_pem, key_pem) = server_cert(&ca);
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).expect("write a certificate file");
            path
        };
        let ca_file = write("ca.pem", &ca_pem);
        let cert_file = write("server.pem", &cert_pem);
        let key_file = write("server.key", &key_pem);
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("redis.log")).expect("log file");
        let child = Command::new(binary)
            .args(["--bind", "127.0.0.1", "--port", "0", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(&cert_file)
            .arg("--tls-key-file")
            .arg(&key_file)
            .arg("--tls-ca-cert-file")
            .arg(&ca_file)
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut server = TlsRedis { child, port, ca: ca_file, dir };
        // On an error the server is dropped, which kills it.
        server.wait_until_up()?;
        Ok(server)
    }

    /// Waits (at most [`START_TIMEOUT`]) for the log to say it is ready and
    /// the TLS port to accept; `Err(log)` when the server exited or never got there.
    fn wait_until_up(&mut self) -> std::result::Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < START_TIMEOUT {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exited with {status})\n{}", self.log()));
            }
            if self.log().contains("Ready to accept connections")
                && TcpStream::connect_timeout(&([127, 0, 0, 1], self.port).into(), Duration::from_secs(1)).is_ok()
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("(no answer within {START_TIMEOUT:?})\n{}", self.log()))
    }
}

/// Awaits `fut` at most [`CALL_TIMEOUT`]; a hang fails the test naming `what`.
async fn within<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {CALL_TIMEOUT:?}"))
}

/// Pub/sub and a dedicated connection over TLS: the worker's cancel feed
/// hears `request_cancel` of the claimed `run_id` (SUBSCRIBE, or SSUBSCRIBE
/// on a cluster), and a BLPOP connection answers.
async fn cancel_and_blpop(store: &Store, run_id: &str) {
    let mut notices = within("cancel_notices", store.cancel_notices(&["q".to_string()])).await.expect("subscribe");
    within("request_cancel", store.request_cancel(run_id, Some("test"))).await.expect("request_cancel");
    assert_eq!(within("cancel notice", notices.next()).await.as_deref(), Some(run_id));
    let mut blocking = within("dedicated_conn", store.dedicated_conn()).await.expect("dedicated connection");
    let popped: Option<(String, String)> =
        within("BLPOP", redis::cmd("BLPOP").arg("tls-test-list").arg(0.2).query_async(&mut blocking))
            .await
            .expect("BLPOP over TLS");
    assert_eq!(popped, None);
}

fn with_ca(ca: &Path) -> StoreConfig {
    StoreConfig { tls_ca_file: Some(ca.to_path_buf()), ..Default::default() }
}

// 1. The whole lifecycle over TLS with a private CA: the pool's connections,
//    a dedicated (blocking) connection and the pub/sub feed all verify it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_works_over_tls_with_a_private_ca() {
    let redis = TlsRedis::start(&[]);
    let store = within("connect", Store::connect_with(&redis.url(), with_ca(&redis.ca)))
        .await
        .unwrap_or_else(|e| panic!("rediss:// with the CA must connect: {e}\nserver log:\n{}", redis.log()));

    let run =
        within("create_run", store.create_run(&NewRun::new("tls-1", "agent").queue("q").metadata(json!({"a": 1}))))
            .await
            .expect("create_run");
    assert_eq!(run.status, RunStatus::Queued);
    let claimed =
        within("claim", store.claim_next_run(&ClaimRequest::new("rt-1").queue("q").lease(Duration::from_secs(30))))
            .await
            .expect("claim")
            .expect("a run to claim");
    assert_eq!(claimed.run_id, "tls-1");
    let token = claimed.claim_token.clone().expect("the claimer gets a token");
    let events = within(
        "append_events",
        store.append_events(
            "tls-1",
            Some(&token),
            &[NewEvent::new(1, "progress", json!({"p": 1})), NewEvent::new(2, "progress", json!({"p": 2}))],
        ),
    )
    .await
    .expect("append_events");
    assert_eq!(events.len(), 2);

    cancel_and_blpop(&store, "tls-1").await;

    let done = within(
        "finalize_run",
        store.finalize_run("tls-1", &Finish::new(RunStatus::Completed).metadata(json!({"b": 2})), Some(&token)),
    )
    .await
    .expect("finalize_run");
    assert_eq!(done.status, RunStatus::Completed);
    assert_eq!(done.metadata, json!({"a": 1, "b": 2}));
    let page = within("page_run_events", store.page_run_events("tls-1", None, None, 10, Direction::Forward))
        .await
        .expect("events");
    assert_eq!(page.items.len(), 2);
    assert_eq!(within("get_run", store.get_run("tls-1")).await.expect("get_run").status, RunStatus::Completed);
}

// 2. What must fail does, with an error and without hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_verified_and_misuse_is_refused() {
    let redis = TlsRedis::start(&[]);
    let plain = format!("redis://127.0.0.1:{}/", redis.port);

    // Plain RESP to the TLS port.
    let err = within("plain redis:// to the TLS port", Store::connect(&plain))
        .await
        .err()
        .expect("a plain redis:// connection to a TLS port must fail");
    println!("plain to TLS port: {err}");

    // No CA: the system's roots do not know the test CA.
    let err = within("rediss:// without the CA", Store::connect(&redis.url()))
        .await
        .err()
        .expect("rediss:// without the private CA must fail certificate verification");
    let text = err.to_string().to_lowercase();
    assert!(text.contains("certificate") || text.contains("issuer"), "a certificate error: {err}");

    // Another CA: trusted instead of the system's roots, still not the server's.
    let (other_pem, _) = new_ca("some other CA");
    let other = redis.dir.path().join("other-ca.pem");
    std::fs::write(&other, other_pem).expect("write the other CA");
    let err = within("rediss:// with another CA", Store::connect_with(&redis.url(), with_ca(&other)))
        .await
        .err()
        .expect("rediss:// trusting another CA must fail certificate verification");
    let text = err.to_string().to_lowercase();
    assert!(text.contains("certificate") || text.contains("issuer"), "a certificate error: {err}");

    // A CA file that cannot be read, or holds no certificate: invalid input naming the file.
    let missing = redis.dir.path().join("no-such-ca.pem");
    match Store::connect_with(&redis.url(), with_ca(&missing)).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("no-such-ca.pem"), "names the file: {msg}"),
        Err(other) => panic!("a missing CA file is Error::Invalid, got {other}"),
        Ok(_) => panic!("a missing CA file must be refused"),
    }
    let junk = redis.dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate\n").expect("write junk");
    match Store::connect_with(&redis.url(), with_ca(&junk)).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("junk.pem"), "names the file: {msg}"),
        Err(other) => panic!("a CA file without a certificate is Error::Invalid, got {other}"),
        Ok(_) => panic!("a CA file without a certificate must be refused"),
    }
    // A CA with a plain URL would silently not be used: refused.
    match Store::connect_with(&plain, with_ca(&redis.ca)).await {
        Err(Error::Invalid(msg)) => assert!(msg.contains("rediss://"), "says what is needed: {msg}"),
        Err(other) => panic!("a CA with redis:// is Error::Invalid, got {other}"),
        Ok(_) => panic!("a CA with a plain redis:// URL must be refused"),
    }

    // The redis crate's #insecure skips verification (no CA needed).
    let insecure = format!("rediss://127.0.0.1:{}/#insecure", redis.port);
    let store = within("rediss://...#insecure", Store::connect(&insecure)).await.expect("#insecure connects");
    let run = within("create_run", store.create_run(&NewRun::new("insecure-1", "agent").queue("q")))
        .await
        .expect("create_run over #insecure");
    assert_eq!(run.status, RunStatus::Queued);
}

// 3. A Redis Cluster over TLS (one master holding every slot, announcing its
//    TLS port): the cluster client, its pub/sub (SSUBSCRIBE) and its
//    blocking client all trust the private CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_tls_with_a_private_ca() {
    let redis =
        TlsRedis::start(&["--cluster-enabled", "yes", "--tls-cluster", "yes", "--cluster-config-file", "nodes.conf"]);
    // Set the node up through a single-server store (also over TLS).
    let admin = within("connect (admin)", Store::connect_with(&redis.url(), with_ca(&redis.ca)))
        .await
        .unwrap_or_else(|e| panic!("rediss:// to the cluster node: {e}\nserver log:\n{}", redis.log()));
    let mut conn = admin.conn().await.expect("admin connection");
    let _: () = within(
        "CLUSTER ADDSLOTSRANGE",
        redis::cmd("CLUSTER").arg("ADDSLOTSRANGE").arg(0).arg(16383).query_async(&mut conn),
    )
    .await
    .expect("CLUSTER ADDSLOTSRANGE");
    let start = Instant::now();
    loop {
        let info: String = within("CLUSTER INFO", redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn))
            .await
            .expect("CLUSTER INFO");
        if info.contains("cluster_state:ok") {
            break;
        }
        assert!(start.elapsed() < START_TIMEOUT, "hang guard: the one-node cluster never got to state ok:\n{info}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let url = format!("rediss+cluster://127.0.0.1:{}/", redis.port);
    let store = within("connect (cluster)", Store::connect_with(&url, with_ca(&redis.ca)))
        .await
        .unwrap_or_else(|e| panic!("rediss+cluster:// with the CA must connect: {e}\nserver log:\n{}", redis.log()));
    assert!(store.is_cluster());
    within("create_run", store.create_run(&NewRun::new("c-1", "agent").queue("q"))).await.expect("create_run");
    let claimed =
        within("claim", store.claim_next_run(&ClaimRequest::new("rt-1").queue("q").lease(Duration::from_secs(30))))
            .await
            .expect("claim")
            .expect("a run to claim");
    let token = claimed.claim_token.clone().expect("token");
    cancel_and_blpop(&store, "c-1").await;
    let done = within("finalize_run", store.finalize_run("c-1", &Finish::new(RunStatus::Cancelled), Some(&token)))
        .await
        .expect("finalize_run");
    assert_eq!(done.status, RunStatus::Cancelled);

    // Without the CA the cluster is refused too.
    let err = within("rediss+cluster:// without the CA", Store::connect(&url))
        .await
        .err()
        .expect("rediss+cluster:// without the CA must fail");
    let text = err.to_string().to_lowercase();
    assert!(text.contains("certificate") || text.contains("issuer"), "a certificate error: {err}");
}

/// Runs the CLI (bounded to 60 s) without any Redis settings from the environment.
async fn cli(args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for var in [
        "REDIS_URL",
        "REDIS_CLUSTER",
        "RUNLEDGER_TLS_CA",
        "RUNLEDGER_PREFIX",
        "RUNLEDGER_WAIT_REPLICAS",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(envs.iter().copied());
    tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .unwrap_or_else(|_| panic!("runledger {args:?}: no exit within 60 s"))
        .expect("run the runledger binary")
}

fn describe(out: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// 4. The CLI over TLS: --tls-ca and RUNLEDGER_TLS_CA; without a CA it fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_works_over_tls_with_tls_ca() {
    let redis = TlsRedis::start(&[]);
    let url = redis.url();
    let ca = redis.ca.to_str().expect("a UTF-8 temp path").to_string();

    let out = cli(
        &[
            "--redis", &url, "--tls-ca", &ca, "--json", "enqueue", "--queue", "jobs", "--runner", "agent", "--run-id",
            "cli-1",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "enqueue over TLS: {}", describe(&out));

    let out = cli(&["--redis", &url, "--tls-ca", &ca, "--json", "get", "cli-1"], &[]).await;
    assert!(out.status.success(), "get over TLS: {}", describe(&out));
    let run: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", describe(&out)));
    assert_eq!(run["run_id"], "cli-1", "{run:#}");
    assert_eq!(run["status"], "queued", "{run:#}");
    assert_eq!(run["queue_name"], "jobs", "{run:#}");

    // The same through the environment.
    let out = cli(&["--json", "get", "cli-1"], &[("REDIS_URL", &url), ("RUNLEDGER_TLS_CA", &ca)]).await;
    assert!(out.status.success(), "get with RUNLEDGER_TLS_CA: {}", describe(&out));
    let run: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("JSON ({e}): {}", describe(&out)));
    assert_eq!(run["run_id"], "cli-1", "{run:#}");

    // No CA: refused, with a certificate error on stderr.
    let out = cli(&["--redis", &url, "--json", "get", "cli-1"], &[]).await;
    assert!(!out.status.success(), "without --tls-ca the server's certificate is not trusted: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(stderr.contains("certificate") || stderr.contains("issuer"), "{}", describe(&out));

    assert_eq!(out.status.code(), Some(2), "an untrusted certificate is a setup error: {}", describe(&out));
    // Not an outage: a worker does not wait for it to pass, it exits.
    let out = cli(&["--redis", &url, "worker", "--queue", "jobs"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "worker without the CA: {}", describe(&out));

    // An unreadable CA file: bad input (exit 2) naming the file.
    let out = cli(&["--redis", &url, "--tls-ca", "/nonexistent/ca.pem", "get", "cli-1"], &[]).await;
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/ca.pem"), "{}", describe(&out));
}
