//! `audit list|verify|export` (docs/api.md "Audit log").

use std::io::Write;
use std::path::Path;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::api::AuditVerification;
use crate::cli::{self, AuditCommand, AuditFilterArgs, Context};
use crate::client::{AuditFilter, BodyStream};
use crate::error::ClientError;
use crate::exit;
use crate::output::{self, OutputFormat};

pub async fn run(ctx: &Context, command: AuditCommand) -> Result<i32, ClientError> {
    match command {
        AuditCommand::List { filter, limit } => {
            let filter = to_filter(&filter, OffsetDateTime::now_utc())?;
            let records = ctx.client()?.list_audit(&filter, limit).await?;
            match output::structured(ctx.output, &records)? {
                Some(text) => cli::print(&text)?,
                None if records.is_empty() => cli::warn("no audit record matches"),
                None => cli::print(&output::audit_table(&records))?,
            }
            Ok(exit::OK)
        }
        AuditCommand::Verify => {
            let v = ctx.client()?.verify_audit().await?;
            if let Some(text) = output::structured(ctx.output, &v)? {
                cli::print(&text)?;
            } else if v.ok {
                cli::print(&format!("{}\n", intact_line(&v)))?;
            }
            if v.ok {
                Ok(exit::OK)
            } else {
                cli::warn(&broken_line(&v));
                Ok(exit::AUDIT_BROKEN)
            }
        }
        AuditCommand::Export {
            filter,
            output_file,
        } => {
            let filter = to_filter(&filter, OffsetDateTime::now_utc())?;
            let body = ctx.client()?.export_audit(&filter).await?;
            match output_file {
                None => {
                    copy(body, cli::write_stdout).await?;
                }
                Some(path) => {
                    let lines = export_to_file(body, &path).await?;
                    if ctx.output == OutputFormat::Table {
                        cli::print(&format!(
                            "Exported {lines} audit record{} to {}.\n",
                            if lines == 1 { "" } else { "s" },
                            path.display()
                        ))?;
                    }
                }
            }
            Ok(exit::OK)
        }
    }
}

/// Writes the body chunk by chunk as it arrives; returns the number of
/// lines (records) written.
async fn copy(
    mut body: BodyStream,
    mut write: impl FnMut(&[u8]) -> Result<(), ClientError>,
) -> Result<u64, ClientError> {
    let mut lines = 0;
    while let Some(chunk) = body.chunk().await? {
        lines += chunk.iter().filter(|b| **b == b'\n').count() as u64;
        write(&chunk)?;
    }
    Ok(lines)
}

async fn export_to_file(body: BodyStream, path: &Path) -> Result<u64, ClientError> {
    let err = |e| ClientError::io(format!("cannot write {}", path.display()), e);
    let file = std::fs::File::create(path).map_err(err)?;
    let mut out = std::io::BufWriter::with_capacity(256 * 1024, file);
    let result = copy(body, |chunk| out.write_all(chunk).map_err(err)).await;
    let flushed = out
        .into_inner()
        .map_err(|e| err(e.into_error()))
        .and_then(|f| f.sync_all().map_err(err));
    match (result, flushed) {
        (Ok(lines), Ok(())) => Ok(lines),
        (Err(e), _) | (Ok(_), Err(e)) => {
            cli::warn(&format!("{} is incomplete", path.display()));
            Err(e)
        }
    }
}

/// "Audit chain intact: N records (seq A–B), head HASH".
fn intact_line(v: &AuditVerification) -> String {
    let range = match (v.first_seq, v.last_seq) {
        (Some(a), Some(b)) if v.records > 0 => {
            let pruned = if v.anchor.as_ref().is_some_and(|a| !a.is_null()) {
                ", older records pruned"
            } else {
                ""
            };
            format!(" (seq {a}–{b}{pruned})")
        }
        _ => String::new(),
    };
    let head = if v.head_hash.is_empty() {
        String::new()
    } else {
        format!(", head {}", v.head_hash)
    };
    format!(
        "Audit chain intact: {} record{}{range}{head}",
        v.records,
        if v.records == 1 { "" } else { "s" }
    )
}

/// "audit chain broken at record 17: record 17 was changed after it was written".
fn broken_line(v: &AuditVerification) -> String {
    let problem = v
        .problem
        .as_deref()
        .filter(|p| !p.is_empty())
        .unwrap_or("the hash chain does not match");
    match v.first_bad_seq {
        Some(seq) => format!("audit chain broken at record {seq}: {problem}"),
        None => format!("audit chain broken: {problem}"),
    }
}

