//! Built-in network diagnostics on the node (`Open` kind `diag`): ping,
//! nslookup, traceroute, nc and nmap run inside the agent through
//! gatekey-diag — no shell, no process. One JSON event per line goes out on
//! stdout as it happens, then `Exit`: 0 the target answered, 1 it did not,
//! 2 the run could not take place (the message says why).

use bytes::Bytes;
use gatekey_diag::{Detached, Limits, Request};
use gatekey_proto::link::{CH_STDOUT, Diag, Exit, RejectCode, exit};
use gatekey_proto::mux::{Event, Stream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tracing::info;

/// Exit codes of a diagnostic stream.
pub const ANSWERED: i32 = 0;
pub const NO_ANSWER: i32 = 1;
pub const FAILED: i32 = 2;

/// Parses and checks a request; the error is for the administrator.
pub fn parse(diag: &Diag, limits: &Limits) -> Result<Request, String> {
    let request: Request = serde_json::from_str(&diag.request_json)
        .map_err(|e| format!("invalid diagnostic request: {e}"))?;
    request.validate(limits).map_err(|e| e.to_string())?;
    Ok(request)
}

/// Runs one diagnostic on `stream`; `permit` counts it as a session.
pub async fn serve(
    mut stream: Stream,
    request: Request,
    limits: Limits,
    user: String,
    _permit: OwnedSemaphorePermit,
) {
    let id = stream.id();
    let Ok(request_json) = serde_json::to_string(&request) else {
        stream
            .reject(RejectCode::Invalid, "request cannot be encoded")
            .await;
        return;
    };
    if stream.accept(0).await.is_err() {
        return;
    }
    info!(stream = id, "diagnostic for {user}: {request_json}");
    let handle = stream.handle();
    let (tx, mut events) = mpsc::channel(16);
    // Dropping `run` (cancel, link loss) stops the diagnostic.
    let run = Detached::start(request, limits, tx).finish();
    tokio::pin!(run);
    let result = loop {
        tokio::select! {
            // Events first, so the last ones go out before the result.
            biased;
            Some(event) = events.recv() => {
                let mut line = serde_json::to_vec(&event).unwrap_or_default();
                line.push(b'\n');
                if handle.send_data(CH_STDOUT, Bytes::from(line)).await.is_err() {
                    return;
                }
            }
            r = &mut run => {
                // Events still queued go out before the exit.
                while let Ok(event) = events.try_recv() {
                    let mut line = serde_json::to_vec(&event).unwrap_or_default();
                    line.push(b'\n');
                    if handle.send_data(CH_STDOUT, Bytes::from(line)).await.is_err() {
                        return;
                    }
                }
                break r;
            }
            ev = stream.next() => match ev {
                // Dropping the run stops every probe and closes its sockets.
                None | Some(Event::Cancelled(_)) | Some(Event::LinkClosed(_)) => {
                    info!(stream = id, "diagnostic for {user} cancelled");
                    return;
                }
                Some(Event::Data(d)) => stream.consumed(d.len()),
                Some(_) => {}
            },
        }
    };
    let (code, message) = match result {
        Ok(o) if o.success => (ANSWERED, o.summary),
        Ok(o) => (NO_ANSWER, o.summary),
        Err(e) => (FAILED, e.to_string()),
    };
    info!(
        stream = id,
        code, "diagnostic for {user} finished: {message}"
    );
    let _ = handle
        .send_exit(Exit {
            stream_id: 0,
            status: Some(exit::Status::Code(code)),
            timed_out: false,
            message,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use gatekey_proto::link::{Open, open};
    use gatekey_proto::mux::{Mux, OpenError};

    use super::*;
    use crate::test_support::{OPEN_TIMEOUT, code, collect, config, link, within};

    async fn open_diag(
        server: &Mux,
        json: &str,
    ) -> Result<(Stream, gatekey_proto::link::Accept), OpenError> {
        let open = Open {
            user: "tester".into(),
            kind: Some(open::Kind::Diag(Diag {
                request_json: json.into(),
            })),
            ..Default::default()
        };
        server.open(open, OPEN_TIMEOUT).await
    }

    #[tokio::test]
    async fn events_as_lines_then_the_exit() {
        let (server, _agent, _exec) = link(config(true)).await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let json = format!(r#"{{"tool":"nc","host":"127.0.0.1","port":{port}}}"#);
        let (mut stream, accept) = open_diag(&server, &json).await.expect("accepted");
        assert_eq!(accept.pid, 0);
        let out = within("the exit", collect(&mut stream)).await;
        let lines: Vec<gatekey_diag::Event> = String::from_utf8(out.stdout.clone())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(
            matches!(lines[0], gatekey_diag::Event::Connect { .. }),
            "{lines:?}"
        );
        assert_eq!(code(&out), Some(exit::Status::Code(ANSWERED)));
        drop(listener);
        let (mut stream, _) = open_diag(&server, &json).await.expect("accepted");
        let out = within("the exit", collect(&mut stream)).await;
        assert_eq!(code(&out), Some(exit::Status::Code(NO_ANSWER)));
    }

    #[tokio::test]
    async fn refusals_name_the_cause() {
        let (server, _agent, _exec) = link(config(true)).await;
        for (json, want) in [
            (r#"{"tool":"nc","host":"127.0.0.1","port":0}"#, "--port"),
            (r#"{"tool":"sh","host":"x"}"#, "invalid diagnostic request"),
            (r#"{"tool":"ping","host":"-x"}"#, "host"),
        ] {
            match open_diag(&server, json).await {
                Err(OpenError::Rejected { code, message }) => {
                    assert_eq!(code, RejectCode::Invalid);
                    assert!(message.contains(want), "{json}: {message}");
                }
                other => panic!("{json}: {:?}", other.map(|_| ())),
            }
        }
        let (server, _agent, _exec) = link(config(false)).await;
        match open_diag(&server, r#"{"tool":"nc","host":"127.0.0.1","port":1}"#).await {
            Err(OpenError::Rejected { code, .. }) => assert_eq!(code, RejectCode::SessionsDisabled),
            other => panic!("{:?}", other.map(|_| ())),
        }
    }
}
