//! SIGHUP, SIGINT and SIGTERM: held (blocked) from the first line of `main` until the run loop
//! starts, so that one arriving while tcptrace loads its programs (systemd's ExecReload, an
//! impatient Ctrl-C) waits for the run loop instead of killing the process with the default
//! action. Held, not merely handled: a caught signal pending during BPF_PROG_LOAD makes the
//! verifier give up with EAGAIN
//! ([verifier.c](https://github.com/torvalds/linux/blob/v6.18/kernel/bpf/verifier.c), `do_check`).

use std::mem::MaybeUninit;

use anyhow::Context as _;
use tokio::signal::unix::{Signal, SignalKind, signal};

const SIGNALS: [libc::c_int; 3] = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM];

/// The signals, blocked until [`Held::handle`] installs their handlers.
pub struct Held {
    /// The signal mask before [`hold`], put back once the handlers are in place.
    previous: libc::sigset_t,
}

/// Blocks SIGHUP, SIGINT and SIGTERM in this thread: the kernel keeps one that arrives pending.
pub fn hold() -> Held {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    let mut previous = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises `set`; pthread_sigmask fills `previous` (it cannot fail with
    // SIG_BLOCK and a valid set, and the fallback below keeps `previous` initialised anyway).
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        for signal in SIGNALS {
            libc::sigaddset(set.as_mut_ptr(), signal);
        }
        libc::sigemptyset(previous.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), previous.as_mut_ptr());
        Held {
            previous: previous.assume_init(),
        }
    }
}

/// The run loop's ends of the three signals.
pub struct Signals {
    pub hangup: Signal,
    pub interrupt: Signal,
    pub terminate: Signal,
}

impl Held {
    /// Installs the handlers (inside the runtime), then lets the signals through: one that
    /// arrived while they were held is delivered now and seen by the run loop.
    pub fn handle(self) -> anyhow::Result<Signals> {
        let signals = Signals {
            hangup: signal(SignalKind::hangup()).context("failed to handle SIGHUP")?,
            interrupt: signal(SignalKind::interrupt()).context("failed to handle SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("failed to handle SIGTERM")?,
        };
        // SAFETY: `previous` is the mask `hold` read.
        let rc = unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc))
                .context("failed to unblock SIGHUP, SIGINT and SIGTERM");
        }
        Ok(signals)
    }
}
