//! A minimal Server-Sent Events reader for the relay's live streams (`text/event-stream`):
//! opens a stream with a bearer token and an optional `Last-Event-ID`, and hands out events one
//! by one, each with a deadline. Comment lines (keep-alives) are counted, not returned.

use std::time::Duration;

use serde_json::Value;

use crate::api::http_builder;

/// One event as the relay sent it.
#[derive(Clone, Debug)]
pub struct SseEvent {
    pub id: Option<i64>,
    pub event: String,
    pub data: Value,
}

/// An open stream.
pub struct SseStream {
    resp: reqwest::Response,
    buf: String,
    /// Keep-alive comments seen so far.
    pub comments: usize,
    /// The id of the last event that carried one (what a browser would send on reconnect).
    pub last_id: Option<i64>,
}

/// Opens `path` on `base`. Returns the status and body text instead when it is not 200.
pub async fn open(
    base: &str,
    path: &str,
    token: &str,
    last_event_id: Option<i64>,
) -> Result<SseStream, (u16, String)> {
    let client = http_builder().build().expect("http client");
    let mut req = client
        .get(format!("{base}{path}"))
        .bearer_auth(token)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id.to_string());
    }
    let resp = req.send().await.expect("SSE request");
    if resp.status().as_u16() != 200 {
        let status = resp.status().as_u16();
        return Err((status, resp.text().await.unwrap_or_default()));
    }
    let ct = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    assert!(ct.starts_with("text/event-stream"), "content-type {ct}");
    Ok(SseStream {
        resp,
        buf: String::new(),
        comments: 0,
        last_id: last_event_id,
    })
}

impl SseStream {
    /// The next event, or `None` if none arrives within `timeout` (or the stream ended).
    pub async fn next_within(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(ev) = self.parse_one() {
                return Some(ev);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk()).await;
            match chunk {
                Ok(Ok(Some(bytes))) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    /// The next event, which must arrive within `timeout`.
    #[track_caller]
    pub fn expect_within(
        &mut self,
        timeout: Duration,
    ) -> impl std::future::Future<Output = SseEvent> + '_ {
        let at = std::panic::Location::caller();
        async move {
            self.next_within(timeout)
                .await
                .unwrap_or_else(|| panic!("no SSE event within {timeout:?} (waited at {at})"))
        }
    }

    /// Skips events until one of kind `event` arrives; panics after `timeout`.
    pub async fn expect_kind(&mut self, event: &str, timeout: Duration) -> SseEvent {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_within(left).await {
                Some(e) if e.event == event => return e,
                Some(_) => {}
                None => panic!("no `{event}` event within {timeout:?}"),
            }
        }
    }

    fn parse_one(&mut self) -> Option<SseEvent> {
        loop {
            let norm = self.buf.replace("\r\n", "\n");
            self.buf = norm;
            let end = self.buf.find("\n\n")?;
            let block: String = self.buf[..end].to_owned();
            self.buf.drain(..end + 2);
            let mut id = None;
            let mut event = String::from("message");
            let mut data = String::new();
            let mut any = false;
            for line in block.lines() {
                if line.starts_with(':') {
                    self.comments += 1;
                    continue;
                }
                let (k, v) = line.split_once(':').unwrap_or((line, ""));
                let v = v.strip_prefix(' ').unwrap_or(v);
                any = true;
                match k {
                    "id" => id = v.parse().ok(),
                    "event" => event = v.to_owned(),
                    "data" => {
                        if !data.is_empty() {
                            data.push('\n');
                        }
                        data.push_str(v);
                    }
                    _ => {}
                }
            }
            if !any {
                continue;
            }
            if id.is_some() {
                self.last_id = id;
            }
            return Some(SseEvent {
                id,
                event,
                data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
            });
        }
    }
}
