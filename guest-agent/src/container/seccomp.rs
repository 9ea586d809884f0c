//! The spec's `linux.seccomp` profile, compiled to a classic BPF program and installed by
//! container-init and container-exec (seccomp(2)) before they run the container's process.
//!
//! The program: a syscall from an architecture other than x86_64, or from the x32 ABI, gets the
//! default action; then, for each rule and each of its syscalls in order, "this syscall, and all
//! of the rule's argument conditions hold" returns the rule's action; anything else gets the
//! default action. Names the x86_64 table does not know are skipped (as libseccomp does for
//! another architecture's calls). Notification (`SCMP_ACT_NOTIFY`) is refused: nothing in the
//! guest could answer it.

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};

use super::syscalls_x86_64::SYSCALLS;

/// The OCI `linux.seccomp` object.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Profile {
    pub default_action: String,
    pub default_errno_ret: Option<u32>,
    pub architectures: Vec<String>,
    pub flags: Vec<String>,
    pub listener_path: Option<String>,
    pub syscalls: Vec<Rule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Rule {
    pub names: Vec<String>,
    pub action: String,
    pub errno_ret: Option<u32>,
    pub args: Vec<Arg>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Arg {
    pub index: u32,
    pub value: u64,
    pub value_two: u64,
    pub op: String,
}

/// One BPF instruction (`struct sock_filter`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// What container-init/-exec installs: the program and seccomp(2)'s flags.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub program: Vec<Insn>,
    pub flags: u32,
}

const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JEQ_K: u16 = 0x15;
const JGT_K: u16 = 0x25;
const JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

/// Offsets in `struct seccomp_data`.
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARGS: u32 = 16;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
/// BPF_MAXINSNS.
const MAX_INSNS: usize = 4096;

const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_KILL_THREAD: u32 = 0;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_TRACE: u32 = 0x7ff0_0000;
const RET_LOG: u32 = 0x7ffc_0000;
const RET_ALLOW: u32 = 0x7fff_0000;

/// Parses and compiles `linux.seccomp`.
pub fn compile_json(value: &serde_json::Value) -> Result<Filter> {
    let profile: Profile =
        serde_json::from_value(value.clone()).context("linux.seccomp: not a seccomp profile")?;
    compile(&profile)
}

