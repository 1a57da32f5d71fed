//! The local terminal during `session connect`: raw mode that is undone on
//! every way out, the window size, and ssh-style `~` escapes.
//!
//! Raw mode is entered through [`RawMode::enter`]; the saved settings are
//! also kept in a process-wide slot so that [`restore`] can put them back
//! from places that never see the guard: the panic hook
//! ([`install_panic_hook`]) and the signal handlers that end the process.
//! Restoring is idempotent: whichever runs first puts the settings back and
//! the others find nothing left to do.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Mutex, Once};
use std::task::{Context, Poll, ready};

use gatekey_proto::channel::TerminalSize;
use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};

/// `TERM` sent to the node when the local one is unset.
pub const DEFAULT_TERM: &str = "xterm-256color";

/// The terminal settings to put back, with (a duplicate of) the terminal's
/// descriptor, so restoring needs nothing from the caller.
struct Saved {
    fd: OwnedFd,
    termios: Termios,
}

static SAVED: Mutex<Option<Saved>> = Mutex::new(None);

fn saved() -> std::sync::MutexGuard<'static, Option<Saved>> {
    SAVED
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The local terminal in raw mode; dropping it (or calling [`restore`])
/// puts the saved settings back.
#[derive(Debug)]
#[must_use = "raw mode ends when the guard is dropped"]
pub struct RawMode {
    _private: (),
}

impl RawMode {
    /// Saves the settings of the terminal on `fd` and switches it to raw
    /// mode (as cfmakeraw(3): no echo, no line editing, no signals from
    /// keys, no output processing; reads return each byte as it comes).
    /// Fails when `fd` is not a terminal.
    pub fn enter(fd: BorrowedFd<'_>) -> io::Result<RawMode> {
        let original = termios::tcgetattr(fd)?;
        let raw = raw_settings(&original);
        let dup = fd.try_clone_to_owned()?;
        *saved() = Some(Saved {
            fd: dup,
            termios: original,
        });
        // TCSADRAIN: output already written (the "Connected" line) is shown
        // with the old settings; input typed ahead is kept.
        if let Err(e) = termios::tcsetattr(fd, SetArg::TCSADRAIN, &raw) {
            saved().take();
            return Err(e.into());
        }
        Ok(RawMode { _private: () })
    }

    /// Restores now (the guard's drop then has nothing left to do).
    pub fn restore(&self) {
        restore();
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Raw-mode settings derived from `original`, as cfmakeraw(3) does it.
pub fn raw_settings(original: &Termios) -> Termios {
    let mut raw = original.clone();
    termios::cfmakeraw(&mut raw);
    raw
}

/// Whether raw mode is on (a guard is alive and nothing restored it yet).
pub fn is_raw() -> bool {
    saved().is_some()
}

/// Puts the terminal back as it was before [`RawMode::enter`], if raw mode
/// is on. Safe to call from anywhere, any number of times. Failures (the
/// terminal is gone, e.g. after SIGHUP) are ignored: nothing is left to fix.
pub fn restore() {
    if let Some(s) = saved().take() {
        // TCSANOW: do not wait behind output to a terminal nobody reads.
        let _ = termios::tcsetattr(s.fd.as_fd(), SetArg::TCSANOW, &s.termios);
    }
}

/// Makes a panic restore the terminal before its message is printed (so
/// the message is readable and the shell usable). Installed once.
pub fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// Most bytes taken from the terminal per read (a paste arrives in pieces).
const TTY_READ: usize = 16 * 1024;

/// Keystrokes from a terminal, read on the runtime's own thread when the
/// event loop reports them: no thread hop per key, and no read left pending
/// once the session ends, so keys typed after it go to the shell, not to
/// a reader nobody listens to any more (as a blocking-thread reader would).
/// The descriptor stays in blocking mode (it is shared with the shell):
/// every read is preceded by a zero-timeout poll(2), so it never blocks.
#[derive(Debug)]
pub struct TtyReader {
    fd: AsyncFd<OwnedFd>,
}

impl TtyReader {
    /// Reads from (a duplicate of) `fd`, which must support epoll (a
    /// terminal, a pipe, a socket; not a regular file or /dev/null).
    pub fn new(fd: BorrowedFd<'_>) -> io::Result<TtyReader> {
        let owned = fd.try_clone_to_owned()?;
        // SAFETY: the `AsyncFd` owns the descriptor (an `OwnedFd`, never
        // swapped), so it stays open and the same for the registration's life.
        let fd = unsafe { AsyncFd::register_with_interest(owned, Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(TtyReader { fd })
    }
}

impl AsyncRead for TtyReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let fd = self.fd.get_ref().as_fd();
            // Readiness may be stale: look before reading (a hang-up or an
            // error counts as readable: the read then reports it).
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match nix::poll::poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => {
                    guard.clear_ready();
                    continue;
                }
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Poll::Ready(Err(e.into())),
            }
            let room = buf.remaining().min(TTY_READ);
            let unfilled = buf.initialize_unfilled_to(room);
            match nix::unistd::read(fd, unfilled) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    continue;
                }
                // A terminal that hung up: end of input.
                Err(Errno::EIO) => return Poll::Ready(Ok(())),
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

/// The window size of the terminal on `fd`; `None` when it is not a
/// terminal or reports no size (0x0).
pub fn window_size(fd: BorrowedFd<'_>) -> Option<TerminalSize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` to the valid pointer given;
    // the descriptor is borrowed for the duration of the call.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &raw mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some(TerminalSize {
        width: ws.ws_col,
        height: ws.ws_row,
    })
}

