//! The command line's pieces, one by one and assembled.

use super::*;

fn joined(arg: &dyn QemuArg) -> String {
    arg.to_args().join(" ")
}

fn window(args: &[String], flag: &str) -> Vec<String> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

fn full(accel: AccelKind, vsock: Box<dyn QemuArg + Send + Sync>) -> Vec<String> {
    let mut c = QemuCommandLine::new();
    c.push(Basics)
        .push(Machine {
            accel,
            memory_backend: "mem".into(),
        })
        .push(Cpu { accel })
        .push(Smp {
            vcpus: 2,
            max_vcpus: 2,
        })
        .push(Memory {
            id: "mem".into(),
            mib: 512,
            max_mib: 512,
            shared: true,
        })
        .push(KernelBoot {
            kernel: "/k/vmlinuz".into(),
            initrd: "/k/initrd.img".into(),
            cmdline: guest_kernel_cmdline(AccelKind::Tcg, 1024, &[]),
        })
        .push(Serial::Fd(11))
        .push(QmpFd { fd: 3 });
    c.parts.push(vsock);
    c.args()
}

#[test]
fn tcg_with_vhost_user_vsock() {
    let args = full(
        AccelKind::Tcg,
        Box::new(VhostUserVsockPci {
            backend_socket: "/run/spinbox/a/vhost-vsock.sock".into(),
        }),
    );
    assert_eq!(window(&args, "-accel"), ["tcg,thread=multi"]);
    assert_eq!(window(&args, "-cpu"), [TCG_CPU_MODEL]);
    assert!(window(&args, "-machine")[0].starts_with("q35,memory-backend=mem"));
    assert_eq!(
        window(&args, "-object"),
        ["memory-backend-memfd,id=mem,size=512M,share=on"]
    );
    assert_eq!(
        window(&args, "-device"),
        ["vhost-user-vsock-pci,id=vsock0,chardev=vsock0-chr"]
    );
    assert!(window(&args, "-chardev")
        .contains(&"socket,id=vsock0-chr,path=/run/spinbox/a/vhost-vsock.sock".to_string()));
    assert!(
        window(&args, "-chardev").contains(&"socket,id=qmp,fd=3,server=on,wait=off".to_string())
    );
    assert_eq!(window(&args, "-mon"), ["chardev=qmp,mode=control"]);
    assert!(args.contains(&"-nodefaults".to_string()));
    assert_eq!(
        window(&args, "-sandbox"),
        ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    );
    assert!(args.contains(&"-no-reboot".to_string()));
}

#[test]
fn kvm_with_kernel_vhost_vsock() {
    let args = full(
        AccelKind::Kvm,
        Box::new(VhostVsockPci {
            guest_cid: 17,
            vhostfd: 4,
        }),
    );
    assert_eq!(window(&args, "-accel"), ["kvm"]);
    assert_eq!(window(&args, "-cpu"), ["host"]);
    assert_eq!(
        window(&args, "-device"),
        ["vhost-vsock-pci,id=vsock0,guest-cid=17,vhostfd=4"]
    );
    // No vhost-user chardev on the kernel path.
    assert!(!window(&args, "-chardev")
        .iter()
        .any(|c| c.contains("vsock0-chr")));
}

#[test]
fn kernel_boot_and_cmdline() {
    let args = full(
        AccelKind::Tcg,
        Box::new(VhostVsockPci {
            guest_cid: 3,
            vhostfd: 4,
        }),
    );
    assert_eq!(window(&args, "-kernel"), ["/k/vmlinuz"]);
    assert_eq!(window(&args, "-initrd"), ["/k/initrd.img"]);
    let append = &window(&args, "-append")[0];
    assert!(append.contains("console=ttyS0"));
    assert!(append.contains("panic=-1"));
    assert!(append.contains(" spinbox.agent_port=1024"));
    assert_eq!(window(&args, "-smp"), ["2"]);
    assert_eq!(window(&args, "-m"), ["512M"]);
}

#[test]
fn extra_kernel_args_come_last() {
    let c = guest_kernel_cmdline(
        AccelKind::Tcg,
        1024,
        &["spinbox.agent_port=9".into(), "debug".into()],
    );
    assert!(c.ends_with(" spinbox.agent_port=9 debug"), "{c}");
    let port = c.find("spinbox.agent_port=1024").expect("the agent port");
    assert!(port < c.find("spinbox.agent_port=9").unwrap_or(0));
}

#[test]
fn the_host_name_travels_when_it_can() {
    let c = guest_kernel_cmdline(AccelKind::Tcg, 1024, &[]);
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    let word = format!("spinbox.hostname={host}");
    assert_eq!(
        c.split(' ').any(|w| w == word),
        spinbox_agent_api::valid_hostname(&host),
        "{c}"
    );
}

#[test]
fn commas_in_paths_cannot_inject_options() {
    let s = Serial::File("/tmp/x,server=on".into());
    assert_eq!(
        joined(&s),
        "-chardev file,id=serial0,path=/tmp/x,,server=on -serial chardev:serial0"
    );
    let v = VhostUserVsockPci {
        backend_socket: "/a,b".into(),
    };
    assert!(joined(&v).contains("path=/a,,b"));
}

