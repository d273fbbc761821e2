//! Cgroups and containers: where the cgroup v2 hierarchy is mounted, which path a cgroup id names
//! (resolved in userspace and cached), and which container and pod a path belongs to, from the
//! shapes container runtimes give their cgroups.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    os::unix::fs::{DirEntryExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail};
use tcptrace_common::CONTAINER_ID_OFFSETS;

use crate::{event::TcpEvent, fast_hash::Fast, filter::Filters};

/// What a cgroup id resolves to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroup {
    /// Below the cgroup2 mount, starting with `/` (the root cgroup is `/`).
    pub path: Box<str>,
    /// The 64-hex container id, when the path has a container runtime's shape.
    pub container_id: Option<Box<str>>,
    /// The Kubernetes pod's UID (dashed), when the path has a kubelet's shape.
    pub pod_uid: Option<Box<str>>,
}

impl Cgroup {
    pub fn new(path: &str) -> Self {
        let (container_id, pod_uid) = container_of(path);
        Self {
            path: path.into(),
            container_id: container_id.map(Into::into),
            pod_uid: pod_uid.map(Into::into),
        }
    }

    /// What the text table's CONTAINER column shows: the short container id (12 hex digits, as
    /// docker prints it) or the cgroup's last component.
    pub fn short(&self) -> &str {
        match &self.container_id {
            Some(id) => &id[..12],
            None => match self.path.rsplit('/').next() {
                Some("") | None => "/",
                Some(last) => last,
            },
        }
    }
}

/// Where the cgroup v2 hierarchy is mounted: the first `cgroup2` mount of the host's root in
/// /proc/self/mountinfo (`/sys/fs/cgroup` on unified hosts, `/sys/fs/cgroup/unified` on hybrid
/// ones). None on a host without cgroup v2.
pub fn mount_point() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mount_point_in(&mountinfo)
}

fn mount_point_in(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        // id parent major:minor root mount-point options [optional...] - fstype source ...
        let (fields, rest) = line.split_once(" - ")?;
        let fstype = rest.split(' ').next()?;
        let mut fields = fields.split(' ');
        let root = fields.nth(3)?;
        let mount = fields.next()?;
        (fstype == "cgroup2" && root == "/").then(|| PathBuf::from(unescape(mount)))
    })
}

/// Mount points in mountinfo escape space, tab, newline and backslash as octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest
            .get(at + 1..at + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[at + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The id of the cgroup at `path`: absolute below the mount (`/sys/fs/cgroup/system.slice`), or
/// relative to the mount (`/system.slice`, `system.slice`). The id is its directory's inode.
pub fn id_of(mount: &Path, path: &str) -> anyhow::Result<u64> {
    let full = if Path::new(path).starts_with(mount) {
        PathBuf::from(path)
    } else {
        mount.join(path.trim_start_matches('/'))
    };
    let meta = std::fs::metadata(&full)
        .with_context(|| format!("--cgroup {path}: no cgroup {}", full.display()))?;
    if !meta.is_dir() || meta.dev() != std::fs::metadata(mount)?.dev() {
        bail!(
            "--cgroup {path}: {} is not a cgroup of the cgroup2 mount {}",
            full.display(),
            mount.display()
        );
    }
    Ok(meta.ino())
}

/// The container id and the pod UID a cgroup path names, if any: docker (`docker-<id>.scope`,
/// `/docker/<id>`), containerd and CRI (`cri-containerd-<id>.scope`, `/kubepods/<qos>/pod<uid>/<id>`,
/// `kubepods-<qos>-pod<uid>.slice`), CRI-O (`crio-<id>.scope`), podman (`libpod-<id>.scope`). The
/// deepest container wins (a container in a container).
pub fn container_of(path: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for component in path.split('/').filter(|c| !c.is_empty()) {
        let bare = component
            .strip_suffix(".scope")
            .unwrap_or(component)
            .trim_start_matches("docker-")
            .trim_start_matches("cri-containerd-")
            .trim_start_matches("crio-")
            .trim_start_matches("libpod-");
        if bare.len() == 64 && bare.bytes().all(|b| b.is_ascii_hexdigit()) {
            container = Some(bare.to_ascii_lowercase());
        }
        if let Some(uid) = pod_uid(component) {
            pod = Some(uid);
        }
    }
    (container, pod)
}

/// `pod<uid>` (cgroupfs driver) or `kubepods-[<qos>-]pod<uid_with_underscores>.slice` (systemd).
fn pod_uid(component: &str) -> Option<String> {
    let component = component.strip_suffix(".slice").unwrap_or(component);
    let at = component.rfind("pod")?;
    if at != 0 && !component[..at].ends_with('-') {
        return None;
    }
    let uid = component[at + 3..].replace('_', "-");
    let groups: Vec<_> = uid.split('-').map(str::len).collect();
    (groups == [8, 4, 4, 4, 12] && uid.bytes().all(|b| b == b'-' || b.is_ascii_hexdigit()))
        .then(|| uid.to_ascii_lowercase())
}

/// A `--container` value: 12 to 64 hex digits, lowercased.
pub fn container_prefix(value: &str) -> Result<String, String> {
    if !(12..=64).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "`{value}` is not a container id (12 to 64 hex digits, as `docker ps` prints them)"
        ));
    }
    Ok(value.to_ascii_lowercase())
}

