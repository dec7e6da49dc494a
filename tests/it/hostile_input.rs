//! Hostile input is refused with one clear error and writes nothing: the
//! whole keyspace (`DUMP` of every key) is the same before and after each
//! refused call. And sequences up to 2^53 - 1 land exactly (Lua would write
//! 1e14 as "1e+14", no stream id, and half-land a batch).

use crate::common;

use std::time::Duration;

use runledger::scripts::Scripts;
use runledger::*;
use serde_json::json;

const Q: &str = "hq";

/// A queue with one claimed run "h": its token.
async fn held_run(store: &Store) -> String {
    store.create_run(&NewRun::new("h", "agent").queue(Q)).await.expect("create");
    let request = ClaimRequest::new("rt").queue(Q).lease(Duration::from_secs(60));
    let run = store.claim_next_run(&request).await.expect("claim").expect("the run");
    run.claim_token.expect("token")
}

/// KEYS of append_events for one run: the queue's keys, its hash, its stream.
fn append_keys(keys: &runledger::keys::QueueKeys, run_id: &str) -> Vec<String> {
    let mut k = keys.fixed().to_vec();
    k.push(keys.run(run_id));
    k.push(keys.events(run_id));
    k
}

fn event(sequence: i64) -> NewEvent {
    NewEvent::new(sequence, "step", json!({ "n": sequence }))
}

#[tokio::test]
async fn a_sequence_of_1e14_lands_whole() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let token = held_run(&store).await;
    let big = 100_000_000_000_000;
    let landed = store.append_events("h", Some(&token), &[event(1), event(big)]).await.expect("append");
    assert_eq!(landed.iter().map(|e| e.sequence).collect::<Vec<_>>(), [1, big]);
    let ids: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(store.queue_keys(Q).events("h"))
        .arg("-")
        .arg("+")
        .query_async(&mut raw)
        .await
        .expect("XRANGE");
    let ids: Vec<&str> = ids.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, ["1-0", "100000000000000-0"]);
    // The largest sequence there is lands too, and the host's next audit event has no number left.
    let max = runledger::store::MAX_SEQUENCE;
    store.append_events("h", Some(&token), &[event(max)]).await.expect("append the largest sequence");
    let before = common::keyspace(&mut raw).await;
    let err = store.append_audit_event("h", "note", None, None).await.expect_err("no sequence left");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused audit event wrote something");
}

#[tokio::test]
async fn refused_inputs_change_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let token = held_run(&store).await;
    store.append_event("h", Some(&token), &event(1)).await.expect("a first event");

    // Through the library: refused before anything is sent.
    let too_many_events: Vec<NewEvent> = (2..=1002).map(event).collect();
    let too_many_runs: Vec<NewRun> = (0..10_001).map(|i| NewRun::new(format!("b{i}"), "agent").queue(Q)).collect();
    let before = common::keyspace(&mut raw).await;
    let refusals: Vec<(&str, Error)> = vec![
        ("sequence 0", store.append_event("h", Some(&token), &event(0)).await.expect_err("sequence 0")),
        ("sequence -1", store.append_event("h", Some(&token), &event(-1)).await.expect_err("sequence -1")),
        (
            "sequence 2^53",
            store.append_event("h", Some(&token), &event(9_007_199_254_740_992)).await.expect_err("2^53"),
        ),
        ("1,001 events", store.append_events("h", Some(&token), &too_many_events).await.expect_err("1,001 events")),
        ("10,001 runs", store.create_runs(&too_many_runs).await.expect_err("10,001 runs")),
    ];
    for (what, err) in &refusals {
        assert!(matches!(err, Error::Invalid(_)), "{what}: {err:?}");
    }
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused library call wrote something");

    // Straight to the script, as another client could: refused by the script itself.
    let scripts = Scripts::new();
    let keys = store.queue_keys(Q);
    let k = append_keys(&keys, "h");
    let call = |events: Vec<[String; 7]>| {
        let mut args =
            vec![keys.base.clone(), "h".to_string(), token.clone(), "1048576".to_string(), "100000".to_string()];
        for e in events {
            args.extend(e);
        }
        args
    };
    let one = |seq: &str| {
        [seq.to_string(), "step".into(), "{}".into(), String::new(), "runner".into(), String::new(), String::new()]
    };
    let hostile: Vec<(&str, Vec<String>)> = vec![
        ("a non-numeric sequence", call(vec![one("abc")])),
        ("a fractional sequence", call(vec![one("1.5")])),
        ("a NaN sequence", call(vec![one("nan")])),
        ("a negative sequence", call(vec![one("-3")])),
        ("a sequence of 2^53", call(vec![one("9007199254740992")])),
        ("a good event then a bad one", call(vec![one("2"), one("1e300")])),
        ("1,001 events", call((2..=1002).map(|s| one(&s.to_string())).collect())),
        ("a cap of 0 events per run", {
            let mut args = call(vec![one("2")]);
            args[4] = "0".into();
            args
        }),
        ("a non-numeric cap of events per run", {
            let mut args = call(vec![one("2")]);
            args[4] = "many".into();
            args
        }),
    ];
    for (what, args) in hostile {
        let reply: redis::RedisResult<redis::Value> = redis::cmd("EVAL")
            .arg(scripts.append_events.code)
            .arg(k.len())
            .arg(&k)
            .arg(&args)
            .query_async(&mut raw)
            .await;
        let err = reply.expect_err(what);
        assert_eq!(err.code(), Some("INVALID"), "{what}: {err:?}");
        assert_eq!(common::keyspace(&mut raw).await, before, "{what}: the refused script wrote something");
    }
}

