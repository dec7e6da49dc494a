//! The Redis settings runledger recommends: the private server has them, a run
//! hash with ~200 bytes of metadata stays a compact listpack there and at
//! Redis's stock settings (its long documents live in doc keys of their own),
//! and `Store::config_advice` names a setting that falls short.

use crate::common;

use runledger::*;
use serde_json::json;

async fn set(raw: &mut runledger::store::Conn, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG").arg("SET").arg(name).arg(value).query_async(raw).await.expect("CONFIG SET");
}

#[tokio::test]
async fn config_advice_names_what_falls_short() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    assert_eq!(store.config_advice().await.expect("advice"), [], "the test server has the recommended settings");

    set(&mut raw, "hash-max-listpack-value", "64").await;
    let advice = store.config_advice().await.expect("advice");
    assert_eq!(
        advice,
        [ConfigAdvice { name: "hash-max-listpack-value".into(), actual: "64".into(), recommended: "1024".into() }]
    );

    set(&mut raw, "hash-max-listpack-value", "4096").await;
    assert_eq!(store.config_advice().await.expect("advice"), [], "more than recommended is fine");
}

async fn encoding(raw: &mut runledger::store::Conn, key: &str) -> String {
    redis::cmd("OBJECT").arg("ENCODING").arg(key).query_async(raw).await.expect("OBJECT ENCODING")
}

#[tokio::test]
async fn a_run_with_metadata_stays_a_listpack_at_recommended_and_stock_settings() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let metadata = json!({ "user": "ada", "text": "x".repeat(200) });
    let usage = json!({ "tokens": 812, "detail": "y".repeat(100) });
    // At Redis's stock limit too: the long documents live in the queue's docs hash.
    for (run_id, limit) in [("big", "1024"), ("big2", "64")] {
        set(&mut raw, "hash-max-listpack-value", limit).await;
        store.create_run(&NewRun::new(run_id, "agent").queue("q").metadata(metadata.clone())).await.expect("create");
        let claimed = store.claim_next_run(&ClaimRequest::new("rt").queue("q")).await.expect("claim").expect("a run");
        assert_eq!(claimed.metadata, metadata, "the claim reads the document back");
        let finish = Finish::new(RunStatus::Completed).usage(usage.clone()).metadata(json!({ "done": true }));
        store.finalize_run(&claimed.run_id, &finish, claimed.claim_token.as_deref()).await.expect("finalize");
        let key = format!("rl:{{q}}:run:{}", claimed.run_id);
        assert_eq!(encoding(&mut raw, &key).await, "listpack", "{key} at hash-max-listpack-value {limit}");
        for field in ["metadata", "usage"] {
            let stored: String = redis::cmd("HGET").arg(&key).arg(field).query_async(&mut raw).await.expect("HGET");
            assert_eq!(stored, runledger::keys::DOCS_MARK, "{field} moved out of {key}");
            let docs = store.queue_keys("q").docs_hash();
            let text: String = redis::cmd("HGET")
                .arg(&docs)
                .arg(runledger::keys::doc_field(field, &claimed.run_id))
                .query_async(&mut raw)
                .await
                .expect("HGET doc");
            assert!(text.starts_with('{'), "{docs} holds the document: {text}");
        }
        let run = store.get_run(&claimed.run_id).await.expect("get");
        let mut merged = metadata.clone();
        merged["done"] = json!(true);
        assert_eq!((run.metadata, run.usage), (merged, Some(usage.clone())), "get_run reads the documents back");
    }
}
