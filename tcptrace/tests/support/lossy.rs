//! A network namespace that loses chosen segments: a server in it, a client on the host, and
//! iptables rules in the namespace dropping what a test picks (one marked segment, or
//! everything). Shared by the retransmit kind and congestion tests.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::mpsc,
    thread,
    time::Duration,
};

use serde_json::Value;

use super::{Netns, Tracer, in_netns, socket_addr};

/// How long a test waits for the retransmits it provoked (the slowest: six SYNs, 7 s).
pub const WAIT: Duration = Duration::from_secs(15);

/// A server in `netns` that accepts one connection and reads it to its end; `accepted` says when
/// it has the connection.
pub struct Server {
    pub port: u16,
    pub accepted: mpsc::Receiver<()>,
    reader: thread::JoinHandle<usize>,
}

impl Server {
    pub fn start(netns: &Netns) -> Self {
        Self::start_on(netns, 0)
    }

    /// A server on `port` (0: any).
    pub fn start_on(netns: &Netns, port: u16) -> Self {
        let ip = netns.ns_ip.clone();
        let listener = in_netns(netns, || {
            TcpListener::bind((ip.as_str(), port)).expect("bind")
        });
        let port = listener.local_addr().expect("address").port();
        let (tell, accepted) = mpsc::channel();
        let reader = thread::spawn(move || {
            let (mut stream, _) = listener.accept().expect("accept");
            let _ = tell.send(());
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .expect("read timeout");
            let mut total = 0;
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stream.read(&mut buf) {
                total += n;
            }
            total
        });
        Self {
            port,
            accepted,
            reader,
        }
    }

    /// Connects to it from the host, without Nagle's delay, and waits until it has accepted.
    pub fn connect(&self, netns: &Netns) -> TcpStream {
        let stream = TcpStream::connect(socket_addr(&netns.ns_ip, self.port)).expect("connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        self.accepted
            .recv_timeout(Duration::from_secs(5))
            .expect("the server accepted nothing");
        stream
    }

    /// Waits until the client has closed; what the server read.
    pub fn finish(self) -> usize {
        self.reader.join().expect("the server panicked")
    }
}

/// Ends a client whose segments the namespace may still drop: reset, not a FIN to retransmit.
pub fn abort(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket, and a value of the size given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Drops the first packet to `port` that carries `marker`, and no later one: its retransmit
/// gets through.
pub fn drop_once(netns: &Netns, port: u16, marker: &str) {
    netns.iptables(&[
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "-m",
        "string",
        "--string",
        marker,
        "--algo",
        "bm",
        "-m",
        "limit",
        "--limit",
        "1/hour",
        "--limit-burst",
        "1",
        "-j",
        "DROP",
    ]);
}

/// Writes `count` segments of 500 bytes, `gap` apart (each its own segment: no Nagle, and the
/// gap is far longer than the round trip); segment `marked` carries `marker`.
pub fn write_segments(
    stream: &mut TcpStream,
    count: usize,
    marked: usize,
    marker: &str,
    gap: Duration,
) -> usize {
    for i in 0..count {
        let mut segment = vec![b'.'; 500];
        if i == marked {
            segment[100..100 + marker.len()].copy_from_slice(marker.as_bytes());
        }
        stream.write_all(&segment).expect("write");
        thread::sleep(gap);
    }
    count * 500
}

/// Connects to `server`, sends `count` segments `gap` apart of which the namespace drops number
/// `marked` once, and waits for a retransmit and a second more (time for a timeout to follow if
/// the retransmit had not been acknowledged: the RTO is about 200 ms here). The server must
/// have read everything.
pub fn lose_one_segment(
    netns: &Netns,
    server: Server,
    tracer: &Tracer,
    count: usize,
    marked: usize,
    gap: Duration,
) {
    let port = server.port;
    let mut client = server.connect(netns);
    let marker = "TCPTRACE-LOST";
    drop_once(netns, port, marker);
    let sent = write_segments(&mut client, count, marked, marker, gap);
    tracer.wait_for(WAIT, "a retransmit", |lines| {
        !client_retransmits(lines, netns, port).is_empty()
    });
    thread::sleep(Duration::from_secs(1));
    drop(client);
    assert_eq!(server.finish(), sent, "what the server read");
}

/// The retransmit lines of the host's connection to `netns`'s `port`, in order.
pub fn client_retransmits(lines: &[String], netns: &Netns, port: u16) -> Vec<Value> {
    lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| {
            l["type"] == "retransmit"
                && l["synack"] == false
                && l["saddr"] == netns.host_ip
                && l["daddr"] == netns.ns_ip
                && l["dport"] == port
        })
        .collect()
}

/// Everything to `port` in `netns` dropped while this lives (the namespace goes with its rules
/// when a test fails).
pub struct Blackhole<'a> {
    netns: &'a Netns,
    rule: [String; 6],
}

impl<'a> Blackhole<'a> {
    pub fn start(netns: &'a Netns, port: u16) -> Self {
        let rule = ["INPUT", "-p", "tcp", "--dport", &port.to_string(), "-j"].map(str::to_owned);
        let hole = Self { netns, rule };
        hole.iptables("-A");
        hole
    }

    fn iptables(&self, action: &str) {
        let mut args = vec![action];
        args.extend(self.rule.iter().map(String::as_str));
        args.push("DROP");
        self.netns.iptables(&args);
    }
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        self.iptables("-D");
    }
}