/// At most this many full scans of the hierarchy per second: a storm of short-lived cgroups
/// leaves some ids unresolved rather than spending the tracer's time.
const SCANS_PER_SECOND: u32 = 20;
/// Ids a scan did not find (cgroups removed before they were resolved), remembered so that they
/// cost no further scan.
const MAX_VANISHED: usize = 4096;

/// Resolves cgroup ids to cgroups. The whole hierarchy is read at start and read again when an
/// id appears that the last read did not see (a cgroup created since); an id that a read made
/// after it appeared does not find is a cgroup that is gone, and keeps its id without a path.
pub struct Resolver {
    mount: PathBuf,
    known: HashMap<u64, Arc<Cgroup>, Fast>,
    vanished: HashSet<u64, Fast>,
    vanished_order: VecDeque<u64>,
    scans: u32,
    window: Instant,
}

impl Resolver {
    pub fn new(mount: PathBuf) -> Self {
        let mut resolver = Self {
            mount,
            known: HashMap::default(),
            vanished: HashSet::default(),
            vanished_order: VecDeque::new(),
            scans: 0,
            window: Instant::now(),
        };
        resolver.scan();
        resolver
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// The cgroup with this id, if it exists or existed at the last scan.
    pub fn get(&mut self, id: u64) -> Option<&Arc<Cgroup>> {
        // The usual case first: a cgroup seen before.
        if self.known.contains_key(&id) {
            return self.known.get(&id);
        }
        if id == 0 || self.vanished.contains(&id) || !self.may_scan() {
            return None;
        }
        self.scan();
        if !self.known.contains_key(&id) {
            self.forget(id);
            return None;
        }
        self.known.get(&id)
    }

    fn may_scan(&mut self) -> bool {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.scans = 0;
        }
        self.scans += 1;
        self.scans <= SCANS_PER_SECOND
    }

    fn forget(&mut self, id: u64) {
        if self.vanished_order.len() == MAX_VANISHED
            && let Some(oldest) = self.vanished_order.pop_front()
        {
            self.vanished.remove(&oldest);
        }
        self.vanished.insert(id);
        self.vanished_order.push_back(id);
    }

    /// Reads the hierarchy: every directory's inode number is its cgroup's id. Cgroups that are
    /// gone are dropped; those still there keep their entry.
    fn scan(&mut self) {
        let mut found = HashMap::with_capacity_and_hasher(self.known.len(), Fast::default());
        let Ok(root) = std::fs::metadata(&self.mount) else {
            return;
        };
        found.insert(root.ino(), self.cgroup(root.ino(), "/"));
        let mut stack = vec![(self.mount.clone(), String::new())];
        while let Some((dir, path)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                let child = format!("{path}/{name}");
                found.insert(entry.ino(), self.cgroup(entry.ino(), &child));
                stack.push((entry.path(), child));
            }
        }
        self.known = found;
    }

    /// The entry for `path`, shared with the previous scan's when it is the same cgroup.
    fn cgroup(&self, ino: u64, path: &str) -> Arc<Cgroup> {
        match self.known.get(&ino) {
            Some(known) if &*known.path == path => Arc::clone(known),
            _ => Arc::new(Cgroup::new(path)),
        }
    }
}

/// Whether a cgroup's name holds a container id prefix where runtimes put the id: the rule of
/// `--container`, on both sides.
pub fn name_holds(name: &str, prefix: &str) -> bool {
    CONTAINER_ID_OFFSETS.iter().any(|&at| {
        name.get(at as usize..)
            .is_some_and(|id| id.starts_with(prefix))
    })
}

