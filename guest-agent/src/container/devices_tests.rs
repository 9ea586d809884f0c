use super::*;

/// Runs a device program on a request, interpreting the instructions [`program`] emits (any
/// other is a test failure). Also fails on a jump out of the program or a fall off its end.
fn run(insns: &[Insn], kind: Kind, major: u32, minor: u32, access: u8) -> u64 {
    let type_code = match kind {
        Kind::Block => 1u64,
        Kind::Char => 2,
        Kind::Any => panic!("a request has a type"),
    };
    let ctx = [
        u64::from(access) << 16 | type_code,
        u64::from(major),
        u64::from(minor),
    ];
    let mut r = [0u64; 11];
    let mut pc = 0usize;
    for _ in 0..100_000 {
        let i = insns
            .get(pc)
            .unwrap_or_else(|| panic!("fell off the program at {pc}"));
        let (d, s) = (usize::from(i.dst), usize::from(i.src));
        let target = (pc as i64 + 1 + i64::from(i.off)) as usize;
        pc += 1;
        match i.code {
            LDX_W => {
                assert_eq!(s, 1, "loads only from the context");
                r[d] = ctx[usize::try_from(i.off).unwrap() / 4];
            }
            MOV64_K => r[d] = i.imm as i64 as u64,
            MOV64_X => r[d] = r[s],
            AND64_K => r[d] &= i.imm as i64 as u64,
            RSH64_K => r[d] >>= i.imm,
            JA => pc = target,
            JEQ_K => {
                if r[d] == i.imm as i64 as u64 {
                    pc = target;
                }
            }
            JNE32_K => {
                if r[d] as u32 != i.imm as u32 {
                    pc = target;
                }
            }
            EXIT => return r[0],
            other => panic!("unexpected opcode {other:#x}"),
        }
    }
    panic!("the program loops");
}

/// Every instruction is reachable (the verifier refuses a program where one is not), and every
/// jump lands inside the program.
fn assert_all_reachable(insns: &[Insn]) {
    let mut seen = vec![false; insns.len()];
    let mut todo = vec![0usize];
    while let Some(pc) = todo.pop() {
        if pc >= insns.len() {
            panic!("a path leaves the program at {pc}");
        }
        if std::mem::replace(&mut seen[pc], true) {
            continue;
        }
        let i = insns[pc];
        let target = (pc as i64 + 1 + i64::from(i.off)) as usize;
        match i.code {
            EXIT => {}
            JA => todo.push(target),
            JEQ_K | JNE32_K => todo.extend([pc + 1, target]),
            _ => todo.push(pc + 1),
        }
    }
    let unreachable: Vec<usize> = (0..insns.len()).filter(|i| !seen[*i]).collect();
    assert!(unreachable.is_empty(), "unreachable: {unreachable:?}");
}

fn spec_rule(
    allow: bool,
    kind: &str,
    major: Option<i64>,
    minor: Option<i64>,
    access: &str,
) -> DeviceCgroup {
    DeviceCgroup {
        allow,
        kind: Some(kind.to_string()),
        major,
        minor,
        access: Some(access.to_string()),
    }
}

/// containerd's default spec: deny everything, then the standard nodes.
fn containerd_default() -> Vec<DeviceCgroup> {
    let mut v = vec![DeviceCgroup {
        allow: false,
        access: Some("rwm".into()),
        ..Default::default()
    }];
    for (maj, min) in [
        (1, 3),
        (1, 8),
        (1, 7),
        (5, 0),
        (1, 5),
        (1, 9),
        (5, 1),
        (5, 2),
        (10, 200),
    ] {
        v.push(spec_rule(true, "c", Some(maj), Some(min), "rwm"));
    }
    v.push(spec_rule(true, "c", Some(136), None, "rwm"));
    v
}

