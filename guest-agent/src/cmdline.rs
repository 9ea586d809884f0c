//! The agent's settings from the kernel command line (`/proc/cmdline`).

use spinbox_agent_api::{
    valid_hostname, CMDLINE_AGENT_PORT, CMDLINE_HOSTNAME, CMDLINE_STDIO_PORT, DEFAULT_AGENT_PORT,
    DEFAULT_STDIO_PORT,
};

use crate::log::Level;

/// Kernel command-line key for the agent's log level (`error|warn|info|debug`).
pub const CMDLINE_LOG: &str = "spinbox.log";

/// Kernel command-line key (test hook): `1` makes the agent ignore ctrl-alt-del and the ACPI
/// power button, as a hung or hostile guest would, so the host's shutdown ladder must escalate.
pub const CMDLINE_IGNORE_POWEROFF: &str = "spinbox.test_ignore_poweroff";

/// What the agent takes from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// vsock port to serve ttrpc on.
    pub agent_port: u32,
    /// vsock port for container stdio streams.
    pub stdio_port: u32,
    /// Console log level.
    pub log_level: Level,
    /// Ignore ctrl-alt-del and the power button ([`CMDLINE_IGNORE_POWEROFF`]).
    pub ignore_poweroff: bool,
    /// The guest's hostname ([`CMDLINE_HOSTNAME`]: the host's).
    pub hostname: Option<String>,
    /// Values that were present but unusable; logged once logging is set up.
    pub problems: Vec<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            agent_port: DEFAULT_AGENT_PORT,
            stdio_port: DEFAULT_STDIO_PORT,
            log_level: Level::Info,
            ignore_poweroff: false,
            hostname: None,
            problems: Vec::new(),
        }
    }
}

/// Parses a kernel command line. For a repeated key the last occurrence wins, so a host can
/// override a default by appending. Unknown keys are ignored; bad values are reported in
/// `problems` and leave the previous value in place.
pub fn parse(cmdline: &str) -> Settings {
    let mut settings = Settings::default();
    for word in split(cmdline) {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        if key == CMDLINE_AGENT_PORT || key == CMDLINE_STDIO_PORT {
            match parse_port(value) {
                Some(port) if key == CMDLINE_AGENT_PORT => settings.agent_port = port,
                Some(port) => settings.stdio_port = port,
                None => settings
                    .problems
                    .push(format!("ignoring {key}={value:?}: not a vsock port")),
            }
        } else if key == CMDLINE_HOSTNAME {
            if valid_hostname(value) {
                settings.hostname = Some(value.to_string());
            } else {
                settings
                    .problems
                    .push(format!("ignoring {key}={value:?}: not a hostname"));
            }
        } else if key == CMDLINE_IGNORE_POWEROFF {
            settings.ignore_poweroff = value == "1";
        } else if key == CMDLINE_LOG {
            match Level::parse(value) {
                Some(level) => settings.log_level = level,
                None => settings
                    .problems
                    .push(format!("ignoring {CMDLINE_LOG}={value:?}: not a log level")),
            }
        }
    }
    settings
}

/// A vsock port a host can dial: not 0, not u32::MAX (VMADDR_PORT_ANY).
fn parse_port(value: &str) -> Option<u32> {
    value
        .parse::<u32>()
        .ok()
        .filter(|p| *p != 0 && *p != u32::MAX)
}

/// Splits a command line into words the way the kernel does: on whitespace, with double
/// quotes grouping (`key="a b"`); the quotes themselves are dropped.
fn split(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut has_word = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_word = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_word {
                    words.push(std::mem::take(&mut word));
                    has_word = false;
                }
            }
            c => {
                word.push(c);
                has_word = true;
            }
        }
    }
    if has_word {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_when_absent() {
        let s = parse("console=ttyS0 quiet panic=-1\n");
        assert_eq!(s, Settings::default());
        assert_eq!(s.agent_port, DEFAULT_AGENT_PORT);
    }

    #[test]
    fn reads_the_hostname_and_refuses_what_is_not_one() {
        assert_eq!(parse("quiet").hostname, None);
        let s = parse("spinbox.hostname=ci-runner-7.example");
        assert_eq!(s.hostname.as_deref(), Some("ci-runner-7.example"));
        for bad in [
            "spinbox.hostname=",
            "spinbox.hostname=a/b",
            "spinbox.hostname=x_y",
        ] {
            let s = parse(bad);
            assert_eq!(s.hostname, None, "{bad}");
            assert!(s.problems[0].contains("not a hostname"), "{bad}");
        }
        let long = format!("spinbox.hostname={}", "a".repeat(65));
        assert_eq!(parse(&long).hostname, None);
    }

    #[test]
    fn reads_port_and_log_level() {
        let s = parse("console=ttyS0 spinbox.agent_port=2048 spinbox.log=debug");
        assert_eq!(s.agent_port, 2048);
        assert!(!s.ignore_poweroff);
        assert!(parse("spinbox.test_ignore_poweroff=1").ignore_poweroff);
        assert!(
            !parse("spinbox.test_ignore_poweroff=1 spinbox.test_ignore_poweroff=0").ignore_poweroff
        );
        assert_eq!(s.log_level, Level::Debug);
        assert!(s.problems.is_empty());
    }

    #[test]
    fn last_occurrence_wins() {
        let s = parse("spinbox.agent_port=2048 quiet spinbox.agent_port=4096");
        assert_eq!(s.agent_port, 4096);
    }

    #[test]
    fn stdio_port() {
        assert_eq!(parse("").stdio_port, DEFAULT_STDIO_PORT);
        let s = parse("spinbox.stdio_port=3000 spinbox.stdio_port=3001 spinbox.stdio_port=0");
        assert_eq!(s.stdio_port, 3001);
        assert_eq!(s.agent_port, DEFAULT_AGENT_PORT);
        assert_eq!(s.problems.len(), 1);
    }

    #[test]
    fn bad_value_keeps_previous_and_is_reported() {
        let s = parse("spinbox.agent_port=2048 spinbox.agent_port=abc spinbox.log=loud");
        assert_eq!(s.agent_port, 2048);
        assert_eq!(s.log_level, Level::Info);
        assert_eq!(s.problems.len(), 2);
        let s = parse("spinbox.agent_port=0 spinbox.agent_port=4294967295");
        assert_eq!(s.agent_port, DEFAULT_AGENT_PORT);
        assert_eq!(s.problems.len(), 2);
    }

    #[test]
    fn ignores_unknown_and_lookalike_keys() {
        let s =
            parse("spinbox.agent_portx=7 xspinbox.agent_port=7 spinbox.agent_port spinbox.other=1");
        assert_eq!(s, Settings::default());
    }

    #[test]
    fn quotes_group_words() {
        let s = parse("foo=\"a spinbox.agent_port=9 b\" spinbox.agent_port=\"3000\"");
        assert_eq!(s.agent_port, 3000);
        assert_eq!(split("a=\"x y\"  b \"\""), vec!["a=x y", "b", ""]);
    }
}
