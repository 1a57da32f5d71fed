//! The process's own stdio: an unbuffered writer for remote output and a
//! no-echo prompt for secrets.
//!
//! `tokio::io::stdout()` copies every write into a buffer and hands it to a
//! blocking-pool thread; for a stream of large chunks it is cheaper to
//! write(2) each chunk directly, from the caller's buffer, right away.

use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, LocalFlags, SetArg};
use tokio::io::AsyncWrite;
use tokio::runtime::{Handle, RuntimeFlavor};

/// An unbuffered [`AsyncWrite`] on a file descriptor: every `poll_write` is
/// one write(2) from the caller's buffer, so output shows as soon as it is
/// written. The write blocks the calling thread (the whole CLI on its
/// single-threaded runtime; inside `block_in_place` on a multi-threaded
/// one), which is what a slow reader of our stdout should cause:
/// backpressure, no growing buffer.
pub struct RawWriter<F> {
    fd: F,
}

impl RawWriter<io::Stdout> {
    pub fn stdout() -> Self {
        RawWriter { fd: io::stdout() }
    }
}

impl RawWriter<io::Stderr> {
    pub fn stderr() -> Self {
        RawWriter { fd: io::stderr() }
    }
}

impl<F: AsFd> RawWriter<F> {
    pub fn new(fd: F) -> Self {
        RawWriter { fd }
    }
}

impl<F: AsFd + Unpin> AsyncWrite for RawWriter<F> {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.fd.as_fd();
        Poll::Ready(blocking(|| write_fd(fd, buf)))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A writer that remembers whether what was written so far ends a line,
/// so a message printed after a terminal session starts on a line of its
/// own. Writers made with [`LineTracker::alongside`] share the record: for
/// stdout and stderr on the same terminal, the last write of either counts.
#[derive(Debug)]
pub struct LineTracker<W> {
    inner: W,
    at_line_start: Arc<AtomicBool>,
}

impl<W> LineTracker<W> {
    pub fn new(inner: W) -> Self {
        LineTracker {
            inner,
            at_line_start: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Another writer whose output counts towards the same record.
    pub fn alongside<V>(&self, inner: V) -> LineTracker<V> {
        LineTracker {
            inner,
            at_line_start: self.at_line_start.clone(),
        }
    }

    /// True before any output and after output ending with "\n".
    pub fn at_line_start(&self) -> bool {
        self.at_line_start.load(Ordering::Relaxed)
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for LineTracker<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result
            && n > 0
        {
            self.at_line_start
                .store(buf[n - 1] == b'\n', Ordering::Relaxed);
        }
        result
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Runs a blocking call without starving other tasks of a worker thread.
/// (Inside `Runtime::block_on` this is a plain call.)
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One write(2), retried on EINTR; waits for room when the descriptor was
/// inherited in non-blocking mode (EAGAIN) instead of failing.
fn write_fd(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    loop {
        match nix::unistd::write(fd, buf) {
            Ok(n) => return Ok(n),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => {
                let mut fds = [PollFd::new(fd, PollFlags::POLLOUT)];
                match nix::poll::poll(&mut fds, PollTimeout::NONE) {
                    Ok(_) | Err(Errno::EINTR) => continue,
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Prints `prompt` on stderr and reads one line from the terminal on stdin
/// without echoing it, trimmed. Blocking; run it off the async threads.
pub fn read_secret(prompt: &str) -> io::Result<String> {
    read_secret_line(prompt).map(|line| line.trim().to_string())
}

/// As [`read_secret`], but only the line ending is removed (for passwords,
/// where spaces count).
pub fn read_secret_line(prompt: &str) -> io::Result<String> {
    let stdin = io::stdin();
    let mut stderr = io::stderr();
    write!(stderr, "{prompt}")?;
    stderr.flush()?;
    let fd = stdin.as_fd();
    let saved = termios::tcgetattr(fd)?;
    let mut quiet = saved.clone();
    quiet.local_flags.remove(LocalFlags::ECHO);
    quiet.local_flags.insert(LocalFlags::ECHONL);
    termios::tcsetattr(fd, SetArg::TCSANOW, &quiet)?;
    let _restore = RestoreTermios { saved };
    let mut line = String::new();
    stdin.lock().read_line(&mut line)?;
    Ok(strip_line_ending(line))
}

/// `line` without its final `\n` or `\r\n`.
pub fn strip_line_ending(mut line: String) -> String {
    if line.ends_with('\n') {
        line.pop();
        if line.ends_with('\r') {
            line.pop();
        }
    }
    line
}

/// Puts the terminal back as it was, whatever happens while reading.
pub(crate) struct RestoreTermios {
    saved: termios::Termios,
}

impl RestoreTermios {
    /// Restores the settings now (e.g. from a signal handler's task).
    pub(crate) fn restore(&self) {
        let _ = termios::tcsetattr(io::stdin().as_fd(), SetArg::TCSANOW, &self.saved);
    }

    /// Snapshot of the terminal on stdin, if it is one.
    pub(crate) fn capture() -> Option<RestoreTermios> {
        termios::tcgetattr(io::stdin().as_fd())
            .ok()
            .map(|saved| RestoreTermios { saved })
    }
}

impl Drop for RestoreTermios {
    fn drop(&mut self) {
        self.restore();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn raw_writer_writes_through() {
        let (reader, writer) = std::io::pipe().unwrap();
        let mut w = RawWriter::new(writer);
        w.write_all(b"no newline").await.unwrap();
        w.flush().await.unwrap();
        drop(w);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut { reader }, &mut got).unwrap();
        assert_eq!(got, "no newline");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn line_tracker_follows_line_ends() {
        let mut w = LineTracker::new(Vec::new());
        assert!(w.at_line_start());
        w.write_all(b"$ ").await.unwrap();
        assert!(!w.at_line_start());
        w.write_all(b"exit\r\n").await.unwrap();
        assert!(w.at_line_start());
        w.write_all(b"").await.unwrap();
        assert!(w.at_line_start());
        assert_eq!(w.inner, b"$ exit\r\n");

        // A notice on stderr after a prompt on stdout: the last write counts.
        let mut out = LineTracker::new(Vec::new());
        let mut err = out.alongside(Vec::new());
        out.write_all(b"remote$ ").await.unwrap();
        assert!(!err.at_line_start());
        err.write_all(b"\r\ngatekey: bob joined\r\n").await.unwrap();
        assert!(out.at_line_start());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn raw_writer_reports_broken_pipe() {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut w = RawWriter::new(writer);
        let e = w.write_all(b"x").await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
