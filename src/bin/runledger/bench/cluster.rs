//! `runledger bench --cluster`: the lifecycle workload on a Redis Cluster and,
//! in the same run, on a single server, so the two are compared side by side.
//!
//! Both get the same logical queue `bench` spread over 6 partitions (on the
//! cluster they land on every master). For each backend it reports runs per
//! second through the whole lifecycle, the Redis CPU per lifecycle summed
//! over the masters, and each master's share of it. On a small machine the
//! nodes share the cores, so the shares (each master should carry about a
//! third) say more than the rate, which the machine cannot scale.

use runledger::embedded::RedisServer;
use runledger::{Result, Store};
use serde::Serialize;

use super::BenchArgs;
use super::probe::OPERATION_CALLS;
use super::workload::{enqueue_batched, lifecycle};
use crate::output::Output;
use crate::private::PrivateRedis;
use crate::target::Target;

const PARTITIONS: u32 = 6;

#[derive(Serialize)]
struct Row {
    backend: String,
    workers: usize,
    runs: usize,
    lifecycle_per_s: f64,
    /// Redis CPU per lifecycle, summed over the masters.
    redis_cpu_us_per_lifecycle: f64,
    /// Each master's share of that CPU (address, fraction).
    master_cpu_shares: Vec<(String, f64)>,
    /// Each master's EVALSHA calls during the lifecycle phase.
    master_script_calls: Vec<(String, u64)>,
}

/// The master nodes of a cluster (by `CLUSTER NODES` of a seed), or the server itself.
async fn masters(url: &str, cluster: bool) -> Result<Vec<String>> {
    let Some(seeds) = runledger::store::conn::cluster_nodes(url, cluster)? else { return Ok(vec![url.to_string()]) };
    let seed = seeds.first().cloned().unwrap_or_default();
    let mut conn = redis::Client::open(seed.as_str())?.get_multiplexed_async_connection().await?;
    let nodes: String = redis::cmd("CLUSTER").arg("NODES").query_async(&mut conn).await?;
    let mut out: Vec<String> = nodes
        .lines()
        .filter(|l| l.split_whitespace().nth(2).is_some_and(|f| f.contains("master") && !f.contains("fail")))
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|addr| format!("redis://{}/", addr.split('@').next().unwrap_or(addr)))
        .collect();
    out.sort();
    Ok(out)
}

/// (CPU seconds, EVALSHA calls) of one node.
async fn node_counters(url: &str) -> Result<(f64, u64)> {
    let mut conn = redis::Client::open(url)?.get_multiplexed_async_connection().await?;
    let text: String = redis::cmd("INFO").arg("all").query_async(&mut conn).await?;
    let mut cpu = 0.0;
    let mut calls = 0;
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("used_cpu_sys:").or_else(|| line.strip_prefix("used_cpu_user:")) {
            cpu += v.trim().parse::<f64>().unwrap_or(0.0);
        }
        for name in OPERATION_CALLS {
            if let Some(stats) = line.strip_prefix(&format!("cmdstat_{name}:")) {
                calls +=
                    stats.split(',').find_map(|p| p.strip_prefix("calls=")).and_then(|c| c.parse().ok()).unwrap_or(0);
            }
        }
    }
    Ok((cpu, calls))
}

async fn measure(backend: &str, url: &str, target: &Target, a: &BenchArgs, workers: usize) -> Result<Row> {
    let prefix = format!("{}-cbench-{workers}-{}", target.prefix, target.wait_replicas);
    let store = Store::connect_with(url, target.config(&prefix)).await?;
    let cluster = store.is_cluster();
    store.declare_partitions("bench", PARTITIONS).await?;
    enqueue_batched(&store, "bench", a.runs).await?;
    let nodes = masters(url, cluster).await?;
    let mut before = Vec::new();
    for node in &nodes {
        before.push(node_counters(node).await?);
    }
    let took = lifecycle(&store, "bench", workers, a.runs).await?;
    let mut cpu = Vec::new();
    let mut calls = Vec::new();
    for (node, (cpu0, calls0)) in nodes.iter().zip(before) {
        let (cpu1, calls1) = node_counters(node).await?;
        cpu.push((node.clone(), cpu1 - cpu0));
        calls.push((node.clone(), calls1.saturating_sub(calls0)));
    }
    let total: f64 = cpu.iter().map(|(_, c)| c).sum();
    Ok(Row {
        backend: backend.to_string(),
        workers,
        runs: a.runs,
        lifecycle_per_s: a.runs as f64 / took.as_secs_f64(),
        redis_cpu_us_per_lifecycle: total * 1e6 / a.runs as f64,
        master_cpu_shares: cpu.into_iter().map(|(n, c)| (n, if total > 0.0 { c / total } else { 0.0 })).collect(),
        master_script_calls: calls,
    })
}

pub async fn run(target: &Target, out: &Output, a: &BenchArgs) -> Result<()> {
    let (_cluster, cluster_url) = match target.url.clone() {
        Some(url) => (None, url),
        None => {
            let cluster = PrivateRedis::start(true)?;
            let url = cluster.url();
            (Some(cluster), url)
        }
    };
    let single = RedisServer::start()?;
    eprintln!("bench: cluster at {cluster_url}, single server at {} (same run)", single.url());
    let mut rows = Vec::new();
    let mut workers = vec![a.workers];
    if a.many_workers > 0 {
        workers.push(a.many_workers);
    }
    // The write concern's cost: the cluster again, every write waiting for a replica.
    let concerned = Target { wait_replicas: target.wait_replicas.max(1), ..target.clone() };
    // The single server is reached as one, whatever --cluster says.
    let plain = Target { cluster: false, ..target.clone() };
    let mut cases = Vec::new();
    for &w in &workers {
        cases.push(("single server", single.url(), &plain, w));
        cases.push(("cluster, 3 masters", cluster_url.clone(), target, w));
    }
    cases.push(("cluster, 3 masters, --wait-replicas 1", cluster_url.clone(), &concerned, a.workers));
    for (backend, url, target, w) in cases {
        let row = measure(backend, &url, target, a, w).await?;
        eprintln!(
            "bench: {backend}, {w} workers: {:.0} runs/s, {:.1} us Redis CPU per lifecycle",
            row.lifecycle_per_s, row.redis_cpu_us_per_lifecycle
        );
        rows.push(row);
    }
    if out.json {
        out.json(&rows);
        return Ok(());
    }
    println!("| backend | workers | lifecycle runs/s | Redis CPU us/lifecycle (all masters) | CPU share per master |");
    println!("| --- | --- | --- | --- | --- |");
    for r in &rows {
        let shares: Vec<String> = r.master_cpu_shares.iter().map(|(_, s)| format!("{:.0}%", s * 100.0)).collect();
        println!(
            "| {} | {} | {:.0} | {:.1} | {} |",
            r.backend,
            r.workers,
            r.lifecycle_per_s,
            r.redis_cpu_us_per_lifecycle,
            shares.join(" / ")
        );
    }
    Ok(())
}
