//! `cargo xtask package`: what a host or a cluster installs, from the static (musl) binary the VM
//! tests also use. A Debian package (cargo-deb, metadata in tcptrace/Cargo.toml) holding
//! /usr/sbin/tcptrace, the systemd unit, the logrotate rule, the man page and shell completions
//! (generated from the clap definition by `examples/generate_assets.rs`); and an OCI image
//! (`packaging/Containerfile`, built with buildah) holding only the binary. Both land in
//! `target/dist/`; the image is also in buildah's local storage as [`IMAGE`]`:VERSION`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{setup::run, vm_test};

/// The image's name in local storage; its tag is the workspace version. deploy/daemonset.yaml
/// names it.
pub const IMAGE: &str = "localhost/tcptrace";
/// The version of every crate of the workspace, tcptrace's included.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// buildah as the tests and this task use it: vfs storage (no overlay mounts needed) and chroot
/// isolation (no user namespaces needed).
pub const BUILDAH_STORAGE: &[&str] = &["--storage-driver", "vfs"];

pub fn package(root: &Path) -> anyhow::Result<()> {
    let release = vm_test::build_static_binaries(root)?;
    let assets = release.join("package-assets");
    if assets.exists() {
        std::fs::remove_dir_all(&assets)
            .with_context(|| format!("failed to remove {}", assets.display()))?;
    }
    run(Command::new(release.join("examples/generate_assets")).arg(&assets))
        .context("failed to generate the man page and completions")?;
    // Debian wants man pages compressed; cargo-deb leaves files under target/ as they are.
    run(Command::new("gzip")
        .args(["--best", "--no-name"])
        .arg(assets.join("tcptrace.8")))?;
    let dist = root.join("target/dist");
    std::fs::create_dir_all(&dist)
        .with_context(|| format!("failed to create {}", dist.display()))?;
    let deb = debian_package(root, &dist)?;
    let (image, image_archive) = image(root, &release.join("tcptrace"), &dist)?;
    eprintln!(
        "xtask: built {}, {image} and {}",
        deb.display(),
        image_archive.display()
    );
    Ok(())
}

/// cargo-deb on the binary built above (`--no-build`), into `dist`.
fn debian_package(root: &Path, dist: &Path) -> anyhow::Result<PathBuf> {
    let deb = dist.join(format!("tcptrace-agent_{VERSION}-1_amd64.deb"));
    if deb.exists() {
        std::fs::remove_file(&deb)
            .with_context(|| format!("failed to remove {}", deb.display()))?;
    }
    run(Command::new("cargo-deb")
        .args([
            "--package",
            "tcptrace",
            "--target",
            vm_test::TARGET,
            "--no-build",
        ])
        .arg("--output")
        .arg(dist)
        .current_dir(root))
    .context("cargo-deb failed (cargo xtask setup installs it)")?;
    if !deb.exists() {
        bail!("cargo-deb did not write {}", deb.display());
    }
    Ok(deb)
}

/// The image from a context holding only the binary; the previous image of this tag is removed
/// first, so rebuilding leaves no unnamed image behind.
fn image(root: &Path, binary: &Path, dist: &Path) -> anyhow::Result<(String, PathBuf)> {
    let context = dist.join("image-context");
    if context.exists() {
        std::fs::remove_dir_all(&context)
            .with_context(|| format!("failed to remove {}", context.display()))?;
    }
    std::fs::create_dir_all(&context)
        .with_context(|| format!("failed to create {}", context.display()))?;
    std::fs::copy(binary, context.join("tcptrace"))
        .with_context(|| format!("failed to copy {}", binary.display()))?;
    let image = format!("{IMAGE}:{VERSION}");
    let exists = Command::new("buildah")
        .args(BUILDAH_STORAGE)
        .args(["inspect", "--type", "image", &image])
        .output()
        .context("failed to run buildah (cargo xtask setup installs it)")?
        .status
        .success();
    if exists {
        run(Command::new("buildah")
            .args(BUILDAH_STORAGE)
            .args(["rmi", "--force", &image]))?;
    }
    run(Command::new("buildah")
        .args(BUILDAH_STORAGE)
        .args(["bud", "--isolation", "chroot", "--quiet"])
        .args(["--build-arg", &format!("VERSION={VERSION}")])
        .arg("--file")
        .arg(root.join("packaging/Containerfile"))
        .args(["--tag", &image])
        .arg(&context))
    .context("failed to build the image")?;
    let archive = dist.join(format!("tcptrace-{VERSION}.oci.tar"));
    if archive.exists() {
        std::fs::remove_file(&archive)
            .with_context(|| format!("failed to remove {}", archive.display()))?;
    }
    run(Command::new("buildah")
        .args(BUILDAH_STORAGE)
        .args(["push", "--quiet", &image])
        .arg(format!("oci-archive:{}:{image}", archive.display())))
    .context("failed to write the image archive")?;
    Ok((image, archive))
}
