//! tracefs mode's process names. Its kernel side can only read the name of the thread that ran
//! (a worker pool's `tokio-runtime-w`, a JVM's `C2 CompilerThre`), while `pid` is the process;
//! it flags an owner seen on a thread other than the process's main one. Such lines take the
//! process's name from /proc, as `ps` and `ss -p` show it, and keep the thread's under `thread`
//! when it differs. A socket opened on the main thread keeps the name the kernel side saw, as in
//! BTF mode, which reads the thread group leader's name in the kernel and needs none of this.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use crate::event::TcpEvent;

/// How long a name read from /proc is used before it is read again: a process may exec or rename
/// itself, and a pid may be reused by another process.
const FRESH: Duration = Duration::from_secs(1);
/// At most this many names are kept; past it, the stale ones go.
const MAX_NAMES: usize = 4096;

#[derive(Default)]
pub struct ProcessNames {
    names: HashMap<u32, (Instant, Option<[u8; 16]>)>,
}

impl ProcessNames {
    /// Gives `event`, when its `comm` is a thread's, its process's name, and the thread's as
    /// `thread` when they differ. A process that is gone keeps the name the kernel side saw.
    pub fn apply(&mut self, event: &mut TcpEvent) {
        if !event.comm_of_thread || event.pid == 0 {
            return;
        }
        let Some(name) = self.name(event.pid) else {
            return;
        };
        event.comm_of_thread = false;
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
    use tcptrace_common::EVENT_COMM_OF_THREAD;

    use super::*;
    use crate::event::{
        decode,
        tests::{bytes, raw_state},
    };

    #[test]
    fn a_thread_s_name_gives_way_to_its_process_s() {
        let mut names = ProcessNames::default();
        let own = read(std::process::id()).unwrap();
        let worker = *b"worker-7\0\0\0\0\0\0\0\0";
        let event = |pid, comm, flags| {
            let mut raw = raw_state(1, 4);
            raw.pid = pid;
            raw.comm = tcptrace_common::Bytes16(comm);
            raw.flags |= flags;
            decode(&bytes(&raw)).unwrap()
        };
        // A socket a worker thread opened: the process's name, the thread's under `thread`.
        let mut named = event(std::process::id(), worker, EVENT_COMM_OF_THREAD);
        names.apply(&mut named);
        assert_eq!((named.comm, named.thread), (own, Some(worker)));
        // A thread of the process's own name: no thread key.
        let mut named = event(std::process::id(), own, EVENT_COMM_OF_THREAD);
        names.apply(&mut named);
        assert_eq!((named.comm, named.thread), (own, None));
        // Opened on the main thread: the name the kernel side saw then stays, whatever the
        // process is called now (it renamed itself, or exec'd).
        let mut named = event(std::process::id(), worker, 0);
        names.apply(&mut named);
        assert_eq!((named.comm, named.thread), (worker, None));
        // A process that is gone keeps what the kernel saw.
        let mut named = event(u32::MAX - 1, worker, EVENT_COMM_OF_THREAD);
        names.apply(&mut named);
        assert_eq!((named.comm, named.thread), (worker, None));
    }
}
