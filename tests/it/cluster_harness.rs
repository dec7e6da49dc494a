//! The private Redis Cluster harness itself: it starts, its masters cover
//! every slot, and it survives losing a master. Without redis-server or
//! redis-cli on PATH this fails (with what to install) rather than skipping,
//! so a missing binary cannot pass for a green cluster suite.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use runledger::embedded_cluster::{RedisCluster, SLOTS};

/// (first, last, master port) for every range in CLUSTER SLOTS, asked
/// directly rather than through the harness, so the harness is checked
/// against Redis and not against itself.
fn cluster_slots(url: &str) -> Vec<(u16, u16, u16)> {
    use redis::Value;
    let client = redis::Client::open(url).expect("client");
    let mut con = client.get_connection_with_timeout(Duration::from_secs(2)).expect("connect");
    let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER").arg("SLOTS").query(&mut con).expect("CLUSTER SLOTS");
    ranges
        .iter()
        .map(|range| match range.as_slice() {
            [Value::Int(first), Value::Int(last), Value::Array(master), ..] => match master.as_slice() {
                [_, Value::Int(port), ..] => (*first as u16, *last as u16, *port as u16),
                other => panic!("CLUSTER SLOTS master entry: {other:?}"),
            },
            other => panic!("CLUSTER SLOTS range: {other:?}"),
        })
        .collect()
}

#[test]
fn cluster_covers_every_slot_and_fails_over() {
    let began = Instant::now();
    let mut cluster = RedisCluster::start().unwrap_or_else(|e| panic!("starting the private Redis Cluster: {e}"));
    let started_in = began.elapsed();
    assert_eq!(cluster.ports().len(), 6);
    assert_eq!(cluster.node_urls().len(), 6);
    assert!(cluster.url().starts_with("redis+cluster://127.0.0.1:") && cluster.url().ends_with('/'));

    let masters = cluster.master_ports().expect("master ports");
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    let ranges = cluster_slots(&cluster.node_urls()[0]);
    let mut covered = vec![false; usize::from(SLOTS)];
    for &(first, last, port) in &ranges {
        assert!(masters.contains(&port), "range {first}-{last} is on {port}, not a master in {masters:?}");
        for slot in first..=last {
            assert!(!covered[usize::from(slot)], "slot {slot} is in two ranges");
            covered[usize::from(slot)] = true;
        }
        assert_eq!(cluster.master_of_slot(first).expect("owner"), port);
        assert_eq!(cluster.master_of_slot(last).expect("owner"), port);
    }
    assert!(covered.iter().all(|&c| c), "some slots are not covered: {ranges:?}");
    let owners: BTreeSet<u16> = ranges.iter().map(|r| r.2).collect();
    assert_eq!(owners.len(), 3, "3 masters share the slots: {ranges:?}");
    assert!(cluster.master_of_slot(SLOTS).is_err());

    let victim = cluster.master_of_slot(0).expect("owner of slot 0");
    cluster.kill(victim).expect("kill");
    assert!(cluster.kill(victim).is_err(), "a killed node cannot be killed again");
    let killed = Instant::now();
    cluster
        .wait_ok(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("after killing {victim}: {e}\n{}", cluster.logs()));
    let failover_in = killed.elapsed();

    let after = cluster.master_ports().expect("master ports after failover");
    assert_eq!(after.len(), 3, "masters after failover: {after:?}");
    assert_ne!(after, masters);
    assert!(!after.contains(&victim));
    let promoted = cluster.master_of_slot(0).expect("owner of slot 0 after failover");
    assert_ne!(promoted, victim);
    assert!(cluster.logs().contains("Failover election won"), "no election in the logs");

    // The old master comes back from its nodes.conf as a replica of the one
    // that replaced it.
    cluster.restart_node(victim).expect("restart");
    cluster.wait_ok(Duration::from_secs(10)).expect("ok after restart");
    assert_eq!(cluster.master_ports().expect("master ports after restart"), after);
    cluster.wait_replicas_up(Duration::from_secs(10)).expect("replicas up after restart");

    drop(cluster);
    eprintln!("cluster started in {started_in:?}, failover took {failover_in:?}, whole test {:?}", began.elapsed());
}