const REQUESTS: &[(Kind, u32, u32)] = &[
    (Kind::Char, 1, 3),
    (Kind::Char, 1, 5),
    (Kind::Char, 4, 64),
    (Kind::Char, 5, 2),
    (Kind::Char, 10, 200),
    (Kind::Char, 136, 7),
    (Kind::Char, 10, 229),
    (Kind::Block, 254, 0),
    (Kind::Block, 1, 3),
    (Kind::Block, 7, 0),
    (Kind::Char, u32::MAX, u32::MAX),
];

/// The program computes what [`allows`] says, for every request and access combination.
fn check(rules: &[Rule]) {
    let insns = program(rules).unwrap();
    assert_all_reachable(&insns);
    for &(kind, major, minor) in REQUESTS {
        for access in 1..=RWM {
            let want = allows(rules, kind, major, minor, access);
            let got = run(&insns, kind, major, minor, access);
            assert_eq!(
                got,
                u64::from(want),
                "{kind:?} {major}:{minor} access {access:#b}, rules {rules:?}"
            );
        }
    }
}

#[test]
fn containerd_defaults_deny_raw_disks_and_the_console_but_allow_the_standard_nodes() {
    let rules = rules(&containerd_default()).unwrap();
    check(&rules);
    let insns = program(&rules).unwrap();
    let ok = |k, maj, min, acc| run(&insns, k, maj, min, acc) == 1;
    // Reading the guest's disk or writing to its serial console: denied.
    assert!(!ok(Kind::Block, 254, 0, ACC_READ));
    assert!(!ok(Kind::Char, 4, 64, ACC_WRITE));
    assert!(!ok(Kind::Char, 10, 229, ACC_READ | ACC_WRITE));
    // Creating the node is allowed (runc's "c *:* m", "b *:* m"), opening it is not.
    assert!(ok(Kind::Block, 254, 0, ACC_MKNOD));
    assert!(ok(Kind::Char, 4, 64, ACC_MKNOD));
    // The standard nodes.
    assert!(ok(Kind::Char, 1, 3, ACC_READ | ACC_WRITE));
    assert!(ok(Kind::Char, 136, 3, ACC_READ | ACC_WRITE));
    assert!(!ok(Kind::Block, 1, 3, ACC_READ));
}

#[test]
fn later_rules_win_per_access() {
    let spec = vec![
        spec_rule(true, "c", Some(1), Some(3), "rw"),
        spec_rule(false, "c", Some(1), Some(3), "w"),
        spec_rule(true, "b", None, None, "r"),
        spec_rule(false, "b", Some(7), None, "rw"),
    ];
    // Without runc's list (it ends with an allow of /dev/null).
    let rules: Vec<Rule> = spec.iter().map(|d| rule(d).unwrap()).collect();
    check(&rules);
    let insns = program(&rules).unwrap();
    let ok = |k, maj, min, acc| run(&insns, k, maj, min, acc) == 1;
    assert!(ok(Kind::Char, 1, 3, ACC_READ));
    assert!(
        !ok(Kind::Char, 1, 3, ACC_READ | ACC_WRITE),
        "a later deny of w wins"
    );
    assert!(ok(Kind::Block, 254, 0, ACC_READ));
    assert!(!ok(Kind::Block, 254, 0, ACC_WRITE));
    assert!(
        !ok(Kind::Block, 7, 1, ACC_READ),
        "a later deny of loop devices wins"
    );
    // runc's list, appended, allows /dev/null again whatever the spec said before.
    let with_runc = super::rules(&spec).unwrap();
    check(&with_runc);
    assert!(allows(&with_runc, Kind::Char, 1, 3, ACC_WRITE));
}

#[test]
fn a_privileged_spec_allows_everything_with_no_check() {
    let spec = vec![spec_rule(true, "a", None, None, "rwm")];
    let rules = rules(&spec).unwrap();
    check(&rules);
    let insns = program(&rules).unwrap();
    // The prologue and `return 1`: the rules appended after the wildcard are all allows.
    assert_eq!(insns.len(), 8, "{insns:?}");
    assert_eq!(run(&insns, Kind::Block, 254, 0, RWM), 1);
}

