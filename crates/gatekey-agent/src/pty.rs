//! Pseudo-terminals for interactive consoles.
//!
//! - [`open`] allocates a terminal and [`Pty::spawn`] starts a process on it
//!   as the leader of a new session, with the terminal as its controlling
//!   terminal, as `sshd` and `login` do: ^C, ^Z and job control work.
//! - [`Master`] is the agent's end, non-blocking on the runtime: read what
//!   the console prints, type into it, resize it.
//! - [`Members`] finds every process a console started and [`Guard`] ends
//!   them, on every path out of a session.
//!
//! Why a session and not a process group: a shell with job control puts each
//! job in a process group of its own, so killing the shell's group would miss
//! them. They all stay in the shell's session, though, whose id is the
//! shell's pid. Only `setsid` leaves it; such processes are still found by the
//! console's id in their environment ([`CONSOLE_ID_VAR`]), the way Jenkins
//! finds what a build left behind. A process that both leaves the session and
//! scrubs its environment escapes; nothing short of a cgroup catches that.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::pty::{PtyMaster, grantpt, posix_openpt, ptsname_r, unlockpt};
use nix::sys::signal::{Signal, kill, killpg};
use nix::sys::stat::Mode;
use nix::sys::termios::{self, InputFlags, SetArg};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::process::{Child, Command};

/// The environment variable that marks a console's processes, so those that
/// leave its session can still be found and ended with it.
pub const CONSOLE_ID_VAR: &str = "GATEKEY_CONSOLE_ID";

/// Largest number of columns or rows accepted; larger requests are clamped.
pub const MAX_SIDE: u32 = 1000;

/// A terminal size in character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size {
    pub cols: u16,
    pub rows: u16,
}

impl Size {
    pub const DEFAULT: Size = Size { cols: 80, rows: 24 };

    /// The size asked for when a console opens: a side of 0 (not given)
    /// takes the default 80x24; sides are clamped to 1..=1000.
    pub fn initial(cols: u32, rows: u32) -> Size {
        let side = |n: u32, default: u16| if n == 0 { default } else { clamp(n) };
        Size {
            cols: side(cols, Size::DEFAULT.cols),
            rows: side(rows, Size::DEFAULT.rows),
        }
    }

    /// The size a resize asks for, clamped to 1..=1000; `None` when a side is
    /// 0, which some clients send while their window is hidden: better to
    /// keep the old size than to squeeze the console into one cell.
    pub fn resize(cols: u32, rows: u32) -> Option<Size> {
        (cols > 0 && rows > 0).then(|| Size {
            cols: clamp(cols),
            rows: clamp(rows),
        })
    }
}

fn clamp(n: u32) -> u16 {
    n.clamp(1, MAX_SIDE) as u16
}

/// A terminal that has not started its process yet.
pub struct Pty {
    master: Master,
    slave: OwnedFd,
}

/// Allocates a terminal of `size`. Must run inside the runtime (the master is
/// registered with it).
pub fn open(size: Size) -> io::Result<Pty> {
    // Close-on-exec from the start, not set afterwards: another thread may
    // start a process at any moment, and a copy of the master leaked into it
    // would keep this terminal from ever hanging up.
    let master =
        posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave = open_slave(&master)?;
    // Best effort: line editing of UTF-8 text (erasing a multi-byte
    // character) needs IUTF8, which the kernel's default settings lack.
    if let Ok(mut t) = termios::tcgetattr(&slave) {
        t.input_flags |= InputFlags::IUTF8;
        let _ = termios::tcsetattr(&slave, SetArg::TCSANOW, &t);
    }
    let master = OwnedFd::from(master);
    set_size(master.as_fd(), size)?;
    // SAFETY: an `OwnedFd` stays open, and the same descriptor, until the
    // `AsyncFd` that owns it drops it.
    let master = unsafe { AsyncFd::register(master) }.map_err(|e| e.into_parts().1)?;
    Ok(Pty {
        master: Master(Arc::new(master)),
        slave,
    })
}

