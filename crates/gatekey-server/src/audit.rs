//! Writing the audit log: what is captured, typed-line reconstruction for
//! console input, bounded output capture, and retention.

use std::time::Duration;

use crate::api::error::{ApiError, ApiResult};
use crate::auth::Caller;
use crate::state::State;
use crate::store::{NewAuditRecord, Note, StoreError};

/// How much of a session the log keeps (`audit_capture`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Capture {
    /// Actions only (session opened and closed, with the exec command line).
    Off,
    /// Also every line typed into a console.
    Commands,
    /// Also the output, up to `audit_output_limit` bytes per session.
    Full,
}

impl Capture {
    pub fn parse(s: &str) -> Option<Capture> {
        match s {
            "off" => Some(Capture::Off),
            "commands" => Some(Capture::Commands),
            "full" => Some(Capture::Full),
            _ => None,
        }
    }
}

impl NewAuditRecord {
    pub fn new(action: &str) -> NewAuditRecord {
        NewAuditRecord {
            action: action.to_string(),
            outcome: "ok",
            detail: serde_json::json!({}),
            ..Default::default()
        }
    }

    /// Who did it and from where.
    pub fn by(mut self, caller: &Caller) -> Self {
        self.user = Some(caller.user.name.clone());
        self.remote_addr = caller.addr.map(|a| a.to_string());
        self
    }

    pub fn outcome(mut self, outcome: &'static str) -> Self {
        self.outcome = outcome;
        self
    }

    pub fn agent(mut self, agent: &str) -> Self {
        self.agent = Some(agent.to_string());
        self
    }

    pub fn session(mut self, id: &str) -> Self {
        self.session_id = Some(id.to_string());
        self
    }

    pub fn detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = detail;
        self
    }
}

impl State {
    /// Records an action; the caller must not acknowledge it unless this
    /// succeeds.
    pub async fn audit(&self, record: NewAuditRecord) -> ApiResult<()> {
        self.append(&record, None).await.map_err(|e| {
            tracing::error!(error = %e, action = %record.action, "audit record not written");
            ApiError::internal(format!("the audit record could not be written: {e}"))
        })
    }

    /// Records something that has already happened (an agent went away, a
    /// session ended on its own); a failure is logged loudly. Returns
    /// whether the record was written.
    pub async fn audit_after(&self, record: NewAuditRecord) -> bool {
        self.audit_after_noting(record, None).await
    }

    /// [`State::audit_after`], noting or dropping a closing record owed in
    /// the same transaction (crate::lease).
    pub async fn audit_after_noting(
        &self,
        record: NewAuditRecord,
        note: Option<&Note<'_>>,
    ) -> bool {
        match self.append(&record, note).await {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, action = %record.action, "audit record lost");
                false
            }
        }
    }

    /// Appends `record`. A session's opening also notes the record that
    /// closes it should this control plane die first, and its closing drops
    /// the note, in the same transaction.
    async fn append(
        &self,
        record: &NewAuditRecord,
        note: Option<&Note<'_>>,
    ) -> Result<(), StoreError> {
        let opened = crate::lease::closing_of_session(record);
        let closed = (record.action == "session.closed")
            .then(|| record.session_id.as_deref().map(crate::lease::session_key))
            .flatten();
        let session_note = match (&opened, &closed) {
            (Some((key, closing)), _) => Some(Note::Owe {
                key,
                instance: &self.instance,
                closing,
            }),
            (None, Some(key)) => Some(Note::Paid { key }),
            _ => None,
        };
        self.store
            .append_audit_noting(record, note.or(session_note.as_ref()))
            .await
            .map(drop)
    }
}

/// Rebuilds the lines a user typed into a terminal: printable text,
/// backspace and ^U edit the line, escape sequences (arrows, function keys)
/// are dropped, other controls appear as ^X, Enter ends the line.
#[derive(Default)]
pub struct LineCapture {
    line: Vec<u8>,
    escape: Escape,
}

#[derive(Default, Clone, Copy, PartialEq)]
enum Escape {
    #[default]
    None,
    /// After ESC.
    Start,
    /// Inside a CSI/SS3 sequence, until its final byte.
    Sequence,
}

/// Longest line kept; the rest of a longer one is dropped.
const MAX_LINE: usize = 4096;

