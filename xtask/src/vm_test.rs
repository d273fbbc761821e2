//! `cargo xtask vm-test`: the end-to-end scenarios on another kernel, for real. Boots a Debian
//! kernel package under QEMU (software emulation) with an initramfs holding busybox, the static
//! (musl) tcptrace, the static test binaries and workload, iproute2 and iptables from this
//! machine, and the kernel's own modules the retransmit tests need; the guest runs the tests and
//! says its verdict on the serial console, which becomes this command's exit status.
//!
//! By default it runs each kernel series of [`SERIES`], each with the newest package of that series
//! the archive lists (old ABIs leave the archive). `--kernel-package` runs one package instead:
//! any Debian `linux-image-*-unsigned` package whose kernel has BTF, tracefs and the two
//! tracepoints.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};

/// Kernel series tested by default: (name, the package names of the series as `prefix`,
/// a version, `suffix`).
pub const SERIES: &[(&str, &str, &str)] = &[
    ("6.1", "linux-image-6.1.0-", "-amd64-unsigned"),
    ("6.12", "linux-image-6.12.", "+deb12-amd64-unsigned"),
];
pub const TARGET: &str = "x86_64-unknown-linux-musl";
/// Modules the guest loads, dependencies first: veth pairs, iptables on nftables.
const MODULES: &[&str] = &[
    "veth",
    "crc32c_generic",
    "libcrc32c",
    "nfnetlink",
    "nf_tables",
    "x_tables",
    "nft_compat",
    "xt_tcpudp",
];
/// Modules loaded when the kernel builds them as modules (`ss` asks sock_diag for sockets; the
/// retransmit kind tests drop one chosen segment with `-m string` and `-m limit`, which
/// iptables-nft makes a native nft limit).
const OPTIONAL_MODULES: &[&str] = &[
    "inet_diag",
    "tcp_diag",
    "ts_bm",
    "xt_string",
    "xt_limit",
    "nft_limit",
];
/// Host programs the tests run inside the guest, with their libraries.
const HOST_PROGRAMS: &[&str] = &["/usr/sbin/ip", "/usr/sbin/xtables-nft-multi", "/usr/bin/ss"];
/// The tests run in the guest: (test binary, test name filters; empty for all).
const TESTS: &[(&str, &[&str])] = &[
    (
        "end_to_end",
        &[
            "every_transition_of_both_sides",
            "pid_filter",
            "port_filter",
            "text_output",
            "sparse_events",
            "sigterm",
            "bad_values",
        ],
    ),
    ("retransmits", &[]),
    ("retransmit_kinds", &[]),
    ("congestion", &[]),
    ("listen_drops", &[]),
    (
        "owners",
        &[
            "predate",
            "namespaces",
            "so_reuseport",
            "pre_forked",
            "handed_over_exec",
            "exited_owner",
            "worker_thread",
        ],
    ),
    ("modes", &["logging", "snapshot_needs"]),
    ("hardening", &["btf_mode_accounts"]),
    ("containers", &[]),
];
const VERDICT: &str = "TCPTRACE-VM-VERDICT";
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// Runs the guest tests on `kernel_package`, or on the newest package of each of [`SERIES`].
pub fn vm_test(root: &Path, kernel_package: Option<&str>) -> anyhow::Result<()> {
    let packages = match kernel_package {
        Some(package) => vec![package.to_owned()],
        None => SERIES
            .iter()
            .map(|&(name, prefix, suffix)| newest_package(name, prefix, suffix))
            .collect::<anyhow::Result<_>>()?,
    };
    for package in &packages {
        println!("xtask: vm-test on {package}");
        vm_test_one(root, package).with_context(|| format!("vm-test on {package}"))?;
    }
    Ok(())
}

/// The newest `prefix<version>suffix` package the archive lists (package lists refreshed once
/// when none is found).
fn newest_package(series: &str, prefix: &str, suffix: &str) -> anyhow::Result<String> {
    let search = || -> anyhow::Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args([
                "search",
                "--names-only",
                &format!("^{}", prefix.replace('.', "\\.")),
            ])
            .output()
            .context("failed to run apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| {
                name.strip_prefix(prefix)
                    .and_then(|rest| rest.strip_suffix(suffix))
                    .is_some_and(|version| {
                        !version.is_empty()
                            && version.chars().all(|c| c.is_ascii_digit() || c == '.')
                    })
            })
            .map(str::to_owned)
            .collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        let _ = Command::new("apt-get")
            .arg("update")
            .stdout(Stdio::null())
            .status();
        names = search()?;
    }
    let version = |name: &String| -> Vec<u64> {
        name[prefix.len()..name.len() - suffix.len()]
            .split('.')
            .map(|n| n.parse().unwrap_or(0))
            .collect()
    };
    names.into_iter().max_by_key(version).with_context(|| {
        format!("the package archive lists no Linux {series} kernel ({prefix}*{suffix})")
    })
}

