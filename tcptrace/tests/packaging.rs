//! What `cargo xtask package` builds (`cargo xtask test` runs it before the tests): the Debian
//! package passes lintian, installs, works from /usr/sbin and its man page, and purges without a
//! trace; the OCI image holds exactly the static binary; the deployment files name what the
//! package installs and the image the task builds. The package and image tests need root and
//! fail, never skip, when something is missing.

mod support;

use std::{
    collections::BTreeSet,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::Value;
use support::{require_root, serial};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Debian package's name (Debian's archive has an unrelated `tcptrace`).
const PACKAGE: &str = "tcptrace-agent";
const IMAGE: &str = "localhost/tcptrace";
/// buildah as `cargo xtask package` uses it.
const BUILDAH_STORAGE: &[&str] = &["--storage-driver", "vfs"];
/// Every file the package installs (directories aside).
const PACKAGE_FILES: &[&str] = &[
    "/etc/logrotate.d/tcptrace",
    "/usr/lib/systemd/system/tcptrace.service",
    "/usr/sbin/tcptrace",
    "/usr/share/bash-completion/completions/tcptrace",
    "/usr/share/doc/tcptrace-agent/README.md",
    "/usr/share/doc/tcptrace-agent/changelog.Debian.gz",
    "/usr/share/doc/tcptrace-agent/copyright",
    "/usr/share/fish/vendor_completions.d/tcptrace.fish",
    "/usr/share/man/man8/tcptrace.8.gz",
    "/usr/share/zsh/vendor-completions/_tcptrace",
];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn read(path: &str) -> String {
    let path = workspace().join(path);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs a command, returning what it printed; panics with its output if it fails.
fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (cargo xtask setup installs it)"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn buildah(args: &[&str]) -> Output {
    let all: Vec<&str> = BUILDAH_STORAGE.iter().chain(args).copied().collect();
    run("buildah", &all)
}

/// A file `cargo xtask package` wrote; panics saying how to make it when it is missing.
fn built(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `cargo xtask package` first (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// The static binary the package and the image were made from.
fn static_binary() -> PathBuf {
    built(workspace().join("target/x86_64-unknown-linux-musl/release/tcptrace"))
}

fn package_installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", PACKAGE])
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).contains("installed"))
}

/// Purges the package when the test ends, also when it fails.
struct Installed;

impl Drop for Installed {
    fn drop(&mut self) {
        let _ = Command::new("dpkg").args(["--purge", PACKAGE]).output();
    }
}

#[test]
fn debian_package_passes_lintian_installs_works_and_purges_cleanly() {
    require_root();
    // dpkg and the package name are machine-wide: one checkout's run at a time.
    let _serial = serial();
    let deb = built(workspace().join(format!("target/dist/{PACKAGE}_{VERSION}-1_amd64.deb")));
    let deb = deb.to_str().expect("UTF-8 path");

    let lintian = Command::new("lintian")
        .args(["--fail-on", "error", "--display-info", deb])
        .output()
        .expect("lintian (cargo xtask setup installs it)");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&lintian.stdout),
        String::from_utf8_lossy(&lintian.stderr)
    );
    assert!(lintian.status.success(), "lintian failed:\n{report}");
    assert!(
        !report.lines().any(|l| l.starts_with("E: ")),
        "lintian errors:\n{report}"
    );

    assert!(
        !package_installed(),
        "a package named tcptrace-agent is already installed: remove it first (this test installs and \
         purges its own)"
    );
    let guard = Installed;
    run("dpkg", &["--install", deb]);

    let listed: BTreeSet<String> = stdout(&run("dpkg", &["--listfiles", PACKAGE]))
        .lines()
        .filter(|path| !Path::new(path).is_dir())
        .map(str::to_owned)
        .collect();
    let want: BTreeSet<String> = PACKAGE_FILES.iter().map(|p| (*p).to_owned()).collect();
    assert_eq!(listed, want, "the package's files");
    let conffiles = stdout(&run(
        "dpkg-query",
        &["--showformat=${Conffiles}", "--show", PACKAGE],
    ));
    assert!(
        conffiles.contains("/etc/logrotate.d/tcptrace"),
        "the logrotate rule is a conffile: {conffiles}"
    );

    let version = stdout(&run("/usr/sbin/tcptrace", &["--version"]));
    assert_eq!(version.trim(), format!("tcptrace {VERSION}"));
    let mode = std::fs::metadata("/usr/sbin/tcptrace")
        .expect("/usr/sbin/tcptrace")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755);

    let man = stdout(&run("man", &["-w", "tcptrace"]));
    assert_eq!(man.trim(), "/usr/share/man/man8/tcptrace.8.gz");
    let page = Command::new("man")
        .args(["8", "tcptrace"])
        .env("MANPAGER", "cat")
        .env("MANWIDTH", "100")
        .output()
        .expect("man");
    let page = String::from_utf8_lossy(&page.stdout);
    for flag in ["--pid", "--output", "--metrics-addr", "--mode"] {
        assert!(page.contains(flag), "the man page lacks {flag}:\n{page}");
    }
    for (path, words) in [
        (
            "/usr/share/bash-completion/completions/tcptrace",
            "complete -F",
        ),
        (
            "/usr/share/zsh/vendor-completions/_tcptrace",
            "#compdef tcptrace",
        ),
        (
            "/usr/share/fish/vendor_completions.d/tcptrace.fish",
            "complete -c tcptrace",
        ),
    ] {
        let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(text.contains(words), "{path} lacks {words:?}");
        assert!(text.contains("metrics-addr"), "{path} lacks --metrics-addr");
    }

    // Offline: no systemd needs to run. It checks the unit's syntax, and that ExecStart and
    // ExecReload name executables that exist.
    let verify = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/tcptrace.service"],
    );
    let complaints = String::from_utf8_lossy(&verify.stderr);
    assert!(
        !complaints.contains("tcptrace.service"),
        "systemd-analyze verify complains about the unit:\n{complaints}"
    );
    // logrotate parses the installed rule (debug mode: reads, rotates nothing).
    let logrotate = run("logrotate", &["--debug", "/etc/logrotate.d/tcptrace"]);
    let said = String::from_utf8_lossy(&logrotate.stderr);
    assert!(
        said.contains("/var/log/tcptrace/events.json") && !said.contains("error"),
        "logrotate --debug on the rule:\n{said}"
    );

    run("dpkg", &["--purge", PACKAGE]);
    assert!(!package_installed(), "tcptrace-agent is still installed");
    for path in PACKAGE_FILES {
        assert!(!Path::new(path).exists(), "{path} is left after purge");
    }
    drop(guard);
}

