//! A TCP endpoint that the end-to-end tests drive step by step, so each state is entered and left
//! at a moment the test knows. One process per role, so server and client have their own pid and
//! comm.
//!
//! `tcp_workload server ADDR COMM [reuseport]` binds ADDR (port 0 picks one; with `reuseport`,
//! SO_REUSEPORT first) and prints `bound PORT`;
//! `tcp_workload client COMM` waits for `connect ADDR`. Then each stdin line is one step, answered
//! with `ok` once done: `listen [BACKLOG]` (4096 unless given), `listen-from-thread` (from a thread named `tt-listener`),
//! `accept`, `connect ADDR`, `connect-from-thread ADDR` (from a thread named `tt-worker`),
//! `rename COMM` (the main thread's name, which is the process's), `echo` (read a byte, write it back),
//! `send` (write a byte, read the reply), `write` (a byte), `accept-many N` (accept and hold N
//! connections), `accept-ready [MIN]` (accept and hold every connection waiting, at least MIN
//! of them if they come within 10 s, and say `peers PORT,PORT,...` with their remote ports),
//! `connect-many N ADDR` (open and hold N connections), `close-some N` (close the first N held),
//! `close-all` (the held ones),
//! `close` (the connection), `wait-eof` (read to the peer's FIN, and acknowledge it at once), `close-listener`,
//! `exit`.

use std::{
    io::{BufRead as _, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, FromRawFd as _},
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (role, comm) = match args.as_slice() {
        [_, role, _, comm] | [_, role, _, comm, _] if role == "server" => (role.as_str(), comm),
        [_, role, comm] if role == "client" => (role.as_str(), comm),
        _ => fail("usage: tcp_workload server ADDR COMM | tcp_workload client COMM"),
    };
    set_comm(comm);
    let mut listener = None;
    let mut socket: Option<std::os::fd::OwnedFd> = None;
    let mut conn: Option<TcpStream> = None;
    let mut held: Vec<TcpStream> = Vec::new();
    if role == "server" {
        // Bind without listening: binding is no state transition, so the test can learn the port
        // (for its filters) before tracing starts, and still see CLOSE -> LISTEN.
        let addr: SocketAddr = args[2]
            .parse()
            .unwrap_or_else(|e| fail(&format!("bad address: {e}")));
        let fd = bound_socket(addr, args.get(4).is_some_and(|a| a == "reuseport"));
        let port = local_port(&fd);
        socket = Some(fd);
        say(&format!("bound {port}"));
    }
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap_or_else(|e| fail(&format!("stdin: {e}")));
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some(step @ ("listen" | "listen-from-thread")), backlog) => {
                let fd = socket
                    .take()
                    .unwrap_or_else(|| fail("listen: nothing bound"));
                let backlog: libc::c_int = backlog.map_or(4096, |b| {
                    b.parse().unwrap_or_else(|e| fail(&format!("backlog: {e}")))
                });
                let listen = move || {
                    // SAFETY: `fd` is a bound TCP socket we own.
                    if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
                        fail(&format!("listen: {}", std::io::Error::last_os_error()));
                    }
                    fd
                };
                let fd = if step == "listen" {
                    listen()
                } else {
                    // listen() from a thread of another name than the process's (a worker pool).
                    std::thread::Builder::new()
                        .name("tt-listener".to_owned())
                        .spawn(listen)
                        .unwrap_or_else(|e| fail(&format!("thread: {e}")))
                        .join()
                        .unwrap_or_else(|_| fail("listen thread panicked"))
                };
                listener = Some(TcpListener::from(fd));
            }
            (Some("rename"), Some(comm)) => set_comm(comm),
            (Some("accept"), _) => {
                let l = listener
                    .as_ref()
                    .unwrap_or_else(|| fail("accept: not listening"));
                conn = Some(
                    l.accept()
                        .unwrap_or_else(|e| fail(&format!("accept: {e}")))
                        .0,
                );
            }
            (Some("accept-many"), Some(count)) => {
                let l = listener
                    .as_ref()
                    .unwrap_or_else(|| fail("accept-many: not listening"));
                let count: usize = count
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("count: {e}")));
                for _ in 0..count {
                    held.push(
                        l.accept()
                            .unwrap_or_else(|e| fail(&format!("accept: {e}")))
                            .0,
                    );
                }
            }
            (Some("accept-ready"), min) => {
                let l = listener
                    .as_ref()
                    .unwrap_or_else(|| fail("accept-ready: not listening"));
                let min: usize = min.map_or(0, |m| {
                    m.parse()
                        .unwrap_or_else(|e| fail(&format!("accept-ready {m}: {e}")))
                });
                l.set_nonblocking(true)
                    .unwrap_or_else(|e| fail(&format!("accept-ready: {e}")));
                // A handshake the kernel has not finished yet (its last ACK still in a softirq
                // queue, on a slow machine) is waited for, up to 10 s, until `min` were taken.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                let mut peers = Vec::new();
                loop {
                    match l.accept() {
                        Ok((stream, peer)) => {
                            peers.push(peer.port().to_string());
                            held.push(stream);
                        }
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                && peers.len() < min
                                && std::time::Instant::now() < deadline =>
                        {
                            std::thread::sleep(std::time::Duration::from_millis(5));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => fail(&format!("accept: {e}")),
                    }
                }
                l.set_nonblocking(false)
                    .unwrap_or_else(|e| fail(&format!("accept-ready: {e}")));
                say(&format!("peers {}", peers.join(",")));
            }
            (Some("connect-many"), Some(count)) => {
                let count: usize = count
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("count: {e}")));
                let addr: SocketAddr = words
                    .next()
                    .unwrap_or_else(|| fail("connect-many: no address"))
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("bad address: {e}")));
                for _ in 0..count {
                    held.push(
                        TcpStream::connect(addr).unwrap_or_else(|e| fail(&format!("connect: {e}"))),
                    );
                }
            }
            (Some("close-some"), Some(count)) => {
                let count: usize = count
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("count: {e}")));
                held.drain(..count.min(held.len()));
            }
            (Some("close-all"), _) => held.clear(),
            (Some("connect"), Some(addr)) => {
                let addr: SocketAddr = addr
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("bad address: {e}")));
                conn = Some(
                    TcpStream::connect(addr).unwrap_or_else(|e| fail(&format!("connect: {e}"))),
                );
            }
            (Some("connect-from-thread"), Some(addr)) => {
                // connect() from a thread of another name than the process's (a worker pool).
                let addr: SocketAddr = addr
                    .parse()
                    .unwrap_or_else(|e| fail(&format!("bad address: {e}")));
                let worker = std::thread::Builder::new()
                    .name("tt-worker".to_owned())
                    .spawn(move || TcpStream::connect(addr))
                    .unwrap_or_else(|e| fail(&format!("thread: {e}")));
                conn = Some(
                    worker
                        .join()
                        .unwrap_or_else(|_| fail("connect thread panicked"))
                        .unwrap_or_else(|e| fail(&format!("connect: {e}"))),
                );
            }
            (Some("echo"), _) => {
                let c = conn.as_mut().unwrap_or_else(|| fail("echo: no connection"));
                let mut byte = [0];
                c.read_exact(&mut byte)
                    .and_then(|()| c.write_all(&byte))
                    .unwrap_or_else(|e| fail(&format!("echo: {e}")));
            }
            (Some("send"), _) => {
                let c = conn.as_mut().unwrap_or_else(|| fail("send: no connection"));
                let mut byte = [b'x'];
                c.write_all(&byte)
                    .and_then(|()| c.read_exact(&mut byte))
                    .unwrap_or_else(|e| fail(&format!("send: {e}")));
            }
            (Some("write"), _) => {
                let c = conn
                    .as_mut()
                    .unwrap_or_else(|| fail("write: no connection"));
                c.write_all(b"x")
                    .unwrap_or_else(|e| fail(&format!("write: {e}")));
            }
            (Some("wait-eof"), _) => {
                let c = conn
                    .as_mut()
                    .unwrap_or_else(|| fail("wait-eof: no connection"));
                let mut rest = Vec::new();
                c.read_to_end(&mut rest)
                    .unwrap_or_else(|e| fail(&format!("wait-eof: {e}")));
                ack_now(c);
            }
            (Some("close"), _) => drop(conn.take()),
            (Some("close-listener"), _) => drop(listener.take()),
            (Some("exit"), _) => return,
            _ => fail(&format!("unknown step `{line}`")),
        }
        say("ok");
    }
}

