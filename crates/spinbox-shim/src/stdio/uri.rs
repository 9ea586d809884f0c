//! containerd's stdout/stderr values, read the way containerd's runc shim reads them.
//!
//! containerd's shim parses the value with Go's `url.Parse` and uses: for `binary://` the
//! decoded path as the program and the decoded query (`url.Values`, `+` is a space) as its
//! arguments, the first value of each key; for `file://` the decoded path; anything without a
//! scheme is a fifo path, taken as it is. Where Go quietly drops a malformed query pair (an
//! invalid escape, a `;`) or ignores a host, spinbox refuses the URI, naming it: a typo such
//! as `binary://usr/bin/logger` would otherwise run `/bin/logger`.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// Where containerd wants a process's output: a fifo or file path (`file://` or bare), or a
/// `binary://` logger that spinbox starts and feeds through pipes, as containerd's runc shim does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    Path(PathBuf),
    Binary {
        program: PathBuf,
        /// In the URI's order, one per key (its first value), both percent-decoded.
        args: Vec<(String, String)>,
    },
}

/// Parses a stdout/stderr value from containerd.
pub fn parse_output(uri: &str) -> io::Result<OutputTarget> {
    let bad = |what: String| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("stdio target {uri:?}: {what}"),
        )
    };
    let scheme = uri
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .filter(|s| s == "binary" || s == "file");
    let Some(scheme) = scheme else {
        if !uri.starts_with('/') {
            return Err(bad("neither an absolute path, file:// nor binary://".into()));
        }
        return Ok(OutputTarget::Path(PathBuf::from(uri)));
    };
    if uri.bytes().any(|b| b < 0x20 || b == 0x7f) {
        return Err(bad("contains a control character".into()));
    }
    let rest = &uri[scheme.len() + 3..];
    let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
    unescape(fragment, false).map_err(|e| bad(format!("{e} in the fragment")))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (host, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if !host.is_empty() {
        return Err(bad(format!(
            "a host ({host:?}) where the path should start: write {scheme}:///absolute/path"
        )));
    }
    let path = unescape(path, false).map_err(|e| bad(format!("{e} in the path")))?;
    if !path.starts_with(b"/") {
        return Err(bad("the path must be absolute".into()));
    }
    if path.contains(&0) {
        return Err(bad("the path holds a NUL byte".into()));
    }
    let path = PathBuf::from(OsString::from_vec(path));
    if scheme == "file" {
        return Ok(OutputTarget::Path(path));
    }
    let mut args: Vec<(String, String)> = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        if pair.contains(';') {
            return Err(bad(format!(
                "query pair {pair:?} holds a ';' (separate arguments with '&')"
            )));
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let decode = |s: &str| {
            let bytes = unescape(s, true).map_err(|e| bad(format!("{e} in {pair:?}")))?;
            if bytes.contains(&0) {
                return Err(bad(format!("{pair:?} decodes to a NUL byte")));
            }
            String::from_utf8(bytes).map_err(|_| bad(format!("{pair:?} decodes to non-UTF-8")))
        };
        let (k, v) = (decode(k)?, decode(v)?);
        // Go's url.Values keeps every value; containerd passes the first.
        if !args.iter().any(|(seen, _)| *seen == k) {
            args.push((k, v));
        }
    }
    Ok(OutputTarget::Binary {
        program: path,
        args,
    })
}

