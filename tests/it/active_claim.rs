//! The active claim of LangBot's host API: status `claimed`, the same token,
//! the same runtime when one is named, and a lease not yet expired by the
//! server's clock. `validate_active_claim` tells it; renew and release with
//! a `runtime_id` require it, and refuse anything else with nothing written.

use crate::common;

use std::time::Duration;

use runledger::*;

const Q: &str = "ac";

async fn claimed(store: &Store, run_id: &str, lease: Duration) -> String {
    store.create_run(&NewRun::new(run_id, "agent").queue(Q)).await.expect("create");
    let request = ClaimRequest::new("rt-1").queue(Q).lease(lease);
    let run = store.claim_next_run(&request).await.expect("claim").expect("the run");
    assert_eq!(run.run_id, run_id);
    run.claim_token.expect("token")
}

async fn the_active_claim_is_token_runtime_and_lease() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let token = claimed(&store, "a1", Duration::from_secs(60)).await;

    assert!(store.validate_active_claim("a1", Some("rt-1"), &token).await.expect("validate"));
    assert!(store.validate_active_claim("a1", None, &token).await.expect("validate, any runtime"));
    assert!(!store.validate_active_claim("a1", Some("rt-2"), &token).await.expect("another runtime"));
    assert!(!store.validate_active_claim("a1", Some("rt-1"), "f00df00df00df00df00d").await.expect("another token"));
    assert!(!store.validate_active_claim("nope", Some("rt-1"), &token).await.expect("an unknown run"));
    let err = store.validate_active_claim("a1", Some("rt-1"), "").await.expect_err("empty token");
    assert!(matches!(err, Error::Invalid(_)), "{err:?}");

    // Another runtime with the right token renews and releases nothing.
    let before = common::keyspace(&mut raw).await;
    let err = store.renew_claim_by("a1", &token, Some("rt-2"), Duration::from_secs(60)).await.expect_err("renew");
    assert!(matches!(err, Error::StaleToken(ref m) if m.contains("rt-1")), "{err:?}");
    let release = Release { runtime_id: Some("rt-2".into()), ..Default::default() };
    let err = store.release_claim("a1", &token, &release).await.expect_err("release");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    assert_eq!(common::keyspace(&mut raw).await, before, "refused calls wrote nothing");

    // The holder does both.
    let renewed = store.renew_claim_by("a1", &token, Some("rt-1"), Duration::from_secs(90)).await.expect("renew");
    assert_eq!(renewed.status, RunStatus::Claimed);
    let release = Release { runtime_id: Some("rt-1".into()), ..Default::default() };
    let released = store.release_claim("a1", &token, &release).await.expect("release");
    assert_eq!(released.status, RunStatus::Queued);
    assert!(!store.validate_active_claim("a1", Some("rt-1"), &token).await.expect("after release"));
}

async fn an_expired_lease_is_not_an_active_claim() {
    let (_redis, store) = common::store().await;
    let token = claimed(&store, "e1", Duration::from_millis(200)).await;
    // A hang guard, not a speed limit: the server's clock passes the lease sooner or later.
    let expired = tokio::time::timeout(Duration::from_secs(60), async {
        while store.validate_active_claim("e1", Some("rt-1"), &token).await.expect("validate") {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(expired.is_ok(), "hang guard: the lease never expired by the server's clock");
    // Nobody claimed it since, and still: no renewal, no release.
    let err = store.renew_claim_by("e1", &token, Some("rt-1"), Duration::from_secs(60)).await.expect_err("renew");
    assert!(matches!(err, Error::StaleToken(_)), "{err:?}");
    let release = Release { runtime_id: Some("rt-1".into()), ..Default::default() };
    assert!(matches!(store.release_claim("e1", &token, &release).await, Err(Error::StaleToken(_))));
}

backend_tests!(the_active_claim_is_token_runtime_and_lease, an_expired_lease_is_not_an_active_claim);

/// `renew --runtime` and `release --runtime` on the CLI: the wrong runtime
/// exits 5 (a lost claim), the holder succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_renew_and_release_check_the_runtime() {
    let (redis, store) = common::store().await;
    let token = claimed(&store, "c1", Duration::from_secs(60)).await;
    let cli = |args: Vec<&str>| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_runledger"));
        cmd.arg("--redis").arg(&redis.url).args(args).env_remove("REDIS_URL");
        cmd
    };
    let run = |mut cmd: std::process::Command| tokio::task::block_in_place(move || cmd.output().expect("run the CLI"));
    let out = run(cli(vec!["renew", "c1", "--token", &token, "--runtime", "rt-2"]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "one line");
    let out = run(cli(vec!["renew", "c1", "--token", &token, "--runtime", "rt-1"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(cli(vec!["release", "c1", "--token", &token, "--runtime", "rt-2"]));
    assert_eq!(out.status.code(), Some(5), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run(cli(vec!["--json", "release", "c1", "--token", &token, "--runtime", "rt-1"]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let released: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(released["status"], "queued");
}