/// The `term` to send: the local `TERM`, or [`DEFAULT_TERM`].
pub fn term_name(local: Option<&str>) -> String {
    match local.map(str::trim) {
        Some(t) if !t.is_empty() => t.to_string(),
        _ => DEFAULT_TERM.to_string(),
    }
}

/// Text for a terminal that may be in raw mode (no output processing):
/// every "\n" not already preceded by "\r" becomes "\r\n".
pub fn crlf(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() + 8);
    let mut previous = 0u8;
    for &b in text {
        if b == b'\n' && previous != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        previous = b;
    }
    out
}

/// The escape character, as in ssh.
pub const ESCAPE_CHAR: u8 = b'~';

/// What `~?` prints (with "\n" line ends; see [`crlf`]).
pub const ESCAPE_HELP: &str = "\
Supported escape sequences:
 ~.   - disconnect
 ~?   - this message
 ~~   - send the escape character by typing it twice
(Note that escapes are only recognized immediately after newline.)
";

/// A local command typed as an escape sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EscapeCommand {
    /// `~.`: leave the session.
    Disconnect,
    /// `~?`: print [`ESCAPE_HELP`].
    Help,
}

/// What one input byte turns into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing to send (yet): an escape character is held back.
    Hold,
    /// Send this byte.
    Send(u8),
    /// Send these two bytes (a held `~` that did not start an escape).
    SendTwo(u8, u8),
    /// Run a local command; nothing is sent.
    Command(EscapeCommand),
}

/// ssh-style escape recognition on the keystroke stream: at the start and
/// right after a newline (CR or LF), `~` starts an escape. `~.` disconnects,
/// `~?` prints help, `~~` sends one `~`, and `~` followed by anything else
/// sends both bytes. Pure: no I/O, so it is tested byte by byte.
#[derive(Debug, Clone)]
pub struct EscapeState {
    enabled: bool,
    at_line_start: bool,
    held: bool,
}

impl Default for EscapeState {
    fn default() -> Self {
        EscapeState::new(true)
    }
}

impl EscapeState {
    /// `enabled: false` passes every byte through unchanged.
    pub fn new(enabled: bool) -> EscapeState {
        EscapeState {
            enabled,
            at_line_start: true,
            held: false,
        }
    }

    /// Whether an escape character is held back, waiting for the next byte.
    pub fn holding(&self) -> bool {
        self.held
    }

