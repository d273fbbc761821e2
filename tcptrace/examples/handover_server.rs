//! Servers whose listener is held by processes other than the one that called listen(), as in
//! production: `handover_server prefork PORT N` listens, forks N workers that accept (and answer
//! one byte per connection) while the parent waits; `handover_server exec PORT` listens, then
//! starts itself as `handover_server serve FD` with the listener inherited across exec (as socket
//! activation hands a listener over) and exits. Each prints `ready PID` once serving (for `exec`,
//! once the launcher has exited): the pid to end it by. `handover_server early-fork PORT` forks a
//! child that only sleeps, then listens, answers one connection and exits with it still open,
//! printing `ready PID CHILD`: the child never held the sockets.

use std::{
    io::{Read as _, Write as _},
    net::TcpListener,
    os::fd::{AsRawFd as _, FromRawFd as _, IntoRawFd as _},
    process::Command,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [_, "prefork", port, workers] => {
            set_comm("tt-prefork");
            prefork(listen(port), workers.parse().unwrap_or(2));
        }
        [_, "exec", port] => {
            set_comm("tt-launcher");
            let listener = listen(port);
            let fd = listener.into_raw_fd();
            // SAFETY: clearing FD_CLOEXEC on a descriptor we own, so the server inherits it.
            unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
            let exe = std::env::current_exe().unwrap_or_else(|e| fail(&format!("exe: {e}")));
            #[expect(
                clippy::zombie_processes,
                reason = "the launcher exits at once and leaves the server running, as it must"
            )]
            Command::new(exe)
                .args(["serve", &fd.to_string()])
                .spawn()
                .unwrap_or_else(|e| fail(&format!("spawn: {e}")));
            // The launcher exits; the server holds the listener alone.
        }
        [_, "serve", fd] => {
            let fd: i32 = fd.parse().unwrap_or_else(|_| fail("serve: bad fd"));
            // SAFETY: the descriptor was inherited from the launcher, which no longer uses it.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            // SAFETY: getppid cannot fail.
            let launcher = unsafe { libc::getppid() };
            for _ in 0..500 {
                if unsafe { libc::getppid() } != launcher {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            say(&format!("ready {}", std::process::id()));
            serve(&listener);
        }
        [_, "early-fork", port] => early_fork(port),
        _ => fail("usage: handover_server prefork PORT N | exec PORT | early-fork PORT"),
    }
}

fn early_fork(port: &str) {
    set_comm("tt-early");
    // SAFETY: single-threaded; the child only sleeps and exits.
    let child = match unsafe { libc::fork() } {
        0 => {
            std::thread::sleep(std::time::Duration::from_secs(60));
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(0) };
        }
        -1 => fail(&format!("fork: {}", std::io::Error::last_os_error())),
        child => child,
    };
    let listener = listen(port);
    say(&format!("ready {} {child}", std::process::id()));
    let (mut stream, _) = listener
        .accept()
        .unwrap_or_else(|e| fail(&format!("accept: {e}")));
    let mut byte = [0];
    if stream.read_exact(&mut byte).is_ok() {
        let _ = stream.write_all(&byte);
    }
    // Exits with the connection open: the kernel closes it after this process is gone.
    std::mem::forget(stream);
    std::process::exit(0);
}

fn listen(port: &str) -> TcpListener {
    TcpListener::bind(format!("127.0.0.1:{port}")).unwrap_or_else(|e| fail(&format!("bind: {e}")))
}

fn prefork(listener: TcpListener, workers: usize) {
    let mut children = Vec::new();
    for _ in 0..workers {
        // SAFETY: the process is single-threaded here; the child only serves and exits.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: asks for SIGTERM when the parent exits.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
                serve(&listener);
                std::process::exit(0);
            }
            -1 => fail(&format!("fork: {}", std::io::Error::last_os_error())),
            child => children.push(child),
        }
    }
    say(&format!("ready {}", std::process::id()));
    // Until the test ends it: stdin closes.
    let _ = std::io::stdin().read(&mut [0]);
    for child in children {
        // SAFETY: our own children.
        unsafe {
            libc::kill(child, libc::SIGTERM);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        }
    }
    let _ = listener.as_raw_fd();
}

/// Answers each connection's byte, then closes it.
fn serve(listener: &TcpListener) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let mut byte = [0];
        if stream.read_exact(&mut byte).is_ok() {
            let _ = stream.write_all(&byte);
        }
    }
}

fn set_comm(comm: &str) {
    let mut name = [0u8; 16];
    let len = comm.len().min(15);
    name[..len].copy_from_slice(&comm.as_bytes()[..len]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
}

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn fail(message: &str) -> ! {
    eprintln!("handover_server: {message}");
    std::process::exit(1)
}
