//! The systemd notify protocol (sd_notify(3)), as the service manager's main
//! process speaks it: `READY=1`, `WATCHDOG=1`, `STATUS=…`, `STOPPING=1`, one
//! datagram each, to the socket named by `NOTIFY_SOCKET` (a path, or an
//! abstract name written `@name`).
//!
//! A few lines on std's `UnixDatagram` rather than a crate: the protocol is
//! one `sendto` of a text line, and std already speaks abstract addresses.
//!
//! Only the supervisor talks to systemd (the unit says `NotifyAccess=main`);
//! [`CHILD_ENV_REMOVE`] keeps the variables away from the children.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// Variables of the protocol that a child must not inherit: a child that
/// notified would confuse systemd (and be ignored under `NotifyAccess=main`).
pub const CHILD_ENV_REMOVE: [&str; 3] = ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"];

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("NOTIFY_SOCKET={0:?} is neither an absolute path nor an @abstract name")]
    BadAddress(String),
    #[error("NOTIFY_SOCKET: {0}")]
    Address(std::io::Error),
    #[error("creating the notify socket: {0}")]
    Socket(std::io::Error),
    #[error("sending {what} to NOTIFY_SOCKET: {source}")]
    Send {
        what: &'static str,
        source: std::io::Error,
    },
}

/// A connection to the service manager, or nothing when not run by one.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half the watchdog timeout: how often to ping. `None` when systemd
    /// asked for no watchdog (or asked another process).
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn from_env() -> Result<Notifier, NotifyError> {
        let var = |name| std::env::var(name).ok().filter(|v| !v.is_empty());
        Notifier::new(
            var("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            watchdog: None,
        }
    }

    fn new(
        socket: Option<&str>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        our_pid: u32,
    ) -> Result<Notifier, NotifyError> {
        let Some(socket) = socket else {
            return Ok(Notifier::disabled());
        };
        let addr = if let Some(name) = socket.strip_prefix('@') {
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(NotifyError::Address)?
        } else if socket.starts_with('/') {
            SocketAddr::from_pathname(socket).map_err(NotifyError::Address)?
        } else {
            return Err(NotifyError::BadAddress(socket.to_string()));
        };
        let sock = UnixDatagram::unbound().map_err(NotifyError::Socket)?;
        // Never block the tree on a full socket buffer: a lost ping is better
        // than a stalled pipeline.
        sock.set_nonblocking(true).map_err(NotifyError::Socket)?;
        // WATCHDOG_PID names the process that must ping; if it is another
        // one (we were exec'd by a wrapper), the watchdog is not ours.
        let ours = watchdog_pid.is_none_or(|p| p.trim().parse::<u32>().ok() == Some(our_pid));
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(|u| Duration::from_micros(u / 2));
        Ok(Notifier {
            target: Some((sock, addr)),
            watchdog,
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn ready(&self, status: &str) -> Result<(), NotifyError> {
        self.send("READY=1", &format!("READY=1\nSTATUS={}", one_line(status)))
    }

    pub fn watchdog(&self) -> Result<(), NotifyError> {
        if self.watchdog.is_none() {
            return Ok(());
        }
        self.send("WATCHDOG=1", "WATCHDOG=1")
    }

    pub fn status(&self, status: &str) -> Result<(), NotifyError> {
        self.send("STATUS", &format!("STATUS={}", one_line(status)))
    }

    pub fn stopping(&self, status: &str) -> Result<(), NotifyError> {
        self.send(
            "STOPPING=1",
            &format!("STOPPING=1\nSTATUS={}", one_line(status)),
        )
    }

    fn send(&self, what: &'static str, message: &str) -> Result<(), NotifyError> {
        let Some((sock, addr)) = &self.target else {
            return Ok(());
        };
        sock.send_to_addr(message.as_bytes(), addr)
            .map(|_| ())
            .map_err(|source| NotifyError::Send { what, source })
    }
}

/// A STATUS value is one line: newlines would start new assignments.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn sends_to_a_path_socket_with_the_watchdog_at_half_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("notify");
        let server = UnixDatagram::bind(&path).expect("bind");
        let path = path.to_str().expect("utf-8 path");
        let n = Notifier::new(Some(path), Some("3000000"), None, 1).expect("notifier");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_millis(1500)));
        n.ready("up\nand running").expect("send");
        assert_eq!(recv(&server), "READY=1\nSTATUS=up and running");
        n.watchdog().expect("send");
        assert_eq!(recv(&server), "WATCHDOG=1");
        n.stopping("draining").expect("send");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn sends_to_an_abstract_socket() {
        let name = format!("analytics-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let server = UnixDatagram::bind_addr(&addr).expect("bind");
        let n = Notifier::new(Some(&format!("@{name}")), None, None, 1).expect("notifier");
        assert_eq!(n.watchdog_interval(), None);
        n.status("hello").expect("send");
        assert_eq!(recv(&server), "STATUS=hello");
        // No watchdog was asked for: the ping is not sent.
        n.watchdog().expect("no-op");
        n.status("again").expect("send");
        assert_eq!(recv(&server), "STATUS=again");
    }

    #[test]
    fn the_watchdog_of_another_pid_is_not_ours() {
        let n = Notifier::new(Some("/nonexistent"), Some("1000"), Some("42"), 7).expect("ok");
        assert_eq!(n.watchdog_interval(), None);
        let n = Notifier::new(Some("/nonexistent"), Some("1000"), Some("7"), 7).expect("ok");
        assert_eq!(n.watchdog_interval(), Some(Duration::from_micros(500)));
    }

    #[test]
    fn no_socket_means_disabled_and_a_relative_path_is_an_error() {
        let n = Notifier::new(None, Some("1000"), None, 1).expect("ok");
        assert!(!n.is_enabled());
        assert_eq!(n.watchdog_interval(), None);
        n.ready("x").expect("no-op");
        assert!(matches!(
            Notifier::new(Some("relative/path"), None, None, 1),
            Err(NotifyError::BadAddress(_))
        ));
    }
}
