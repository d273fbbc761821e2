//! Real servers from Debian's packages, each in a directory of the test's own on a port of its
//! choosing, stopped by the pid the test started when dropped; and `ss -tnp`, sampled while they
//! run, for who holds each connection.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use super::{TempDir, sh};

/// The pids `ss` lists as holding the listener on `port`.
pub fn listener_holders(port: u16) -> Vec<u64> {
    let out = Command::new("ss")
        .args(["-Htlnp", &format!("sport = :{port}")])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout)
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect()
}

/// The pids that held each socket, by its cookie (`ss -e`'s `sk:`, the lines' `cookie`): a
/// port pair may be used again by a later connection of another process.
pub type Held = BTreeMap<u64, BTreeSet<u64>>;

/// Who held each connection of a port, as `ss -tnp` listed it in back-to-back samples taken
/// while it ran.
pub struct HolderSamples {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Held>>,
}

impl HolderSamples {
    pub fn start(port: u16) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = thread::spawn(move || {
            let mut seen = Held::new();
            let filter = format!("( sport = :{port} or dport = :{port} )");
            while !stopping.load(Ordering::Relaxed) {
                let out = Command::new("ss")
                    .args(["-Htnpe", &filter])
                    .output()
                    .expect("ss");
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    if let Some((cookie, pids)) = parse_ss_line(line) {
                        seen.entry(cookie).or_default().extend(pids);
                    }
                }
            }
            seen
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling: the holders seen for each connection.
    pub fn finish(mut self) -> Held {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("sampling")
            .join()
            .expect("the ss sampler panicked")
    }
}

impl Drop for HolderSamples {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `ESTAB 0 0 127.0.0.1:5432 127.0.0.1:40000 users:(("postgres",pid=12,fd=9)) ino:7 sk:1a2b
/// cgroup:/ <->`: the socket's cookie and the pids that hold it.
fn parse_ss_line(line: &str) -> Option<(u64, Vec<u64>)> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let cookie = fields
        .iter()
        .find_map(|f| f.strip_prefix("sk:"))
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())?;
    let pids: Vec<u64> = fields
        .get(5)?
        .split("pid=")
        .skip(1)
        .filter_map(|rest| rest.split(',').next()?.parse().ok())
        .collect();
    (!pids.is_empty()).then_some((cookie, pids))
}

