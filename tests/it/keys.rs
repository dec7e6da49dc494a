//! No two things runledger stores can share a key.
//!
//! Ids, queue names and runner ids may contain `:` (and anything but
//! control characters and braces), so a key built by pasting names together
//! could be another key: run `x:events` was once run `x`'s event stream.
//! This test builds every key of every family (`src/keys.rs` spells them
//! all) for every name made of up to three pieces of an alphabet chosen to
//! provoke collisions (key words, `:`, `#`), under several prefixes, and
//! checks that no key is built twice. A second check reads `lua/` and fails
//! when a script derives a key family that `src/keys.rs` does not spell, so
//! a new key cannot escape the first check.

use std::collections::HashMap;

use runledger::keys::{GlobalKeys, QueueKeys};

/// Pieces that names are made of: every word a key is made of, the
/// separator, and plain text.
const PIECES: &[&str] = &[
    ":", "a", "#0", "run", "runs", "events", "runner", "pinned", "receipt", "idx", "bot", "wake", "pin", "runtime",
    "locator", "queues", "doc", "metadata",
];

/// Names of one to `max` pieces.
fn names(max: usize) -> Vec<String> {
    let mut out: Vec<String> = PIECES.iter().map(|p| p.to_string()).collect();
    let mut last = out.clone();
    for _ in 1..max {
        last = last.iter().flat_map(|n| PIECES.iter().map(move |p| format!("{n}{p}"))).collect();
        out.extend(last.iter().cloned());
    }
    out.retain(|n| runledger::validate::id("name", n).is_ok());
    out
}

/// What a key holds: its family and the names it was built from.
type Owner = (String, String, String);

fn claim(seen: &mut HashMap<String, Owner>, key: String, owner: Owner) {
    if let Some(first) = seen.get(&key) {
        assert_eq!(first, &owner, "key {key:?} is built for {first:?} and for {owner:?}");
    } else {
        seen.insert(key, owner);
    }
}

#[test]
fn no_two_keys_collide() {
    let args = names(3);
    let mut queues = names(1);
    queues.extend(["a:run", "run:a", "a:", ":a", "a:a"].map(String::from));
    let prefixes = ["rl", "a", "run"];
    assert!(prefixes.iter().all(|p| runledger::validate::prefix(p).is_ok()));
    assert!(args.len() > 4_000, "the alphabet builds {} names", args.len());
    let mut seen: HashMap<String, Owner> = HashMap::with_capacity(4_000_000);
    for prefix in prefixes {
        let g = GlobalKeys { prefix: prefix.to_string() };
        let fixed = [("partitions", g.partitions()), ("queues", g.queues()), ("runtimes", g.runtimes())];
        for (family, key) in fixed.into_iter().chain([("runtimes:seq", g.runtime_seq())]) {
            claim(&mut seen, key, (prefix.into(), family.into(), String::new()));
        }
        for arg in &args {
            claim(&mut seen, g.locator(arg), (prefix.into(), "locator".into(), arg.clone()));
            claim(&mut seen, g.runtime(arg), (prefix.into(), "runtime".into(), arg.clone()));
        }
        for queue in &queues {
            let q = QueueKeys::new(prefix, queue);
            let owner = |family: &str, arg: &str| (format!("{prefix} {queue}"), family.to_string(), arg.to_string());
            let fixed = [
                ("queued", q.queued()),
                ("leases", q.leases()),
                ("delayed", q.delayed()),
                ("deadlines", q.deadlines()),
                ("finished", q.finished()),
                ("stats", q.stats()),
                ("dead", q.dead()),
                ("wake", q.wake()),
                ("listeners", q.listeners()),
                ("cancel", q.cancel_channel()),
                ("pins", q.pins()),
                ("hints", q.hints()),
                ("runs", q.runs_index()),
                ("meta", q.meta()),
                ("runners", q.runners()),
                ("running", q.running()),
                ("events-copy", q.events_copy()),
                ("groups", q.groups()),
                ("group-limits", q.group_limits()),
                ("group-rate-limits", q.group_rate_limits()),
                ("group-caps", q.group_caps()),
                ("paused-groups", q.paused_groups()),
                ("audit", q.audit()),
                ("rate", q.rate()),
                ("group-rates", q.group_rates()),
                ("queued-count", q.queued_count()),
                ("docs", q.docs_hash()),
            ];
            for (family, key) in fixed {
                claim(&mut seen, key, owner(family, ""));
            }
            for arg in &args {
                let families = [
                    ("run", q.run(arg)),
                    ("events", q.events(arg)),
                    ("runner", q.runner_lane(arg)),
                    ("pinned", q.pinned_lane(arg)),
                    ("wake:runner", q.runner_wake(arg)),
                    ("wake:pin", q.pin_wake(arg)),
                    ("receipt", q.receipt(arg)),
                    ("group:queued", q.group_queued(arg)),
                    ("group:admitted", q.group_admitted(arg)),
                    ("group:active", q.group_active(arg)),
                    ("group:rate", q.group_rate(arg)),
                ];
                for (family, key) in families {
                    claim(&mut seen, key, owner(family, arg));
                }
                for scope in ["conversation", "bot", "workspace", "thread"] {
                    claim(&mut seen, q.scope_index(scope, arg), owner(&format!("idx:{scope}"), arg));
                }
                for field in runledger::keys::DOCUMENTS {
                    claim(&mut seen, q.doc(field, arg), owner(&format!("doc:{field}"), arg));
                }
            }
        }
    }
    eprintln!("{} distinct keys, none built twice", seen.len());
}

