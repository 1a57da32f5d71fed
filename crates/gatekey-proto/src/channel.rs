//! The admin stream protocol: Kubernetes remote-command WebSocket framing
//! (`v5.channel.k8s.io`, and `v4.channel.k8s.io`), used by the CLI, the web
//! UI and any k8s-style client for exec and console sessions.
//!
//! Every binary message starts with a channel byte:
//! 0 stdin, 1 stdout, 2 stderr, 3 status (a Kubernetes `Status` JSON),
//! 4 resize (`{"Width":w,"Height":h}`), 255 close (v5 only: the next byte
//! names the channel that is half-closed, e.g. `[255, 0]` is stdin EOF).

use serde::{Deserialize, Serialize};

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
pub const STATUS: u8 = 3;
pub const RESIZE: u8 = 4;
pub const CLOSE: u8 = 255;

pub const V5: &str = "v5.channel.k8s.io";
pub const V4: &str = "v4.channel.k8s.io";
/// Subprotocols the server accepts, most preferred first.
pub const PROTOCOLS: [&str; 2] = [V5, V4];

/// A terminal size, as the resize channel carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The `command` part of the `metadata` query parameter.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MetadataCommand {
    #[serde(default)]
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
}

/// The `metadata` query parameter of the exec and console endpoints
/// (the shape flightctl's clients send).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    #[serde(default)]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<MetadataCommand>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initial_dimensions: Option<TerminalSize>,
    /// gatekey extension: a shell command line, run as `/bin/sh -c`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<String>,
    /// gatekey extension: kill the process after this many seconds.
    #[serde(
        default,
        alias = "timeout_seconds",
        skip_serializing_if = "Option::is_none"
    )]
    pub timeout_seconds: Option<u64>,
    /// gatekey extension: whether the client sends stdin (default true).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<bool>,
}

/// A Kubernetes `Status`, sent once on the status channel before the close.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// "Success" or "Failure".
    pub status: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// `NonZeroExitCode`, `Timeout`, `InternalError`, …
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<StatusDetails>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusDetails {
    #[serde(default)]
    pub causes: Vec<StatusCause>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusCause {
    pub reason: String,
    pub message: String,
}

/// Status reasons gatekey uses.
pub const REASON_NON_ZERO_EXIT: &str = "NonZeroExitCode";
pub const REASON_TIMEOUT: &str = "Timeout";
pub const REASON_INTERNAL: &str = "InternalError";
pub const REASON_CANCELLED: &str = "Cancelled";
/// The agent or its link went away mid-session (the CLI's "session lost").
pub const REASON_SESSION_LOST: &str = "ServiceUnavailable";
/// An administrator ended the session (`session kill`); the message says who.
pub const REASON_KILLED: &str = "SessionKilled";
/// Another user took the console over (`--force`); the message says who.
pub const REASON_TAKEN_OVER: &str = "SessionTakenOver";
/// The session saw no input and no output for the idle timeout.
pub const REASON_IDLE_TIMEOUT: &str = "IdleTimeout";
/// The session reached the control plane's maximum session duration.
pub const REASON_MAX_DURATION: &str = "MaxDurationExceeded";
pub const CAUSE_EXIT_CODE: &str = "ExitCode";
pub const CAUSE_SIGNAL: &str = "Signal";

impl Status {
    pub fn success() -> Status {
        Status {
            status: "Success".into(),
            ..Default::default()
        }
    }

    /// A process that exited with a non-zero code, or died of a signal
    /// (reported, as shells do, as exit code 128 + signal).
    pub fn exit(code: i32, signal: Option<i32>) -> Status {
        let (message, mut causes) = match signal {
            Some(sig) => (
                format!("command terminated by signal {sig}"),
                vec![StatusCause {
                    reason: CAUSE_SIGNAL.into(),
                    message: sig.to_string(),
                }],
            ),
            None => (
                format!("command terminated with non-zero exit code: {code}"),
                vec![],
            ),
        };
        causes.insert(
            0,
            StatusCause {
                reason: CAUSE_EXIT_CODE.into(),
                message: code.to_string(),
            },
        );
        Status {
            status: "Failure".into(),
            message,
            reason: REASON_NON_ZERO_EXIT.into(),
            details: Some(StatusDetails { causes }),
            ..Default::default()
        }
    }

    pub fn failure(reason: &str, message: impl Into<String>) -> Status {
        Status {
            status: "Failure".into(),
            reason: reason.into(),
            message: message.into(),
            ..Default::default()
        }
    }

    /// The exit code this status stands for: 0 on success, the `ExitCode`
    /// cause when present, `None` for failures that are not an exit.
    pub fn exit_code(&self) -> Option<i32> {
        if self.status == "Success" {
            return Some(0);
        }
        self.details
            .as_ref()?
            .causes
            .iter()
            .find(|c| c.reason == CAUSE_EXIT_CODE)
            .and_then(|c| c.message.parse().ok())
    }

    /// A channel-3 message carrying this status.
    pub fn to_message(&self) -> Vec<u8> {
        let mut m = vec![STATUS];
        serde_json::to_writer(&mut m, self).expect("status serializes");
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trip() {
        let s = Status::exit(3, None);
        let m = s.to_message();
        assert_eq!(m[0], STATUS);
        let back: Status = serde_json::from_slice(&m[1..]).unwrap();
        assert_eq!(back.exit_code(), Some(3));
        assert_eq!(back.reason, REASON_NON_ZERO_EXIT);
        assert_eq!(Status::success().exit_code(), Some(0));
        assert_eq!(Status::exit(137, Some(9)).exit_code(), Some(137));
        assert_eq!(Status::failure(REASON_TIMEOUT, "x").exit_code(), None);
    }

    #[test]
    fn metadata_flightctl_shape() {
        let m: Metadata = serde_json::from_str(
            r#"{"tty":true,"term":"xterm","command":{"command":"bash","args":["-l"]},"initialDimensions":{"Width":80,"Height":24}}"#,
        )
        .unwrap();
        assert!(m.tty);
        assert_eq!(m.command.unwrap().args, vec!["-l"]);
        assert_eq!(
            m.initial_dimensions,
            Some(TerminalSize {
                width: 80,
                height: 24
            })
        );
    }
}
