//! Markup helpers of the dashboard: escaping, the page frame, times, links,
//! and the two static assets (compiled into the binary).

use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use runledger::Error;

/// Text for HTML content and attribute values.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Everything but RFC 3986's unreserved characters.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// One path segment or query value (run ids may hold `/`, `?`, `#`, spaces).
pub fn enc(text: &str) -> String {
    utf8_percent_encode(text, SEGMENT).to_string()
}

/// Epoch seconds as `2026-12-03 12:00:01Z`, or `-`.
pub fn when(epoch_s: Option<i64>) -> String {
    epoch_s
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .map(|t| t.format("%Y-%m-%d %H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// A duration in seconds, short: `4.2 s`, `3 min`, `2.5 h`, or `-`.
pub fn age(seconds: Option<f64>) -> String {
    match seconds {
        None => "-".into(),
        Some(s) if s < 60.0 => format!("{s:.1} s"),
        Some(s) if s < 3600.0 => format!("{:.0} min", s / 60.0),
        Some(s) if s < 172_800.0 => format!("{:.1} h", s / 3600.0),
        Some(s) => format!("{:.1} d", s / 86_400.0),
    }
}

pub fn run_link(run_id: &str) -> String {
    format!(r#"<a href="/runs/{}">{}</a>"#, enc(run_id), esc(run_id))
}

pub fn queue_link(queue: &str) -> String {
    format!(r#"<a href="/queues/{}">{}</a>"#, enc(queue), esc(queue))
}

/// The page frame: navigation, then `body`. `refresh` makes app.js reload
/// the page's `<main>` every few seconds.
pub fn page(title: &str, body: &str, refresh: bool) -> Html<String> {
    let refresh = if refresh { r#" data-refresh="5""# } else { "" };
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} · runledger</title><link rel="stylesheet" href="/assets/app.css"></head>
<body><nav><b>runledger</b> <a href="/">Queues</a> <a href="/runs">Runs</a> <a href="/runtimes">Runtimes</a> <a href="/metrics">Metrics</a></nav>
<main{refresh}>
<h1>{title}</h1>
{body}
</main>
<script src="/assets/app.js"></script>
</body></html>"#,
        title = esc(title),
    ))
}

/// A page saying what went wrong, with the status code the error calls for.
pub fn error_page(err: &Error) -> Response {
    let status = match err {
        Error::NotFound(_) => StatusCode::NOT_FOUND,
        Error::Invalid(_) => StatusCode::BAD_REQUEST,
        Error::Conflict(_) | Error::Finished(_) | Error::OutOfOrder(_) | Error::StaleToken(_) => StatusCode::CONFLICT,
        Error::DeadlinePassed(_) | Error::Limit(_) => StatusCode::CONFLICT,
        Error::QueueFull(_) => StatusCode::TOO_MANY_REQUESTS,
        _ => StatusCode::BAD_GATEWAY,
    };
    message(status, &err.to_string())
}

pub fn message(status: StatusCode, text: &str) -> Response {
    let body = format!(r#"<p class="error">{}</p>"#, esc(text));
    (status, page(status.canonical_reason().unwrap_or("Error"), &body, false)).into_response()
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("assets/app.js"))
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("assets/app.css"))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "max-age=300")], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_encodes_segments() {
        assert_eq!(esc(r#"<a href="x">'&'</a>"#), "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;");
        assert_eq!(enc("a/b c?#"), "a%2Fb%20c%3F%23");
        assert_eq!(age(Some(3.25)), "3.2 s");
        assert_eq!(when(Some(0)), "1970-01-01 00:00:00Z");
    }
}
