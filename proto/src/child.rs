//! The child side of the process tree: adopt the socket the supervisor
//! passed down, and never outlive the supervisor.

use std::os::fd::{FromRawFd, RawFd};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ChildError {
    #[error("file descriptor {0} is not a Unix socket passed by the supervisor")]
    NotASocket(RawFd),
    #[error("the supervisor (pid {0}) is already gone")]
    ParentGone(i32),
    #[error("setting up the child process: {0}")]
    Setup(#[from] std::io::Error),
}

/// Asks the kernel to SIGKILL us when the supervisor dies, and checks it has
/// not died already (the race between fork and this call).
pub fn die_with_parent(expected_parent: i32) -> Result<(), ChildError> {
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(std::io::Error::from)?;
    if nix::unistd::getppid().as_raw() != expected_parent {
        return Err(ChildError::ParentGone(expected_parent));
    }
    // The supervisor handles Ctrl-C and SIGTERM for the whole tree; children
    // stop when their socket closes.
    for sig in [
        nix::sys::signal::Signal::SIGINT,
        nix::sys::signal::Signal::SIGTERM,
    ] {
        // SAFETY: installing SIG_IGN runs no handler code, so it cannot break
        // any invariant of the program.
        unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigIgn) }
            .map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// Lowers this process's CPU priority by `by` nice levels (the kernel caps
/// the result at 19). Linux keeps niceness per thread and a new thread
/// inherits its creator's: call it before starting any thread.
pub fn lower_priority(by: i32) -> std::io::Result<()> {
    if by == 0 {
        return Ok(());
    }
    // SAFETY: errno is this thread's own; `nice` only changes this
    // thread's scheduling priority. -1 is also a valid new niceness, so
    // errno, cleared first, tells a failure apart.
    let result = unsafe {
        *libc::__errno_location() = 0;
        libc::nice(by)
    };
    let error = std::io::Error::last_os_error();
    if result == -1 && error.raw_os_error() != Some(0) {
        return Err(error);
    }
    Ok(())
}

/// Takes ownership of the inherited socket `fd`. Must be called once, from
/// within a tokio runtime.
pub fn adopt_socket(fd: RawFd) -> Result<UnixStream, ChildError> {
    let stat = nix::sys::stat::fstat(fd).map_err(|_| ChildError::NotASocket(fd))?;
    if stat.st_mode & libc_s_ifmt() != libc_s_ifsock() {
        return Err(ChildError::NotASocket(fd));
    }
    // SAFETY: the fd is open (fstat succeeded), is a socket, and was created
    // by the supervisor for this process alone; nothing else here owns it.
    let std_stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) };
    std_stream.set_nonblocking(true)?;
    Ok(UnixStream::from_std(std_stream)?)
}

fn libc_s_ifmt() -> u32 {
    nix::sys::stat::SFlag::S_IFMT.bits()
}

fn libc_s_ifsock() -> u32 {
    nix::sys::stat::SFlag::S_IFSOCK.bits()
}