fn to_filter(args: &AuditFilterArgs, now: OffsetDateTime) -> Result<AuditFilter, ClientError> {
    let nonempty = |o: &Option<String>| o.clone().filter(|s| !s.is_empty());
    if let Some(agent) = nonempty(&args.agent) {
        crate::client::check_ref("agent", &agent)?;
    }
    if let Some(user) = nonempty(&args.user) {
        crate::client::check_user_name(&user)?;
    }
    Ok(AuditFilter {
        action: nonempty(&args.action),
        agent: nonempty(&args.agent),
        user: nonempty(&args.user),
        since: args
            .since
            .as_deref()
            .map(|t| parse_time("--since", t, now))
            .transpose()?,
        until: args
            .until
            .as_deref()
            .map(|t| parse_time("--until", t, now))
            .transpose()?,
    })
}

/// A time for `--since`/`--until` as the API wants it (RFC 3339, UTC):
/// from RFC 3339, a date (midnight UTC), or a duration ago (`1h`, `7d`).
pub(crate) fn parse_time(
    flag: &str,
    text: &str,
    now: OffsetDateTime,
) -> Result<String, ClientError> {
    let text = text.trim();
    let time = if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        t
    } else if let Ok(d) = time::Date::parse(text, format_description!("[year]-[month]-[day]")) {
        d.midnight().assume_utc()
    } else if let Ok(ago) = gatekey_proto::duration::parse(text) {
        time::Duration::try_from(ago)
            .ok()
            .and_then(|ago| now.checked_sub(ago))
            .ok_or_else(|| {
                ClientError::InvalidArgument(format!("{flag} {text:?} is too long ago"))
            })?
    } else {
        return Err(ClientError::InvalidArgument(format!(
            "invalid {flag} {text:?}: use an RFC 3339 time (2026-11-23T10:00:00Z), a date (2026-11-23) or a time ago (1h, 7d)"
        )));
    };
    let utc = time.to_offset(time::UtcOffset::UTC);
    let utc = utc.replace_nanosecond(0).unwrap_or(utc);
    utc.format(&Rfc3339)
        .map_err(|e| ClientError::InvalidArgument(format!("{flag} {text:?}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_become_rfc3339_utc() {
        let now = OffsetDateTime::parse("2026-11-23T12:00:00.750Z", &Rfc3339).unwrap();
        for (input, want) in [
            ("2026-11-23T10:00:00Z", "2026-11-23T10:00:00Z"),
            ("2026-11-23T12:00:00+02:00", "2026-11-23T10:00:00Z"),
            ("2026-11-23", "2026-11-23T00:00:00Z"),
            ("1h", "2026-11-23T11:00:00Z"),
            ("7d", "2026-11-16T12:00:00Z"),
            ("90m", "2026-11-23T10:30:00Z"),
            ("3600", "2026-11-23T11:00:00Z"),
        ] {
            assert_eq!(parse_time("--since", input, now).unwrap(), want, "{input}");
        }
        for bad in ["yesterday", "2026-13-01", "1w", ""] {
            let e = parse_time("--since", bad, now).unwrap_err();
            assert_eq!(e.exit_code(), exit::INVALID_ARGUMENT, "{bad}");
            assert!(e.to_string().contains("--since"), "{e}");
        }
    }

    #[test]
    fn verification_lines() {
        let ok: AuditVerification = serde_json::from_value(serde_json::json!({
            "ok": true, "records": 42, "first_seq": 1, "last_seq": 42,
            "head_hash": "ab12", "anchor": null
        }))
        .unwrap();
        assert_eq!(
            intact_line(&ok),
            "Audit chain intact: 42 records (seq 1–42), head ab12"
        );
        let broken: AuditVerification = serde_json::from_value(serde_json::json!({
            "ok": false, "records": 42, "first_seq": 1, "last_seq": 42, "head_hash": "ab12",
            "anchor": null, "first_bad_seq": 17,
            "problem": "record 17 was changed after it was written"
        }))
        .unwrap();
        assert_eq!(
            broken_line(&broken),
            "audit chain broken at record 17: record 17 was changed after it was written"
        );
    }
}