/// The ids of the cgroups below `mount` whose names hold the container id `prefix`.
pub fn matching(mount: &Path, prefix: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    let mut stack = vec![mount.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            if entry
                .file_name()
                .to_str()
                .is_some_and(|name| name_holds(name, prefix))
            {
                ids.push(entry.ino());
            }
            stack.push(entry.path());
        }
    }
    ids
}

/// `--cgroup` and `--container` applied to cgroup paths, for tracefs mode, whose kernel side
/// cannot read a cgroup's ancestors or name. The same rules as the kernel side's.
#[derive(Debug, Default)]
pub struct PathFilter {
    /// Keep cgroups at or below one of these paths (empty: no such filter).
    below: Vec<Box<str>>,
    /// Keep cgroups with a component holding this container id prefix.
    container: Option<String>,
}

impl PathFilter {
    pub fn keeps(&self, cgroup: Option<&Cgroup>) -> bool {
        let Some(cgroup) = cgroup else {
            return false;
        };
        let path = &*cgroup.path;
        let below = self.below.is_empty()
            || self.below.iter().any(|top| {
                &**top == "/"
                    || path
                        .strip_prefix(&**top)
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
            });
        let in_container = self
            .container
            .as_deref()
            .is_none_or(|prefix| path.split('/').any(|name| name_holds(name, prefix)));
        below && in_container
    }
}

/// What the run loop needs of cgroups: the cgroup of each event (for JSON, the wide table, the
/// container label), and in tracefs mode the `--cgroup` and `--container` filters.
pub struct Cgroups {
    resolver: Option<Resolver>,
    resolve: bool,
    filter: Option<PathFilter>,
    /// The cgroup the last event resolved to: the events of a burst mostly share one (an id
    /// names one cgroup for the whole boot), so most lines take no lookup.
    last: Option<(u64, Arc<Cgroup>)>,
}

impl Cgroups {
    /// `resolve`: events need their cgroup. `filters`: the in-kernel filters, applied here too
    /// when `in_userspace` (tracefs mode).
    pub fn new(
        mount: Option<PathBuf>,
        resolve: bool,
        filters: &Filters,
        in_userspace: bool,
    ) -> Self {
        let filtering =
            in_userspace && (!filters.cgroups.is_empty() || filters.container.is_some());
        let mut resolver = (resolve || filtering)
            .then_some(mount)
            .flatten()
            .map(Resolver::new);
        let filter = filtering.then(|| PathFilter {
            below: filters
                .cgroups
                .iter()
                .filter_map(|&id| Some(resolver.as_mut()?.get(id)?.path.clone()))
                .collect(),
            container: filters.container.clone(),
        });
        Self {
            resolver,
            resolve: resolve || filtering,
            filter,
            last: None,
        }
    }

    /// The cgroup of an event, when lines need it and it resolves; `Err` when a userspace filter
    /// drops the event.
    pub fn of(&mut self, event: &TcpEvent) -> Result<Option<&Cgroup>, Dropped> {
        if !self.resolve {
            return Ok(None);
        }
        let id = event.cgroup_id;
        if self.last.as_ref().is_none_or(|(last, _)| *last != id) {
            // Only what resolved is kept: an id not found now may be found by a later scan.
            self.last = self
                .resolver
                .as_mut()
                .and_then(|r| r.get(id))
                .map(|cgroup| (id, Arc::clone(cgroup)));
        }
        let cgroup = match &self.last {
            Some((last, cgroup)) if *last == id => Some(&**cgroup),
            _ => None,
        };
        match &self.filter {
            Some(filter) if !filter.keeps(cgroup) => Err(Dropped),
            _ => Ok(cgroup),
        }
    }
}

/// An event a userspace filter dropped.
#[derive(Debug)]
pub struct Dropped;

