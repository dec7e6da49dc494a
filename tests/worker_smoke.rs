mod common;
use runledger::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_everything() {
    let (_r, store) = common::store().await;
    for i in 0..50 {
        store
            .create_run(&NewRun::new(format!("r{i}"), "agent").queue(if i % 2 == 0 { "a" } else { "b" }))
            .await
            .unwrap();
    }
    let worker = Worker::builder(&store)
        .queues(["a", "b"])
        .concurrency(4)
        .handle_signals(false)
        .build(|ctx| async move {
            ctx.emit_many(vec![("progress".into(), json!({"p": 1})), ("progress".into(), json!({"p": 2}))]).await?;
            Ok(Done::default())
        })
        .unwrap();
    let stop = worker.shutdown_token();
    let h = tokio::spawn(worker.run());
    let t0 = std::time::Instant::now();
    loop {
        let a = store.queue_stats("a", 0).await.unwrap();
        let b = store.queue_stats("b", 0).await.unwrap();
        if a.finished + b.finished == 50 {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "not all finished: {a:?} {b:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let report = h.await.unwrap().unwrap();
    assert_eq!(report.completed, 50);
    for i in 0..50 {
        let page = store.page_run_events(&format!("r{i}"), None, None, 10, Direction::Forward).await.unwrap();
        assert_eq!(page.items.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![1, 2]);
    }
}