impl LineCapture {
    /// Feeds input; returns the lines it completed.
    pub fn feed(&mut self, input: &[u8]) -> Vec<String> {
        let mut done = Vec::new();
        for &b in input {
            match self.escape {
                Escape::Start => {
                    self.escape = if b == b'[' || b == b'O' {
                        Escape::Sequence
                    } else {
                        Escape::None
                    };
                    continue;
                }
                Escape::Sequence => {
                    if (0x40..=0x7e).contains(&b) {
                        self.escape = Escape::None;
                    }
                    continue;
                }
                Escape::None => {}
            }
            match b {
                b'\r' | b'\n' => {
                    if !self.line.is_empty() {
                        done.push(String::from_utf8_lossy(&self.line).into_owned());
                        self.line.clear();
                    }
                }
                0x1b => self.escape = Escape::Start,
                0x7f | 0x08 => {
                    // Remove one whole UTF-8 character.
                    while let Some(c) = self.line.pop() {
                        if c & 0xc0 != 0x80 {
                            break;
                        }
                    }
                }
                0x15 => self.line.clear(),
                b'\t' => self.push(b"\t"),
                c if c < 0x20 => self.push(&[b'^', c + 0x40]),
                c => self.push(&[c]),
            }
        }
        done
    }

    fn push(&mut self, bytes: &[u8]) {
        if self.line.len() + bytes.len() <= MAX_LINE {
            self.line.extend_from_slice(bytes);
        }
    }
}

/// Keeps the first `limit` bytes of a session's output.
pub struct OutputCapture {
    kept: Vec<u8>,
    limit: usize,
    total: u64,
}

impl OutputCapture {
    pub fn new(limit: usize) -> OutputCapture {
        OutputCapture {
            kept: Vec::new(),
            limit,
            total: 0,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.total += bytes.len() as u64;
        let room = self.limit.saturating_sub(self.kept.len());
        self.kept.extend_from_slice(&bytes[..room.min(bytes.len())]);
    }

    /// The record's detail: the text, and a truncation marker past the cap.
    pub fn detail(&self) -> serde_json::Value {
        let truncated = self.total > self.kept.len() as u64;
        let mut text = String::from_utf8_lossy(&self.kept).into_owned();
        if truncated {
            text.push_str(&format!(
                "\n[gatekey: output truncated after {} of {} bytes]",
                self.kept.len(),
                self.total
            ));
        }
        serde_json::json!({"output": text, "bytes": self.total, "truncated": truncated})
    }

    pub fn is_empty(&self) -> bool {
        self.total == 0
    }
}

/// Prunes records older than `audit_retention` once an hour (and at start).
pub async fn retention(state: std::sync::Arc<State>) {
    let keep = state.config.audit_retention;
    if keep.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let cutoff = crate::store::now_ms() - keep.as_millis() as i64;
        match state.store.prune_audit(cutoff).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(removed = n, "audit retention pruned old records");
                state
                    .audit_after(
                        NewAuditRecord::new("audit.pruned").detail(serde_json::json!({
                            "removed": n,
                            "older_than": crate::api::format_time(cutoff),
                        })),
                    )
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "audit retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_lines() {
        let mut c = LineCapture::default();
        assert!(c.feed(b"ls -").is_empty());
        assert_eq!(c.feed(b"l\r"), vec!["ls -l"]);
        // Backspace, arrows dropped, ^C shown.
        assert_eq!(c.feed(b"echo hx\x7fi\x1b[A\x1bOB\r"), vec!["echo hi"]);
        assert_eq!(c.feed(b"sleep 9\x03\r"), vec!["sleep 9^C"]);
        assert_eq!(c.feed(b"junk\x15pwd\n\r"), vec!["pwd"]);
        // A multi-byte character is erased whole.
        assert_eq!(c.feed("é\x7fok\r".as_bytes()), vec!["ok"]);
        let long = vec![b'a'; 10_000];
        let lines = c.feed(&[long.as_slice(), b"\r"].concat());
        assert_eq!(lines[0].len(), MAX_LINE);
    }

    #[test]
    fn output_is_capped_with_a_marker() {
        let mut o = OutputCapture::new(5);
        o.feed(b"abc");
        o.feed(b"defgh");
        let d = o.detail();
        assert_eq!(d["bytes"], 8);
        assert_eq!(d["truncated"], true);
        assert!(
            d["output"]
                .as_str()
                .unwrap()
                .starts_with("abcde\n[gatekey: output truncated after 5 of 8 bytes]")
        );
        let mut small = OutputCapture::new(100);
        small.feed(b"hi");
        assert_eq!(small.detail()["truncated"], false);
    }
}
