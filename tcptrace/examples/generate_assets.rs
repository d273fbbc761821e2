//! Writes what the Debian package ships beside the binary, generated from the clap definition
//! (`tcptrace::cli::Cli`) so it never drifts from the flags: the man page `tcptrace.8` and shell
//! completions for bash (`tcptrace.bash`), zsh (`_tcptrace`) and fish (`tcptrace.fish`).
//!
//! `generate_assets DIR` (run by `cargo xtask package`). An example rather than a part of the
//! binary, so the shipped tcptrace does not carry the generators.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;
use clap_complete::Shell;
use tcptrace::cli::Cli;

fn main() {
    if let Err(e) = run() {
        eprintln!("generate_assets: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> anyhow::Result<()> {
    let mut args = std::env::args_os().skip(1);
    let (Some(dir), None) = (args.next(), args.next()) else {
        bail!("usage: generate_assets DIR");
    };
    let dir = PathBuf::from(dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("failed to create {}", dir.display()))?;
    man_page(&dir)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        clap_complete::generate_to(shell, &mut Cli::command(), "tcptrace", &dir)
            .with_context(|| format!("failed to write the {shell} completions"))?;
    }
    Ok(())
}

/// Section 8: a system administration command, installed in /usr/sbin.
fn man_page(dir: &Path) -> anyhow::Result<()> {
    let version = env!("CARGO_PKG_VERSION");
    let man = clap_mangen::Man::new(Cli::command())
        .section("8")
        .manual("System Manager's Manual")
        .source(format!("tcptrace {version}"));
    let mut page = Vec::new();
    man.render(&mut page)
        .context("failed to render the man page")?;
    let path = dir.join("tcptrace.8");
    std::fs::write(&path, page).with_context(|| format!("failed to write {}", path.display()))
}