/// Removes the working container when the test ends, also when it fails.
struct Container(String);

impl Drop for Container {
    fn drop(&mut self) {
        let mut args = BUILDAH_STORAGE.to_vec();
        args.extend(["umount", &self.0]);
        let _ = Command::new("buildah").args(&args).output();
        let mut args = BUILDAH_STORAGE.to_vec();
        args.extend(["rm", &self.0]);
        let _ = Command::new("buildah").args(&args).output();
    }
}

#[test]
fn oci_image_holds_exactly_the_static_binary() {
    require_root();
    let image = format!("{IMAGE}:{VERSION}");
    let inspect: Value =
        serde_json::from_slice(&buildah(&["inspect", "--type", "image", &image]).stdout)
            .expect("buildah inspect prints JSON");
    let config = &inspect["OCIv1"]["config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/sbin/tcptrace"])
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.version"],
        VERSION
    );
    assert_eq!(inspect["OCIv1"]["architecture"], "amd64");

    let name = format!("tcptrace-test-{}", std::process::id());
    let mut from = BUILDAH_STORAGE.to_vec();
    from.extend(["from", "--pull-never", "--name", &name, &image]);
    run("buildah", &from);
    let container = Container(name);
    let root = PathBuf::from(stdout(&buildah(&["mount", &container.0])).trim());

    // Nothing but the binary (and its directories).
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read the image's tree") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path.strip_prefix(&root).expect("below root").to_owned());
            }
        }
    }
    assert_eq!(files, [PathBuf::from("usr/sbin/tcptrace")]);
    let binary = root.join("usr/sbin/tcptrace");
    assert_eq!(
        std::fs::metadata(&binary)
            .expect("binary")
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    assert!(
        std::fs::read(&binary).expect("binary") == std::fs::read(static_binary()).expect("binary"),
        "the image's binary is not target/x86_64-unknown-linux-musl/release/tcptrace"
    );
    // Static: it runs in a root with no libraries at all.
    let out = buildah(&[
        "run",
        "--isolation",
        "chroot",
        &container.0,
        "--",
        "/usr/sbin/tcptrace",
        "--version",
    ]);
    assert_eq!(stdout(&out).trim(), format!("tcptrace {VERSION}"));

    // The archive beside the package holds the same image, for `podman load` or `ctr import`.
    let archive = built(workspace().join(format!("target/dist/tcptrace-{VERSION}.oci.tar")));
    let listing = stdout(&run(
        "tar",
        &["--list", "--file", archive.to_str().expect("UTF-8 path")],
    ));
    for entry in ["oci-layout", "index.json"] {
        assert!(
            listing.lines().any(|l| l == entry),
            "{entry} missing from {}",
            archive.display()
        );
    }
}

#[test]
fn deployment_files_and_changelog_match_the_package_and_image() {
    let unit = read("packaging/tcptrace.service");
    let exec = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    assert!(exec.starts_with("/usr/sbin/tcptrace "), "{exec}");

    let manifest: Value =
        serde_yaml_ng::from_str(&read("deploy/daemonset.yaml")).expect("daemonset.yaml is YAML");
    let container = &manifest["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["image"], format!("{IMAGE}:{VERSION}"));
    assert_eq!(
        container["command"],
        serde_json::json!(["/usr/sbin/tcptrace"])
    );

    // cargo-deb takes the package's version from Cargo.toml: the changelog must have its entry.
    let changelog = read("packaging/changelog");
    assert!(
        changelog.starts_with(&format!("{PACKAGE} ({VERSION}-1) ")),
        "packaging/changelog needs an entry for {VERSION}-1 first"
    );

    let containerfile = read("packaging/Containerfile");
    assert!(containerfile.contains("\nFROM scratch\n"));
    assert!(containerfile.contains("\nCOPY tcptrace /usr/sbin/tcptrace\n"));
    assert!(containerfile.contains("\nENTRYPOINT [\"/usr/sbin/tcptrace\"]\n"));
}
