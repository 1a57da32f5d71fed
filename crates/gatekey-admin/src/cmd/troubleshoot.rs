//! `troubleshoot ping|nslookup|traceroute|nc|nmap … [--location LOC]` and
//! `troubleshoot list` (docs/cli.md "Network troubleshooting"). Lines are
//! printed as the tool produces them; `-o json` prints every event and the
//! result at the end.

use std::time::Duration;

use gatekey_diag::Event;
use serde_json::{Map, Value, json};

use crate::cli::{self, Context, TroubleshootCommand};
use crate::error::ClientError;
use crate::exit;
use crate::output::{self, OutputFormat};

/// Longest silence between two lines of a running tool (a scan of filtered
/// ports or a silent hop); the control plane bounds every tool's run time.
const IDLE: Duration = Duration::from_secs(600);

pub async fn run(ctx: &Context, command: TroubleshootCommand) -> Result<i32, ClientError> {
    let (request, location) = match command {
        TroubleshootCommand::List => return list(ctx).await,
        TroubleshootCommand::Ping {
            host,
            count,
            interval,
            timeout,
            size,
            at,
        } => {
            let mut r = base("ping", host);
            put(&mut r, "count", count.map(Value::from));
            put(&mut r, "interval_ms", millis("--interval", interval)?);
            put(&mut r, "timeout_ms", millis("--timeout", timeout)?);
            put(&mut r, "size", size.map(Value::from));
            (r, at.location)
        }
        TroubleshootCommand::Nslookup {
            host,
            record_type,
            server,
            timeout,
            at,
        } => {
            let mut r = base("nslookup", host);
            put(
                &mut r,
                "type",
                record_type.map(|t| Value::from(t.to_ascii_uppercase())),
            );
            put(&mut r, "server", server.map(Value::from));
            put(&mut r, "timeout_ms", millis("--timeout", timeout)?);
            (r, at.location)
        }
        TroubleshootCommand::Traceroute {
            host,
            max_hops,
            queries,
            timeout,
            icmp,
            numeric,
            at,
        } => {
            let mut r = base("traceroute", host);
            put(&mut r, "max_hops", max_hops.map(Value::from));
            put(&mut r, "queries", queries.map(Value::from));
            put(&mut r, "timeout_ms", millis("--timeout", timeout)?);
            put(&mut r, "method", icmp.then(|| Value::from("icmp")));
            put(&mut r, "numeric", numeric.then_some(Value::Bool(true)));
            (r, at.location)
        }
        TroubleshootCommand::Nc {
            host,
            port,
            timeout,
            banner,
            at,
        } => {
            let mut r = base("nc", host);
            put(&mut r, "port", Some(Value::from(port)));
            put(&mut r, "timeout_ms", millis("--timeout", timeout)?);
            put(&mut r, "banner", banner.then_some(Value::Bool(true)));
            (r, at.location)
        }
        TroubleshootCommand::Nmap {
            host,
            ports,
            timeout,
            concurrency,
            at,
        } => {
            let mut r = base("nmap", host);
            put(&mut r, "ports", ports.map(Value::from));
            put(&mut r, "timeout_ms", millis("--timeout", timeout)?);
            put(&mut r, "concurrency", concurrency.map(Value::from));
            (r, at.location)
        }
    };
    let request = Value::Object(request);
    let mut body = ctx
        .client()?
        .troubleshoot(&location, &request, IDLE)
        .await?;
    let text = ctx.output == OutputFormat::Table;
    let mut events = Vec::new();
    let mut last: Option<Value> = None;
    let mut pending = Vec::new();
    while let Some(chunk) = body.chunk().await? {
        pending.extend_from_slice(&chunk);
        while let Some(at) = pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = pending.drain(..=at).collect();
            let value: Value = serde_json::from_slice(&raw[..at]).map_err(|e| {
                ClientError::Protocol(format!("troubleshoot: invalid line from the server: {e}"))
            })?;
            match value["event"].as_str() {
                Some("result") | Some("error") => last = Some(value),
                _ if text => match serde_json::from_value::<Event>(value) {
                    Ok(ev) => cli::print(&format!("{}\n", ev.text()))?,
                    Err(e) => {
                        return Err(ClientError::Protocol(format!(
                            "troubleshoot: unknown event from the server: {e}"
                        )));
                    }
                },
                _ => events.push(value),
            }
        }
    }
    let Some(last) = last else {
        return Err(ClientError::Protocol(
            "troubleshoot: the run ended without a result".into(),
        ));
    };
    if !text {
        let whole =
            json!({"location": location, "request": request, "events": events, "result": last});
        if let Some(out) = output::structured(ctx.output, &whole)? {
            cli::print(&out)?;
        }
    }
    if last["event"] == "error" {
        cli::warn(last["message"].as_str().unwrap_or("the tool could not run"));
        return Ok(exit::TROUBLESHOOT_FAILED);
    }
    Ok(if last["success"] == true {
        exit::OK
    } else {
        exit::FAILURE
    })
}

fn base(tool: &str, host: String) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("tool".into(), tool.into());
    m.insert("host".into(), host.into());
    m
}

fn put(m: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        m.insert(key.into(), v);
    }
}

/// `0.2` (seconds, as ping takes it) or `200ms`, `2s`: milliseconds.
fn millis(flag: &str, value: Option<String>) -> Result<Option<Value>, ClientError> {
    let Some(v) = value else { return Ok(None) };
    let d = match v.trim().parse::<f64>() {
        Ok(secs) if (0.0..=86_400.0).contains(&secs) => Duration::from_secs_f64(secs),
        Ok(_) => {
            return Err(ClientError::InvalidArgument(format!(
                "invalid {flag} {v:?}: use seconds (0.2) or a duration (200ms)"
            )));
        }
        Err(_) => gatekey_proto::duration::parse(&v)
            .map_err(|e| ClientError::InvalidArgument(format!("invalid {flag}: {e}")))?,
    };
    Ok(Some(Value::from(d.as_millis() as u64)))
}

async fn list(ctx: &Context) -> Result<i32, ClientError> {
    let l = ctx.client()?.troubleshoot_list().await?;
    if let Some(out) = output::structured(ctx.output, &l)? {
        cli::print(&out)?;
        return Ok(exit::OK);
    }
    let mut out = String::from("Available Tools:\n");
    for t in &l.tools {
        out.push_str(&format!("  {:<12} - {}\n", t.name, t.description));
    }
    out.push_str("\nExecution Locations:\n");
    if l.locations.is_empty() {
        out.push_str("  (none: your role or scopes allow no location)\n");
    }
    for loc in &l.locations {
        out.push_str(&format!("  {:<30} ({})\n", loc.location, loc.label));
    }
    cli::print(&out)?;
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            millis("--interval", Some("0.2".into())).unwrap(),
            Some(200.into())
        );
        assert_eq!(
            millis("--interval", Some("1500ms".into())).unwrap(),
            Some(1500.into())
        );
        assert_eq!(
            millis("--timeout", Some("2s".into())).unwrap(),
            Some(2000.into())
        );
        assert!(millis("--timeout", Some("-1".into())).is_err());
        assert!(millis("--timeout", Some("soon".into())).is_err());
        assert_eq!(millis("--timeout", None).unwrap(), None);
    }
}