/// Acknowledges what arrived (the peer's FIN) now, from this process. The kernel delays that ACK
/// (about 40 ms, hoping to send it with this side's FIN), and its timer then runs in softirq
/// context on top of whatever task the CPU runs: where the kernel runs no tracing program on top
/// of some task (a sandbox's agent), the peer's FIN_WAIT1 -> FIN_WAIT2 and its hand-over to a
/// timewait socket would go unseen. TCP_QUICKACK sends the pending ACK from the setsockopt call.
/// https://elixir.bootlin.com/linux/v6.18/source/net/ipv4/tcp.c (__tcp_sock_set_quickack)
fn ack_now(conn: &TcpStream) {
    set_option(
        conn.as_raw_fd(),
        libc::IPPROTO_TCP,
        libc::TCP_QUICKACK,
        "TCP_QUICKACK",
    );
}

/// Turns an int socket option on, or fails saying which.
fn set_option(fd: libc::c_int, level: libc::c_int, option: libc::c_int, name: &str) {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt(2) on a descriptor we own, with an int option value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        fail(&format!("{name}: {}", std::io::Error::last_os_error()));
    }
}

fn bound_socket(addr: SocketAddr, reuseport: bool) -> std::os::fd::OwnedFd {
    let family = if addr.is_ipv6() {
        libc::AF_INET6
    } else {
        libc::AF_INET
    };
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        fail(&format!("socket: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    if reuseport {
        set_option(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEPORT,
            "SO_REUSEPORT",
        );
    }
    let (storage, len) = sockaddr(addr);
    // SAFETY: `storage` holds a valid sockaddr of `len` bytes.
    if unsafe { libc::bind(fd.as_raw_fd(), (&raw const storage).cast(), len) } != 0 {
        fail(&format!("bind {addr}: {}", std::io::Error::last_os_error()));
    }
    fd
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than sockaddr_in and suitably aligned.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in>().write(sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: as above.
            unsafe { (&raw mut storage).cast::<libc::sockaddr_in6>().write(sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

fn local_port(fd: &std::os::fd::OwnedFd) -> u16 {
    // SAFETY: all-zero is valid; getsockname fills at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    if unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut storage).cast(), &mut len) } != 0 {
        fail(&format!("getsockname: {}", std::io::Error::last_os_error()));
    }
    // sin_port and sin6_port sit at the same offset, right after the family.
    // SAFETY: storage is initialised and at least 4 bytes long.
    let port = unsafe {
        (&raw const storage)
            .cast::<u8>()
            .add(2)
            .cast::<u16>()
            .read_unaligned()
    };
    u16::from_be(port)
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
    eprintln!("tcp_workload: {message}");
    std::process::exit(1)
}
