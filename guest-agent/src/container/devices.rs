//! `linux.resources.devices`, enforced as runc enforces it on cgroup v2: a
//! `BPF_PROG_TYPE_CGROUP_DEVICE` program attached to the container's cgroup, which the kernel
//! asks before every open(2) and mknod(2) of a device node by a process in that cgroup (the
//! init and every exec: both are born in it, see [`super::launch`]).
//!
//! Semantics: default deny; the spec's rules, then runc's always-allowed devices (the same list
//! runc appends, so a container sees what it would see under runc: mknod of any node, the
//! standard nodes, ptys); for each access (mknod, read, write) the **last** rule that matches
//! the device and names that access decides. An access of several kinds at once (open with
//! O_RDWR) needs each of them allowed. Rule types: `a` (any), `b`, `c`; a major or minor that
//! is missing or -1 is a wildcard.
//!
//! The program is assembled here by hand from a handful of eBPF instructions (no compiler, no
//! library) and loaded with bpf(2).

use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use anyhow::{bail, Context as _, Result};
use serde::Deserialize;

/// One entry of `linux.resources.devices` (runtime-spec `LinuxDeviceCgroup`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct DeviceCgroup {
    pub allow: bool,
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub major: Option<i64>,
    pub minor: Option<i64>,
    pub access: Option<String>,
}

/// `BPF_DEVCG_DEV_*`: the device type in the low 16 bits of `access_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Any,
    Block,
    Char,
}

impl Kind {
    fn code(self) -> Option<i32> {
        match self {
            Kind::Any => None,
            Kind::Block => Some(1),
            Kind::Char => Some(2),
        }
    }
}

/// `BPF_DEVCG_ACC_*`: the access in the high 16 bits of `access_type`.
pub const ACC_MKNOD: u8 = 1;
pub const ACC_READ: u8 = 2;
pub const ACC_WRITE: u8 = 4;
const ACCESSES: [u8; 3] = [ACC_MKNOD, ACC_READ, ACC_WRITE];

/// A checked device rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub allow: bool,
    pub kind: Kind,
    /// None: any.
    pub major: Option<u32>,
    pub minor: Option<u32>,
    /// ACC_* bits.
    pub access: u8,
}

impl Rule {
    const fn allow(kind: Kind, major: Option<u32>, minor: Option<u32>, access: u8) -> Rule {
        Rule {
            allow: true,
            kind,
            major,
            minor,
            access,
        }
    }

    /// Whether the rule applies to every device (of every type).
    fn matches_all(&self) -> bool {
        self.kind == Kind::Any && self.major.is_none() && self.minor.is_none()
    }

    /// Whether the rule decides `access` for the device (the reference semantics the program
    /// implements; used by the tests).
    #[cfg(test)]
    pub fn matches(&self, kind: Kind, major: u32, minor: u32, access: u8) -> bool {
        self.access & access != 0
            && (self.kind == Kind::Any || self.kind == kind)
            && self.major.is_none_or(|m| m == major)
            && self.minor.is_none_or(|m| m == minor)
    }
}

const RWM: u8 = ACC_MKNOD | ACC_READ | ACC_WRITE;

/// What runc appends to every container's rules (libcontainer/specconv `AllowedDevices`, less
/// tun/tap, which runc 1.2 dropped): mknod of any node, /dev/null, random, full, tty, zero,
/// urandom, console, ptys and ptmx.
pub const RUNC_ALLOWED: &[Rule] = &[
    Rule::allow(Kind::Char, None, None, ACC_MKNOD),
    Rule::allow(Kind::Block, None, None, ACC_MKNOD),
    Rule::allow(Kind::Char, Some(1), Some(3), RWM),
    Rule::allow(Kind::Char, Some(1), Some(8), RWM),
    Rule::allow(Kind::Char, Some(1), Some(7), RWM),
    Rule::allow(Kind::Char, Some(5), Some(0), RWM),
    Rule::allow(Kind::Char, Some(1), Some(5), RWM),
    Rule::allow(Kind::Char, Some(1), Some(9), RWM),
    Rule::allow(Kind::Char, Some(5), Some(1), RWM),
    Rule::allow(Kind::Char, Some(136), None, RWM),
    Rule::allow(Kind::Char, Some(5), Some(2), RWM),
];

/// Checks `linux.resources.devices` and returns the rules the program enforces: the spec's,
/// in order, then [`RUNC_ALLOWED`].
pub fn rules(spec: &[DeviceCgroup]) -> Result<Vec<Rule>> {
    let mut out = Vec::with_capacity(spec.len() + RUNC_ALLOWED.len());
    for (i, d) in spec.iter().enumerate() {
        out.push(rule(d).with_context(|| format!("linux.resources.devices[{i}]"))?);
    }
    out.extend_from_slice(RUNC_ALLOWED);
    Ok(out)
}