/// The cgroup v2 mount, or why there is none, for the flags that need it.
pub fn require_mount(flag: &str) -> anyhow::Result<PathBuf> {
    mount_point().ok_or_else(|| anyhow!("{flag} needs cgroup v2, and no cgroup2 mount was found"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f1c9e2b7a4d5e6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7";
    const UID: &str = "1b2c3d4e-5f60-4718-9a0b-1c2d3e4f5a6b";

    #[test]
    fn container_runtime_shapes() {
        let uid_ = UID.replace('-', "_");
        for (path, container, pod) in [
            (format!("/system.slice/docker-{ID}.scope"), true, false),
            (format!("/docker/{ID}"), true, false),
            (
                format!(
                    "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{ID}.scope"
                ),
                true,
                true,
            ),
            (format!("/kubepods/besteffort/pod{UID}/{ID}"), true, true),
            (format!("/kubepods/pod{UID}/{ID}"), true, true),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-{ID}.scope"),
                true,
                true,
            ),
            (format!("/machine.slice/libpod-{ID}.scope"), true, false),
            (
                format!("/machine.slice/libpod-{ID}.scope/container"),
                true,
                false,
            ),
            (
                format!("/kubepods.slice/kubepods-pod{uid_}.slice"),
                false,
                true,
            ),
            (
                "/user.slice/user-0.slice/session-3.scope".into(),
                false,
                false,
            ),
            ("/".into(), false, false),
            (
                format!("/machine.slice/libpod-conmon-{ID}.scope"),
                false,
                false,
            ),
            (
                format!("/system.slice/crio-conmon-{ID}.scope"),
                false,
                false,
            ),
            (format!("/docker/{}", &ID[..63]), false, false),
        ] {
            let (c, p) = container_of(&path);
            assert_eq!(c.as_deref(), container.then_some(ID), "{path}");
            assert_eq!(p.as_deref(), pod.then_some(UID), "{path}");
        }
    }

    #[test]
    fn short_names() {
        let docker = Cgroup::new(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(docker.short(), &ID[..12]);
        let plain = Cgroup::new("/system.slice/nginx.service");
        assert_eq!(plain.short(), "nginx.service");
        assert_eq!(Cgroup::new("/").short(), "/");
    }

    #[test]
    fn container_prefixes() {
        assert_eq!(container_prefix("3F1C9E2B7A4D"), Ok("3f1c9e2b7a4d".into()));
        assert_eq!(container_prefix(ID), Ok(ID.into()));
        for bad in [
            "3f1c9e2b7a4",
            "3f1c9e2b7a4g",
            &format!("{ID}0"),
            "",
            "docker-3f1c9e2b7a4d",
        ] {
            assert!(container_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_filters_follow_the_kernel_sides_rules() {
        let filter = PathFilter {
            below: vec!["/system.slice".into()],
            container: None,
        };
        assert!(filter.keeps(Some(&Cgroup::new("/system.slice"))));
        assert!(filter.keeps(Some(&Cgroup::new("/system.slice/a.service"))));
        assert!(!filter.keeps(Some(&Cgroup::new("/system.slice2"))));
        assert!(!filter.keeps(Some(&Cgroup::new("/"))));
        assert!(!filter.keeps(None));
        let filter = PathFilter {
            below: Vec::new(),
            container: Some(ID[..12].to_owned()),
        };
        for shape in [
            format!("/system.slice/docker-{ID}.scope"),
            format!("/docker/{ID}"),
            format!("/x/cri-containerd-{ID}.scope/nested"),
            format!("/x/crio-{ID}.scope"),
            format!("/machine.slice/libpod-{ID}.scope"),
        ] {
            assert!(filter.keeps(Some(&Cgroup::new(&shape))), "{shape}");
        }
        assert!(!filter.keeps(Some(&Cgroup::new("/system.slice/docker-0123.scope"))));
        assert!(!filter.keeps(Some(&Cgroup::new(&format!("/x/abc{ID}")))));
    }

    #[test]
    fn finds_the_cgroup2_mount_in_mountinfo() {
        let hybrid = "\
25 30 0:23 / /sys rw,nosuid shared:7 - sysfs sysfs rw
31 25 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:28 / /sys/fs/cgroup/systemd rw,nosuid shared:11 - cgroup cgroup rw,name=systemd
";
        assert_eq!(
            mount_point_in(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        // A container's view of a subtree comes after the host's; a bind of a subtree is not it.
        let nested = "\
40 1 0:30 /kubepods.slice /sys/fs/cgroup rw - cgroup2 cgroup2 rw
41 1 0:30 / /host/sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw
";
        assert_eq!(
            mount_point_in(nested),
            Some(PathBuf::from("/host/sys/fs/cgroup x"))
        );
        assert_eq!(
            mount_point_in("25 30 0:23 / /sys rw - sysfs sysfs rw\n"),
            None
        );
    }
}