/// Percent-decodes like Go's `url.PathUnescape` (`plus_is_space` false) or
/// `url.QueryUnescape` (true): `%` must start two hex digits.
fn unescape(s: &str, plus_is_space: bool) -> Result<Vec<u8>, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                match (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
                    (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                    _ => {
                        let end = (i + 3).min(bytes.len());
                        let seq = String::from_utf8_lossy(&bytes[i..end]);
                        return Err(format!("invalid escape {seq:?}"));
                    }
                }
                i += 3;
            }
            b'+' if plus_is_space => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binary(program: &str, args: &[(&str, &str)]) -> OutputTarget {
        OutputTarget::Binary {
            program: program.into(),
            args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn parses_containerd_output_targets() {
        assert_eq!(
            parse_output("/run/containerd/fifo/1-stdout").unwrap(),
            OutputTarget::Path("/run/containerd/fifo/1-stdout".into())
        );
        assert_eq!(
            parse_output("file:///var/log/c.log").unwrap(),
            OutputTarget::Path("/var/log/c.log".into())
        );
        assert_eq!(
            parse_output("binary:///usr/bin/logger?tag=x&verbose").unwrap(),
            binary("/usr/bin/logger", &[("tag", "x"), ("verbose", "")])
        );
        assert!(parse_output("binary://relative").is_err());
        assert!(parse_output("relative/path").is_err());
    }

    /// What `ctr run --log-uri` and containerd's `cio.BinaryIO` produce (Go's
    /// `url.Values.Encode`: spaces as `+`, reserved bytes as `%XX`; the path `%`-escaped).
    #[test]
    fn decodes_like_containerd() {
        assert_eq!(
            parse_output("binary:///opt/my%20logger/bin?tag=a+b&dir=%2Fvar%2Flog&pct=100%25")
                .unwrap(),
            binary(
                "/opt/my logger/bin",
                &[("tag", "a b"), ("dir", "/var/log"), ("pct", "100%")]
            )
        );
        // '+' is a space in the query only; %2F in the path is a '/'.
        assert_eq!(
            parse_output("binary:///usr/bin/c++%2Flog?a%2Bb=c%20d+e").unwrap(),
            binary("/usr/bin/c++/log", &[("a+b", "c d e")])
        );
        // The first value of a key, as containerd passes vs[0]; '=' inside a value stays.
        assert_eq!(
            parse_output("binary:///l?k=1&k=2&x=a=b&&").unwrap(),
            binary("/l", &[("k", "1"), ("x", "a=b")])
        );
        // A fragment is not part of the query; file:// paths are decoded too.
        assert_eq!(
            parse_output("binary:///l?k=v#frag").unwrap(),
            binary("/l", &[("k", "v")])
        );
        assert_eq!(
            parse_output("FILE:///var/log/a%20b.log?ignored").unwrap(),
            OutputTarget::Path("/var/log/a b.log".into())
        );
        // A bare path is a fifo path as given, '%' and all.
        assert_eq!(
            parse_output("/run/fifo/100%zz").unwrap(),
            OutputTarget::Path("/run/fifo/100%zz".into())
        );
    }

    #[test]
    fn invalid_uris_are_refused_naming_them() {
        for (uri, why) in [
            (
                "binary:///usr/bin/log%zzger",
                "invalid escape \"%zz\" in the path",
            ),
            ("binary:///l?tag=%", "invalid escape \"%\""),
            ("binary:///l?tag=%4", "invalid escape \"%4\""),
            ("binary:///l?ta%g1=x", "invalid escape"),
            ("binary:///l#%x", "in the fragment"),
            ("binary:///l?a=1;b=2", "';'"),
            ("binary://usr/bin/logger", "a host (\"usr\")"),
            ("binary://", "absolute"),
            ("binary:///l?a=%00", "NUL"),
            ("binary:///l%00x", "NUL"),
            ("binary:///l?a=%FF", "non-UTF-8"),
            ("binary:///l?a=b\nc", "control character"),
            ("file://%2Fetc", "a host"),
        ] {
            let e = parse_output(uri).unwrap_err().to_string();
            assert!(e.contains(&format!("{uri:?}")), "{e} must name {uri:?}");
            assert!(e.contains(why), "{uri}: {e} should say {why}");
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Go's `url.QueryEscape`: unreserved bytes stay, a space is `+`, the rest `%XX`.
    fn query_escape(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b' ' => "+".into(),
                b => format!("%{b:02X}"),
            })
            .collect()
    }

    /// Path escaping as `url.URL.EscapedPath` does it for odd bytes (`/` stays).
    fn path_escape(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    }

    fn text() -> impl Strategy<Value = String> {
        // Everything but NUL, leaning on the bytes that have a meaning in a URI.
        prop_oneof!["[^\\x00]{0,12}", "[ +%&=;#?/a-z0-9]{0,12}",]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_values_never_panic(uri in ".{0,80}", tail in ".{0,40}") {
            for u in [uri.clone(), format!("binary://{uri}"), format!("binary:///{uri}?{tail}"), format!("file://{uri}")] {
                if let Err(e) = parse_output(&u) {
                    prop_assert!(e.to_string().contains(&format!("{u:?}")), "{e}");
                }
            }
        }

        /// An encoded program path and arguments come back exactly (first value per key).
        #[test]
        fn encoded_uris_round_trip(
            program in "(/[^\\x00/]{1,8}){1,3}",
            args in prop::collection::vec((text(), text()), 0..5),
        ) {
            let query: Vec<String> = args
                .iter()
                .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
                .collect();
            let uri = format!("binary://{}?{}", path_escape(&program), query.join("&"));
            let mut want: Vec<(String, String)> = Vec::new();
            for (k, v) in &args {
                if !want.iter().any(|(seen, _)| seen == k) {
                    want.push((k.clone(), v.clone()));
                }
            }
            prop_assert_eq!(
                parse_output(&uri).unwrap(),
                OutputTarget::Binary { program: program.into(), args: want }
            );
        }

        /// A '%' not followed by two hex digits anywhere in the path or query is refused.
        #[test]
        fn broken_escapes_are_refused(
            before in "[a-z]{0,6}",
            after in "[g-z%]?",
            in_query in any::<bool>(),
        ) {
            let uri = if in_query {
                format!("binary:///bin/log?k={before}%{after}")
            } else {
                format!("binary:///bin/{before}%{after}")
            };
            let e = parse_output(&uri).unwrap_err().to_string();
            prop_assert!(e.contains("invalid escape") && e.contains(&format!("{uri:?}")), "{e}");
        }
    }
}
