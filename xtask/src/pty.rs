//! A pseudo-terminal for `tcptrace top` in the bench: the view needs a terminal, and the bench
//! has none. What tcptrace draws is read and thrown away, as fast as a terminal would take it.

use std::{
    ffi::CStr,
    fs::File,
    io::Read as _,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
};

use anyhow::{Context as _, bail};

/// The terminal's size: the view's full layout fits.
pub const COLUMNS: u16 = 140;
pub const ROWS: u16 = 45;

/// In the view's first line: the view is drawn.
const TITLE: &[u8] = b"tcptrace top";

/// A child whose stdin, stdout and stderr are one pseudo-terminal; its output drained.
pub struct OnPty {
    pub child: Child,
    drain: Option<thread::JoinHandle<Vec<u8>>>,
    drawn: Arc<AtomicBool>,
}

impl OnPty {
    /// Starts `command` in a new session on a new pseudo-terminal of [`COLUMNS`]x[`ROWS`].
    pub fn spawn(mut command: Command) -> anyhow::Result<Self> {
        let (leader, follower) = open()?;
        let stdio = |fd: &OwnedFd| -> anyhow::Result<Stdio> {
            Ok(Stdio::from(fd.try_clone().context("dup the terminal")?))
        };
        command
            .stdin(stdio(&follower)?)
            .stdout(stdio(&follower)?)
            .stderr(stdio(&follower)?);
        // SAFETY: setsid and ioctl are async-signal-safe; in a new session the terminal (on
        // stdin by now) becomes the child's controlling terminal, as a login's would.
        unsafe {
            use std::os::unix::process::CommandExt as _;
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().context("failed to start on the terminal")?;
        drop(follower);
        let mut leader = File::from(leader);
        let drawn = Arc::new(AtomicBool::new(false));
        let seen = Arc::clone(&drawn);
        let drain = thread::spawn(move || {
            // The last bytes drawn: the summary after the view, for messages.
            let mut tail = Vec::new();
            let mut chunk = [0; 65536];
            // EIO once the child and every copy of the follower are gone.
            while let Ok(n @ 1..) = leader.read(&mut chunk) {
                tail.extend_from_slice(&chunk[..n]);
                if tail.windows(TITLE.len()).any(|w| w == TITLE) {
                    seen.store(true, Ordering::Relaxed);
                }
                if tail.len() > 8192 {
                    tail.drain(..tail.len() - 4096);
                }
            }
            tail
        });
        Ok(Self {
            child,
            drain: Some(drain),
            drawn,
        })
    }

    /// Whether the view has been drawn.
    pub fn drawn(&self) -> bool {
        self.drawn.load(Ordering::Relaxed)
    }

    /// What the terminal showed last, once the child has exited.
    pub fn tail(mut self) -> String {
        let bytes = self
            .drain
            .take()
            .and_then(|d| d.join().ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// A new pseudo-terminal pair: the leader (the bench's end) and the follower (the child's).
fn open() -> anyhow::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: posix_openpt returns a new descriptor or -1.
    let leader = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if leader < 0 {
        bail!("posix_openpt: {}", std::io::Error::last_os_error());
    }
    // SAFETY: just opened, owned by nothing else.
    let leader = unsafe { OwnedFd::from_raw_fd(leader) };
    let fd = leader.as_raw_fd();
    let size = libc::winsize {
        ws_row: ROWS,
        ws_col: COLUMNS,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: calls on the descriptor just opened; ptsname_r writes at most `name.len()` bytes.
    unsafe {
        if libc::grantpt(fd) != 0
            || libc::unlockpt(fd) != 0
            || libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) != 0
            || libc::ioctl(fd, libc::TIOCSWINSZ, &size) != 0
        {
            bail!("pseudo-terminal: {}", std::io::Error::last_os_error());
        }
    }
    // SAFETY: ptsname_r wrote a NUL-terminated path.
    let path = unsafe { CStr::from_ptr(name.as_ptr()) };
    // SAFETY: open returns a new descriptor or -1.
    let follower = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if follower < 0 {
        bail!(
            "open {}: {}",
            path.to_string_lossy(),
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: just opened, owned by nothing else.
    Ok((leader, unsafe { OwnedFd::from_raw_fd(follower) }))
}
