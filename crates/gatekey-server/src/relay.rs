//! The admin stream relay: a client WebSocket speaking the Kubernetes channel
//! protocol on one side, an agent-link stream on the other. It only moves
//! bytes: agent output is forwarded without copying (an agent data message
//! minus its 5-byte header *is* a channel message) and credit goes back to
//! the agent only once the client's socket has taken the bytes.

use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use gatekey_proto::channel::{self, Status, TerminalSize};
use gatekey_proto::link::CH_STDIN;
use gatekey_proto::mux::{Event, LinkClosed, Stream, StreamHandle};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::session::exit_status;
use crate::ws::ServerWs;

/// Most agent messages forwarded before one flush.
const BATCH: usize = 32;

/// Why the client → agent half stopped.
enum InputEnd {
    /// The client closed its WebSocket or vanished: end the remote process.
    ClientGone,
    /// The stream ended on the agent's side; its final event is on the way.
    StreamEnded,
}

/// Relays one session. `close_timeout` bounds sending the final status and
/// the close handshake to a client that may have stopped reading.
pub async fn relay(ws: ServerWs, mut stream: Stream, v5: bool, close_timeout: Duration) {
    let (mut tx, rx) = ws.split();
    let mut input = tokio::spawn(client_input(rx, stream.handle(), v5));
    let mut input_done = false;

    let status = loop {
        tokio::select! {
            // Agent events first: an exit that races the client's input ending
            // must still reach the client as its status.
            biased;
            event = stream.next() => {
                let Some(event) = event else {
                    break Status::failure(channel::REASON_INTERNAL, "session ended without an exit status");
                };
                match event {
                    Event::Data(first) => {
                        // Forward this and whatever else is queued, then flush once.
                        let mut consumed = first.len();
                        let mut failed = tx.feed(Message::Binary(first.channel_message())).await.is_err();
                        let mut pending = None;
                        for _ in 0..BATCH {
                            if failed {
                                break;
                            }
                            match stream.try_next() {
                                Some(Event::Data(d)) => {
                                    consumed += d.len();
                                    failed = tx.feed(Message::Binary(d.channel_message())).await.is_err();
                                }
                                Some(other) => {
                                    pending = Some(other);
                                    break;
                                }
                                None => break,
                            }
                        }
                        if failed || tx.flush().await.is_err() {
                            stream.handle().cancel("client connection lost").await;
                            input.abort();
                            return;
                        }
                        stream.consumed(consumed);
                        if let Some(final_status) = pending.and_then(final_event) {
                            break final_status;
                        }
                    }
                    other => {
                        if let Some(final_status) = final_event(other) {
                            break final_status;
                        }
                    }
                }
            }
            end = &mut input, if !input_done => {
                input_done = true;
                if !matches!(end, Ok(InputEnd::StreamEnded)) {
                    stream.handle().cancel("client disconnected").await;
                    return;
                }
            }
        }
    };
    input.abort();
    let finish = async {
        tx.send(Message::Binary(Bytes::from(status.to_message())))
            .await?;
        tx.send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        })))
        .await?;
        tx.close().await
    };
    let _ = tokio::time::timeout(close_timeout, finish).await;
}

/// Client → agent: stdin (waiting for credit, so a fast client is slowed by
/// TCP backpressure rather than buffered), resize, and stdin EOF (once).
async fn client_input(mut rx: SplitStream<ServerWs>, handle: StreamHandle, v5: bool) -> InputEnd {
    let mut stdin_closed = false;
    let mut ahead: Option<Message> = None;
    loop {
        let msg = match ahead.take() {
            Some(m) => m,
            None => match rx.next().await {
                Some(Ok(m)) => m,
                _ => return InputEnd::ClientGone,
            },
        };
        let data = match msg {
            Message::Binary(d) => d,
            Message::Close(_) => return InputEnd::ClientGone,
            _ => continue,
        };
        let Some(&ch) = data.first() else { continue };
        let sent = match ch {
            channel::STDIN if !stdin_closed && data.len() > 1 => {
                // While waiting for credit, read one message ahead so that a
                // client that closes (Ctrl-C) is noticed even though the
                // remote process is not reading its stdin.
                let send = handle.send_data(CH_STDIN, data.slice(1..));
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => break r,
                        m = rx.next(), if ahead.is_none() => match m {
                            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return InputEnd::ClientGone,
                            Some(Ok(m)) => ahead = Some(m),
                        },
                    }
                }
            }
            channel::RESIZE => match serde_json::from_slice::<TerminalSize>(&data[1..]) {
                Ok(size) => {
                    handle
                        .send_resize(size.width as u32, size.height as u32)
                        .await
                }
                Err(_) => Ok(()),
            },
            channel::CLOSE if v5 && data.get(1) == Some(&channel::STDIN) && !stdin_closed => {
                stdin_closed = true;
                handle.send_eof(CH_STDIN).await
            }
            _ => Ok::<(), LinkClosed>(()),
        };
        if sent.is_err() {
            return InputEnd::StreamEnded;
        }
    }
}

/// The status to send for an event that ends the session, if it does.
fn final_event(event: Event) -> Option<Status> {
    match event {
        Event::Exit(x) => Some(exit_status(&x)),
        Event::Cancelled(r) => Some(Status::failure(
            channel::REASON_SESSION_LOST,
            format!("the agent ended the session: {r}"),
        )),
        Event::LinkClosed(r) => Some(Status::failure(
            channel::REASON_SESSION_LOST,
            format!("the agent's link closed: {r}"),
        )),
        Event::Rejected(r) => Some(Status::failure(channel::REASON_INTERNAL, r.message)),
        Event::Data(_) | Event::Eof(_) | Event::Accepted(_) | Event::Resize(_) => None,
    }
}
