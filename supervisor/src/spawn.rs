//! Starting a child process connected by a socketpair. Only the child's end
//! is inherited, so no other process (or user) can reach the socket; nothing
//! runs between fork and exec.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;

/// Serialises spawns: a child's socket end is inheritable only while its
/// own spawn runs, so no sibling can inherit it.
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

pub struct Spawned {
    pub child: tokio::process::Child,
    pub stream: tokio::net::UnixStream,
    pub pid: i32,
}

/// Bytes a child socket may hold in flight each way. At the default
/// (208 KiB) a worker's input ran dry whenever the supervisor waited a
/// scheduler slice for the core it shares with the storage process.
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Starts `program args… --ipc-fd N --parent-pid P`. Call it from the
/// thread that lives as long as the supervisor (the main thread): the
/// child's parent-death signal follows the thread that forked it.
pub fn spawn_child(
    program: &Path,
    args: &[OsString],
    envs: &[(OsString, OsString)],
) -> std::io::Result<Spawned> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let (ours, theirs) = socket_pair()?;
    let fd = theirs.as_raw_fd();
    let child = {
        let _guard = SPAWN_LOCK
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())).map_err(std::io::Error::from)?;
        let mut cmd = tokio::process::Command::new(program);
        cmd.args(args)
            // Settings that may hold secrets travel in the environment, which
            // (unlike the command line) other users cannot read.
            .envs(envs.iter().map(|(k, v)| (k, v)))
            .arg("--ipc-fd")
            .arg(fd.to_string())
            .arg("--parent-pid")
            .arg(std::process::id().to_string())
            .stdin(Stdio::null())
            // Ctrl-C goes to the supervisor alone; it stops the children.
            .process_group(0)
            .kill_on_drop(true);
        // Only the supervisor speaks to systemd.
        for name in crate::notify::CHILD_ENV_REMOVE {
            cmd.env_remove(name);
        }
        cmd.spawn()
    };
    drop(theirs);
    let child = child?;
    let pid = child.id().map_or(-1, |p| p as i32);
    ours.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        stream: tokio::net::UnixStream::from_std(ours)?,
        pid,
    })
}

/// A connected pair with send buffers of [`SOCKET_BUFFER_BYTES`].
fn socket_pair() -> std::io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    for end in [&ours, &theirs] {
        use nix::sys::socket::{setsockopt, sockopt::SndBuf};
        // The kernel caps it at net.core.wmem_max; a smaller buffer only
        // costs throughput, so a refusal is not an error.
        let _ = setsockopt(end, SndBuf, &SOCKET_BUFFER_BYTES);
    }
    Ok((ours, theirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt::SndBuf};

    #[test]
    fn both_ends_get_the_larger_send_buffer_up_to_the_kernel_cap() {
        let cap: usize = std::fs::read_to_string("/proc/sys/net/core/wmem_max")
            .expect("read net.core.wmem_max")
            .trim()
            .parse()
            .expect("a number");
        let (ours, theirs) = socket_pair().expect("socketpair");
        for end in [&ours, &theirs] {
            // Linux doubles the value it grants (bookkeeping overhead).
            let got = getsockopt(end, SndBuf).expect("SO_SNDBUF");
            assert_eq!(got, 2 * SOCKET_BUFFER_BYTES.min(cap));
        }
    }
}