/// The example from the issue: run `x:events` and run `x`'s stream.
#[test]
fn a_run_id_is_never_another_runs_stream() {
    let q = QueueKeys::new("rl", "q");
    assert_ne!(q.run("x:events"), q.events("x"));
    assert_ne!(q.events("x:events"), q.run("x"));
}

/// Prefixes would nest with `:` (prefix `rl`'s runtime `queues` is prefix
/// `rl:runtime`'s queue set), and braces break the hash tag: both are refused.
#[test]
fn prefixes_cannot_nest() {
    let nested = GlobalKeys { prefix: "rl:runtime".into() };
    let outer = GlobalKeys { prefix: "rl".into() };
    assert_eq!(outer.runtime("queues"), nested.queues(), "why the rule exists");
    for bad in ["rl:x", "a{b", "", "a}b"] {
        let err = runledger::validate::prefix(bad).expect_err(bad);
        assert!(err.to_string().contains("prefix"), "{err}");
    }
}

/// Every key family a script derives from the queue's base (`B .. 'word'`)
/// is one the test above builds.
#[test]
fn scripts_derive_only_keys_the_test_knows() {
    let known = [
        "run:",
        "events:",
        "doc:",
        "runner:",
        "pinned:",
        "wake:runner:",
        "wake:pin:",
        "receipt:",
        "idx:",
        "queued",
        "leases",
        "delayed",
        "deadlines",
        "finished",
        "stats",
        "dead",
        "wake",
        "listeners",
        "cancel",
        "pins",
        "hints",
        "runs",
        "meta",
        "runners",
        "running",
        "events-copy",
        "group:",
        "groups",
        "group-limits",
        "group-rate-limits",
        "group-caps",
        "paused-groups",
        "audit",
        "rate",
        "group-rates",
        "queued-count",
        "docs",
    ];
    let mut found = 0;
    for dir in ["lua", "lua/include"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
        for entry in std::fs::read_dir(&dir).expect("read lua dir") {
            let path = entry.expect("dir entry").path();
            if path.extension().is_none_or(|e| e != "lua") {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read script");
            for (i, _) in text.match_indices("B .. '") {
                let rest = &text[i + "B .. '".len()..];
                let word = &rest[..rest.find('\'').expect("closing quote")];
                assert!(
                    known.contains(&word),
                    "{} derives key family {word:?}, unknown to tests/it/keys.rs",
                    path.display()
                );
                found += 1;
            }
        }
    }
    assert!(found > 20, "found only {found} derived keys: did the scripts' spelling change?");
}
