//! An async QMP client (tokio).
//!
//! QMP is newline-delimited JSON on a unix socket: QEMU greets, the client negotiates
//! capabilities, then sends commands tagged with an `id` and gets either `return` or `error`
//! back with the same id; asynchronous `event`s arrive in between. One reader task routes replies
//! to their waiting command and events to a broadcast channel, so a command never blocks on
//! events and several commands can be in flight.
//!
//! Everything QEMU sends is bounded before it is parsed: a line is at most [`MAX_LINE`] bytes
//! (reading stops there and the session counts as closed: pending commands fail at once), and
//! errors quote at most [`EXCERPT`] bytes of a line.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP: no greeting from QEMU within {0:?}")]
    NoGreeting(Duration),
    #[error("QMP: I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: unparsable message from QEMU: {0}")]
    Protocol(String),
    #[error("QMP: command {command} got no reply within {after:?}")]
    Timeout { command: String, after: Duration },
    #[error("QMP: command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP: connection closed by QEMU (during {command})")]
    Disconnected { command: String },
}

/// One message from QEMU.
#[derive(Debug, Clone, PartialEq)]
pub enum QmpMessage {
    Greeting {
        version: String,
    },
    Return {
        id: Option<u64>,
        value: Value,
    },
    Error {
        id: Option<u64>,
        class: String,
        desc: String,
    },
    Event(QmpEvent),
}

/// An asynchronous QMP event (`SHUTDOWN`, `POWERDOWN`, `STOP`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
    /// Seconds and microseconds since the epoch, as QEMU stamped it.
    pub timestamp_us: u64,
}

/// Longest line accepted from QEMU, newline included. The largest reply spinbox asks for
/// (`query-status`, hotplug results) is well under a KiB; `query-qmp-schema`, the largest QEMU
/// has, is a few hundred KiB.
pub const MAX_LINE: usize = 1 << 20;

/// How much of an offending line an error quotes.
pub const EXCERPT: usize = 256;

/// At most `max` bytes of `text` (cut on a character boundary), marked when cut.
pub(crate) fn excerpt(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &text[..end], text.len())
}

/// One read of [`read_line_bounded`].
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BoundedLine {
    /// A line without its `\n` (the last one may end at EOF instead).
    Line(Vec<u8>),
    /// No newline within the bound: reading stopped there, the stream is out of step.
    TooLong,
    Eof,
}

/// Reads one `\n`-terminated line of at most `max` bytes, newline included. Never holds or
/// consumes more than `max` bytes: past that it stops and answers [`BoundedLine::TooLong`].
pub(crate) async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<BoundedLine> {
    let mut line = Vec::new();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(match line.is_empty() {
                true => BoundedLine::Eof,
                false => BoundedLine::Line(line),
            });
        }
        let room = max - line.len();
        let (take, done) = match buf.iter().take(room).position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (buf.len().min(room), false),
        };
        line.extend_from_slice(&buf[..take]);
        reader.consume(take);
        if done {
            line.pop();
            return Ok(BoundedLine::Line(line));
        }
        if line.len() >= max {
            return Ok(BoundedLine::TooLong);
        }
    }
}

/// Parses one line QEMU sent.
pub fn parse_message(line: &str) -> Result<QmpMessage, QmpError> {
    let v: Value = serde_json::from_str(line.trim())
        .map_err(|e| QmpError::Protocol(format!("{e}: {}", excerpt(line.trim(), EXCERPT))))?;
    let id = v.get("id").and_then(Value::as_u64);
    if let Some(greeting) = v.get("QMP") {
        let ver = &greeting["version"]["qemu"];
        let version = format!(
            "{}.{}.{}",
            ver["major"].as_u64().unwrap_or(0),
            ver["minor"].as_u64().unwrap_or(0),
            ver["micro"].as_u64().unwrap_or(0)
        );
        return Ok(QmpMessage::Greeting { version });
    }
    if let Some(value) = v.get("return") {
        return Ok(QmpMessage::Return {
            id,
            value: value.clone(),
        });
    }
    if let Some(err) = v.get("error") {
        return Ok(QmpMessage::Error {
            id,
            class: err["class"].as_str().unwrap_or("GenericError").to_owned(),
            desc: err["desc"].as_str().unwrap_or("").to_owned(),
        });
    }
    if let Some(name) = v.get("event").and_then(Value::as_str) {
        let ts = &v["timestamp"];
        // QEMU's numbers, not trusted to fit: saturate instead of overflowing.
        let timestamp_us = ts["seconds"]
            .as_u64()
            .unwrap_or(0)
            .saturating_mul(1_000_000)
            .saturating_add(ts["microseconds"].as_u64().unwrap_or(0));
        return Ok(QmpMessage::Event(QmpEvent {
            name: name.to_owned(),
            data: v.get("data").cloned().unwrap_or(Value::Null),
            timestamp_us,
        }));
    }
    Err(QmpError::Protocol(format!(
        "neither greeting, return, error nor event: {}",
        excerpt(line.trim(), EXCERPT)
    )))
}

