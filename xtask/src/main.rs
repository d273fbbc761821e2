//! Developer tasks that are not a build: `setup` installs what building and testing need on a fresh
//! machine, `test` runs every test, `run` builds and runs the tracer.

mod bench;
mod keep_alive;
mod package;
mod pty;
mod setup;
mod soak;
mod vm_test;

use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "tcptrace's developer tasks")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need: nightly rust-src, bpf-linker, Debian packages.
    /// Idempotent: a second run only checks.
    Setup,
    /// Set up, then check and run every test: declared dependencies the code does not use
    /// (cargo-machete) and clippy's lints fail it, then unit tests, the end-to-end tests against
    /// the real kernel (as root; they fail, never skip, without it), the benchmark's smoke run
    /// and the VM tests. Without a filter, `package` runs first: the packaging tests check what
    /// it built.
    Test {
        /// Extra arguments for `cargo test` (for example a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Measure what tracing costs: loopback connection churn untraced vs traced (as root).
    Bench {
        /// Untraced/traced pairs to run.
        #[arg(long, default_value_t = 5)]
        pairs: usize,
        /// Seconds per run.
        #[arg(long, default_value_t = 4.0)]
        seconds: f64,
        /// A short smoke run (one pair of one second) that checks every event is accounted for.
        #[arg(long)]
        quick: bool,
        /// Leave the client and server threads unpinned (by default they are pinned to CPUs 0
        /// and 1, so that the workload keeps every core busy).
        #[arg(long)]
        no_pin: bool,
        /// Instead: how fast tcptrace starts (BTF mode) on a host already holding this many
        /// established connections, its peak memory, and that --snapshot lists every socket.
        #[arg(long, value_name = "CONNECTIONS", num_args = 0..=1, default_missing_value = "50000")]
        startup: Option<usize>,
    },
    /// Many short connections under tcptrace (as root), to show its memory stays flat.
    Soak {
        /// Connections to make.
        #[arg(long, default_value_t = 1_000_000)]
        connections: u64,
    },
    /// The end-to-end scenarios on other kernels: Debian kernel packages booted under QEMU, by
    /// default the newest package of each tested series (6.1 and 6.12).
    VmTest {
        /// One Debian kernel package to boot instead.
        #[arg(long)]
        kernel_package: Option<String>,
    },
    /// Set up, then build the Debian package and the OCI image from the static (musl) binary,
    /// into target/dist/ (the image also into buildah's storage as localhost/tcptrace:VERSION).
    Package,
    /// Set up, build the release binary and run it with these arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let root = workspace_root();
    match args.task {
        Task::Setup => setup::setup(),
        Task::Test { args } => {
            setup::setup()?;
            require_root("the end-to-end tests load eBPF programs")?;
            if args.is_empty() {
                // Dependency hygiene and lints first: quick, and fixed in a manifest or the code.
                // Run directly with the path: under `cargo xtask`, cargo-machete sees cargo's
                // CARGO_PKG_* variables and would take a `cargo machete` subcommand word for a path.
                let status = Command::new("cargo-machete")
                    .arg(&root)
                    .status()
                    .context("failed to run cargo-machete (cargo xtask setup installs it)")?;
                if !status.success() {
                    bail!("cargo-machete found declared but unused dependencies ({status})");
                }
                cargo(&root, &["clippy", "--all-targets", "--", "-D", "warnings"])?;
            }
            cargo(&root, &["build", "--release", "--package", "tcptrace"])?;
            if args.is_empty() {
                // The packaging tests check what this builds (target/dist/, buildah's storage).
                package::package(&root)?;
            }
            let mut test = vec![
                "test",
                "--release",
                "--package",
                "tcptrace",
                "--package",
                "tcptrace-common",
            ];
            // The privileged tests take turns by themselves (tests/support: `serial`).
            test.extend(args.iter().map(String::as_str));
            cargo(&root, &test)?;
            if args.is_empty() {
                // The scenarios once more in the fallback mode (the run above is BTF mode's).
                cargo_with_env(
                    &root,
                    &[
                        "test",
                        "--release",
                        "--package",
                        "tcptrace",
                        "--test",
                        "end_to_end",
                        "--test",
                        "retransmits",
                        "--test",
                        "retransmit_kinds",
                        "--test",
                        "congestion",
                        "--test",
                        "listen_drops",
                    ],
                    ("TCPTRACE_TEST_MODE", "tracefs"),
                )?;
                // The benchmark's smoke run: it runs, and every event is accounted for.
                bench::bench(&root, &bench::Options::QUICK)?;
                // The same scenarios on a second kernel.
                vm_test::vm_test(&root, None)?;
            }
            Ok(())
        }
        Task::Bench {
            pairs,
            seconds,
            quick,
            no_pin,
            startup,
        } => {
            setup::setup()?;
            require_root("the benchmark loads eBPF programs")?;
            if let Some(connections) = startup {
                return bench::startup(&root, connections.max(1));
            }
            let options = if quick {
                bench::Options {
                    pin: !no_pin,
                    ..bench::Options::QUICK
                }
            } else {
                bench::Options {
                    pairs: pairs.max(1),
                    seconds,
                    quick,
                    pin: !no_pin,
                }
            };
            bench::bench(&root, &options)
        }
        Task::Soak { connections } => {
            setup::setup()?;
            require_root("the soak loads eBPF programs")?;
            soak::soak(&root, connections)
        }
        Task::Package => {
            setup::setup()?;
            package::package(&root)
        }
        Task::VmTest { kernel_package } => {
            setup::setup()?;
            vm_test::vm_test(&root, kernel_package.as_deref())
        }
        Task::Run { args } => {
            setup::setup()?;
            cargo(&root, &["build", "--release", "--package", "tcptrace"])?;
            let status = Command::new(root.join("target/release/tcptrace"))
                .args(&args)
                .status()
                .context("failed to start target/release/tcptrace")?;
            if !status.success() {
                bail!("tcptrace exited with {status}");
            }
            Ok(())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

fn require_root(why: &str) -> anyhow::Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("failed to read /proc/self/status")?;
    let root = status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))
        .and_then(|uids| uids.split_whitespace().nth(1))
        == Some("0");
    if !root {
        bail!("{why}: run as root (for example `sudo -E cargo xtask test`)");
    }
    Ok(())
}

/// Runs cargo in the workspace, failing on a non-zero exit.
pub fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    cargo_command(root, args, None)
}

/// Like [`cargo`], with one more environment variable.
pub fn cargo_with_env(root: &Path, args: &[&str], env: (&str, &str)) -> anyhow::Result<()> {
    cargo_command(root, args, Some(env))
}

fn cargo_command(root: &Path, args: &[&str], env: Option<(&str, &str)>) -> anyhow::Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(cargo);
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    let status = command
        .args(args)
        .current_dir(root)
        .status()
        .with_context(|| format!("failed to run cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}
