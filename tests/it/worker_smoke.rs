use crate::common;
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
    // A hang guard, not a speed limit: the runs must end, however slow the machine.
    let all_finished = tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let a = store.queue_stats("a", 0).await.unwrap();
            let b = store.queue_stats("b", 0).await.unwrap();
            if a.finished + b.finished == 50 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    if all_finished.is_err() {
        let a = store.queue_stats("a", 0).await.unwrap();
        let b = store.queue_stats("b", 0).await.unwrap();
        panic!("hang guard: not all runs finished after 120 s: {a:?} {b:?}");
    }
    stop.cancel();
    let report = h.await.unwrap().unwrap();
    assert_eq!(report.completed, 50);
    for i in 0..50 {
        let page = store.page_run_events(&format!("r{i}"), None, None, 10, Direction::Forward).await.unwrap();
        assert_eq!(page.items.iter().map(|e| e.sequence).collect::<Vec<_>>(), vec![1, 2]);
    }
}