fn vm_test_one(root: &Path, kernel_package: &str) -> anyhow::Result<()> {
    let work = root.join("target/vm");
    std::fs::create_dir_all(&work)
        .with_context(|| format!("failed to create {}", work.display()))?;
    let kernel = unpack_kernel(&work, kernel_package)?;
    let binaries = build_static(root)?;
    let initrd = initramfs(root, &work, &kernel, &binaries)?;
    boot(&kernel.vmlinuz, &initrd)
}

struct Kernel {
    vmlinuz: PathBuf,
    /// `lib/modules/<release>` of the unpacked package.
    modules: PathBuf,
}

/// Downloads (once) and unpacks the kernel package.
fn unpack_kernel(work: &Path, package: &str) -> anyhow::Result<Kernel> {
    let dir = work.join(package);
    if !dir.join("boot").is_dir() {
        let download = work.join("download");
        std::fs::create_dir_all(&download)?;
        let fetch = || {
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(&download)
                .status()
                .context("failed to run apt-get download")
        };
        // Package lists may be missing or stale on a fresh machine: refresh them once.
        if !fetch()?.success() {
            let _ = Command::new("apt-get")
                .arg("update")
                .stdout(Stdio::null())
                .status();
            ensure!(
                fetch()?.success(),
                "apt-get download {package} failed: is the package name right, and the archive reachable?"
            );
        }
        let deb = std::fs::read_dir(&download)?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(package) && n.ends_with(".deb"))
            })
            .with_context(|| format!("apt-get download left no {package}*.deb"))?;
        let status = Command::new("dpkg-deb")
            .arg("-x")
            .arg(&deb)
            .arg(&dir)
            .status()
            .context("dpkg-deb")?;
        ensure!(status.success(), "dpkg-deb -x {} failed", deb.display());
    }
    let vmlinuz = std::fs::read_dir(dir.join("boot"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .with_context(|| format!("{package} has no boot/vmlinuz-*"))?;
    let modules = std::fs::read_dir(dir.join("lib/modules"))
        .with_context(|| format!("{package} has no lib/modules"))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .next()
        .with_context(|| format!("{package} has an empty lib/modules"))?;
    Ok(Kernel { vmlinuz, modules })
}

/// Paths of the static binaries, where the tests expect them (their compile-time paths).
struct Binaries {
    tcptrace: PathBuf,
    examples: Vec<PathBuf>,
    tests: Vec<(PathBuf, &'static [&'static str])>,
}

/// Builds the static (musl) tcptrace and its examples; returns their release directory
/// (`target/x86_64-unknown-linux-musl/release`). The VM tests and `cargo xtask package` share it.
pub fn build_static_binaries(root: &Path) -> anyhow::Result<PathBuf> {
    crate::cargo(
        root,
        &[
            "build",
            "--release",
            "--target",
            TARGET,
            "--package",
            "tcptrace",
            "--bins",
            "--examples",
        ],
    )?;
    Ok(root.join("target").join(TARGET).join("release"))
}

fn build_static(root: &Path) -> anyhow::Result<Binaries> {
    let release = build_static_binaries(root)?;
    let mut args = vec![
        "test",
        "--release",
        "--target",
        TARGET,
        "--package",
        "tcptrace",
        "--no-run",
        "--message-format=json",
    ];
    for (test, _) in TESTS {
        args.extend(["--test", test]);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(&args)
        .current_dir(root)
        .stderr(Stdio::inherit())
        .output()
        .context("failed to build the static test binaries")?;
    ensure!(
        out.status.success(),
        "building the static test binaries failed"
    );
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        for &(name, filters) in TESTS {
            if line.contains("\"reason\":\"compiler-artifact\"")
                && line.contains(&format!("\"name\":\"{name}\""))
                && line.contains("\"test\":true")
            {
                let exe = line
                    .split("\"executable\":\"")
                    .nth(1)
                    .and_then(|rest| rest.split('"').next())
                    .with_context(|| format!("no executable for test {name}"))?;
                tests.push((PathBuf::from(exe), filters));
            }
        }
    }
    ensure!(
        tests.len() == TESTS.len(),
        "found {} of {} test binaries",
        tests.len(),
        TESTS.len()
    );
    Ok(Binaries {
        tcptrace: release.join("tcptrace"),
        examples: vec![
            release.join("examples/tcp_workload"),
            release.join("examples/handover_server"),
        ],
        tests,
    })
}

/// Copies `source` to the same absolute path under `stage`.
fn place(stage: &Path, source: &Path) -> anyhow::Result<()> {
    let target = stage.join(source.strip_prefix("/").unwrap_or(source));
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::copy(source, &target)
        .with_context(|| format!("failed to copy {}", source.display()))?;
    Ok(())
}

/// The shared libraries `program` loads, from ldd, and the loader itself.
fn libraries(program: &str) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(program)
        .output()
        .with_context(|| format!("ldd {program}"))?;
    ensure!(out.status.success(), "ldd {program} failed");
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = l
                .split("=> ")
                .nth(1)
                .map_or(l, |rest| rest)
                .split(" (")
                .next()?;
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