fn rule(d: &DeviceCgroup) -> Result<Rule> {
    let kind = match d.kind.as_deref().unwrap_or("a") {
        "a" | "" => Kind::Any,
        "b" => Kind::Block,
        "c" => Kind::Char,
        other => bail!("type {other:?} is not one of a, b, c"),
    };
    let number = |v: Option<i64>, what: &str| -> Result<Option<u32>> {
        match v {
            None | Some(-1) => Ok(None),
            Some(n) => u32::try_from(n)
                .map(Some)
                .map_err(|_| anyhow::anyhow!("bad {what} {n}")),
        }
    };
    let mut access = 0;
    for c in d.access.as_deref().unwrap_or("").chars() {
        access |= match c {
            'r' => ACC_READ,
            'w' => ACC_WRITE,
            'm' => ACC_MKNOD,
            other => bail!("access {:?}: {other:?} is not one of r, w, m", d.access),
        };
    }
    Ok(Rule {
        allow: d.allow,
        kind,
        major: number(d.major, "major")?,
        minor: number(d.minor, "minor")?,
        access,
    })
}

/// Whether the rules allow an access (several ACC_* bits: each must be allowed): the
/// reference for what [`program`] computes.
#[cfg(test)]
pub fn allows(rules: &[Rule], kind: Kind, major: u32, minor: u32, access: u8) -> bool {
    ACCESSES.iter().filter(|a| access & **a != 0).all(|a| {
        rules
            .iter()
            .rev()
            .find(|r| r.matches(kind, major, minor, *a))
            .is_some_and(|r| r.allow)
    })
}

// ---------------------------------------------------------------------------------------------
// eBPF instructions (include/uapi/linux/bpf.h, bpf_common.h).

/// `struct bpf_insn`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insn {
    pub code: u8,
    pub dst: u8,
    pub src: u8,
    pub off: i16,
    pub imm: i32,
}

impl Insn {
    /// The kernel's encoding (little-endian x86_64).
    pub fn encode(&self) -> u64 {
        u64::from(self.code)
            | (u64::from(self.dst & 0xf) | u64::from(self.src & 0xf) << 4) << 8
            | u64::from(self.off as u16) << 16
            | u64::from(self.imm as u32) << 32
    }
}

pub const LDX_W: u8 = 0x61; // BPF_LDX | BPF_MEM | BPF_W
pub const MOV64_K: u8 = 0xb7; // BPF_ALU64 | BPF_MOV | BPF_K
pub const MOV64_X: u8 = 0xbf; // BPF_ALU64 | BPF_MOV | BPF_X
pub const AND64_K: u8 = 0x57; // BPF_ALU64 | BPF_AND | BPF_K
pub const RSH64_K: u8 = 0x77; // BPF_ALU64 | BPF_RSH | BPF_K
pub const JA: u8 = 0x05; // BPF_JMP | BPF_JA
pub const JEQ_K: u8 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
pub const JNE32_K: u8 = 0x56; // BPF_JMP32 | BPF_JNE | BPF_K
pub const EXIT: u8 = 0x95; // BPF_JMP | BPF_EXIT

/// Registers the program keeps the request in: R2 access bits, R3 type, R4 major, R5 minor.
pub const R_ACCESS: u8 = 2;
pub const R_TYPE: u8 = 3;
pub const R_MAJOR: u8 = 4;
pub const R_MINOR: u8 = 5;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        dst,
        src,
        off,
        imm,
    }
}

/// A program under construction: jumps to labels, resolved at the end.
struct Asm {
    insns: Vec<Insn>,
    /// (instruction index, label) of each jump.
    jumps: Vec<(usize, usize)>,
    /// Label -> instruction index.
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn new_label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }
    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }
    fn jump(&mut self, code: u8, dst: u8, imm: i32, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.insns.push(insn(code, dst, 0, 0, imm));
    }
    fn ret(&mut self, v: i32) {
        self.push(insn(MOV64_K, 0, 0, 0, v));
        self.push(insn(EXIT, 0, 0, 0, 0));
    }
    fn finish(mut self) -> Result<Vec<Insn>> {
        for (at, label) in &self.jumps {
            let target = self.labels[*label].context("unbound label")?;
            let off = i16::try_from(target as i64 - *at as i64 - 1)
                .context("the device program is too long (jump out of range)")?;
            self.insns[*at].off = off;
        }
        Ok(self.insns)
    }
}

