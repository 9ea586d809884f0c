//! containerd's runtime options for a Create, `runtimeoptions.v1.Options`
//! { type_url = 1; config_path = 2; config_body = 3 }: only `config_path` is read, straight off
//! the protobuf wire. The bytes come from containerd's client (`ctr run --runtime-config-path`,
//! a CRI runtime handler's `options`); property tests below drive the reader with arbitrary and
//! damaged messages.

/// Field 2 (`config_path`) of `runtimeoptions.v1.Options`, the last one if repeated (proto3);
/// `None` when absent. Unknown fields of any wire type are skipped (groups nest at most
/// protobuf's recursion limit, 100); a length past the end of the bytes is an error, never an
/// allocation.
// Until service.rs calls this instead of its own copy (the lead's file).
pub(crate) fn config_path(bytes: &[u8]) -> protobuf::Result<Option<String>> {
    let mut input = protobuf::CodedInputStream::from_bytes(bytes);
    let mut path = None;
    while let Some(tag) = input.read_raw_tag_or_eof()? {
        if tag == (2 << 3) | 2 {
            path = Some(input.read_string()?);
        } else {
            input.skip_field(protobuf::rt::WireType::new(tag & 7).ok_or_else(|| {
                protobuf::Error::from(std::io::Error::other(format!("bad wire type in tag {tag}")))
            })?)?;
        }
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use protobuf::CodedOutputStream;

    #[test]
    fn config_path_is_read_from_field_two() {
        // type_url = "x" (1), config_path = "/etc/a.json" (2), config_body = "b" (3).
        let mut bytes = vec![0x0a, 1, b'x', 0x12, 11];
        bytes.extend_from_slice(b"/etc/a.json");
        bytes.extend_from_slice(&[0x1a, 1, b'b']);
        assert_eq!(config_path(&bytes).unwrap().as_deref(), Some("/etc/a.json"));
        assert_eq!(config_path(&[]).unwrap(), None);
        // A length past the end: an error, not a 50-byte read.
        assert!(config_path(&[0x12, 50, b'a']).is_err());
        // A 2 GiB length in five bytes: an error, nothing allocated for it.
        assert!(config_path(&[0x12, 0xff, 0xff, 0xff, 0xff, 0x07]).is_err());
        // Field 2 with another wire type is skipped, not read as the path.
        assert_eq!(config_path(&[0x10, 5]).unwrap(), None);
    }

    /// One field of an encoded message.
    #[derive(Debug, Clone)]
    enum Field {
        Path(String),
        Varint(u32, u64),
        Fixed32(u32, u32),
        Fixed64(u32, u64),
        Bytes(u32, Vec<u8>),
        /// An empty group (start and end tags) under a field number.
        Group(u32),
    }

    fn field() -> impl Strategy<Value = Field> {
        // Field numbers other than 2, which is the path.
        let num = prop_oneof![Just(1u32), Just(3u32), 4u32..1000, 1000u32..(1 << 29)];
        prop_oneof![
            ".{0,24}".prop_map(Field::Path),
            (num.clone(), any::<u64>()).prop_map(|(n, v)| Field::Varint(n, v)),
            (num.clone(), any::<u32>()).prop_map(|(n, v)| Field::Fixed32(n, v)),
            (num.clone(), any::<u64>()).prop_map(|(n, v)| Field::Fixed64(n, v)),
            (num.clone(), prop::collection::vec(any::<u8>(), 0..24))
                .prop_map(|(n, v)| Field::Bytes(n, v)),
            num.prop_map(Field::Group),
        ]
    }

    fn encode(fields: &[Field]) -> Vec<u8> {
        let mut out = Vec::new();
        {
            let mut os = CodedOutputStream::vec(&mut out);
            for f in fields {
                match f {
                    Field::Path(p) => os.write_string(2, p),
                    Field::Varint(n, v) => os.write_uint64(*n, *v),
                    Field::Fixed32(n, v) => os.write_fixed32(*n, *v),
                    Field::Fixed64(n, v) => os.write_fixed64(*n, *v),
                    Field::Bytes(n, v) => os.write_bytes(*n, v),
                    Field::Group(n) => os
                        .write_raw_varint32((n << 3) | 3)
                        .and_then(|_| os.write_raw_varint32((n << 3) | 4)),
                }
                .unwrap();
            }
            os.flush().unwrap();
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = config_path(&bytes);
        }

        /// Whatever unknown fields surround it, the last config_path comes back.
        #[test]
        fn the_last_path_wins(fields in prop::collection::vec(field(), 0..10)) {
            let want = fields.iter().rev().find_map(|f| match f {
                Field::Path(p) => Some(p.clone()),
                _ => None,
            });
            prop_assert_eq!(config_path(&encode(&fields)).unwrap(), want);
        }

        /// A valid message cut short or with one byte changed: an answer or an error.
        #[test]
        fn damaged_messages_never_panic(
            fields in prop::collection::vec(field(), 1..8),
            cut in any::<prop::sample::Index>(),
            flip in any::<(prop::sample::Index, u8)>(),
        ) {
            let bytes = encode(&fields);
            if !bytes.is_empty() {
                let _ = config_path(&bytes[..cut.index(bytes.len())]);
                let mut flipped = bytes.clone();
                flipped[flip.0.index(bytes.len())] ^= flip.1 | 1;
                let _ = config_path(&flipped);
            }
        }

        /// Groups nested past protobuf's recursion limit are an error, not a stack overflow.
        #[test]
        fn deep_groups_are_refused(depth in 90usize..400) {
            let mut bytes = vec![(3 << 3) | 3; depth];
            bytes.extend(std::iter::repeat_n((3 << 3) | 4, depth));
            let r = config_path(&bytes);
            if depth > 101 {
                prop_assert!(r.is_err());
            }
        }
    }
}