/// Waits until something listens on `port` (127.0.0.1).
fn wait_for_listener(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while listener_holders(port).is_empty() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Ends a server this test started, by its handle: `signal`, then SIGKILL if it lingers.
fn stop_child(child: &mut Child, signal: libc::c_int) {
    // SAFETY: signalling a child this test started and has not reaped.
    unsafe { libc::kill(child.id() as i32, signal) };
    for _ in 0..100 {
        if child.try_wait().ok().flatten().is_some() {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Debian's nginx (master and two workers, daemonized after listen(); with `reuseport`, one
/// listener per worker); stopped by the master's pid when dropped.
pub struct Nginx {
    dir: std::path::PathBuf,
    pub port: u16,
}

impl Nginx {
    pub fn start(port: u16, reuseport: bool) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tcptrace-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(dir.join("logs")).expect("nginx dir");
        let conf = format!(
            "daemon on;\nmaster_process on;\nworker_processes 2;\npid {dir}/nginx.pid;\n\
             error_log {dir}/logs/error.log;\nevents {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
             fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
             server {{ listen 127.0.0.1:{port}{reuseport}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n",
            dir = dir.display(),
            reuseport = if reuseport { " reuseport" } else { "" },
        );
        std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
        let nginx = Self { dir, port };
        sh(
            "nginx",
            &[
                "-p",
                nginx.dir.to_str().unwrap(),
                "-c",
                nginx.dir.join("nginx.conf").to_str().unwrap(),
            ],
        );
        nginx
    }

    pub fn master(&self) -> Option<i32> {
        std::fs::read_to_string(self.dir.join("nginx.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn listener_holders(&self) -> Vec<u64> {
        listener_holders(self.port)
    }

    /// `ab` against it; returns ab's pid.
    pub fn load(&self, requests: u32) -> u32 {
        self.load_with(requests, false)
    }

    /// `ab` against it, with keep-alive (`-k`: 4 connections, many requests each) or without
    /// (a connection per request); returns ab's pid.
    pub fn load_with(&self, requests: u32, keep_alive: bool) -> u32 {
        let mut ab = std::process::Command::new("ab")
            .args(["-q", "-n", &requests.to_string(), "-c", "4"])
            .args(keep_alive.then_some("-k"))
            .arg(format!("http://127.0.0.1:{}/", self.port))
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("ab");
        let pid = ab.id();
        let status = ab.wait().expect("ab");
        assert!(status.success(), "ab failed: {status}");
        pid
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        if let Some(master) = self.master() {
            // SAFETY: signalling the nginx master this test started.
            unsafe { libc::kill(master, libc::SIGTERM) };
            for _ in 0..50 {
                // SAFETY: signal 0 only checks that the process exists.
                if unsafe { libc::kill(master, 0) } != 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian's PostgreSQL: a cluster made by `initdb` in a directory of the test's own, its
/// postmaster listening on 127.0.0.1 (and a Unix socket in that directory).
pub struct Postgres {
    dir: TempDir,
    pub port: u16,
    postmaster: Child,
}

impl Postgres {
    pub fn start(port: u16) -> Self {
        let bin = postgres_bin();
        let dir = TempDir::new(&format!("postgres-{port}"));
        let data = dir.0.join("data");
        let (uid, gid) = (user_id("postgres", "-u"), user_id("postgres", "-g"));
        std::fs::create_dir_all(&data).expect("data dir");
        sh(
            "chown",
            &["-R", "postgres:postgres", dir.0.to_str().unwrap()],
        );
        let out = Command::new(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .uid(uid)
            .gid(gid)
            .current_dir(&dir.0)
            .output()
            .expect("initdb");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let postmaster = Command::new(bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-k"])
            .arg(&dir.0)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=40",
            ])
            .uid(uid)
            .gid(gid)
            .current_dir(&dir.0)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("log")).expect("log"))
            .spawn()
            .expect("postgres");
        let server = Self {
            dir,
            port,
            postmaster,
        };
        wait_for_listener(port, "postgres");
        server
    }

    pub fn postmaster(&self) -> u32 {
        self.postmaster.id()
    }

    /// `pgbench -C`: a new connection per transaction, each held for `hold_ms` by the server's
    /// backend (`pg_sleep`); returns pgbench's pid.
    pub fn pgbench(&self, clients: u32, transactions: u32, hold_ms: u32) -> u32 {
        let script = self.dir.0.join("hold.sql");
        std::fs::write(&script, format!("SELECT pg_sleep({hold_ms} / 1000.0);\n")).expect("script");
        let pgbench = Command::new("pgbench")
            .args(["-n", "-C", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-c", &clients.to_string()])
            .args(["-t", &transactions.to_string(), "-f"])
            .arg(&script)
            .arg("postgres")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("pgbench");
        let pid = pgbench.id();
        let out = pgbench.wait_with_output().expect("pgbench");
        assert!(
            out.status.success(),
            "pgbench failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pid
    }

    /// A `psql` session over TCP, idle until its stdin closes.
    pub fn psql(&self) -> Child {
        Command::new("psql")
            .args(["-X", "-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "postgres"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("psql")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // Fast shutdown: open sessions are ended, not waited for.
        stop_child(&mut self.postmaster, libc::SIGINT);
    }
}

/// The newest PostgreSQL server binaries Debian installed.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("/usr/lib/postgresql (Debian's postgresql package)")
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("postgres").exists())
        .collect();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(Path::file_name)
            .and_then(|v| v.to_str()?.parse::<u32>().ok())
    });
    versions
        .pop()
        .expect("no PostgreSQL server in /usr/lib/postgresql")
}

fn user_id(user: &str, which: &str) -> u32 {
    let out = Command::new("id").args([which, user]).output().expect("id");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("no user {user}"))
}

/// Debian's OpenSSH server with its own configuration and host key, in the foreground, on
/// 127.0.0.1; no client can log in (no keys, no passwords).
pub struct Sshd {
    dir: TempDir,
    pub port: u16,
    listener: Child,
}

impl Sshd {
    pub fn start(port: u16) -> Self {
        let dir = TempDir::new(&format!("sshd-{port}"));
        let key = dir.0.join("host_key");
        sh(
            "ssh-keygen",
            &["-q", "-t", "ed25519", "-N", "", "-f", key.to_str().unwrap()],
        );
        let config = dir.0.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {dir}/sshd.pid\n\
                 UsePAM no\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nAuthorizedKeysFile none\nMaxStartups 100\n",
                key = key.display(),
                dir = dir.0.display()
            ),
        )
        .expect("sshd_config");
        // sshd's privilege separation directory, as the package's tmpfiles entry makes it.
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
        let listener = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.0.join("log")).expect("log"))
            .spawn()
            .expect("/usr/sbin/sshd (Debian's openssh-server)");
        let server = Self {
            dir,
            port,
            listener,
        };
        wait_for_listener(port, "sshd");
        server
    }

    pub fn listener(&self) -> u32 {
        self.listener.id()
    }

    /// `count` clients without keys, `parallel` at a time: each is refused. Returns their pids.
    pub fn refused_clients(&self, count: u32, parallel: u32) -> Vec<u32> {
        let mut pids = Vec::new();
        for _ in 0..count.div_ceil(parallel) {
            let mut clients: Vec<Child> = (0..parallel)
                .map(|_| {
                    Command::new("ssh")
                        .args(["-F", "/dev/null", "-o", "BatchMode=yes"])
                        .args([
                            "-o",
                            "StrictHostKeyChecking=no",
                            "-o",
                            "UserKnownHostsFile=/dev/null",
                        ])
                        .args(["-o", "ConnectTimeout=10", "-p", &self.port.to_string()])
                        .args(["nobody@127.0.0.1", "true"])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("ssh")
                })
                .collect();
            for client in &mut clients {
                pids.push(client.id());
                let status = client.wait().expect("ssh");
                assert_eq!(status.code(), Some(255), "ssh logged in?");
            }
        }
        pids
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        stop_child(&mut self.listener, libc::SIGTERM);
    }
}
