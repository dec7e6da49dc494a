//! A `runledger ui` process for a test: started on a free loopback port
//! against the test's Redis, killed (by its PID, through the child handle)
//! when the handle drops.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct Dashboard {
    pub base: String,
    child: Child,
}

impl Dashboard {
    /// `runledger --redis URL ui --listen 127.0.0.1:0 <extra>`, once it says where it listens.
    pub async fn start(redis_url: &str, extra: &[&str]) -> Dashboard {
        let mut child = Command::new(env!("CARGO_BIN_EXE_runledger"))
            .args(["--redis", redis_url, "ui", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start runledger ui");
        let stdout = child.stdout.take().expect("ui stdout");
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("runledger ui printed nothing in 30 s")
            .expect("read ui stdout")
            .expect("runledger ui exited before listening");
        let base = line
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .unwrap_or_else(|| panic!("no address in {line:?}"))
            .trim_end_matches('/')
            .to_string();
        // Keep draining stdout so the process never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Dashboard { base, child }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }
}

/// An HTTP client that never follows redirects (the tests look at them) and
/// never waits more than 30 s.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http client")
}

/// The text of the cells of the first `<tr ...{marker}...>` row of `html`.
pub fn row_cells(html: &str, marker: &str) -> Vec<String> {
    let start = html.find(marker).unwrap_or_else(|| panic!("no row with {marker} in page"));
    let row_start = html[..start].rfind("<tr").expect("row start");
    let row_end = start + html[start..].find("</tr>").expect("row end");
    let row = &html[row_start..row_end];
    row.split("<td")
        .skip(1)
        .map(|cell| {
            let inner = &cell[cell.find('>').map(|i| i + 1).unwrap_or(0)..];
            let inner = inner.split("</td>").next().unwrap_or("");
            strip_tags(inner).trim().to_string()
        })
        .collect()
}

fn strip_tags(text: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}
