//! Property tests of the hybrid-vsock handshake: whatever the backend answers, the host
//! neither panics nor reads past [`MAX_HYBRID_REPLY`] bytes, and what follows a good reply
//! stays in the stream.

use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Answers one `CONNECT` on a fresh socket with `reply`, then returns what it read.
async fn one_reply(reply: Vec<u8>, port: u32) -> io::Result<(UnixStream, Vec<u8>)> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("v.sock");
    let listener = tokio::net::UnixListener::bind(&path)?;
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut connect = vec![0u8; format!("CONNECT {port}\n").len()];
        s.read_exact(&mut connect).await.unwrap();
        let _ = s.write_all(&reply).await;
        s
    });
    let client = hybrid_connect(&path, port).await?;
    let server = peer.await.map_err(io::Error::other)?;
    drop(server);
    let mut rest = Vec::new();
    let mut client = client;
    client.read_to_end(&mut rest).await?;
    Ok((client, rest))
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_replies_never_panic(reply in prop::collection::vec(any::<u8>(), 0..200)) {
        if let Err(e) = parse_hybrid_reply(&reply) {
            prop_assert!(e.len() < 2 * MAX_HYBRID_REPLY + 200, "{e}");
        }
    }

    #[test]
    fn good_replies_parse(port in any::<u32>(), pad in " {0,3}") {
        let reply = format!("OK {pad}{port}{pad}\n");
        prop_assert_eq!(parse_hybrid_reply(reply.as_bytes()), Ok(port));
    }

    #[test]
    fn damaged_replies_are_refused(port in any::<u32>(), at in any::<usize>(), byte in any::<u8>()) {
        let mut reply = format!("OK {port}\n").into_bytes();
        let at = at % reply.len();
        if reply[at] != byte {
            reply[at] = byte;
            // Still a decimal number in "OK <n>\n" shape: parses to that number, nothing else.
            if let Ok(n) = parse_hybrid_reply(&reply) {
                let text = std::str::from_utf8(&reply).unwrap();
                prop_assert_eq!(text.trim_end_matches('\n').trim_start_matches("OK ").trim().parse::<u32>(), Ok(n));
            }
        }
    }
}

proptest! {
    // Each case is a real socket handshake: fewer of them.
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Over a real socket: a reply is taken through its newline only, the rest stays.
    #[test]
    fn handshake_keeps_what_follows(
        port in any::<u32>(),
        head in prop_oneof![
            "OK [0-9]{1,11}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>().prop_filter("one line", |b| *b != b'\n'), 0..100),
        ],
        tail in prop::collection::vec(any::<u8>(), 0..100),
    ) {
        let mut reply = head.clone();
        reply.push(b'\n');
        reply.extend_from_slice(&tail);
        let out = rt().block_on(one_reply(reply, port));
        let line_ok = parse_hybrid_reply(&[&head[..], b"\n"].concat()).ok();
        match (out, line_ok) {
            (Ok((_, rest)), Some(_)) => prop_assert_eq!(rest, tail),
            (Err(e), None) => prop_assert!(e.to_string().contains(&format!("CONNECT {port}")), "{e}"),
            (out, want) => prop_assert!(false, "{:?} vs {:?}", out.map(|o| o.1), want),
        }
    }
}

/// A backend that streams bytes without a newline: the handshake fails at the bound, at
/// once, naming it (before: `read_until` buffered until the connect timeout).
#[tokio::test]
async fn endless_reply_stops_at_the_bound() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let peer = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let chunk = vec![b'O'; 64 * 1024];
        while s.write_all(&chunk).await.is_ok() {}
    });
    let started = std::time::Instant::now();
    let e = tokio::time::timeout(Duration::from_secs(10), hybrid_connect(&path, 1024))
        .await
        .expect("the handshake must not wait for more bytes")
        .unwrap_err();
    assert!(e.to_string().contains("no newline"), "{e}");
    assert!(e.to_string().contains("CONNECT 1024"), "{e}");
    assert!(started.elapsed() < Duration::from_secs(10));
    peer.await.unwrap();
}
