//! The agent link: framing of WebSocket binary messages and the control
//! messages generated from `proto/gatekey/link/v1/link.proto`.
//!
//! ```text
//! [0x00][protobuf Control]                           control message
//! [0x01][stream_id u32 BE][channel u8][payload…]     data
//! ```

use bytes::{BufMut, Bytes, BytesMut};
use prost::Message as _;

#[allow(clippy::all, missing_docs)]
mod generated {
    include!("gen/gatekey.link.v1.rs");
}
pub use generated::*;

/// Lowest link protocol version this build speaks.
pub const MIN_VERSION: u32 = 1;
/// Highest link protocol version this build speaks.
pub const MAX_VERSION: u32 = 1;

/// Kind byte of a control message.
pub const KIND_CONTROL: u8 = 0x00;
/// Kind byte of a data message.
pub const KIND_DATA: u8 = 0x01;
/// Length of a data message's header (kind, stream id, channel).
pub const DATA_HEADER_LEN: usize = 6;

/// Data channels (the Kubernetes remote-command numbering).
pub const CH_STDIN: u8 = 0;
pub const CH_STDOUT: u8 = 1;
pub const CH_STDERR: u8 = 2;

/// The WebSocket path agents dial.
pub const AGENT_PATH: &str = "/ws/agent";

/// A decoded agent-link message.
#[derive(Debug)]
pub enum Frame {
    Control(control::Msg),
    Data(DataFrame),
}

/// A data message, kept as the original buffer so relays can forward it
/// without copying.
#[derive(Debug, Clone)]
pub struct DataFrame {
    raw: Bytes,
}

impl DataFrame {
    pub fn stream_id(&self) -> u32 {
        u32::from_be_bytes([self.raw[1], self.raw[2], self.raw[3], self.raw[4]])
    }
    pub fn channel(&self) -> u8 {
        self.raw[5]
    }
    pub fn payload(&self) -> Bytes {
        self.raw.slice(DATA_HEADER_LEN..)
    }
    pub fn len(&self) -> usize {
        self.raw.len() - DATA_HEADER_LEN
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `[channel][payload]`: exactly an admin-stream (k8s channel protocol) message.
    pub fn channel_message(&self) -> Bytes {
        self.raw.slice(DATA_HEADER_LEN - 1..)
    }
}

/// Why a message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("empty message")]
    Empty,
    #[error("unknown message kind {0:#04x}")]
    UnknownKind(u8),
    #[error("data message shorter than its header")]
    ShortData,
    #[error("control message of {0} bytes exceeds the limit")]
    ControlTooLarge(usize),
    #[error("malformed control message: {0}")]
    Malformed(String),
    #[error("control message with no content")]
    EmptyControl,
}

/// Decodes one WebSocket binary message.
pub fn decode(raw: Bytes) -> Result<Frame, FrameError> {
    match raw.first() {
        None => Err(FrameError::Empty),
        Some(&KIND_CONTROL) => {
            if raw.len() > crate::limits::MAX_CONTROL_MESSAGE {
                return Err(FrameError::ControlTooLarge(raw.len()));
            }
            let ctl =
                Control::decode(&raw[1..]).map_err(|e| FrameError::Malformed(e.to_string()))?;
            ctl.msg.map(Frame::Control).ok_or(FrameError::EmptyControl)
        }
        Some(&KIND_DATA) => {
            if raw.len() < DATA_HEADER_LEN {
                return Err(FrameError::ShortData);
            }
            Ok(Frame::Data(DataFrame { raw }))
        }
        Some(&k) => Err(FrameError::UnknownKind(k)),
    }
}

/// Encodes a control message.
pub fn encode_control(msg: control::Msg) -> Bytes {
    let ctl = Control { msg: Some(msg) };
    let mut buf = BytesMut::with_capacity(1 + ctl.encoded_len());
    buf.put_u8(KIND_CONTROL);
    ctl.encode(&mut buf).expect("BytesMut grows");
    buf.freeze()
}

/// Encodes a data message, copying the payload after the header.
pub fn encode_data(stream_id: u32, channel: u8, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(DATA_HEADER_LEN + payload.len());
    put_data_header(&mut buf, stream_id, channel);
    buf.put_slice(payload);
    buf.freeze()
}

/// Writes a data header; callers that read into a buffer after it avoid a copy.
pub fn put_data_header(buf: &mut BytesMut, stream_id: u32, channel: u8) {
    buf.put_u8(KIND_DATA);
    buf.put_u32(stream_id);
    buf.put_u8(channel);
}

/// Picks the highest version both sides speak.
pub fn negotiate(peer_min: u32, peer_max: u32) -> Option<u32> {
    let v = peer_max.min(MAX_VERSION);
    (v >= peer_min.max(MIN_VERSION)).then_some(v)
}

/// The stream id a control message refers to, if any.
pub fn stream_of(msg: &control::Msg) -> Option<u32> {
    use control::Msg::*;
    Some(match msg {
        Hello(_) | Welcome(_) => return None,
        Open(m) => m.stream_id,
        Accept(m) => m.stream_id,
        Reject(m) => m.stream_id,
        WindowUpdate(m) => m.stream_id,
        Eof(m) => m.stream_id,
        Exit(m) => m.stream_id,
        Resize(m) => m.stream_id,
        Cancel(m) => m.stream_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_round_trip_and_channel_slice() {
        let raw = encode_data(7, CH_STDERR, b"hello");
        let Frame::Data(d) = decode(raw).unwrap() else {
            panic!("not data")
        };
        assert_eq!(d.stream_id(), 7);
        assert_eq!(d.channel(), CH_STDERR);
        assert_eq!(&d.payload()[..], b"hello");
        assert_eq!(&d.channel_message()[..], b"\x02hello");
    }

    #[test]
    fn control_round_trip() {
        let raw = encode_control(control::Msg::Cancel(Cancel {
            stream_id: 3,
            reason: "x".into(),
        }));
        match decode(raw).unwrap() {
            Frame::Control(control::Msg::Cancel(c)) => assert_eq!(c.stream_id, 3),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(decode(Bytes::new()).unwrap_err(), FrameError::Empty);
        assert_eq!(
            decode(Bytes::from_static(&[9, 1])).unwrap_err(),
            FrameError::UnknownKind(9)
        );
        assert_eq!(
            decode(Bytes::from_static(&[1, 0, 0])).unwrap_err(),
            FrameError::ShortData
        );
        assert!(matches!(
            decode(Bytes::from_static(&[0, 0xff, 0xff, 0xff])),
            Err(FrameError::Malformed(_))
        ));
        assert_eq!(
            decode(Bytes::from_static(&[0])).unwrap_err(),
            FrameError::EmptyControl
        );
        let big = vec![0u8; crate::limits::MAX_CONTROL_MESSAGE + 1];
        assert!(matches!(
            decode(Bytes::from(big)),
            Err(FrameError::ControlTooLarge(_))
        ));
        // Random bytes never panic.
        let mut x: u32 = 12345;
        for _ in 0..2000 {
            let len = (x % 40) as usize;
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                v.push((x >> 16) as u8);
            }
            if !v.is_empty() {
                v[0] %= 2;
            }
            let _ = decode(Bytes::from(v));
        }
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate(1, 1), Some(1));
        assert_eq!(negotiate(1, 9), Some(MAX_VERSION));
        assert_eq!(negotiate(MAX_VERSION + 1, MAX_VERSION + 3), None);
    }
}
