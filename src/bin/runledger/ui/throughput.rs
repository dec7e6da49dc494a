//! Throughput and failures over the last minutes, for the queue chart: the
//! dashboard samples every queue's cumulative counters every few seconds
//! (one `queue_stats` call per queue, as a `/metrics` scrape does) and keeps
//! the last ten minutes in memory. The chart starts when the dashboard does;
//! Prometheus keeps the long history.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::Shared;

pub const INTERVAL: Duration = Duration::from_secs(5);
/// Ten minutes of samples.
const KEEP: usize = 121;

/// (completed, failed + timeout) of one queue at one sample.
type Counts = (i64, i64);

#[derive(Default)]
pub struct Throughput {
    samples: Mutex<VecDeque<(i64, HashMap<String, Counts>)>>,
}

impl Throughput {
    fn push(&self, at_ms: i64, counts: HashMap<String, Counts>) {
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        samples.push_back((at_ms, counts));
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    /// Per interval, oldest first: runs completed and runs failed in it.
    pub fn deltas(&self, queue: &str) -> Vec<Counts> {
        let samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        let series: Vec<Counts> = samples.iter().map(|(_, c)| c.get(queue).copied().unwrap_or((0, 0))).collect();
        series.windows(2).map(|w| ((w[1].0 - w[0].0).max(0), (w[1].1 - w[0].1).max(0))).collect()
    }

    /// A small bar chart (inline SVG): completed in green, failed stacked in red.
    pub fn chart(&self, queue: &str) -> String {
        let deltas = self.deltas(queue);
        if deltas.is_empty() {
            return r#"<span class="muted">sampling…</span>"#.into();
        }
        let (w, h, bar) = (240, 36, 2);
        let top = deltas.iter().map(|(c, f)| c + f).max().unwrap_or(0).max(1) as f64;
        let mut svg = format!(
            r#"<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img"><title>{} completed, {} failed in the last {} s</title>"#,
            deltas.iter().map(|d| d.0).sum::<i64>(),
            deltas.iter().map(|d| d.1).sum::<i64>(),
            deltas.len() as u64 * INTERVAL.as_secs(),
        );
        let start = w - deltas.len() as i64 * bar;
        for (i, (done, failed)) in deltas.iter().enumerate() {
            let x = start + i as i64 * bar;
            let hd = (*done as f64 / top * h as f64).round() as i64;
            let hf = (*failed as f64 / top * h as f64).round() as i64;
            if hd > 0 {
                svg.push_str(&format!(r#"<rect x="{x}" y="{}" width="{bar}" height="{hd}" class="ok"/>"#, h - hd));
            }
            if hf > 0 {
                svg.push_str(&format!(
                    r#"<rect x="{x}" y="{}" width="{bar}" height="{hf}" class="bad"/>"#,
                    h - hd - hf
                ));
            }
        }
        svg.push_str("</svg>");
        svg
    }
}

/// Samples until the task is aborted; a failed sample is logged and skipped.
pub async fn sample_forever(ui: Shared) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tick.tick().await;
        let at = chrono::Utc::now().timestamp_millis();
        match ui.store.queue_overview(0).await {
            Ok(rows) => {
                let counts = rows
                    .iter()
                    .map(|s| {
                        let get = |k: &str| s.counters.get(k).copied().unwrap_or(0);
                        (s.queue_name.clone(), (get("completed"), get("failed") + get("timeout")))
                    })
                    .collect();
                ui.throughput.push(at, counts);
            }
            Err(e) => tracing::warn!(error = %e, "throughput sample failed"),
        }
    }
}
