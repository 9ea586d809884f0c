//! The ACPI power button (QMP `system_powerdown`): the kernel's `button` driver reports it as
//! KEY_POWER on an evdev input device. One blocking thread per `/dev/input/event*` device
//! reads `struct input_event`s and powers the VM off on a press.

use std::fs::File;
use std::io::Read as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::log::{debug, warning};
use crate::shutdown::power_off;

/// `struct input_event` on x86_64: struct timeval (16 bytes), type u16, code u16, value i32.
const INPUT_EVENT_SIZE: usize = 24;
const EV_KEY: u16 = 1;
const KEY_POWER: u16 = 116;

/// Whether one raw `struct input_event` is a press of the power key.
fn is_power_press(event: &[u8; INPUT_EVENT_SIZE]) -> bool {
    let kind = u16::from_ne_bytes([event[16], event[17]]);
    let code = u16::from_ne_bytes([event[18], event[19]]);
    let value = i32::from_ne_bytes([event[20], event[21], event[22], event[23]]);
    kind == EV_KEY && code == KEY_POWER && value == 1
}

fn event_devices() -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir("/dev/input") else {
        return Vec::new();
    };
    let mut devices: Vec<PathBuf> = dir
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("event"))
        .map(|e| e.path())
        .collect();
    devices.sort();
    devices
}

/// Opens the input devices there are now, before the agent reports ready (evdev drops events
/// nobody has open, so a power-button press right after "ready" must find them open), and
/// reads each in its own thread. Devices normally exist once the modules are loaded; if none
/// does, a background thread rescans a few times. No device at all (no ACPI, no evdev) is
/// only worth a debug line.
pub fn watch_power_button() {
    let devices = open_devices();
    if !devices.is_empty() {
        for (path, file) in devices {
            watch_device(path, file);
        }
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("input-scan".into())
        .spawn(|| {
            for attempt in 0..5 {
                std::thread::sleep(Duration::from_millis(200 << attempt));
                let devices = open_devices();
                if !devices.is_empty() {
                    for (path, file) in devices {
                        watch_device(path, file);
                    }
                    return;
                }
            }
            debug!("no /dev/input/event* device; the ACPI power button will not be seen");
        });
    if let Err(e) = spawned {
        warning!("starting the power-button watcher: {e}");
    }
}

fn open_devices() -> Vec<(PathBuf, File)> {
    event_devices()
        .into_iter()
        .filter_map(|path| match File::open(&path) {
            Ok(file) => Some((path, file)),
            Err(e) => {
                debug!("{}: {e}", path.display());
                None
            }
        })
        .collect()
}

fn watch_device(path: PathBuf, file: File) {
    debug!("watching {} for the power button", path.display());
    let spawned = std::thread::Builder::new()
        .name("input".into())
        .spawn(move || {
            if let Err(e) = read_events(file) {
                debug!("{}: {e}", path.display());
            }
        });
    if let Err(e) = spawned {
        warning!("starting an input watcher thread: {e}");
    }
}

fn read_events(mut file: File) -> std::io::Result<()> {
    let mut event = [0u8; INPUT_EVENT_SIZE];
    loop {
        // evdev hands out whole events per read.
        file.read_exact(&mut event)?;
        if is_power_press(&event) {
            power_off("ACPI power button");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: u16, code: u16, value: i32) -> [u8; INPUT_EVENT_SIZE] {
        let mut e = [0u8; INPUT_EVENT_SIZE];
        e[..8].copy_from_slice(&12345i64.to_ne_bytes());
        e[16..18].copy_from_slice(&kind.to_ne_bytes());
        e[18..20].copy_from_slice(&code.to_ne_bytes());
        e[20..24].copy_from_slice(&value.to_ne_bytes());
        e
    }

    #[test]
    fn power_press() {
        assert!(is_power_press(&event(EV_KEY, KEY_POWER, 1)));
        assert!(!is_power_press(&event(EV_KEY, KEY_POWER, 0))); // release
        assert!(!is_power_press(&event(EV_KEY, 115, 1))); // volume up
        assert!(!is_power_press(&event(0, 0, 0))); // EV_SYN
    }
}
