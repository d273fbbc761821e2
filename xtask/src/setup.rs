//! `cargo xtask setup`: what a fresh machine needs to build and test tcptrace. Each step checks
//! first, so a second run only checks.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

/// The bpf-linker release that matches rustc's LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian packages the tests use: network namespaces and veth (iproute2), packet drops
/// (iptables), checking what is attached (bpftool), capability sets (util-linux's setpriv), a real
/// Prometheus server and promtool for the metrics tests (prometheus), a second kernel booted in
/// software emulation (qemu-system-x86, busybox-static, cpio, xz-utils), a real daemonizing
/// pre-fork server and a load generator for the owner tests (nginx-light, apache2-utils); for
/// the packaging tests, the image builder and what checks the package and its files (buildah,
/// lintian, man-db, systemd's `systemd-analyze verify`), and the log pipeline's rotation and
/// collector (logrotate, procps' pkill, syslog-ng-core), and a terminal for `tcptrace top`'s test
/// (tmux).
const PACKAGES: &[&str] = &[
    "iproute2",
    "iptables",
    "bpftool",
    "util-linux",
    "prometheus",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "xz-utils",
    "nginx-light",
    "postgresql",
    "openssh-server",
    "openssh-client",
    "apache2-utils",
    "buildah",
    "lintian",
    "man-db",
    "systemd",
    "logrotate",
    "tmux",
    "procps",
    "syslog-ng-core",
];
/// The static build for other hosts and for the VM tests.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// The test command's check for declared dependencies the code does not use.
const CARGO_MACHETE_VERSION: &str = "0.9.2";
/// `cargo xtask package` builds the Debian package with it (pinned; builds with stable 1.95).
const CARGO_DEB_VERSION: &str = "3.8.0";

pub fn setup() -> anyhow::Result<()> {
    rust_src()?;
    musl_target()?;
    clippy()?;
    cargo_machete()?;
    cargo_deb()?;
    bpf_linker()?;
    packages()
}

/// The test command runs clippy with warnings as errors.
fn clippy() -> anyhow::Result<()> {
    if output(Command::new("cargo").args(["+stable", "clippy", "--version"])).is_ok() {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "clippy", "--toolchain", "stable"]))
}

fn cargo_machete() -> anyhow::Result<()> {
    if let Ok(version) = output(Command::new("cargo-machete").arg("--version"))
        && version.contains(CARGO_MACHETE_VERSION)
    {
        return Ok(());
    }
    run(Command::new("cargo").args([
        "+stable",
        "install",
        "cargo-machete",
        "--version",
        CARGO_MACHETE_VERSION,
        "--locked",
    ]))
}

fn cargo_deb() -> anyhow::Result<()> {
    if let Ok(version) = output(Command::new("cargo-deb").arg("--version"))
        && version.contains(CARGO_DEB_VERSION)
    {
        return Ok(());
    }
    run(Command::new("cargo").args([
        "+stable",
        "install",
        "cargo-deb",
        "--version",
        CARGO_DEB_VERSION,
        "--locked",
    ]))
}

/// `-Z build-std=core` for the BPF target needs the nightly toolchain's standard library sources.
fn rust_src() -> anyhow::Result<()> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
        .context("the nightly toolchain is missing (rustup toolchain install nightly)")?;
    if PathBuf::from(sysroot.trim())
        .join("lib/rustlib/src/rust/library/core")
        .is_dir()
    {
        return Ok(());
    }
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn musl_target() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if installed.lines().any(|t| t.trim() == MUSL_TARGET) {
        return Ok(());
    }
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// bpf-linker must use the LLVM rustc itself uses; a plain `cargo install` looks for a system
/// LLVM that does not match. Link it against the nightly toolchain's own libLLVM, through a
/// directory that outlives the install (the binary keeps an rpath to it).
fn bpf_linker() -> anyhow::Result<()> {
    if let Ok(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok(());
    }
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let libdir = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&libdir)
        .with_context(|| format!("failed to list {}", libdir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .with_context(|| format!("no libLLVM.so.* in {}", libdir.display()))?;
    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .context("neither CARGO_HOME nor HOME is set")?;
    let prefix = cargo_home.join("bpf-linker-llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("failed to create {}", lib.display()))?;
    // `libLLVM.so` for the build; the versioned name for the loader when bpf-linker runs outside
    // rustup (which otherwise puts the toolchain's lib directory on LD_LIBRARY_PATH).
    let soname = libllvm
        .file_name()
        .context("libLLVM path has no file name")?;
    for name in [std::ffi::OsStr::new("libLLVM.so"), soname] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&libllvm, &link).with_context(|| {
            format!("failed to link {} to {}", link.display(), libllvm.display())
        })?;
    }
    run(Command::new("cargo")
        .args([
            "+stable",
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--locked",
        ])
        .args(["--no-default-features", "--features", "llvm-22", "--force"])
        .env("LLVM_PREFIX", &prefix))
}

fn packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${Status}", package])
                .output()
                .is_ok_and(|out| {
                    String::from_utf8_lossy(&out.stdout).contains("install ok installed")
                })
        })
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").arg("update").stdout(Stdio::null()))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn output(command: &mut Command) -> anyhow::Result<String> {
    let out = command
        .output()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !out.status.success() {
        bail!("{command:?} failed ({})", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command, failing on a non-zero exit.
pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("failed to run {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
