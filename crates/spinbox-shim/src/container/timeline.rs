//! Where a create's time went.

/// Where a create's time went: each step's duration, logged as one `create timeline` line
/// (the benchmark's boot breakdown reads it from containerd's log).
pub struct Timeline {
    pub started: std::time::Instant,
    last: std::time::Instant,
    steps: Vec<(&'static str, u64)>,
}

impl Timeline {
    pub fn start() -> Timeline {
        let now = std::time::Instant::now();
        Timeline {
            started: now,
            last: now,
            steps: Vec::new(),
        }
    }

    /// Ends the step named `step` now.
    pub fn mark(&mut self, step: &'static str) {
        let now = std::time::Instant::now();
        let ms = u64::try_from(now.duration_since(self.last).as_millis()).unwrap_or(u64::MAX);
        self.steps.push((step, ms));
        self.last = now;
    }

    /// Logs the steps; `boot` is the VM's, for the container that booted it (a container
    /// joining a running pod has none).
    pub fn log(&self, id: &str, boot: Option<&spinbox_vmm::BootInfo>) {
        let steps: Vec<String> = self
            .steps
            .iter()
            .map(|(step, ms)| format!("{step}_ms={ms}"))
            .collect();
        let total = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        match boot {
            Some(boot) => tracing::info!(
                id = %id,
                steps = %steps.join(" "),
                vm_prepare_ms = boot.host_prepare_ms,
                qemu_spawn_to_qmp_ms = boot.host_spawn_to_qmp_ms,
                qemu_spawn_to_ready_ms = boot.host_spawn_to_ready_ms,
                guest_boot_to_ready_ms = boot.guest_boot_to_ready_ms,
                total_ms = total,
                "create timeline"
            ),
            None => tracing::info!(
                id = %id,
                steps = %steps.join(" "),
                total_ms = total,
                joined_pod = true,
                "create timeline"
            ),
        }
    }
}