    /// Feeds one byte.
    pub fn step(&mut self, b: u8) -> Step {
        if !self.enabled {
            return Step::Send(b);
        }
        if self.held {
            self.held = false;
            return match b {
                b'.' => Step::Command(EscapeCommand::Disconnect),
                // Still at a line start: another escape may follow.
                b'?' => Step::Command(EscapeCommand::Help),
                ESCAPE_CHAR => {
                    self.at_line_start = false;
                    Step::Send(ESCAPE_CHAR)
                }
                other => {
                    self.at_line_start = is_newline(other);
                    Step::SendTwo(ESCAPE_CHAR, other)
                }
            };
        }
        if self.at_line_start && b == ESCAPE_CHAR {
            self.held = true;
            return Step::Hold;
        }
        self.at_line_start = is_newline(b);
        Step::Send(b)
    }

    /// Feeds `input` until the first command: the bytes to send are appended
    /// to `out`; returns how many input bytes were used and the command that
    /// stopped it, if any. Call again with the rest after a command.
    pub fn feed<X: Extend<u8>>(
        &mut self,
        input: &[u8],
        out: &mut X,
    ) -> (usize, Option<EscapeCommand>) {
        if !self.enabled {
            out.extend(input.iter().copied());
            return (input.len(), None);
        }
        for (i, &b) in input.iter().enumerate() {
            match self.step(b) {
                Step::Hold => {}
                Step::Send(x) => out.extend([x]),
                Step::SendTwo(x, y) => out.extend([x, y]),
                Step::Command(c) => return (i + 1, Some(c)),
            }
        }
        (input.len(), None)
    }
}