/// Assembles the device program for `rules` (see the module documentation).
///
/// Per access kind the request has: the rules that name it, last first; the first that
/// matches decides (deny: return 0), none matching denies. Rules before the last one that
/// matches every device are left out (they could never decide, and the verifier refuses
/// code that cannot run).
pub fn program(rules: &[Rule]) -> Result<Vec<Insn>> {
    let mut a = Asm {
        insns: Vec::new(),
        jumps: Vec::new(),
        labels: Vec::new(),
    };
    // struct bpf_cgroup_dev_ctx { u32 access_type; u32 major; u32 minor; } in R1.
    a.push(insn(LDX_W, R_ACCESS, 1, 0, 0));
    a.push(insn(MOV64_X, R_TYPE, R_ACCESS, 0, 0));
    a.push(insn(AND64_K, R_TYPE, 0, 0, 0xffff));
    a.push(insn(RSH64_K, R_ACCESS, 0, 0, 16));
    a.push(insn(LDX_W, R_MAJOR, 1, 4, 0));
    a.push(insn(LDX_W, R_MINOR, 1, 8, 0));
    for acc in ACCESSES {
        let named: Vec<&Rule> = rules.iter().filter(|r| r.access & acc != 0).collect();
        // The last rule for every device decides what no later rule matches; earlier ones
        // never decide anything.
        let (later, default_allow) = match named.iter().rposition(|r| r.matches_all()) {
            Some(i) => (&named[i + 1..], named[i].allow),
            None => (&named[..], false),
        };
        // Last first; where the default allows, only the denies need a check.
        let checks: Vec<&Rule> = later
            .iter()
            .rev()
            .filter(|r| !(default_allow && r.allow))
            .copied()
            .collect();
        if default_allow && checks.is_empty() {
            continue;
        }
        let done = a.new_label();
        // Not this access: next one.
        a.push(insn(MOV64_X, 1, R_ACCESS, 0, 0));
        a.push(insn(AND64_K, 1, 0, 0, i32::from(acc)));
        a.jump(JEQ_K, 1, 0, done);
        for r in checks {
            // Every rule here has a condition (none matches every device).
            let next = a.new_label();
            let conditions = [
                (R_TYPE, r.kind.code()),
                (R_MAJOR, r.major.map(|m| m as i32)),
                (R_MINOR, r.minor.map(|m| m as i32)),
            ];
            for (reg, want) in conditions {
                if let Some(v) = want {
                    a.jump(JNE32_K, reg, v, next);
                }
            }
            if r.allow {
                a.jump(JA, 0, 0, done);
            } else {
                a.ret(0);
            }
            a.bind(next);
        }
        if !default_allow {
            a.ret(0);
        }
        a.bind(done);
    }
    a.ret(1);
    a.finish()
}

// ---------------------------------------------------------------------------------------------
// Loading and attaching (bpf(2)).

const BPF_PROG_LOAD: libc::c_int = 5;
const BPF_PROG_ATTACH: libc::c_int = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
/// Further programs may be attached below (a nested runtime): every one must allow.
const BPF_F_ALLOW_MULTI: u32 = 2;

/// `union bpf_attr` for BPF_PROG_LOAD, up to `expected_attach_type`.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr` for BPF_PROG_ATTACH.
#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

fn bpf<T>(cmd: libc::c_int, attr: &mut T) -> std::io::Result<libc::c_long> {
    // SAFETY: bpf(2) with a command and an attr struct of the given size that outlives the
    // call; pointers inside it point at live buffers of the sizes they state.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Loads the program; on a verifier refusal the error carries the verifier's log.
pub fn load(insns: &[Insn]) -> Result<OwnedFd> {
    let code: Vec<u64> = insns.iter().map(Insn::encode).collect();
    let license = c"Apache-2.0";
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"devices");
    let attempt = |log: Option<&mut Vec<u8>>| {
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: u32::try_from(code.len()).unwrap_or(u32::MAX),
            insns: code.as_ptr() as u64,
            license: license.as_ptr() as u64,
            prog_name: name,
            expected_attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        if let Some(buf) = log {
            attr.log_level = 1;
            attr.log_size = u32::try_from(buf.len()).unwrap_or(u32::MAX);
            attr.log_buf = buf.as_mut_ptr() as u64;
        }
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    let fd = match attempt(None) {
        Ok(fd) => fd,
        Err(e)
            if e.raw_os_error() == Some(libc::EINVAL) || e.raw_os_error() == Some(libc::EACCES) =>
        {
            let mut log = vec![0u8; 64 * 1024];
            let again = attempt(Some(&mut log));
            let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
            let text = String::from_utf8_lossy(&log[..end]);
            let tail: String = text.lines().rev().take(4).collect::<Vec<_>>().join(" | ");
            match again {
                Ok(fd) => fd,
                Err(_) => {
                    return Err(e).with_context(|| {
                        format!(
                            "loading the device program ({} instructions); verifier: {tail}",
                            code.len()
                        )
                    })
                }
            }
        }
        Err(e) => {
            return Err(e).context("loading the device program (bpf BPF_PROG_LOAD)");
        }
    };
    let fd = i32::try_from(fd).context("bpf returned a bad fd")?;
    // SAFETY: a new fd the kernel just returned, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Loads the program for `rules` and attaches it to the cgroup whose directory `cgroup` is
/// open. The cgroup keeps the program; the fd we held closes here.
pub fn attach(cgroup: BorrowedFd<'_>, rules: &[Rule]) -> Result<()> {
    let insns = program(rules)?;
    let prog = load(&insns)?;
    let mut attr = ProgAttachAttr {
        target_fd: u32::try_from(cgroup.as_raw_fd()).context("bad cgroup fd")?,
        attach_bpf_fd: u32::try_from(prog.as_raw_fd()).context("bad program fd")?,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    bpf(BPF_PROG_ATTACH, &mut attr)
        .context("attaching the device program to the cgroup (bpf BPF_PROG_ATTACH)")?;
    Ok(())
}

#[cfg(test)]
#[path = "devices_tests.rs"]
mod tests;
