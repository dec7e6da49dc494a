//! The dashboard in a real browser: headless Chromium, driven over WebDriver
//! (chromedriver), loads `runledger ui` while a demo worker runs. The queue
//! page shows the depths set up here, a run's page shows an event appended
//! after the page loaded (the live view), and screenshots are written to
//! `target/ui-screenshots/` (or `$RUNLEDGER_SCREENSHOT_DIR`; the README's
//! picture is one of them).
//!
//! Needs Debian's `chromium` and `chromium-driver` (`.ci/run` installs them);
//! without them it fails saying so, it never passes silently.

use crate::common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::dashboard::Dashboard;
use fantoccini::{Client, ClientBuilder};
use runledger::*;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

fn find(env: &str, candidates: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in candidates {
        let direct = PathBuf::from(name);
        if direct.is_absolute() && direct.exists() {
            return Some(direct);
        }
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.exists() {
                return Some(p);
            }
        }
    }
    None
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port()
}

/// chromedriver on a free loopback port; killed by its PID when dropped.
struct Driver {
    url: String,
    _child: Child,
}

async fn start_driver() -> Driver {
    let driver = find("RUNLEDGER_CHROMEDRIVER", &["chromedriver", "/usr/bin/chromedriver"]).unwrap_or_else(|| {
        panic!(
            "the browser test needs chromedriver: `apt-get install chromium chromium-driver` \
             (or set RUNLEDGER_CHROMEDRIVER)"
        )
    });
    let port = free_port();
    let child = Command::new(driver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start chromedriver");
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(Instant::now() < deadline, "hang guard: chromedriver did not listen on port {port} in 20 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Driver { url: format!("http://127.0.0.1:{port}"), _child: child }
}

async fn browser(driver: &Driver) -> Client {
    let chromium = find("RUNLEDGER_CHROMIUM", &["chromium", "/usr/bin/chromium", "chromium-browser"])
        .unwrap_or_else(|| panic!("the browser test needs Chromium: `apt-get install chromium chromium-driver`"));
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1300,900", "--hide-scrollbars"],
        }),
    );
    // chromedriver is on loopback: plain HTTP.
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|e| panic!("chromedriver could not start Chromium: {e}"))
}

/// Polls a JavaScript expression until it is truthy; returns its value.
async fn until(client: &Client, what: &str, script: &str, within: Duration) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let value = client.execute(script, vec![]).await.unwrap_or(Value::Null);
        let truthy = match &value {
            Value::Null | Value::Bool(false) => false,
            Value::String(s) => !s.is_empty(),
            _ => true,
        };
        if truthy {
            return value;
        }
        assert!(Instant::now() < deadline, "hang guard: {what}: not seen in {within:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn screenshot_dir() -> PathBuf {
    std::env::var_os("RUNLEDGER_SCREENSHOT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots"))
}

async fn save(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "a real PNG, {} bytes", png.len());
    let dir = screenshot_dir();
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    std::fs::write(dir.join(name), png).expect("write screenshot");
}

#[tokio::test]
async fn the_dashboard_in_chromium_shows_depths_and_live_events() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let (redis, store) = common::store().await;
        // A queue nobody serves, with known depths.
        for i in 0..3 {
            store.create_run(&NewRun::new(format!("watched-{i}"), "agent").queue("watched")).await.unwrap();
        }
        store.create_run(&NewRun::new("watched-later", "agent").queue("watched").not_before(4e9)).await.unwrap();
        // A queue a demo worker works through while the browser looks.
        let work: Vec<NewRun> = (0..40).map(|i| NewRun::new(format!("job-{i}"), "summarize").queue("work")).collect();
        store.create_runs(&work).await.unwrap();
        let mut worker = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "worker", "--queue", "work", "--concurrency", "2", "--work-ms", "600"])
            .args(["--fail-rate", "0.1", "--runtime-id", "demo-worker"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the demo worker");
        // A run held by this test, whose events it writes.
        store.create_run(&NewRun::new("manual-1", "agent").queue("manual")).await.unwrap();
        let held = store
            .claim_next_run(&ClaimRequest::new("test-runtime").queue("manual").lease(Duration::from_secs(120)))
            .await
            .unwrap()
            .unwrap();
        let token = held.claim_token.clone().unwrap();
        store.append_events("manual-1", Some(&token), &[NewEvent::new(1, "started", json!({}))]).await.unwrap();

        let ui = Dashboard::start(&redis.url, &[]).await;
        let driver = start_driver().await;
        let client = browser(&driver).await;

        client.goto(&ui.url("/")).await.expect("open the dashboard");
        let cells = until(
            &client,
            "the watched queue's row",
            r#"const r = document.querySelector('tr[data-queue="watched"]');
               return r ? Array.from(r.cells).map(c => c.textContent.trim()) : null;"#,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(cells[1], "3", "queued: {cells}");
        assert_eq!(cells[2], "1", "delayed: {cells}");
        assert_eq!(cells[4], "0", "claimed: {cells}");
        until(
            &client,
            "the worker's progress on the page (refreshed in place)",
            r#"const r = document.querySelector('tr[data-queue="work"]');
               return r && Number(r.cells[9].textContent) > 0;"#,
            Duration::from_secs(60),
        )
        .await;

        client.goto(&ui.url("/runs/manual-1")).await.expect("open the run page");
        until(
            &client,
            "the live view connected",
            r#"return document.getElementById('live-state').textContent.startsWith('live');"#,
            Duration::from_secs(20),
        )
        .await;
        assert!(
            client
                .execute(r#"return document.querySelector('#events tr[data-seq="2"]') === null;"#, vec![])
                .await
                .unwrap()
                .as_bool()
                .unwrap()
        );
        // Written after the page loaded: only the live view can show it.
        store
            .append_events(
                "manual-1",
                Some(&token),
                &[NewEvent::new(2, "tool_call", json!({"tool": "search", "query": "redis streams"}))],
            )
            .await
            .unwrap();
        let row = until(
            &client,
            "event 2 on the run page",
            r#"const r = document.querySelector('#events tr[data-seq="2"]');
               return r ? Array.from(r.cells).map(c => c.textContent) : null;"#,
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(row[1], "tool_call", "{row}");
        assert!(row[4].as_str().unwrap().contains("redis streams"), "{row}");
        let countdown =
            client.execute("return document.querySelector('#lease .countdown').textContent;", vec![]).await.unwrap();
        assert!(countdown.as_str().unwrap().ends_with(" s"), "lease countdown: {countdown}");
        save(&client, "run.png").await;

        // The queue page after the chart has a few samples, for the README.
        tokio::time::sleep(Duration::from_secs(11)).await;
        client.goto(&ui.url("/")).await.unwrap();
        until(&client, "the chart", "return document.querySelector('svg.chart') !== null;", Duration::from_secs(20))
            .await;
        save(&client, "queues.png").await;
        client.close().await.expect("close the browser");
        let _ = worker.kill().await;
    })
    .await
    .expect("the browser test took more than 240 s");
}
