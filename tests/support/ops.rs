//! Helpers for the operations tests: a notify socket standing in for
//! systemd, a plain HTTP GET, and a free loopback port.

use std::io::{Read, Write};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::time::{Duration, Instant};

/// A Unix datagram socket bound where `NOTIFY_SOCKET` will point.
pub struct NotifySocket {
    sock: UnixDatagram,
    /// The value to pass as `NOTIFY_SOCKET`.
    pub address: String,
}

impl NotifySocket {
    /// Bound to `dir/notify`.
    pub fn bind_path(dir: &Path) -> NotifySocket {
        let path = dir.join("notify");
        let sock = UnixDatagram::bind(&path).expect("bind the notify socket");
        NotifySocket::with(sock, path.to_str().expect("utf-8 path").to_string())
    }

    /// Bound to a fresh abstract name (`@…`).
    pub fn bind_abstract() -> NotifySocket {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let name = format!("analytics-test-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let sock = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket::with(sock, format!("@{name}"))
    }

    fn with(sock: UnixDatagram, address: String) -> NotifySocket {
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .expect("read timeout");
        NotifySocket { sock, address }
    }

    /// The next datagram, if one arrives within 50 ms.
    fn next(&self) -> Option<String> {
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => None,
        }
    }

    /// Every datagram received within `d`.
    pub fn collect(&self, d: Duration) -> Vec<String> {
        let end = Instant::now() + d;
        let mut out = Vec::new();
        while Instant::now() < end {
            out.extend(self.next());
        }
        out
    }

    /// Waits up to `timeout` for a datagram with a line `line`; returns it
    /// and everything received before it, or panics with what came.
    pub fn wait_for_line(&self, line: &str, timeout: Duration) -> Vec<String> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Some(m) = self.next() {
                let found = m.lines().any(|l| l == line);
                seen.push(m);
                if found {
                    return seen;
                }
            }
        }
        panic!("no {line} within {timeout:?}; received: {seen:?}");
    }

    /// Waits up to `timeout` for a datagram with a line starting `prefix`.
    pub fn wait_for_prefix(&self, prefix: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while Instant::now() < end {
            if let Some(m) = self.next() {
                if m.lines().any(|l| l.starts_with(prefix)) {
                    return m;
                }
                seen.push(m);
            }
        }
        panic!("nothing starting {prefix:?} within {timeout:?}; received: {seen:?}");
    }
}

pub fn count_line(messages: &[String], line: &str) -> usize {
    messages
        .iter()
        .filter(|m| m.lines().any(|l| l == line))
        .count()
}

/// A loopback port nothing listens on (now).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET path` over HTTP/1.1; (status, body). Panics if the server does not
/// answer within 10 s.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        c,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .expect("send the request");
    let mut out = String::new();
    c.read_to_string(&mut out).expect("read the response");
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {out:?}"));
    (status, body.to_string())
}

/// The value of a sample (`name{labels}`) in a Prometheus text body.
pub fn sample(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