/// A queue whose `runs` index is ahead of its clock (its meta hash was lost
/// or edited, or the server clock was set back) still creates runs whole:
/// the new ids follow the index, instead of a run hash written and then its
/// index entry refused.
#[tokio::test]
async fn a_clock_behind_the_index_still_creates_whole_runs() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let first = store.create_run(&NewRun::new("first", "agent").queue(Q)).await.expect("create");
    let keys = store.queue_keys(Q);
    // An index entry an hour ahead of the queue's clock.
    let ahead = first.id + 3_600_000 * 4096;
    let _: String = redis::cmd("XADD")
        .arg(keys.runs_index())
        .arg(format!("{ahead}-0"))
        .arg("r")
        .arg("elsewhere")
        .query_async(&mut raw)
        .await
        .expect("XADD");
    let next = store.create_run(&NewRun::new("next", "agent").queue(Q)).await.expect("create after the jump");
    assert!(next.id > ahead, "id {} does not follow the index ({ahead})", next.id);
    assert_eq!(next.id % 4096, first.id % 4096, "the queue number stays in the id");
    let last: Vec<(String, Vec<(String, String)>)> = redis::cmd("XREVRANGE")
        .arg(keys.runs_index())
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut raw)
        .await
        .expect("XREVRANGE");
    assert_eq!(last[0].0, format!("{}-0", next.id), "the new run is the index's newest entry");
    assert_eq!(store.get_run("next").await.expect("get").status, RunStatus::Queued);
}

/// A Redis user without rights on the cancel channel: cancelling a claimed
/// run is refused (the notice cannot go out) and nothing is written, rather
/// than a cancel recorded that its holder never hears of.
#[tokio::test]
async fn a_cancel_refused_by_the_acl_writes_nothing() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    held_run(&store).await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "nochannels", "on", ">secret", "~*", "+@all", "resetchannels"][..])
        .query_async(&mut raw)
        .await
        .expect("ACL SETUSER");
    let url = redis.url.replacen("redis://", "redis://nochannels:secret@", 1);
    let limited = Store::connect(&url).await.expect("connect as the limited user");
    let before = common::keyspace(&mut raw).await;
    let err = limited.request_cancel("h", Some("operator")).await.expect_err("no channel rights");
    assert!(err.to_string().contains("publish"), "the error says what was refused: {err}");
    assert_eq!(common::keyspace(&mut raw).await, before, "a refused cancel wrote something");
    assert!(store.get_run("h").await.expect("get").cancel_requested_at.is_none());
}

