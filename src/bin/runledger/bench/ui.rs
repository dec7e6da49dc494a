//! `runledger bench --dashboard`: what watching costs Redis. For 10 and for
//! 1,000 queues (each with queued, claimed and finished runs), a private
//! redis-server and an in-process dashboard without its sampler; each page
//! and `/metrics` is fetched a few times, and the figures are the Redis
//! commands per request (INFO commandstats, script inner commands included)
//! and the median time per request.

use std::time::{Duration, Instant};

use runledger::{ClaimRequest, Error, Finish, NewRun, RegisterRuntime, Result, RunStatus, Store};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use super::probe::Probe;
use crate::measure::percentile;
use crate::output::Output;
use crate::private::PrivateRedis;
use crate::target::Target;

const QUEUE_COUNTS: [usize; 2] = [10, 1000];

#[derive(Serialize)]
pub struct PageCost {
    pub queues: usize,
    pub path: String,
    pub requests: usize,
    pub redis_commands_per_request: Option<f64>,
    pub median_ms: f64,
}

pub async fn run(target: &Target, out: &Output) -> Result<()> {
    if target.url.is_some() || target.cluster {
        return Err(Error::Invalid(
            "bench --dashboard starts a private redis-server of its own (it counts every command the server runs)"
                .into(),
        ));
    }
    let mut rows = Vec::new();
    for queues in QUEUE_COUNTS {
        let server = PrivateRedis::start(false)?;
        let store = Store::connect(&server.url()).await?;
        let sample_run = fill(&store, queues).await?;
        let stop = CancellationToken::new();
        let addr = crate::ui::serve_for_bench(&store, stop.clone()).await?;
        let requests = if queues >= 1000 { 5 } else { 20 };
        let paths = [
            "/metrics".to_string(),
            "/".to_string(),
            "/queues/q-0".to_string(),
            "/runs".to_string(),
            format!("/runs/{sample_run}"),
            "/runtimes".to_string(),
        ];
        for path in paths {
            rows.push(measure(&store, addr, &path, queues, requests).await?);
        }
        stop.cancel();
    }
    if out.json {
        out.json(&rows);
    } else {
        println!("{:>7}  {:<22}  {:>14}  {:>10}", "QUEUES", "REQUEST", "REDIS CMDS/REQ", "MEDIAN ms");
        for r in &rows {
            let cmds = r.redis_commands_per_request.map(|c| format!("{c:.0}")).unwrap_or_else(|| "n/a".into());
            println!("{:>7}  {:<22}  {:>14}  {:>10.2}", r.queues, r.path, cmds, r.median_ms);
        }
    }
    Ok(())
}

/// `queues` queues with 5 queued, 1 claimed and 2 finished runs each, and 3
/// runtimes; returns a run id with events for the run page.
async fn fill(store: &Store, queues: usize) -> Result<String> {
    for rt in 0..3 {
        store.register_runtime(&RegisterRuntime::new(format!("rt-{rt}"))).await?;
    }
    let mut sample = String::new();
    for chunk in (0..queues).collect::<Vec<_>>().chunks(50) {
        let runs: Vec<NewRun> = chunk
            .iter()
            .flat_map(|q| (0..8).map(move |i| NewRun::new(format!("r-{q}-{i}"), "bench-agent").queue(format!("q-{q}"))))
            .collect();
        store.create_runs(&runs).await?;
        for q in chunk {
            let queue = format!("q-{q}");
            let request = ClaimRequest::new(format!("rt-{}", q % 3)).queue(&queue).lease(Duration::from_secs(600));
            for n in 0..3 {
                let Some(run) = store.claim_next_run(&request).await? else { break };
                let events: Vec<runledger::NewEvent> = (1..=3)
                    .map(|s| runledger::NewEvent::new(s, "progress", serde_json::json!({ "step": s })))
                    .collect();
                store.append_events(&run.run_id, run.claim_token.as_deref(), &events).await?;
                if n < 2 {
                    store
                        .finalize_run(&run.run_id, &Finish::new(RunStatus::Completed), run.claim_token.as_deref())
                        .await?;
                }
                sample = run.run_id.clone();
            }
        }
    }
    Ok(sample)
}

async fn measure(
    store: &Store,
    addr: std::net::SocketAddr,
    path: &str,
    queues: usize,
    requests: usize,
) -> Result<PageCost> {
    let probe = Probe::new(store);
    // One fetch first: connections, script loads and the locator cache are warm.
    get(addr, path).await?;
    let before = probe.command_calls().await?;
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let start = Instant::now();
        get(addr, path).await?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    let after = probe.command_calls().await?;
    let commands = match (before, after) {
        (Some(b), Some(a)) => {
            let total = |m: &std::collections::HashMap<String, (f64, f64)>| {
                m.iter().filter(|(name, _)| name.as_str() != "info").map(|(_, (calls, _))| calls).sum::<f64>()
            };
            if std::env::var_os("RUNLEDGER_BENCH_BREAKDOWN").is_some() {
                let mut d: Vec<(String, f64)> = a
                    .iter()
                    .map(|(k, (c, _))| (k.clone(), c - b.get(k).map(|x| x.0).unwrap_or(0.0)))
                    .filter(|(_, c)| *c > 0.0)
                    .collect();
                d.sort_by(|x, y| y.1.total_cmp(&x.1));
                eprintln!("{path} at {queues} queues: {d:?}");
            }
            Some((total(&a) - total(&b)) / requests as f64)
        }
        _ => None,
    };
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(PageCost {
        queues,
        path: path.to_string(),
        requests,
        redis_commands_per_request: commands,
        median_ms: percentile(&times, 0.5),
    })
}

/// One GET over HTTP/1.1 (Connection: close); an error unless the status is 200.
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<()> {
    let fail = |e: std::io::Error| Error::Server(format!("dashboard GET {path}: {e}"));
    let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(fail)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(fail)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.map_err(fail)?;
    let head = String::from_utf8_lossy(&response[..response.len().min(64)]).to_string();
    if !head.starts_with("HTTP/1.1 200") {
        return Err(Error::Server(format!("dashboard GET {path}: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(())
}