/// Serializes a command with its id, newline-terminated.
pub fn encode_command(command: &str, arguments: Option<&Value>, id: u64) -> String {
    let mut msg = json!({ "execute": command, "id": id });
    if let Some(args) = arguments {
        msg["arguments"] = args.clone();
    }
    let mut line = msg.to_string();
    line.push('\n');
    line
}

type Pending = Arc<Mutex<HashMap<u64, (String, oneshot::Sender<Result<Value, QmpError>>)>>>;

/// A connected, negotiated QMP session.
pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
    next_id: AtomicU64,
    timeout: Duration,
    version: String,
    reader: JoinHandle<()>,
}

impl Qmp {
    /// Reads the greeting, starts the reader task and negotiates capabilities. `timeout`
    /// bounds the greeting and every later command.
    pub async fn handshake(stream: UnixStream, timeout: Duration) -> Result<Qmp, QmpError> {
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read);
        let first = match tokio::time::timeout(timeout, read_line_bounded(&mut lines, MAX_LINE))
            .await
            .map_err(|_| QmpError::NoGreeting(timeout))??
        {
            BoundedLine::Line(line) => line,
            BoundedLine::TooLong => {
                return Err(QmpError::Protocol(format!(
                    "no newline in the greeting's first {MAX_LINE} bytes"
                )))
            }
            BoundedLine::Eof => {
                return Err(QmpError::Disconnected {
                    command: "greeting".into(),
                })
            }
        };
        let version = match parse_message(&String::from_utf8_lossy(&first))? {
            QmpMessage::Greeting { version } => version,
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected greeting, got {other:?}"
                )))
            }
        };
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(64);
        let reader = tokio::spawn(read_loop(lines, pending.clone(), events.clone()));
        let qmp = Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending,
            events,
            next_id: AtomicU64::new(1),
            timeout,
            version,
            reader,
        };
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// QEMU's version from the greeting.
    pub fn qemu_version(&self) -> &str {
        &self.version
    }

    /// Events from now on. Subscribe before issuing the command whose event you wait for.
    pub fn subscribe(&self) -> broadcast::Receiver<QmpEvent> {
        self.events.subscribe()
    }

    /// Runs one command and waits (at most the configured `qmp_command` timeout) for its reply.
    pub async fn execute(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        lock(&self.pending).insert(id, (command.to_owned(), tx));
        let line = encode_command(command, arguments.as_ref(), id);
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(line.as_bytes()).await?;
            w.flush().await
        };
        let result = tokio::time::timeout(self.timeout, async {
            write.await?;
            rx.await.unwrap_or(Err(QmpError::Disconnected {
                command: command.to_owned(),
            }))
        })
        .await;
        match result {
            Ok(r) => r,
            Err(_) => {
                lock(&self.pending).remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_owned(),
                    after: self.timeout,
                })
            }
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means a panicking holder; the map itself stays consistent.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn read_loop(
    mut lines: BufReader<OwnedReadHalf>,
    pending: Pending,
    events: broadcast::Sender<QmpEvent>,
) {
    loop {
        let line = match read_line_bounded(&mut lines, MAX_LINE).await {
            Ok(BoundedLine::Line(line)) => String::from_utf8_lossy(&line).into_owned(),
            Ok(BoundedLine::TooLong) => {
                // Out of step with QEMU: treated like a closed connection, never buffered.
                tracing::warn!(
                    max = MAX_LINE,
                    "QMP line without a newline in its first bytes; closing"
                );
                break;
            }
            Ok(BoundedLine::Eof) | Err(_) => break,
        };
        if line.trim().is_empty() {
            continue;
        }
        match parse_message(&line) {
            Ok(QmpMessage::Event(ev)) => {
                tracing::debug!(event = %ev.name, data = %ev.data, "QMP event");
                let _ = events.send(ev);
            }
            Ok(QmpMessage::Return {
                id: Some(id),
                value,
            }) => {
                if let Some((_, tx)) = lock(&pending).remove(&id) {
                    let _ = tx.send(Ok(value));
                }
            }
            Ok(QmpMessage::Error {
                id: Some(id),
                class,
                desc,
            }) => {
                if let Some((command, tx)) = lock(&pending).remove(&id) {
                    let _ = tx.send(Err(QmpError::Command {
                        command,
                        class,
                        desc,
                    }));
                }
            }
            Ok(other) => tracing::debug!(?other, "QMP message without a waiting command"),
            Err(e) => tracing::warn!(error = %e, "ignoring QMP line"),
        }
    }
    // QEMU went away: every command still waiting learns it now, not at its timeout.
    for (_, (command, tx)) in lock(&pending).drain() {
        let _ = tx.send(Err(QmpError::Disconnected { command }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

    #[test]
    fn parses_each_message_kind() {
        assert_eq!(
            parse_message(GREETING).unwrap(),
            QmpMessage::Greeting {
                version: "7.2.22".into()
            }
        );
        assert_eq!(
            parse_message("{\"return\": {}, \"id\": 1}\r\n").unwrap(),
            QmpMessage::Return {
                id: Some(1),
                value: json!({})
            }
        );
        assert_eq!(
            parse_message(r#"{"id": 7, "error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#).unwrap(),
            QmpMessage::Error {
                id: Some(7),
                class: "CommandNotFound".into(),
                desc: "The command nope has not been found".into()
            }
        );
        match parse_message(r#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "SHUTDOWN", "data": {"guest": true, "reason": "guest-shutdown"}}"#).unwrap() {
            QmpMessage::Event(ev) => {
                assert_eq!(ev.name, "SHUTDOWN");
                assert_eq!(ev.timestamp_us, 2_000_005);
                assert_eq!(ev.data["reason"], "guest-shutdown");
            }
            other => panic!("{other:?}"),
        }
        assert!(parse_message("{\"what\": 1}").is_err());
        assert!(parse_message("not json").is_err());
    }

    #[test]
    fn encodes_commands_with_id_and_newline() {
        let line = encode_command("send-key", Some(&json!({"keys": []})), 9);
        assert!(line.ends_with('\n'));
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["execute"], "send-key");
        assert_eq!(v["id"], 9);
        assert_eq!(v["arguments"]["keys"], json!([]));
        let v: Value = serde_json::from_str(&encode_command("quit", None, 1)).unwrap();
        assert!(v.get("arguments").is_none());
    }

    /// A peer speaking QMP framing on the other end of a socketpair: replies out of order,
    /// interleaves an event, answers one command with an error and never answers another.
    #[tokio::test]
    async fn routes_replies_events_errors_and_timeouts() {
        let (client, server) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{GREETING}\r\n").as_bytes())
                .await
                .unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            assert_eq!(caps["execute"], "qmp_capabilities");
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            let a: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let b: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let _never: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            let (status, bad) = if a["execute"] == "query-status" {
                (a, b)
            } else {
                (b, a)
            };
            // Error first, then an event, then the earlier command's reply.
            w.write_all(format!("{{\"id\": {}, \"error\": {{\"class\": \"CommandNotFound\", \"desc\": \"nope\"}}}}\r\n", bad["id"]).as_bytes()).await.unwrap();
            w.write_all(
                b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 0}, \"event\": \"STOP\"}\r\n",
            )
            .await
            .unwrap();
            w.write_all(
                format!(
                    "{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\r\n",
                    status["id"]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
            // Keep the socket open until the client is done, then drain.
            let mut rest = Vec::new();
            let _ = lines.into_inner().read_to_end(&mut rest).await;
        });
        let qmp = Qmp::handshake(client, Duration::from_millis(500))
            .await
            .unwrap();
        assert_eq!(qmp.qemu_version(), "7.2.22");
        let mut events = qmp.subscribe();
        let (status, bad, never) = tokio::join!(
            qmp.execute("query-status", None),
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                qmp.execute("nope", None).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(40)).await;
                qmp.execute("never-answered", None).await
            },
        );
        assert_eq!(status.unwrap()["status"], "running");
        match bad {
            Err(QmpError::Command { command, class, .. }) => {
                assert_eq!(command, "nope");
                assert_eq!(class, "CommandNotFound");
            }
            other => panic!("{other:?}"),
        }
        match never {
            Err(QmpError::Timeout { command, .. }) => assert_eq!(command, "never-answered"),
            other => panic!("{other:?}"),
        }
        assert_eq!(events.recv().await.unwrap().name, "STOP");
        drop(qmp);
        peer.await.unwrap();
    }

    #[tokio::test]
    async fn no_greeting_times_out_and_close_fails_pending() {
        let (client, _server) = UnixStream::pair().unwrap();
        match Qmp::handshake(client, Duration::from_millis(50)).await {
            Err(QmpError::NoGreeting(_)) => {}
            other => panic!("{:?}", other.err()),
        }

        let (client, server) = UnixStream::pair().unwrap();
        let peer = tokio::spawn(async move {
            let (r, mut w) = server.into_split();
            let mut lines = BufReader::new(r).lines();
            w.write_all(format!("{GREETING}\n").as_bytes())
                .await
                .unwrap();
            let caps: Value =
                serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
                .await
                .unwrap();
            // Read the next command, then hang up without answering.
            let _ = lines.next_line().await;
        });
        let qmp = Qmp::handshake(client, Duration::from_secs(5))
            .await
            .unwrap();
        let started = std::time::Instant::now();
        match qmp.execute("quit", None).await {
            Err(QmpError::Disconnected { command }) => assert_eq!(command, "quit"),
            other => panic!("{other:?}"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "must not wait for the timeout"
        );
        peer.await.unwrap();
    }
}

#[cfg(test)]
mod proptests;