#[test]
fn unshared_memory_for_kernel_vhost_only_setups() {
    let m = Memory {
        id: "mem".into(),
        mib: 256,
        max_mib: 256,
        shared: false,
    };
    assert_eq!(
        joined(&m),
        "-m 256M -object memory-backend-memfd,id=mem,size=256M,share=off"
    );
}

#[test]
fn room_to_grow_memory_is_maxmem_and_a_virtio_mem_region_of_whole_blocks() {
    let m = Memory {
        id: "mem".into(),
        mib: 640,
        max_mib: 8192,
        shared: true,
    };
    assert_eq!(
        joined(&m),
        "-m 640M,maxmem=8192M -object memory-backend-memfd,id=mem,size=640M,share=on"
    );
    // 8192 - 640 = 7552 MiB: 59 blocks of 128 MiB.
    assert_eq!(hotplug_region_mib(640, 8192), 59 * 128);
    assert_eq!(hotplug_region_mib(512, 600), 0);
    assert_eq!(hotplug_region_mib(8192, 512), 0);
    let v = VirtioMem {
        region_mib: 7552,
        shared: true,
    };
    assert_eq!(
        joined(&v),
        "-object memory-backend-memfd,id=vmem0-mem,size=7552M,share=on \
         -device virtio-mem-pci,id=vmem0,memdev=vmem0-mem,block-size=2M,requested-size=0"
    );
}

#[test]
fn virtio_fs_share_on_its_backend_socket() {
    let fs = VhostUserFs {
        id: "fs0".into(),
        socket: "/run/spinbox/c,1/fs0.sock".into(),
        tag: "sbxfs0".into(),
    };
    assert_eq!(
        fs.to_args(),
        [
            "-chardev",
            "socket,id=fs0-chr,path=/run/spinbox/c,,1/fs0.sock",
            "-device",
            "vhost-user-fs-pci,id=fs0,chardev=fs0-chr,tag=sbxfs0",
        ]
    );
}

#[test]
fn serial_ports_on_passed_sockets() {
    let serial = VirtioSerialPorts {
        ports: vec![
            SerialPort {
                name: "spinbox.stdout".into(),
                fd: 9,
            },
            SerialPort {
                name: "a,b".into(),
                fd: 10,
            },
        ],
    };
    assert_eq!(
        serial.to_args(),
        [
            "-device",
            "virtio-serial-pci,id=serial0,max_ports=3",
            "-chardev",
            "socket,id=port0,fd=9",
            "-device",
            "virtserialport,bus=serial0.0,nr=1,chardev=port0,name=spinbox.stdout",
            "-chardev",
            "socket,id=port1,fd=10",
            "-device",
            "virtserialport,bus=serial0.0,nr=2,chardev=port1,name=a,,b",
        ]
    );
}

#[test]
fn hotplug_root_ports_have_their_own_chassis() {
    let a = PcieRootPort {
        id: "hp0".into(),
        chassis: 1,
    };
    assert_eq!(
        a.to_args(),
        vec!["-device", "pcie-root-port,id=hp0,bus=pcie.0,chassis=1"]
    );
}

#[test]
fn virtio_blk_disk_with_serial() {
    let d = VirtioBlk {
        node: "disk0".into(),
        path: "/var/lib/spinbox/layers/ab.erofs".into(),
        serial: "sbx-lower0".into(),
        read_only: true,
    };
    let args = d.to_args();
    assert_eq!(args[0], "-blockdev");
    assert!(args[1].starts_with("node-name=disk0,driver=raw,read-only=on,"));
    assert!(args[1].contains("file.filename=/var/lib/spinbox/layers/ab.erofs"));
    assert_eq!(args[3], "virtio-blk-pci,drive=disk0,serial=sbx-lower0");
    let nic = VirtioNetTap {
        id: "net0".into(),
        fd: 10,
        mac: "02:aa:bb:cc:dd:01".into(),
    }
    .to_args();
    assert_eq!(nic[1], "tap,id=net0,fd=10,vhost=off");
    assert_eq!(
        nic[3],
        "virtio-net-pci,netdev=net0,mac=02:aa:bb:cc:dd:01,romfile="
    );
    let rw = VirtioBlk {
        read_only: false,
        ..d
    };
    assert!(rw.to_args()[1].contains("read-only=off"));
}

#[test]
fn firmware_is_optional_bios() {
    assert_eq!(
        joined(&Firmware {
            path: "/usr/share/qemu/qboot.rom".into()
        }),
        "-bios /usr/share/qemu/qboot.rom"
    );
}

#[test]
fn only_a_tcg_guest_skips_the_apic_timer_calibration() {
    let has = |accel| {
        guest_kernel_cmdline(accel, 1024, &[])
            .split(' ')
            .any(|w| w == "lapic_timer_khz=1000000")
    };
    assert!(has(AccelKind::Tcg));
    assert!(!has(AccelKind::Kvm));
}
