//! `runledger ui`: the web dashboard and the Prometheus `/metrics` endpoint,
//! served by the binary itself (axum, server-rendered HTML, a little plain
//! JavaScript; no build step).
//!
//! Every page reads Redis through the same `Store` calls as the CLI, and
//! every action (cancel, requeue, release; pause and resume of a queue or of
//! one group) is the `Store` operator call the CLI's `cancel`/`requeue`/
//! `release --attempt`/`queue pause|resume` make, which records an audit
//! event (on the run, or in the queue's audit stream). Pages: `pages.rs`; the live event view: `live.rs`;
//! actions and their guards: `actions.rs`; `/metrics`: `metrics.rs`; the
//! throughput chart's samples: `throughput.rs`; markup helpers: `html.rs`.

mod actions;
mod html;
mod live;
mod metrics;
mod pages;
mod throughput;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::routing::{get, post};
use clap::Args;
use runledger::{Error, Result, Store};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Args)]
pub struct UiArgs {
    /// Address to serve on (port 0 picks a free one; the address is printed).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Pages and /metrics only: no cancel, requeue or release.
    #[arg(long)]
    read_only: bool,
    /// Actions require this token (form field `token`, or `Authorization: Bearer T`).
    /// Required when the listen address is not loopback, unless --read-only.
    #[arg(long, env = "RUNLEDGER_UI_TOKEN")]
    token: Option<String>,
}

/// What every handler shares.
pub struct Ui {
    store: Store,
    read_only: bool,
    token: Option<String>,
    throughput: throughput::Throughput,
    /// Cancelled at shutdown: live event streams end, so the graceful
    /// shutdown does not wait on them forever.
    stop: CancellationToken,
}

type Shared = Arc<Ui>;

pub async fn run(store: &Store, a: UiArgs) -> Result<()> {
    if a.token.as_deref() == Some("") {
        return Err(Error::Invalid("--token must not be empty".into()));
    }
    if !a.listen.ip().is_loopback() && !a.read_only && a.token.is_none() {
        return Err(Error::Invalid(format!(
            "--listen {} is not a loopback address: give --token (actions would be open to anyone who can reach it) or --read-only",
            a.listen
        )));
    }
    let listener =
        TcpListener::bind(a.listen).await.map_err(|e| Error::Server(format!("cannot listen on {}: {e}", a.listen)))?;
    let addr = listener.local_addr().map_err(|e| Error::Server(format!("listening socket: {e}")))?;
    let ui = Arc::new(Ui {
        store: store.clone(),
        read_only: a.read_only,
        token: a.token,
        throughput: throughput::Throughput::default(),
        stop: CancellationToken::new(),
    });
    let stop = ui.stop.clone();
    let sampler = tokio::spawn(throughput::sample_forever(ui.clone()));
    let app = router(ui);
    println!("runledger ui on http://{addr}/ (metrics on http://{addr}/metrics)");
    tracing::info!(%addr, "dashboard listening");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            stop.cancel();
        })
        .await;
    sampler.abort();
    served.map_err(|e| Error::Server(format!("dashboard server: {e}")))
}

/// A read-only dashboard on a free loopback port, without the throughput
/// sampler, for `bench --dashboard` to measure one page at a time. It serves
/// until `stop` is cancelled.
pub async fn serve_for_bench(store: &Store, stop: CancellationToken) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind("127.0.0.1:0").await.map_err(|e| Error::Server(format!("cannot listen on loopback: {e}")))?;
    let addr = listener.local_addr().map_err(|e| Error::Server(format!("listening socket: {e}")))?;
    let ui = Arc::new(Ui {
        store: store.clone(),
        read_only: true,
        token: None,
        throughput: throughput::Throughput::default(),
        stop: stop.clone(),
    });
    let served = axum::serve(listener, router(ui)).with_graceful_shutdown(stop.cancelled_owned());
    tokio::spawn(async move {
        if let Err(e) = served.await {
            tracing::warn!(error = %e, "bench dashboard server");
        }
    });
    Ok(addr)
}

fn router(ui: Shared) -> Router {
    Router::new()
        .route("/", get(pages::queues))
        .route("/queues/{queue}", get(pages::queue))
        .route("/queues/{queue}/{action}", post(actions::queue_act))
        .route("/queues/{queue}/groups/{action}", post(actions::group_form_act))
        .route("/queues/{queue}/groups/{group}/{action}", post(actions::group_act))
        .route("/runs", get(pages::runs))
        .route("/runs/{run_id}", get(pages::run))
        .route("/runs/{run_id}/live", get(live::events))
        .route("/runs/{run_id}/{action}", post(actions::act))
        .route("/runtimes", get(pages::runtimes))
        .route("/metrics", get(metrics::scrape))
        .route("/assets/app.js", get(html::script))
        .route("/assets/app.css", get(html::style))
        .with_state(ui)
}

/// Ctrl-C or SIGTERM: stop taking connections, finish the requests in flight.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