/// JSON and text are checked in full at the edge, and in O(1) in Lua.
///
/// Every entry point (the CLI, the Worker, the dashboard, the Python
/// package) goes through the library, which parses each document, bounds
/// its depth and size, and sends only UTF-8: broken JSON, two objects, an
/// unterminated string, JSON nested 65 deep and 10 MiB documents are refused
/// there, by the CLI with exit code 2, with nothing written. The scripts keep
/// the checks that stop a raw call from storing what no reader expects: a
/// document's shape (an object, by its first and last byte) and size, and
/// ids (controls, C1 controls, invalid UTF-8, braces; at most 200 bytes).
/// They do not parse JSON: that would cost the hot path a decode per document.
#[tokio::test]
async fn json_and_text_are_checked_in_full_at_the_edge() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let token = held_run(&store).await;
    let before = common::keyspace(&mut raw).await;

    // The CLI, as a user types it.
    let nested = |n: usize| format!("{}{}", "{\"a\":".repeat(n), "1".to_string() + &"}".repeat(n));
    let texts: Vec<(&str, String)> = vec![
        ("broken JSON", r#"{"a": broken}"#.into()),
        ("two objects", r#"{"a":1}{"b":2}"#.into()),
        ("an unterminated string", r#"{"a":"}"#.into()),
        ("not an object", "[1, 2]".into()),
        ("JSON nested 65 deep", nested(65)),
    ];
    for (what, data) in &texts {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", &redis.url, "append", "h", "--seq", "2", "--type", "step", "--data", data])
            .args(["--token", &token])
            .output()
            .expect("run the CLI");
        assert_eq!(out.status.code(), Some(2), "{what}: {}", String::from_utf8_lossy(&out.stderr));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("data"), "{what}: the error names the argument: {stderr}");
        assert_eq!(common::keyspace(&mut raw).await, before, "{what}: the refused CLI call wrote something");
    }
    // The library: too deep, too large.
    let mut deep = json!(1);
    for _ in 0..65 {
        deep = json!({ "a": deep });
    }
    let huge = json!({ "t": "x".repeat(10 << 20) });
    for (what, data) in [("JSON nested 65 deep", deep), ("10 MiB of data", huge)] {
        let err = store.append_event("h", Some(&token), &NewEvent::new(2, "step", data)).await.expect_err(what);
        assert!(matches!(err, Error::Invalid(_)), "{what}: {err:?}");
        assert_eq!(common::keyspace(&mut raw).await, before, "{what}: the refused library call wrote something");
    }

    // A raw call: the scripts' own checks, before any write.
    let scripts = Scripts::new();
    let keys = store.queue_keys(Q);
    let k = append_keys(&keys, "h");
    // (what, event type, data), sent as raw bytes.
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        ("an array for data", b"step".to_vec(), b"[1]".to_vec()),
        ("a number for data", b"step".to_vec(), b"42".to_vec()),
        ("a string for data", b"step".to_vec(), br#""{}""#.to_vec()),
        ("no data", b"step".to_vec(), Vec::new()),
        ("10 MiB of data", b"step".to_vec(), format!(r#"{{"t":"{}"}}"#, "x".repeat(10 << 20)).into_bytes()),
        ("invalid UTF-8 in the type", b"st\xc3\x28ep".to_vec(), b"{}".to_vec()),
        ("a C1 control in the type", b"st\xc2\x85ep".to_vec(), b"{}".to_vec()),
        ("a truncated sequence in the type", b"step\xe2\x82".to_vec(), b"{}".to_vec()),
        ("a brace in the type", b"st{x}ep".to_vec(), b"{}".to_vec()),
    ];
    for (what, event_type, data) in cases {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(scripts.append_events.code).arg(k.len()).arg(&k);
        cmd.arg(&keys.base).arg("h").arg(&token).arg("1048576").arg("100000");
        cmd.arg("2").arg(event_type).arg(data).arg("").arg("runner").arg("").arg("");
        let err = cmd.query_async::<redis::Value>(&mut raw).await.expect_err(what);
        assert_eq!(err.code(), Some("INVALID"), "{what}: {err:?}");
        assert_eq!(common::keyspace(&mut raw).await, before, "{what}: the refused script wrote something");
    }
    // Valid UTF-8 beyond ASCII, and JSON nested 64 deep, go through the library.
    store
        .append_event(
            "h",
            Some(&token),
            &NewEvent::new(2, "étape-步骤-🚀", serde_json::from_str(&nested(64)).expect("64 deep")),
        )
        .await
        .expect("valid UTF-8 and JSON 64 deep");
    let events = common::all_events(&store, "h").await;
    assert_eq!(events.last().map(|e| e.event_type.as_str()), Some("étape-步骤-🚀"));
}

/// A run hash edited by hand into a state no script writes (an unknown
/// status, a non-numeric priority or lease) is refused by every operation
/// that meets it, with an error naming the key and field, and nothing is
/// written: the scripts decide nothing from a value they cannot trust.
#[tokio::test]
async fn a_hand_edited_run_is_refused_with_nothing_written() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let token = held_run(&store).await;
    store.create_run(&NewRun::new("q1", "agent").queue(Q)).await.expect("a queued run");
    let hset = |key: &str, field: &str, value: &str| {
        let mut cmd = redis::cmd("HSET");
        cmd.arg(key).arg(field).arg(value);
        cmd
    };
    let run_h = store.queue_keys(Q).run("h");
    let run_q1 = store.queue_keys(Q).run("q1");

    // (run, field, edited value, operations that must refuse it)
    let cases: [(&str, &str, &str, &[&str]); 4] = [
        ("h", "status", "bogus", &["renew", "append", "finalize", "cancel"]),
        ("h", "claim_lease_expires_at", "soon", &["renew", "append", "finalize", "cancel"]),
        ("q1", "priority", "high", &["claim", "finalize", "cancel"]),
        ("q1", "status", "", &["claim", "finalize", "cancel"]),
    ];
    for (run_id, field, value, ops) in cases {
        let key = if run_id == "h" { &run_h } else { &run_q1 };
        let original: String =
            redis::cmd("HGET").arg(key.as_str()).arg(field).query_async(&mut raw).await.expect("HGET");
        let _: i64 = hset(key, field, value).query_async(&mut raw).await.expect("edit by hand");
        let before = common::keyspace(&mut raw).await;
        let what = format!("{run_id}: {field} = {value:?}");
        let fenced = (run_id == "h").then_some(token.as_str());
        for op in ops {
            let result = match *op {
                "renew" => store.renew_claim(run_id, &token, Duration::from_secs(60)).await.map(|_| ()),
                "append" => store.append_event(run_id, fenced, &event(2)).await.map(|_| ()),
                "finalize" => store.finalize_run(run_id, &Finish::new(RunStatus::Completed), fenced).await.map(|_| ()),
                "cancel" => store.request_cancel(run_id, None).await.map(|_| ()),
                _ => store.claim_next_run(&ClaimRequest::new("rt2").queue(Q)).await.map(|_| ()),
            };
            match result {
                Err(Error::Protocol(msg)) => {
                    assert!(msg.contains(field) && msg.contains("by hand"), "{what}: {op}: {msg}")
                }
                other => panic!("{what}: {op}: expected a refusal naming {field}, got {other:?}"),
            }
            assert_eq!(common::keyspace(&mut raw).await, before, "{what}: the refused {op} wrote something");
        }
        let _: i64 = hset(key, field, &original).query_async(&mut raw).await.expect("restore");
    }
    // Put back, both runs work again.
    store.finalize_run("h", &Finish::new(RunStatus::Completed), Some(&token)).await.expect("finalize h");
    let claimed = store.claim_next_run(&ClaimRequest::new("rt2").queue(Q)).await.expect("claim").expect("q1");
    assert_eq!(claimed.run_id, "q1");
}
