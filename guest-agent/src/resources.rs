//! What the guest has and how busy it is (GuestResources): online CPUs, /proc/meminfo,
//! /proc/stat's CPU ticks and PSI. The host's resize controllers read it; it is the guest's
//! word, and the host bounds it.

use std::io;

use spinbox_agent_api::agent::GuestResourcesResponse;

/// Reads everything. Blocking.
pub fn read() -> io::Result<GuestResourcesResponse> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    let stat = std::fs::read_to_string("/proc/stat")?;
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online")?;
    // PSI may be off (psi=0): no pressure then.
    let pressure = |res: &str| {
        std::fs::read_to_string(format!("/proc/pressure/{res}"))
            .ok()
            .and_then(|p| some_avg10(&p))
            .unwrap_or(0)
    };
    let (busy, total) = cpu_ticks(&stat).unwrap_or((0, 0));
    Ok(GuestResourcesResponse {
        online_cpus: count_cpu_list(&online).unwrap_or(1),
        mem_total_kib: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0),
        mem_available_kib: meminfo_kib(&meminfo, "MemAvailable").unwrap_or(0),
        cpu_busy_ticks: busy,
        cpu_total_ticks: total,
        cpu_pressure_avg10: pressure("cpu"),
        memory_pressure_avg10: pressure("memory"),
        ..Default::default()
    })
}

/// `MemTotal:  1234 kB` -> 1234.
fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k == key).then(|| v.split_whitespace().next()?.parse().ok())?
    })
}

/// The aggregate `cpu` line of /proc/stat: (busy, total) ticks. Idle and iowait are not busy;
/// guest time is already counted in user.
fn cpu_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total))
}

/// `some avg10=12.34 ...` -> 1234.
fn some_avg10(psi: &str) -> Option<u32> {
    let line = psi.lines().find(|l| l.starts_with("some "))?;
    let v = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("avg10="))?;
    let (whole, frac) = v.split_once('.').unwrap_or((v, "0"));
    let frac: String = frac.chars().chain("00".chars()).take(2).collect();
    Some(whole.parse::<u32>().ok()?.saturating_mul(100) + frac.parse::<u32>().ok()?)
}

/// How many CPUs a kernel CPU list (`0-3,5`) names.
fn count_cpu_list(list: &str) -> Option<u32> {
    crate::container::cgroup::count_cpu_list(list).and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_stat_and_psi_are_parsed() {
        let meminfo = "MemTotal:        1000448 kB\nMemFree:  5 kB\nMemAvailable:     812000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(1_000_448));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(812_000));
        assert_eq!(meminfo_kib(meminfo, "Mem"), None);
        let stat = "cpu  100 5 50 800 40 3 2 0 0 0\ncpu0 100 5 50 800 40 3 2 0 0 0\n";
        assert_eq!(cpu_ticks(stat), Some((160, 1000)));
        assert_eq!(cpu_ticks("cpu0 1 2 3\n"), None);
        let psi = "some avg10=12.34 avg60=1.00 avg300=0.00 total=1\nfull avg10=99.00 avg60=0 avg300=0 total=0\n";
        assert_eq!(some_avg10(psi), Some(1234));
        assert_eq!(some_avg10("some avg10=0.5 avg60=0"), Some(50));
        assert_eq!(some_avg10("full avg10=3.00"), None);
        assert_eq!(count_cpu_list("0-1,3\n"), Some(3));
    }

    #[test]
    fn this_machine_reads() {
        let r = read().unwrap();
        assert!(r.online_cpus >= 1);
        assert!(r.mem_total_kib > 0 && r.mem_available_kib <= r.mem_total_kib);
        assert!(r.cpu_total_ticks >= r.cpu_busy_ticks && r.cpu_total_ticks > 0);
    }
}
