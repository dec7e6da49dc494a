//! The Redis settings runledger recommends: the private server has them, a run
//! hash with ~200 bytes of metadata stays a compact listpack there, and
//! `Store::config_advice` names a setting that falls short.

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
async fn a_run_with_metadata_stays_a_listpack_on_the_recommended_settings() {
    let (redis, store) = common::store().await;
    let mut raw = common::raw(&redis).await;
    let metadata = json!({ "user": "ada", "text": "x".repeat(200) });
    store.create_run(&NewRun::new("big", "agent").queue("q").metadata(metadata.clone())).await.expect("create");
    assert_eq!(encoding(&mut raw, "rl:{q}:run:big").await, "listpack");

    // At Redis's default limit the same run takes a hash table.
    set(&mut raw, "hash-max-listpack-value", "64").await;
    store.create_run(&NewRun::new("big2", "agent").queue("q").metadata(metadata)).await.expect("create");
    assert_eq!(encoding(&mut raw, "rl:{q}:run:big2").await, "hashtable");
}
