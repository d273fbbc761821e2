//! tracefs mode's process names. Its kernel side can only read the name of the thread that ran
//! (a worker pool's `tokio-runtime-w`, a JVM's `C2 CompilerThre`), while `pid` is the process:
//! lines take the process's name from /proc, as `ps` and `ss -p` show it, and keep the thread's
//! under `thread` when it differs. BTF mode reads the thread group leader's name in the kernel
//! and needs none of this.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::event::TcpEvent;

/// How long a name read from /proc is used before it is read again (a process may exec, and a
/// pid may be reused).
const FRESH: Duration = Duration::from_secs(1);
/// At most this many names are kept; past it, the stale ones go.
const MAX_NAMES: usize = 4096;

#[derive(Default)]
pub struct ProcessNames {
    names: HashMap<u32, (Instant, Option<[u8; 16]>)>,
}

impl ProcessNames {
    /// Gives `event` its process's name, and the thread's as `thread` when they differ. A process
    /// that is gone keeps the name the kernel side saw.
    pub fn apply(&mut self, event: &mut TcpEvent) {
        if event.pid == 0 {
            return;
        }
        let Some(name) = self.name(event.pid) else {
            return;
        };
        if name != event.comm {
            event.thread = Some(event.comm);
            event.comm = name;
        }
    }

    fn name(&mut self, pid: u32) -> Option<[u8; 16]> {
        let now = Instant::now();
        if let Some(&(read_at, name)) = self.names.get(&pid)
            && now.duration_since(read_at) < FRESH
        {
            return name;
        }
        if self.names.len() >= MAX_NAMES {
            self.names
                .retain(|_, (read_at, _)| now.duration_since(*read_at) < FRESH);
            if self.names.len() >= MAX_NAMES {
                self.names.clear();
            }
        }
        let name = read(pid);
        self.names.insert(pid, (now, name));
        name
    }
}

/// /proc/PID/comm: the process's (thread group leader's) name, NUL-padded as the kernel keeps it.
fn read(pid: u32) -> Option<[u8; 16]> {
    let text = std::fs::read(format!("/proc/{pid}/comm")).ok()?;
    let text = text.strip_suffix(b"\n").unwrap_or(&text);
    let mut name = [0; 16];
    let len = text.len().min(15);
    name[..len].copy_from_slice(&text[..len]);
    Some(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    #[test]
    fn a_thread_s_name_gives_way_to_its_process_s() {
        let mut names = ProcessNames::default();
        let mut raw = raw_state(1, 4);
        raw.pid = std::process::id();
        raw.comm = tcptrace_common::Bytes16(*b"worker-7\0\0\0\0\0\0\0\0");
        let mut event = decode(&bytes(&raw)).unwrap();
        names.apply(&mut event);
        let own = read(std::process::id()).unwrap();
        assert_eq!(event.comm, own);
        assert_eq!(event.thread, Some(*b"worker-7\0\0\0\0\0\0\0\0"));
        // The process's own name: no thread key.
        let mut raw = raw_state(1, 4);
        raw.pid = std::process::id();
        raw.comm = tcptrace_common::Bytes16(own);
        let mut event = decode(&bytes(&raw)).unwrap();
        names.apply(&mut event);
        assert_eq!((event.comm, event.thread), (own, None));
        // A process that is gone keeps what the kernel saw.
        let mut raw = raw_state(1, 4);
        raw.pid = u32::MAX - 1;
        let mut event = decode(&bytes(&raw)).unwrap();
        names.apply(&mut event);
        assert_eq!((event.comm_bytes(), event.thread), (&b"curl"[..], None));
    }
}