#[test]
fn a_trailing_deny_all_denies_everything() {
    let mut spec = containerd_default();
    spec.push(DeviceCgroup {
        allow: false,
        access: Some("rwm".into()),
        ..Default::default()
    });
    // Without runc's list (it would re-allow the standard nodes).
    let rules: Vec<Rule> = spec.iter().map(|d| rule(d).unwrap()).collect();
    check(&rules);
    let insns = program(&rules).unwrap();
    for &(k, maj, min) in REQUESTS {
        assert_eq!(run(&insns, k, maj, min, ACC_READ), 0);
    }
}

#[test]
fn no_rules_deny_everything() {
    check(&[]);
    let insns = program(&[]).unwrap();
    assert_eq!(run(&insns, Kind::Char, 1, 3, ACC_READ), 0);
    assert_eq!(run(&insns, Kind::Char, 1, 3, ACC_MKNOD), 0);
}

#[test]
fn many_mixed_rules_match_the_reference() {
    // A deterministic pseudo-random walk over rule lists.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    for _ in 0..200 {
        let len = next(8);
        let rules: Vec<Rule> = (0..len)
            .map(|_| Rule {
                allow: next(2) == 0,
                kind: [Kind::Any, Kind::Block, Kind::Char][next(3) as usize],
                major: [None, Some(1), Some(254), Some(136)][next(4) as usize],
                minor: [None, Some(3), Some(0)][next(3) as usize],
                access: next(8) as u8,
            })
            .collect();
        check(&rules);
    }
}

#[test]
fn spec_rules_are_checked() {
    let bad = |d: DeviceCgroup| rules(&[d]).unwrap_err();
    let e = bad(spec_rule(true, "p", None, None, "rwm"));
    assert!(format!("{e:#}").contains("devices[0]: type \"p\""), "{e:#}");
    let e = bad(spec_rule(true, "c", Some(-2), None, "rwm"));
    assert!(format!("{e:#}").contains("bad major -2"), "{e:#}");
    let e = bad(spec_rule(true, "c", None, None, "rwx"));
    assert!(format!("{e:#}").contains("'x'"), "{e:#}");
    let r = rule(&spec_rule(false, "b", Some(-1), Some(5), "mr")).unwrap();
    assert_eq!(
        r,
        Rule {
            allow: false,
            kind: Kind::Block,
            major: None,
            minor: Some(5),
            access: ACC_MKNOD | ACC_READ,
        }
    );
    // Absent type and numbers: every device.
    let r = rule(&DeviceCgroup {
        allow: false,
        access: Some("rwm".into()),
        ..Default::default()
    })
    .unwrap();
    assert!(r.matches_all());
    // The JSON form.
    let d: DeviceCgroup =
        serde_json::from_str(r#"{"allow": true, "type": "c", "major": 136, "access": "rwm"}"#)
            .unwrap();
    assert_eq!(d, spec_rule(true, "c", Some(136), None, "rwm"));
}

#[test]
fn encoding() {
    let i = insn(LDX_W, R_MAJOR, 1, 4, 0);
    assert_eq!(i.encode(), 0x0000_0000_0004_1461);
    let j = insn(JNE32_K, R_MINOR, 0, -2, -1);
    assert_eq!(j.encode(), 0xffff_ffff_fffe_0556);
}

/// The kernel's verifier accepts the programs (where this test may load BPF: root on Linux;
/// skipped with the reason printed otherwise).
#[test]
fn the_kernel_accepts_the_programs() {
    let lists = [
        rules(&containerd_default()).unwrap(),
        rules(&[spec_rule(true, "a", None, None, "rwm")]).unwrap(),
        Vec::new(),
    ];
    for rules in &lists {
        match load(&program(rules).unwrap()) {
            Ok(_) => {}
            Err(e) => {
                let denied = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>().is_some_and(|io| {
                        matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS))
                    })
                });
                if denied {
                    eprintln!("skipped: may not load BPF programs here: {e:#}");
                    return;
                }
                panic!("{e:#}");
            }
        }
    }
}