fn initramfs(
    root: &Path,
    work: &Path,
    kernel: &Kernel,
    binaries: &Binaries,
) -> anyhow::Result<PathBuf> {
    let stage = work.join("initramfs");
    let _ = std::fs::remove_dir_all(&stage);
    for dir in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "modules",
        "var",
    ] {
        std::fs::create_dir_all(stage.join(dir))?;
    }
    std::fs::copy("/bin/busybox", stage.join("bin/busybox"))
        .context("busybox-static is missing")?;
    std::os::unix::fs::symlink("../run", stage.join("var/run"))?;
    for program in HOST_PROGRAMS {
        place(&stage, Path::new(program))?;
        for library in libraries(program)? {
            place(&stage, &library)?;
        }
    }
    std::os::unix::fs::symlink("xtables-nft-multi", stage.join("usr/sbin/iptables"))?;
    for entry in
        std::fs::read_dir("/usr/lib/x86_64-linux-gnu/xtables").context("iptables extensions")?
    {
        place(&stage, &entry?.path())?;
    }
    for file in ["/etc/protocols", "/etc/services"] {
        place(&stage, Path::new(file))?;
    }
    // Modules, decompressed if needed, in load order.
    let mut order = String::new();
    let optional = OPTIONAL_MODULES
        .iter()
        .filter(|module| find_module(&kernel.modules, module).is_ok());
    for module in MODULES.iter().chain(optional) {
        let path = find_module(&kernel.modules, module)?;
        let target = stage.join("modules").join(format!("{module}.ko"));
        if path.extension().is_some_and(|e| e == "ko") {
            std::fs::copy(&path, &target)?;
        } else {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&path)
                .output()
                .context("xz")?;
            ensure!(out.status.success(), "xz -d {} failed", path.display());
            std::fs::write(&target, out.stdout)?;
        }
        order.push_str(module);
        order.push('\n');
    }
    std::fs::write(stage.join("modules/order"), order)?;
    // The tests find these at their build-time paths.
    place(&stage, &binaries.tcptrace)?;
    for example in &binaries.examples {
        place(&stage, example)?;
    }
    place(&stage, &root.join("schema/tcptrace-events.schema.json"))?;
    std::fs::create_dir_all(
        stage.join(
            root.join("tcptrace")
                .strip_prefix("/")
                .unwrap_or(&root.join("tcptrace")),
        ),
    )?;
    let mut tests = String::new();
    for (exe, filters) in &binaries.tests {
        place(&stage, exe)?;
        tests.push_str(&format!(
            "run {} --test-threads=1 {}\n",
            exe.display(),
            filters.join(" ")
        ));
    }
    let init = format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# cgroup v2, for the container tests (as a unified host mounts it).
mkdir -p /sys/fs/cgroup && mount -t cgroup2 cgroup2 /sys/fs/cgroup
# /run and /tmp stay on the (writable) initramfs: the test binaries may live under /tmp.
ip link set lo up
# The burst test holds 3,000 sockets in one process.
ulimit -n 65536
for module in $(cat /modules/order); do insmod /modules/$module.ko || echo "insmod $module failed"; done
echo "guest: Linux $(uname -r)"
verdict=pass
run() {{
    echo "guest: running $*"
    "$@" || verdict=fail
}}
{tests}echo "{VERDICT} $verdict"
poweroff -f
"#
    );
    let init_path = stage.join("init");
    std::fs::write(&init_path, init)?;
    std::fs::set_permissions(
        &init_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let initrd = work.join("initrd.gz");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd '{}' && find . | cpio -o -H newc --quiet | gzip -1 > '{}'",
            stage.display(),
            initrd.display()
        ))
        .status()
        .context("cpio")?;
    ensure!(status.success(), "packing the initramfs failed");
    Ok(initrd)
}

fn find_module(modules: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let mut stack = vec![modules.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n == format!("{name}.ko") || n.starts_with(&format!("{name}.ko.")))
            {
                return Ok(path);
            }
        }
    }
    bail!("module {name} is not in {}", modules.display())
}

/// Boots the guest and turns its verdict into ours.
fn boot(vmlinuz: &Path, initrd: &Path) -> anyhow::Result<()> {
    // KVM is not usable here (nested); software emulation works everywhere.
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-smp",
            "2",
            "-m",
            "1024",
            "-nographic",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", "console=ttyS0 panic=-1 quiet"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("failed to start qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let stdout = child.stdout.take().context("no qemu stdout")?;
    let started = Instant::now();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut verdict = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                println!("{line}");
                if let Some(v) = line.trim().strip_prefix(VERDICT) {
                    verdict = Some(v.trim() == "pass");
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!("the guest did not finish within {GUEST_TIMEOUT:?}");
        }
    }
    let _ = child.wait();
    match verdict {
        Some(true) => {
            println!(
                "xtask: vm-test passed in {:.0} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Some(false) => bail!("tests failed in the guest"),
        None => bail!("the guest gave no verdict (did it boot?)"),
    }
}