fn is_newline(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::termios::{InputFlags, LocalFlags, OutputFlags};

    /// Feeds everything, collecting sent bytes and commands in order.
    fn run(state: &mut EscapeState, input: &[u8]) -> (Vec<u8>, Vec<EscapeCommand>) {
        let mut out = Vec::new();
        let mut commands = Vec::new();
        let mut rest = input;
        while !rest.is_empty() {
            let (used, command) = state.feed(rest, &mut out);
            rest = &rest[used..];
            if let Some(c) = command {
                commands.push(c);
            }
        }
        (out, commands)
    }

    fn escapes(input: &[u8]) -> (Vec<u8>, Vec<EscapeCommand>) {
        run(&mut EscapeState::new(true), input)
    }

    #[test]
    fn tilde_dot_disconnects_at_start_and_after_newlines() {
        assert_eq!(escapes(b"~."), (vec![], vec![EscapeCommand::Disconnect]));
        assert_eq!(
            escapes(b"ls\r~."),
            (b"ls\r".to_vec(), vec![EscapeCommand::Disconnect])
        );
        assert_eq!(
            escapes(b"ls\n~."),
            (b"ls\n".to_vec(), vec![EscapeCommand::Disconnect])
        );
    }

    #[test]
    fn tilde_mid_line_is_plain_text() {
        assert_eq!(escapes(b"echo ~.x"), (b"echo ~.x".to_vec(), vec![]));
        assert_eq!(escapes(b"a~~"), (b"a~~".to_vec(), vec![]));
        assert_eq!(escapes(b"cd ~/x\r"), (b"cd ~/x\r".to_vec(), vec![]));
    }

    #[test]
    fn double_tilde_sends_one() {
        assert_eq!(escapes(b"~~"), (b"~".to_vec(), vec![]));
        // The sent ~ is text: a following ~. is not an escape.
        assert_eq!(escapes(b"~~~."), (b"~~.".to_vec(), vec![]));
        assert_eq!(escapes(b"\r~~/x"), (b"\r~/x".to_vec(), vec![]));
    }

    #[test]
    fn other_escapes_send_both_bytes() {
        assert_eq!(escapes(b"~x"), (b"~x".to_vec(), vec![]));
        assert_eq!(escapes(b"~/tmp\r"), (b"~/tmp\r".to_vec(), vec![]));
        // ~ then Enter: both go, and the line starts again.
        assert_eq!(
            escapes(b"~\r~."),
            (b"~\r".to_vec(), vec![EscapeCommand::Disconnect])
        );
        // Control bytes are not newlines.
        assert_eq!(escapes(b"\x03~."), (b"\x03~.".to_vec(), vec![]));
    }

    #[test]
    fn help_keeps_the_line_start() {
        assert_eq!(
            escapes(b"~?~."),
            (vec![], vec![EscapeCommand::Help, EscapeCommand::Disconnect])
        );
        assert_eq!(
            escapes(b"~?ls\r"),
            (b"ls\r".to_vec(), vec![EscapeCommand::Help])
        );
    }

    #[test]
    fn a_held_tilde_survives_chunk_boundaries() {
        let mut s = EscapeState::new(true);
        let mut out = Vec::new();
        assert_eq!(s.feed(b"pwd\r~", &mut out), (5, None));
        assert!(s.holding());
        assert_eq!(out, b"pwd\r");
        assert_eq!(s.feed(b".", &mut out), (1, Some(EscapeCommand::Disconnect)));
        assert_eq!(out, b"pwd\r");

        let mut s = EscapeState::new(true);
        let (out, _) = run(&mut s, b"~");
        assert!(out.is_empty() && s.holding());
        let (out, _) = run(&mut s, b"~");
        assert_eq!(out, b"~");
        assert!(!s.holding());
    }

    #[test]
    fn feed_stops_at_each_command() {
        let mut s = EscapeState::new(true);
        let mut out = Vec::new();
        assert_eq!(s.feed(b"a\r~?b", &mut out), (4, Some(EscapeCommand::Help)));
        assert_eq!(out, b"a\r");
        assert_eq!(s.feed(b"b", &mut out), (1, None));
        assert_eq!(out, b"a\rb");
    }

    #[test]
    fn disabled_escapes_pass_everything() {
        assert_eq!(
            run(&mut EscapeState::new(false), b"~.\r~~~?"),
            (b"~.\r~~~?".to_vec(), vec![])
        );
        assert_eq!(EscapeState::new(false).step(b'~'), Step::Send(b'~'));
    }

    #[test]
    fn control_keys_go_through() {
        for key in [0x03u8, 0x1a, 0x04, 0x1c, 0x7f, 0x1b] {
            assert_eq!(escapes(&[key]), (vec![key], vec![]), "{key:#x}");
        }
    }

    #[test]
    fn crlf_for_raw_terminals() {
        assert_eq!(crlf(b"a\nb\r\nc"), b"a\r\nb\r\nc");
        assert_eq!(crlf(b"\n\n"), b"\r\n\r\n");
        assert_eq!(crlf(b"none"), b"none");
    }

    #[test]
    fn term_names() {
        assert_eq!(term_name(Some("screen-256color")), "screen-256color");
        assert_eq!(term_name(Some(" ")), DEFAULT_TERM);
        assert_eq!(term_name(None), DEFAULT_TERM);
    }

    #[test]
    fn raw_settings_are_cfmakeraw() {
        // SAFETY: termios is plain data; all-zero is a valid value.
        let mut base: libc::termios = unsafe { std::mem::zeroed() };
        base.c_lflag = (libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN) as _;
        base.c_iflag = (libc::ICRNL | libc::IXON) as _;
        base.c_oflag = (libc::OPOST | libc::ONLCR) as _;
        let cooked = Termios::from(base);
        let raw = raw_settings(&cooked);
        for flag in [
            LocalFlags::ECHO,
            LocalFlags::ICANON,
            LocalFlags::ISIG,
            LocalFlags::IEXTEN,
        ] {
            assert!(!raw.local_flags.contains(flag), "{flag:?}");
        }
        assert!(!raw.input_flags.contains(InputFlags::ICRNL));
        assert!(!raw.input_flags.contains(InputFlags::IXON));
        assert!(!raw.output_flags.contains(OutputFlags::OPOST));
        assert_eq!(raw.control_chars[libc::VMIN], 1);
        assert_eq!(raw.control_chars[libc::VTIME], 0);
        // The original is untouched (it is what gets restored).
        assert!(cooked.local_flags.contains(LocalFlags::ECHO));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tty_reader_reads_keys_as_they_come() {
        use std::io::Write;
        use tokio::io::AsyncReadExt;
        let pty = nix::pty::openpty(None, None).unwrap();
        // Raw without the guard: the process-wide slot belongs to the
        // other test.
        let cooked = termios::tcgetattr(pty.slave.as_fd()).unwrap();
        termios::tcsetattr(pty.slave.as_fd(), SetArg::TCSANOW, &raw_settings(&cooked)).unwrap();
        let mut keys = TtyReader::new(pty.slave.as_fd()).unwrap();
        let mut master = std::fs::File::from(pty.master);
        let mut buf = [0u8; 64];
        for key in [&b"a"[..], b"\x03", b"~.", b"\r"] {
            master.write_all(key).unwrap();
            let n = tokio::time::timeout(std::time::Duration::from_secs(5), keys.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], key);
        }
        // Nothing typed: no read completes (and none is left pending).
        let idle =
            tokio::time::timeout(std::time::Duration::from_millis(50), keys.read(&mut buf)).await;
        assert!(idle.is_err());
        master.write_all(b"later").unwrap();
        let n = keys.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"later");
        // The master gone: end of input, not an error.
        drop(master);
        assert_eq!(keys.read(&mut buf).await.unwrap(), 0);
    }

    /// The guard on a real pseudo-terminal: raw while alive, restored on
    /// drop, on an explicit restore, and by the process-wide [`restore`]
    /// (the panic hook's and the signal handlers' way).
    #[test]
    fn raw_mode_is_restored_on_every_path() {
        let size = libc::winsize {
            ws_row: 30,
            ws_col: 100,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).unwrap();
        let tty = pty.slave.as_fd();
        assert_eq!(
            window_size(tty),
            Some(TerminalSize {
                width: 100,
                height: 30
            })
        );
        let before = termios::tcgetattr(tty).unwrap();
        assert!(before.local_flags.contains(LocalFlags::ECHO));
        let same = |t: &Termios| {
            let (a, b): (libc::termios, libc::termios) = (t.clone().into(), before.clone().into());
            (a.c_iflag, a.c_oflag, a.c_cflag, a.c_lflag, a.c_cc)
                == (b.c_iflag, b.c_oflag, b.c_cflag, b.c_lflag, b.c_cc)
        };

        // Drop.
        let guard = RawMode::enter(tty).unwrap();
        let now = termios::tcgetattr(tty).unwrap();
        assert!(!now.local_flags.contains(LocalFlags::ECHO));
        assert!(!now.local_flags.contains(LocalFlags::ISIG));
        assert!(is_raw());
        drop(guard);
        assert!(same(&termios::tcgetattr(tty).unwrap()));
        assert!(!is_raw());

        // The process-wide restore (panic hook, signals), then the drop.
        let guard = RawMode::enter(tty).unwrap();
        restore();
        assert!(same(&termios::tcgetattr(tty).unwrap()));
        restore();
        drop(guard);
        assert!(same(&termios::tcgetattr(tty).unwrap()));

        // A panic while raw: the hook restores before unwinding finishes.
        install_panic_hook();
        let result = std::panic::catch_unwind(|| {
            let _guard = RawMode::enter(tty).unwrap();
            panic!("boom");
        });
        assert!(result.is_err());
        assert!(same(&termios::tcgetattr(tty).unwrap()));

        // Not a terminal: refused, nothing saved.
        let (r, _w) = std::io::pipe().unwrap();
        assert!(RawMode::enter(r.as_fd()).is_err());
        assert!(!is_raw());
        assert_eq!(window_size(r.as_fd()), None);
    }
}
