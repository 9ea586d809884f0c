//! Property tests: whatever QEMU sends, parsing neither panics nor buffers without bound.

use proptest::prelude::*;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;

use super::*;

/// Arbitrary JSON, leaning on the shapes and keys QMP uses so the parser's branches are hit.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("QMP".to_string()),
        Just("return".to_string()),
        Just("error".to_string()),
        Just("event".to_string()),
        Just("id".to_string()),
        Just("class".to_string()),
        Just("desc".to_string()),
        Just("data".to_string()),
        Just("timestamp".to_string()),
        Just("seconds".to_string()),
        Just("microseconds".to_string()),
        Just("version".to_string()),
        Just("qemu".to_string()),
        Just("major".to_string()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(|n| json!(n)),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,16}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Valid messages of every kind, with arbitrary numbers where QEMU puts numbers.
fn valid_line() -> impl Strategy<Value = String> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(a, b, c)| json!({
            "QMP": {"version": {"qemu": {"major": a, "minor": b, "micro": c}}, "capabilities": []}
        })
        .to_string()),
        (any::<u64>(), json_value()).prop_map(|(id, v)| json!({"return": v, "id": id}).to_string()),
        (any::<u64>(), ".{0,12}", ".{0,12}").prop_map(|(id, c, d)| json!({
            "id": id, "error": {"class": c, "desc": d}
        })
        .to_string()),
        (".{0,12}", any::<u64>(), any::<u64>(), json_value()).prop_map(|(n, s, us, d)| json!({
            "event": n, "timestamp": {"seconds": s, "microseconds": us}, "data": d
        })
        .to_string()),
    ]
}

/// Byte-level damage to a valid line: overwrite, insert, delete, truncate.
fn mutated(line: String, edits: Vec<(usize, u8, u8)>) -> Vec<u8> {
    let mut bytes = line.into_bytes();
    for (at, kind, byte) in edits {
        let at = if bytes.is_empty() {
            0
        } else {
            at % bytes.len()
        };
        match kind % 4 {
            0 if !bytes.is_empty() => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 if !bytes.is_empty() => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
    }
    bytes
}

/// A parse result's error stays short whatever the line's length.
fn check(line: &str) -> Result<(), TestCaseError> {
    if let Err(e) = parse_message(line) {
        let msg = e.to_string();
        prop_assert!(
            msg.len() <= 2 * EXCERPT + 256,
            "error of {} bytes",
            msg.len()
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_text_never_panics(line in ".{0,300}") {
        check(&line)?;
    }

    #[test]
    fn arbitrary_json_never_panics(v in json_value()) {
        check(&v.to_string())?;
    }

    #[test]
    fn valid_messages_parse(line in valid_line()) {
        let msg = parse_message(&line);
        prop_assert!(msg.is_ok(), "{line}: {msg:?}");
        if let Ok(QmpMessage::Event(ev)) = msg {
            let v: Value = serde_json::from_str(&line).unwrap();
            let (s, us) = (v["timestamp"]["seconds"].as_u64().unwrap(), v["timestamp"]["microseconds"].as_u64().unwrap());
            prop_assert_eq!(ev.timestamp_us, s.saturating_mul(1_000_000).saturating_add(us));
        }
    }

    #[test]
    fn mutated_messages_never_panic(
        line in valid_line(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        check(&String::from_utf8_lossy(&mutated(line, edits)))?;
    }

    /// The bounded reader against a model: lines shorter than `max` bytes (so at most `max`
    /// with their newline) come back exactly, whatever the chunking; at the first longer one
    /// (or an unterminated tail of `max` bytes) it stops.
    #[test]
    fn bounded_reader_matches_its_model(
        input in prop::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..400),
        max in 1usize..64,
        chunk in 1usize..17,
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let got = rt.block_on(async {
            let (mut w, r) = tokio::io::duplex(chunk);
            let feed = input.clone();
            let writer = tokio::spawn(async move {
                let _ = w.write_all(&feed).await;
            });
            let mut r = tokio::io::BufReader::with_capacity(chunk, r);
            let mut got = Vec::new();
            loop {
                match read_line_bounded(&mut r, max).await.unwrap() {
                    BoundedLine::Eof => break,
                    BoundedLine::TooLong => {
                        got.push(None);
                        break;
                    }
                    BoundedLine::Line(l) => {
                        prop_assert!(l.len() < max);
                        got.push(Some(l));
                    }
                }
            }
            drop(r);
            writer.abort();
            Ok(got)
        })?;
        let mut want = Vec::new();
        let mut rest = &input[..];
        while !rest.is_empty() {
            match rest.iter().position(|b| *b == b'\n') {
                Some(i) if i < max => {
                    want.push(Some(rest[..i].to_vec()));
                    rest = &rest[i + 1..];
                }
                None if rest.len() < max => {
                    want.push(Some(rest.to_vec()));
                    rest = &[];
                }
                _ => {
                    want.push(None);
                    rest = &[];
                }
            }
        }
        prop_assert_eq!(got, want);
    }
}

/// QEMU (or whatever holds the socket) sending an endless line: the handshake fails at the
/// bound instead of buffering it.
#[tokio::test]
async fn endless_greeting_stops_at_the_bound() {
    let (client, server) = UnixStream::pair().unwrap();
    let peer = tokio::spawn(async move {
        let (_r, mut w) = server.into_split();
        let chunk = vec![b'x'; 64 * 1024];
        let mut sent = 0usize;
        while w.write_all(&chunk).await.is_ok() {
            sent += chunk.len();
            if sent > 4 * MAX_LINE {
                break;
            }
        }
        sent
    });
    match Qmp::handshake(client, Duration::from_secs(20)).await {
        Err(QmpError::Protocol(msg)) => assert!(msg.contains("newline"), "{msg}"),
        other => panic!("{:?}", other.err()),
    }
    // The peer got stuck (or was cut off) well before it could send 4x the bound.
    let sent = peer.await.unwrap();
    assert!(sent <= 4 * MAX_LINE, "{sent}");
}

/// After the handshake, an over-long line ends the session: a pending command fails at once
/// (Disconnected), not at its timeout, and nothing past the bound is read.
#[tokio::test]
async fn endless_line_after_handshake_disconnects() {
    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}}, "capabilities": []}}"#;
    let (client, server) = UnixStream::pair().unwrap();
    let peer = tokio::spawn(async move {
        let (r, mut w) = server.into_split();
        let mut lines = BufReader::new(r).lines();
        w.write_all(format!("{GREETING}\n").as_bytes())
            .await
            .unwrap();
        let caps: Value = serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap();
        w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", caps["id"]).as_bytes())
            .await
            .unwrap();
        let _ = lines.next_line().await;
        let chunk = vec![b'{'; 64 * 1024];
        for _ in 0..(2 * MAX_LINE / chunk.len()) {
            if w.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = lines.next_line().await;
    });
    let qmp = Qmp::handshake(client, Duration::from_secs(30))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    match qmp.execute("query-status", None).await {
        Err(QmpError::Disconnected { command }) => assert_eq!(command, "query-status"),
        other => panic!("{other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "must not wait for the timeout"
    );
    drop(qmp);
    peer.await.unwrap();
}