fn open_slave(master: &PtyMaster) -> io::Result<OwnedFd> {
    // TIOCGPTPEER (Linux 4.13) opens the peer without a path lookup, so it
    // works whatever is mounted on /dev/pts; older kernels go by name.
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
    // SAFETY: the ioctl takes the open flags by value and returns a new
    // descriptor or -1; it touches no memory of ours.
    let fd = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTPEER, flags) };
    if fd >= 0 {
        // SAFETY: `fd` was just opened and nothing else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let name = ptsname_r(master)?;
    Ok(nix::fcntl::open(
        name.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

fn set_size(fd: BorrowedFd<'_>, size: Size) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one `winsize`, which lives across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCSWINSZ, &ws) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Pty {
    /// Starts `cmd` on the terminal: stdin, stdout and stderr are the
    /// terminal, the process leads a new session and the terminal is its
    /// controlling terminal. Takes the command because it holds copies of the
    /// terminal's slave end, which must be closed once the process has its
    /// own: the master reads end-of-file only when every copy is closed.
    pub fn spawn(self, mut cmd: Command) -> io::Result<(Child, Master)> {
        let Pty { master, slave } = self;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: `enter_session` runs in the child between fork and exec
        // and makes only async-signal-safe system calls (no allocation, no
        // locks), as a pre_exec hook must.
        unsafe { cmd.pre_exec(enter_session) };
        let child = cmd.spawn();
        drop(cmd);
        Ok((child?, master))
    }
}

/// In the child, after its stdio became the terminal and before exec.
fn enter_session() -> io::Result<()> {
    // SAFETY: signal, setsid and ioctl are async-signal-safe system calls;
    // the ioctl argument is an integer.
    unsafe {
        // A console's programs expect default handling of these whatever the
        // agent was started with (nohup ignores SIGHUP, for one).
        for sig in [
            libc::SIGHUP,
            libc::SIGINT,
            libc::SIGQUIT,
            libc::SIGTERM,
            libc::SIGTSTP,
            libc::SIGTTIN,
            libc::SIGTTOU,
            libc::SIGWINCH,
            libc::SIGCHLD,
        ] {
            libc::signal(sig, libc::SIG_DFL);
        }
        if libc::setsid() < 0 {
            return Err(io::Error::last_os_error());
        }
        // fd 0 is the slave by now; 0 = do not steal it from another session.
        if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The agent's end of a console's terminal. Clones share one descriptor,
/// closed with the last clone: for the console's processes, that is the
/// terminal hanging up.
#[derive(Clone)]
pub struct Master(Arc<AsyncFd<OwnedFd>>);

impl Master {
    /// Sets the terminal's size; the kernel sends SIGWINCH to the foreground
    /// process group.
    pub fn resize(&self, size: Size) -> io::Result<()> {
        set_size(self.0.get_ref().as_fd(), size)
    }
}

/// Reads into the unfilled part of `buf`.
fn read_into(fd: &OwnedFd, buf: &mut ReadBuf<'_>) -> io::Result<usize> {
    // SAFETY: read(2) writes at most `unfilled.len()` bytes into the
    // unfilled part, which is valid for writes; exactly the `n` bytes it
    // wrote are then marked initialised and filled.
    unsafe {
        let unfilled = buf.unfilled_mut();
        let n = libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len());
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let n = n as usize;
        buf.assume_init(n);
        buf.advance(n);
        Ok(n)
    }
}

/// Output of the console. End-of-file once every process has closed the
/// terminal (the kernel reports EIO then) and everything they wrote was read.
impl AsyncRead for Master {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let start = buf.filled().len();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            // One terminal read returns at most a few KiB: gather what is
            // ready into the buffer, for fewer and larger frames, but never
            // wait for more once there is something.
            while buf.remaining() > 0 {
                match read_into(self.0.get_ref(), buf) {
                    Ok(0) => return Poll::Ready(Ok(())),
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::EIO) => return Poll::Ready(Ok(())),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if buf.filled().len() == start => return Poll::Ready(Err(e)),
                    // Deliver what was read; the error comes back next time.
                    Err(_) => break,
                }
            }
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Input of the console: what the user types.
impl AsyncWrite for Master {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.0.poll_write_ready(cx))?;
            let written = guard.try_io(|fd| {
                loop {
                    match nix::unistd::write(fd.get_ref(), data) {
                        Err(Errno::EINTR) => continue,
                        r => break r.map_err(io::Error::from),
                    }
                }
            });
            if let Ok(r) = written {
                return Poll::Ready(r);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// A terminal cannot be half-closed: this does nothing.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// The processes of one console: the members of its session, and those that
/// left the session but carry its id in their environment.
#[derive(Clone, Debug)]
pub struct Members {
    /// The session id: the pid of the process started on the terminal.
    sid: i32,
    /// `GATEKEY_CONSOLE_ID=…` exactly as it appears in /proc/PID/environ.
    marker: Arc<[u8]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Proc {
    pid: i32,
    pgid: i32,
    /// A member of the session, not only marked.
    in_session: bool,
}

impl Members {
    /// `console_id` is the value of [`CONSOLE_ID_VAR`] the console was started with.
    pub fn new(sid: u32, console_id: &str) -> Members {
        Members {
            sid: i32::try_from(sid).unwrap_or(0),
            marker: format!("{CONSOLE_ID_VAR}={console_id}").into_bytes().into(),
        }
    }

    /// The live processes (zombies are dead already). Never the agent itself
    /// or init.
    fn find(&self) -> Vec<Proc> {
        let me = std::process::id() as i32;
        let Ok(dir) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        let mut found = Vec::new();
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<i32>().ok())
            else {
                continue;
            };
            if pid <= 1 || pid == me {
                continue;
            }
            let Some(stat) = std::fs::read(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| parse_stat(&s))
            else {
                continue;
            };
            if matches!(stat.state, b'Z' | b'X') {
                continue;
            }
            let in_session = self.sid > 1 && stat.session == self.sid;
            if in_session || self.marked(pid) {
                found.push(Proc {
                    pid,
                    pgid: stat.pgrp,
                    in_session,
                });
            }
        }
        found
    }

    fn marked(&self, pid: i32) -> bool {
        // Unreadable (another user's process, or gone): not ours.
        std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|&b| b == 0).any(|e| e == &self.marker[..]))
    }

    /// Does what a terminal hangup does, to every process group of the
    /// session (job control gives each job its own) and to every process that
    /// left it: SIGHUP, then SIGCONT so that stopped jobs act on it. Returns
    /// the pids found, to wait for. Blocking (reads /proc).
    pub fn hang_up(&self) -> Vec<i32> {
        let found = self.find();
        // Groups of the session can hold only the session's processes.
        let mut groups: Vec<i32> = found
            .iter()
            .filter(|p| p.in_session && p.pgid > 1)
            .map(|p| p.pgid)
            .collect();
        groups.sort_unstable();
        groups.dedup();
        for g in groups {
            let _ = killpg(Pid::from_raw(g), Signal::SIGHUP);
            let _ = killpg(Pid::from_raw(g), Signal::SIGCONT);
        }
        // Those that left it may share a group with strangers: one by one.
        for p in found.iter().filter(|p| !p.in_session) {
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGHUP);
            let _ = kill(Pid::from_raw(p.pid), Signal::SIGCONT);
        }
        found.into_iter().map(|p| p.pid).collect()
    }

    /// SIGKILLs every process of the console, looking again while any is
    /// found: one may have forked while the last look was under way.
    /// Blocking (reads /proc).
    pub fn kill_all(&self) {
        for round in 0..20 {
            let found = self.find();
            if found.is_empty() {
                return;
            }
            for p in found {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
            // Killed processes take a moment to turn into zombies.
            std::thread::sleep(Duration::from_millis(if round < 5 { 2 } else { 20 }));
        }
    }
}

/// Whether a process exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|s| !matches!(s.state, b'Z' | b'X'))
}

#[derive(Debug, PartialEq, Eq)]
struct Stat {
    state: u8,
    pgrp: i32,
    session: i32,
}

/// Fields 3, 5 and 6 of /proc/PID/stat.
fn parse_stat(s: &[u8]) -> Option<Stat> {
    // Field 2, the command name, is in parentheses and may itself hold spaces
    // and parentheses: the fields after it start after the last ')'.
    let end = s.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(&s[end + 1..]).ok()?;
    let mut f = rest.split_ascii_whitespace();
    let state = f.next()?.bytes().next()?;
    let _ppid = f.next()?;
    let pgrp = f.next()?.parse().ok()?;
    let session = f.next()?.parse().ok()?;
    Some(Stat {
        state,
        pgrp,
        session,
    })
}

/// Kills every process of a console when dropped, unless [`Guard::kill`]
/// already did: no path out of a session, a panic or an aborted task
/// included, leaves one behind.
pub struct Guard {
    members: Members,
    armed: bool,
}

impl Guard {
    pub fn new(members: Members) -> Guard {
        Guard {
            members,
            armed: true,
        }
    }

    /// [`Members::hang_up`], off the runtime's threads.
    pub async fn hang_up(&self) -> Vec<i32> {
        let m = self.members.clone();
        tokio::task::spawn_blocking(move || m.hang_up())
            .await
            .unwrap_or_default()
    }

    /// [`Members::kill_all`], off the runtime's threads; afterwards nothing
    /// more is killed (the drop does nothing).
    pub async fn kill(&mut self) {
        if !self.armed {
            return;
        }
        let m = self.members.clone();
        if tokio::task::spawn_blocking(move || m.kill_all())
            .await
            .is_ok()
        {
            self.armed = false;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.armed {
            self.members.kill_all();
        }
    }
}

/// Waits until none of `pids` is alive, or until `deadline`.
pub async fn wait_gone(pids: &[i32], deadline: tokio::time::Instant) {
    while pids.iter().any(|&p| alive(p)) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn sizes_are_defaulted_and_clamped() {
        assert_eq!(Size::initial(0, 0), Size::DEFAULT);
        assert_eq!(
            Size::initial(120, 0),
            Size {
                cols: 120,
                rows: 24
            }
        );
        assert_eq!(
            Size::initial(u32::MAX, 5000),
            Size {
                cols: 1000,
                rows: 1000
            }
        );
        assert_eq!(Size::resize(0, 30), None);
        assert_eq!(Size::resize(100, 0), None);
        assert_eq!(Size::resize(1, 1), Some(Size { cols: 1, rows: 1 }));
        assert_eq!(
            Size::resize(70_000, 40),
            Some(Size {
                cols: 1000,
                rows: 40
            })
        );
    }

    #[test]
    fn stat_lines_are_parsed_whatever_the_command_name() {
        let s = b"4242 (a) b (c)) S 1 4240 4200 34816 4242 4194560 0 0 0 0";
        assert_eq!(
            parse_stat(s),
            Some(Stat {
                state: b'S',
                pgrp: 4240,
                session: 4200
            })
        );
        assert_eq!(parse_stat(b"4242 (sleep"), None);
        assert_eq!(parse_stat(b"4242 (sleep) R 1 x 3"), None);
        assert_eq!(parse_stat(b""), None);
        let own = std::fs::read("/proc/self/stat").unwrap();
        let own = parse_stat(&own).unwrap();
        assert_eq!(own.session, nix::unistd::getsid(None).unwrap().as_raw());
    }

    #[tokio::test]
    async fn descriptors_are_close_on_exec_and_non_blocking() {
        let pty = open(Size::DEFAULT).unwrap();
        let fd_flags = |fd: BorrowedFd<'_>| {
            nix::fcntl::FdFlag::from_bits_truncate(
                nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).unwrap(),
            )
        };
        let master = pty.master.0.get_ref().as_fd();
        assert!(fd_flags(master).contains(nix::fcntl::FdFlag::FD_CLOEXEC));
        assert!(fd_flags(pty.slave.as_fd()).contains(nix::fcntl::FdFlag::FD_CLOEXEC));
        let status = OFlag::from_bits_truncate(
            nix::fcntl::fcntl(master, nix::fcntl::FcntlArg::F_GETFL).unwrap(),
        );
        assert!(status.contains(OFlag::O_NONBLOCK));
    }

    #[tokio::test]
    async fn a_process_runs_on_the_terminal_as_a_session_leader() {
        let pty = open(Size { cols: 77, rows: 11 }).unwrap();
        let mut cmd = Command::new("/bin/sh");
        // `ps -o sid= -p $$` is not everywhere: read the fields from /proc.
        cmd.args([
            "-c",
            "stty size; test -t 0 && echo tty; cut -d' ' -f6 /proc/$$/stat; echo $$",
        ]);
        let (mut child, mut master) = pty.spawn(cmd).unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), master.read_to_end(&mut out))
            .await
            .expect("end of file once the process exited")
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        let lines: Vec<&str> = out.lines().map(str::trim).collect();
        assert_eq!(lines[..2], ["11 77", "tty"], "{out:?}");
        // Session id == its own pid: it leads a new session.
        assert_eq!(lines[2], lines[3], "{out:?}");
        assert!(child.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn typing_reaches_the_process_and_resizes_are_seen() {
        let pty = open(Size::DEFAULT).unwrap();
        let mut cmd = Command::new("/bin/sh");
        cmd.args(["-c", "read line; stty size; echo \"got $line\""]);
        let (mut child, mut master) = pty.spawn(cmd).unwrap();
        master.resize(Size { cols: 90, rows: 33 }).unwrap();
        master.write_all(b"hello\n").await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), master.read_to_end(&mut out))
            .await
            .unwrap()
            .unwrap();
        let out = String::from_utf8_lossy(&out);
        assert!(out.contains("33 90"), "{out:?}");
        assert!(out.contains("got hello"), "{out:?}");
        assert!(child.wait().await.unwrap().success());
    }
}