/// Compiles a profile.
pub fn compile(p: &Profile) -> Result<Filter> {
    if p.listener_path.as_deref().is_some_and(|l| !l.is_empty()) {
        bail!("linux.seccomp.listenerPath: seccomp notification is not supported in the guest");
    }
    let default_errno = p.default_errno_ret.unwrap_or(libc::EPERM as u32);
    let default =
        action(&p.default_action, default_errno).context("linux.seccomp.defaultAction")?;
    let mut flags = 0;
    for f in &p.flags {
        flags |= match f.as_str() {
            "SECCOMP_FILTER_FLAG_TSYNC" => 1,
            "SECCOMP_FILTER_FLAG_LOG" => 2,
            "SECCOMP_FILTER_FLAG_SPEC_ALLOW" => 4,
            other => bail!("linux.seccomp.flags: unknown flag {other:?}"),
        };
    }

    let mut prog = vec![
        ld(OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        ret(default),
        ld(OFF_NR),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        ret(default),
    ];
    for (i, rule) in p.syscalls.iter().enumerate() {
        let errno = rule.errno_ret.unwrap_or(default_errno);
        let act = action(&rule.action, errno)
            .with_context(|| format!("linux.seccomp.syscalls[{i}].action"))?;
        for name in &rule.names {
            let Some(nr) = number(name) else { continue };
            let block = rule_block(nr, &rule.args, act)
                .with_context(|| format!("linux.seccomp.syscalls[{i}] ({name})"))?;
            prog.extend(block);
        }
        if prog.len() >= MAX_INSNS {
            bail!("linux.seccomp: the profile needs more than {MAX_INSNS} BPF instructions");
        }
    }
    prog.push(ret(default));
    Ok(Filter {
        program: prog,
        flags,
    })
}

/// The x86_64 number of a syscall name.
fn number(name: &str) -> Option<u32> {
    SYSCALLS
        .binary_search_by(|(n, _)| n.cmp(&name))
        .ok()
        .map(|i| SYSCALLS[i].1)
}

fn action(name: &str, errno: u32) -> Result<u32> {
    let data = errno & 0xffff;
    Ok(match name {
        "SCMP_ACT_ALLOW" => RET_ALLOW,
        "SCMP_ACT_ERRNO" => RET_ERRNO | data,
        "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => RET_KILL_THREAD,
        "SCMP_ACT_KILL_PROCESS" => RET_KILL_PROCESS,
        "SCMP_ACT_TRAP" => RET_TRAP,
        "SCMP_ACT_TRACE" => RET_TRACE | data,
        "SCMP_ACT_LOG" => RET_LOG,
        "SCMP_ACT_NOTIFY" => bail!("SCMP_ACT_NOTIFY is not supported in the guest"),
        other => bail!("unknown action {other:?}"),
    })
}

fn ld(offset: u32) -> Insn {
    Insn {
        code: LD_W_ABS,
        jt: 0,
        jf: 0,
        k: offset,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn ret(k: u32) -> Insn {
    Insn {
        code: RET_K,
        jt: 0,
        jf: 0,
        k,
    }
}

/// Where a conditional jump goes: `Fail` is the end of the block (the next rule).
#[derive(Clone, Copy)]
enum To {
    Next(u8),
    Fail,
}

/// `nr`, then every argument condition, then `ret action`; a failed test jumps past the block.
fn rule_block(nr: u32, args: &[Arg], act: u32) -> Result<Vec<Insn>> {
    let mut body: Vec<(Insn, To, To)> = Vec::new();
    let plain = |i: Insn| (i, To::Next(0), To::Next(0));
    body.push(plain(ld(OFF_NR)));
    body.push((jump(JEQ_K, nr, 0, 0), To::Next(0), To::Fail));
    for a in args {
        if a.index > 5 {
            bail!("args: index {} (a syscall has 6 arguments)", a.index);
        }
        let lo = OFF_ARGS + 8 * a.index;
        let hi = lo + 4;
        let (vh, vl) = ((a.value >> 32) as u32, a.value as u32);
        match a.op.as_str() {
            "SCMP_CMP_EQ" => body.extend([
                plain(ld(hi)),
                (jump(JEQ_K, vh, 0, 0), To::Next(0), To::Fail),
                plain(ld(lo)),
                (jump(JEQ_K, vl, 0, 0), To::Next(0), To::Fail),
            ]),
            "SCMP_CMP_NE" => body.extend([
                plain(ld(hi)),
                (jump(JEQ_K, vh, 0, 0), To::Next(0), To::Next(2)),
                plain(ld(lo)),
                (jump(JEQ_K, vl, 0, 0), To::Fail, To::Next(0)),
            ]),
            "SCMP_CMP_MASKED_EQ" => {
                let (wh, wl) = ((a.value_two >> 32) as u32, a.value_two as u32);
                let and = |m: u32| Insn {
                    code: ALU_AND_K,
                    jt: 0,
                    jf: 0,
                    k: m,
                };
                body.extend([
                    plain(ld(hi)),
                    plain(and(vh)),
                    (jump(JEQ_K, wh, 0, 0), To::Next(0), To::Fail),
                    plain(ld(lo)),
                    plain(and(vl)),
                    (jump(JEQ_K, wl, 0, 0), To::Next(0), To::Fail),
                ])
            }
            // Unsigned 64-bit order from two 32-bit halves: the high words decide unless equal.
            op @ ("SCMP_CMP_GT" | "SCMP_CMP_GE" | "SCMP_CMP_LT" | "SCMP_CMP_LE") => {
                let greater = matches!(op, "SCMP_CMP_GT" | "SCMP_CMP_GE");
                let low_code = if matches!(op, "SCMP_CMP_GT" | "SCMP_CMP_LE") {
                    JGT_K
                } else {
                    JGE_K
                };
                let (high_true, high_false) = if greater {
                    (To::Next(3), To::Next(0))
                } else {
                    (To::Next(0), To::Next(3))
                };
                let high = if greater { JGT_K } else { JGE_K };
                let (low_true, low_false) = if greater {
                    (To::Next(0), To::Fail)
                } else {
                    (To::Fail, To::Next(0))
                };
                body.extend([
                    plain(ld(hi)),
                    (jump(high, vh, 0, 0), high_true, high_false),
                    (jump(JEQ_K, vh, 0, 0), To::Next(0), To::Fail),
                    plain(ld(lo)),
                    (jump(low_code, vl, 0, 0), low_true, low_false),
                ])
            }
            other => bail!("args: unknown op {other:?}"),
        }
    }
    body.push(plain(ret(act)));
    let end = body.len();
    let mut out = Vec::with_capacity(end);
    for (i, (mut insn, jt, jf)) in body.into_iter().enumerate() {
        let resolve = |t: To| -> Result<u8> {
            match t {
                To::Next(n) => Ok(n),
                To::Fail => u8::try_from(end - i - 1).context("rule too long for a BPF jump"),
            }
        };
        insn.jt = resolve(jt)?;
        insn.jf = resolve(jf)?;
        out.push(insn);
    }
    Ok(out)
}

/// Installs `filter` on the calling thread (seccomp(2), SECCOMP_SET_MODE_FILTER). Without
/// no_new_privs the caller needs CAP_SYS_ADMIN.
pub fn install(filter: &Filter) -> std::io::Result<()> {
    let program: Vec<libc::sock_filter> = filter
        .program
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect();
    let len =
        u16::try_from(program.len()).map_err(|_| std::io::Error::other("program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: program.as_ptr().cast_mut(),
    };
    const SECCOMP_SET_MODE_FILTER: libc::c_ulong = 1;
    // SAFETY: seccomp(2) reads `len` instructions through the pointer, valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            SECCOMP_SET_MODE_FILTER,
            libc::c_ulong::from(filter.flags),
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(json: serde_json::Value) -> Filter {
        compile_json(&json).unwrap()
    }

    /// Runs `probe` in a forked child after installing `filter` (with no_new_privs); returns
    /// what the child exited with.
    fn in_child(filter: &Filter, probe: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw syscalls and exits.
        match unsafe { libc::fork() } {
            0 => unsafe {
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
                if install(filter).is_err() {
                    libc::_exit(200);
                }
                libc::_exit(probe());
            },
            pid => {
                let mut status = 0;
                // SAFETY: waiting for our own child.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                assert!(libc::WIFEXITED(status), "child status {status:#x}");
                libc::WEXITSTATUS(status)
            }
        }
    }

    fn errno_of(rc: libc::c_long) -> i32 {
        if rc == -1 {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        } else {
            0
        }
    }

    #[test]
    fn names_resolve_and_unknown_ones_are_skipped() {
        assert_eq!(number("read"), Some(0));
        assert_eq!(number("clone3"), Some(435));
        assert_eq!(number("_llseek"), None);
        let with = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid", "_llseek"], "action": "SCMP_ACT_ERRNO"}]
        }));
        let without = profile(serde_json::json!({
            "defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["getppid"], "action": "SCMP_ACT_ERRNO"}]
        }));
        assert_eq!(with, without);
    }

    #[test]
    fn refusals_name_the_field() {
        let err = |j: serde_json::Value| format!("{:#}", compile_json(&j).unwrap_err());
        assert!(
            err(serde_json::json!({"defaultAction": "SCMP_ACT_NOPE"})).contains("defaultAction")
        );
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}));
        assert!(
            e.contains("syscalls[0].action") && e.contains("NOTIFY"),
            "{e}"
        );
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_ALLOW",
                          "args": [{"index": 6, "value": 0, "op": "SCMP_CMP_EQ"}]}]}));
        assert!(
            e.contains("syscalls[0] (read)") && e.contains("index 6"),
            "{e}"
        );
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "listenerPath": "/x"}));
        assert!(e.contains("listenerPath"), "{e}");
        let e = err(serde_json::json!({"defaultAction": "SCMP_ACT_ALLOW", "flags": ["X"]}));
        assert!(e.contains("flags"), "{e}");
    }

    /// The compiled program, run by this kernel: an allow-list with a default errno, a rule's
    /// own errno, and each comparison on both sides of its value.
    #[test]
    fn the_kernel_enforces_the_compiled_profile() {
        let base = |args: serde_json::Value| {
            profile(serde_json::json!({
                "defaultAction": "SCMP_ACT_ERRNO",
                "defaultErrnoRet": 38,
                "syscalls": [
                    {"names": ["exit_group", "exit", "write", "rt_sigreturn"], "action": "SCMP_ACT_ALLOW"},
                    {"names": ["getppid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 42},
                    {"names": ["personality"], "action": "SCMP_ACT_ALLOW", "args": args}
                ]
            }))
        };
        // Not on the list: the default errno (38, ENOSYS).
        let f = base(serde_json::json!([]));
        assert_eq!(
            in_child(&f, || errno_of(unsafe { libc::syscall(libc::SYS_getpid) })),
            38
        );
        assert_eq!(
            in_child(&f, || errno_of(unsafe { libc::syscall(libc::SYS_getppid) })),
            42
        );
        // personality(0xffffffff) queries; allowed only where the condition holds.
        let query = || errno_of(unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffffu64) });
        let big = || errno_of(unsafe { libc::syscall(libc::SYS_personality, 0x1_0000_0000u64) });
        let cond = |op: &str, value: u64| {
            base(serde_json::json!([{"index": 0, "value": value, "op": op}]))
        };
        for (op, value, query_ok, big_ok) in [
            ("SCMP_CMP_EQ", 0xffff_ffff, true, false),
            ("SCMP_CMP_NE", 0xffff_ffff, false, true),
            ("SCMP_CMP_GT", 0xffff_ffff, false, true),
            ("SCMP_CMP_GE", 0xffff_ffff, true, true),
            ("SCMP_CMP_LT", 0x1_0000_0000, true, false),
            ("SCMP_CMP_LE", 0xffff_ffff, true, false),
            ("SCMP_CMP_LT", 0xffff_ffff, false, false),
        ] {
            let f = cond(op, value);
            let expect = |ok: bool| if ok { 0 } else { 38 };
            assert_eq!(
                in_child(&f, query),
                expect(query_ok),
                "{op} {value:#x} on 0xffffffff"
            );
            assert_eq!(
                in_child(&f, big),
                expect(big_ok),
                "{op} {value:#x} on 1<<32"
            );
        }
        // MASKED_EQ: (arg & value) == valueTwo.
        let f = base(serde_json::json!([
            {"index": 0, "value": 0x1_0000_00ffu64, "valueTwo": 0x1_0000_0000u64, "op": "SCMP_CMP_MASKED_EQ"}
        ]));
        assert_eq!(in_child(&f, big), 0);
        assert_eq!(in_child(&f, query), 38);
    }
}
