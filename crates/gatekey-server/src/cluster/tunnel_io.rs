//! The bytes between a tunnel's user (hyper, on either replica) and the
//! tunnel's pumps, copied once each way: what the user writes collects in
//! chunks that become bus messages as they are (each chunk keeps room at
//! its front for the message's tag), and what arrives in bulk is read
//! straight out of the messages' payloads. Each direction holds at most
//! `capacity` bytes plus one message, so a user that stops reading, or a far
//! side that grants no credit, stops the other end instead of growing a
//! buffer.
//!
//! A payload kept as it arrived may hold on to its broker connection's
//! whole read buffer (async-nats reads 64 KiB at a time and hands out
//! slices of it), so small payloads, which would hold the most for the
//! least, are copied together instead: the queue has at most
//! `capacity / SMALL` entries, each holding at most one read buffer.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The user's end: read what the far side sent, write what goes to it.
pub struct TunnelIo {
    shared: Arc<Shared>,
}

/// The send pump's end: takes what the user wrote, as messages.
pub struct Outgoing {
    shared: Arc<Shared>,
}

/// The receiving pump's end: hands the far side's payloads to the user.
pub struct Incoming {
    shared: Arc<Shared>,
}

/// A message taken by the send pump: `payload[..head]` is free for the
/// tag (or holds the open request's head), the rest is the user's bytes.
pub struct Taken {
    pub payload: BytesMut,
    pub head: usize,
    /// The user has shut down and nothing follows this message.
    pub end: bool,
}

impl Taken {
    pub fn data_len(&self) -> usize {
        self.payload.len() - self.head
    }
}

/// The user's side of [`Incoming::push`] has gone.
#[derive(Debug)]
pub struct ReaderGone;

/// Payloads smaller than this are copied into the queue rather than kept.
const SMALL: usize = 4096;

/// A pair of ends joined to the user's. `first_head` is reserved at the
/// front of the first message (the open request's head), `chunk` is the
/// most user bytes per message.
pub fn pipe(capacity: usize, chunk: usize, first_head: Vec<u8>) -> (TunnelIo, Outgoing, Incoming) {
    assert!(chunk > 0, "a message carries at least one byte");
    let mut chunks = VecDeque::new();
    if !first_head.is_empty() {
        let mut buf = BytesMut::with_capacity(first_head.len() + 4096);
        buf.put_slice(&first_head);
        chunks.push_back(Chunk {
            head: first_head.len(),
            buf,
        });
    }
    let shared = Arc::new(Shared {
        out: Mutex::new(Out {
            chunks,
            queued: 0,
            capacity,
            chunk,
            shut: false,
            taker_gone: false,
            writer: None,
            taker: None,
        }),
        inc: Mutex::new(In {
            queue: VecDeque::new(),
            tail: BytesMut::new(),
            queued: 0,
            capacity,
            eof: false,
            reader_gone: false,
            reader: None,
            pusher: None,
        }),
    });
    (
        TunnelIo {
            shared: shared.clone(),
        },
        Outgoing {
            shared: shared.clone(),
        },
        Incoming { shared },
    )
}

struct Shared {
    out: Mutex<Out>,
    inc: Mutex<In>,
}

impl Shared {
    fn out(&self) -> MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn inc(&self) -> MutexGuard<'_, In> {
        self.inc.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A message being filled: `buf[..head]` is reserved.
struct Chunk {
    head: usize,
    buf: BytesMut,
}

impl Chunk {
    fn data_len(&self) -> usize {
        self.buf.len() - self.head
    }
}

/// Towards the far side.
struct Out {
    chunks: VecDeque<Chunk>,
    /// User bytes in `chunks`.
    queued: usize,
    capacity: usize,
    chunk: usize,
    /// The user shut down its writing (or let go): the end follows the
    /// bytes queued.
    shut: bool,
    /// The send pump stopped: writes fail.
    taker_gone: bool,
    writer: Option<Waker>,
    taker: Option<Waker>,
}

/// From the far side.
struct In {
    /// Payloads of at least [`SMALL`] bytes, as they came, then `tail`.
    queue: VecDeque<Bytes>,
    /// Small payloads that came after the last large one, copied together.
    tail: BytesMut,
    /// Bytes in `queue` and `tail`.
    queued: usize,
    capacity: usize,
    /// Nothing more comes.
    eof: bool,
    /// The user let go: what arrives is dropped.
    reader_gone: bool,
    reader: Option<Waker>,
    pusher: Option<Waker>,
}

/// Wakes a waker taken out while the lock was held, once it is released
/// (so the woken task does not find it still taken).
fn wake(w: Option<Waker>) {
    if let Some(w) = w {
        w.wake();
    }
}

impl Out {
    /// Copies as much of `bufs` as there is room for; the number taken.
    fn put(&mut self, bufs: &[io::IoSlice<'_>]) -> usize {
        let mut room = self.capacity - self.queued;
        let mut taken = 0;
        for b in bufs {
            let mut b: &[u8] = b;
            while !b.is_empty() && room > 0 {
                let full = self
                    .chunks
                    .back()
                    .is_none_or(|c| c.data_len() >= self.chunk);
                if full {
                    // Sized for what is being written: a keystroke does not
                    // hold a whole message's worth of memory.
                    let want = b.len().max(4096).min(self.chunk);
                    let mut buf = BytesMut::with_capacity(1 + want);
                    buf.put_u8(0);
                    self.chunks.push_back(Chunk { head: 1, buf });
                }
                let back = self.chunks.back_mut().expect("a chunk");
                let n = b.len().min(room).min(self.chunk - back.data_len());
                back.buf.put_slice(&b[..n]);
                b = &b[n..];
                room -= n;
                taken += n;
            }
        }
        self.queued += taken;
        taken
    }
}

impl Outgoing {
    /// The next message of at most `max` user bytes, waiting for some;
    /// None once the user shut down and everything was taken.
    pub async fn take(&self, max: usize) -> Option<Taken> {
        std::future::poll_fn(|cx| self.poll_take(cx, max.max(1))).await
    }

    fn poll_take(&self, cx: &mut Context<'_>, max: usize) -> Poll<Option<Taken>> {
        let mut out = self.shared.out();
        let ready = out.chunks.front().is_some_and(|c| c.data_len() > 0);
        if !ready {
            if out.shut {
                return Poll::Ready(None);
            }
            out.taker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let front = out.chunks.front_mut().expect("a chunk");
        let (payload, head) = if front.data_len() <= max {
            let c = out.chunks.pop_front().expect("a chunk");
            (c.buf, c.head)
        } else {
            // Less credit than the chunk holds (rare: credit comes back in
            // quarter windows): the part taken is copied out, and the last
            // byte taken becomes the tag's room of the rest.
            let head = front.head;
            let taken = BytesMut::from(&front.buf[..head + max]);
            front.buf.advance(head + max - 1);
            front.head = 1;
            (taken, head)
        };
        let n = payload.len() - head;
        out.queued -= n;
        let end = out.shut && out.chunks.is_empty();
        let writer = out.writer.take();
        drop(out);
        wake(writer);
        Poll::Ready(Some(Taken { payload, head, end }))
    }
}

impl Drop for Outgoing {
    fn drop(&mut self) {
        let mut out = self.shared.out();
        out.taker_gone = true;
        out.chunks.clear();
        out.queued = 0;
        let writer = out.writer.take();
        drop(out);
        wake(writer);
    }
}

impl Incoming {
    /// Hands bytes to the user, waiting while `capacity` bytes are unread.
    pub async fn push(&self, bytes: Bytes) -> Result<(), ReaderGone> {
        let mut bytes = Some(bytes);
        std::future::poll_fn(|cx| {
            let mut inc = self.shared.inc();
            if inc.reader_gone {
                return Poll::Ready(Err(ReaderGone));
            }
            if inc.queued >= inc.capacity {
                inc.pusher = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let b = bytes.take().expect("pushed once");
            if b.is_empty() {
                return Poll::Ready(Ok(()));
            }
            inc.queued += b.len();
            if b.len() < SMALL {
                inc.tail.extend_from_slice(&b);
            } else {
                if !inc.tail.is_empty() {
                    let small = inc.tail.split().freeze();
                    inc.queue.push_back(small);
                }
                inc.queue.push_back(b);
            }
            let reader = inc.reader.take();
            drop(inc);
            wake(reader);
            Poll::Ready(Ok(()))
        })
        .await
    }

    /// Nothing more comes: the user reads to the end of what is queued.
    pub fn finish(&self) {
        let mut inc = self.shared.inc();
        inc.eof = true;
        let reader = inc.reader.take();
        drop(inc);
        wake(reader);
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        self.finish();
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut inc = self.shared.inc();
        let before = buf.remaining();
        while buf.remaining() > 0 {
            let n = if let Some(front) = inc.queue.front_mut() {
                let n = front.len().min(buf.remaining());
                buf.put_slice(&front[..n]);
                front.advance(n);
                if front.is_empty() {
                    inc.queue.pop_front();
                }
                n
            } else if !inc.tail.is_empty() {
                let n = inc.tail.len().min(buf.remaining());
                buf.put_slice(&inc.tail[..n]);
                inc.tail.advance(n);
                n
            } else {
                break;
            };
            inc.queued -= n;
        }
        if buf.remaining() < before {
            let pusher = inc.pusher.take();
            drop(inc);
            wake(pusher);
            return Poll::Ready(Ok(()));
        }
        if inc.eof || before == 0 {
            return Poll::Ready(Ok(()));
        }
        inc.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl TunnelIo {
    fn poll_put(&self, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let mut out = self.shared.out();
        if out.taker_gone {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if out.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the tunnel was shut down for writing",
            )));
        }
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        if out.queued >= out.capacity {
            out.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = out.put(bufs);
        let taker = out.taker.take();
        drop(out);
        wake(taker);
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_put(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_put(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut out = self.shared.out();
        out.shut = true;
        let taker = out.taker.take();
        drop(out);
        wake(taker);
        Poll::Ready(Ok(()))
    }
}

impl Drop for TunnelIo {
    fn drop(&mut self) {
        let mut out = self.shared.out();
        out.shut = true;
        let taker = out.taker.take();
        drop(out);
        wake(taker);
        let mut inc = self.shared.inc();
        inc.reader_gone = true;
        inc.queue.clear();
        inc.tail.clear();
        inc.queued = 0;
        let pusher = inc.pusher.take();
        drop(inc);
        wake(pusher);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn writes_become_messages_with_room_for_the_tag() {
        let (mut io, out, _inc) = pipe(1 << 20, 8, b"HEAD".to_vec());
        io.write_all(b"0123456789abc").await.unwrap();
        // The first message carries the open request's head.
        let t = out.take(100).await.unwrap();
        assert_eq!(
            (&t.payload[..], t.head, t.end),
            (&b"HEAD01234567"[..], 4, false)
        );
        let t = out.take(100).await.unwrap();
        assert_eq!((&t.payload[1..], t.head), (&b"89abc"[..], 1));
        io.shutdown().await.unwrap();
        assert!(out.take(100).await.is_none());
    }

    #[tokio::test]
    async fn short_credit_splits_a_message_and_the_last_one_says_the_end() {
        let (mut io, out, _inc) = pipe(1 << 20, 100, Vec::new());
        io.write_all(b"abcdefghij").await.unwrap();
        io.shutdown().await.unwrap();
        let t = out.take(4).await.unwrap();
        assert_eq!((&t.payload[1..], t.end), (&b"abcd"[..], false));
        let t = out.take(4).await.unwrap();
        assert_eq!((&t.payload[1..], t.end), (&b"efgh"[..], false));
        let t = out.take(4).await.unwrap();
        assert_eq!(
            (&t.payload[1..], t.end, t.data_len()),
            (&b"ij"[..], true, 2)
        );
        assert!(out.take(4).await.is_none());
    }

    #[tokio::test]
    async fn a_writer_waits_at_capacity_and_a_vectored_write_stays_together() {
        let (mut io, out, _inc) = pipe(10, 100, Vec::new());
        let parts = [io::IoSlice::new(b"GET /"), io::IoSlice::new(b" HTTP")];
        assert_eq!(io.write_vectored(&parts).await.unwrap(), 10);
        assert!(io.write_all(b"x").now_or_never().is_none());
        let t = out.take(100).await.unwrap();
        assert_eq!(&t.payload[1..], b"GET / HTTP");
        io.write_all(b"x").await.unwrap();
        drop(out);
        assert_eq!(
            io.write_all(b"y").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn reads_come_straight_from_the_payloads_within_capacity() {
        let (mut io, _out, inc) = pipe(8, 100, Vec::new());
        inc.push(Bytes::from_static(b"hello ")).await.unwrap();
        inc.push(Bytes::from_static(b"world")).await.unwrap();
        // Eleven bytes unread, more than the capacity: the next push waits.
        let mut third = Box::pin(inc.push(Bytes::from_static(b"!")));
        assert!((&mut third).now_or_never().is_none());
        let mut buf = [0u8; 8];
        assert_eq!(io.read(&mut buf).await.unwrap(), 8);
        assert_eq!(&buf, b"hello wo");
        third.await.unwrap();
        inc.finish();
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"rld!");
    }

    #[tokio::test]
    async fn short_credit_splits_the_open_request_and_keeps_its_head() {
        let (mut io, out, _inc) = pipe(1 << 20, 100, b"T{}\n".to_vec());
        io.write_all(b"GET / HTTP/1.1").await.unwrap();
        let t = out.take(3).await.unwrap();
        assert_eq!((&t.payload[..], t.head), (&b"T{}\nGET"[..], 4));
        let t = out.take(100).await.unwrap();
        assert_eq!((&t.payload[1..], t.head), (&b" / HTTP/1.1"[..], 1));
    }

    #[tokio::test]
    async fn the_end_comes_with_the_last_chunk_only() {
        let (mut io, out, _inc) = pipe(1 << 20, 4, Vec::new());
        io.write_all(b"abcdefgh").await.unwrap();
        io.shutdown().await.unwrap();
        let ends: Vec<bool> = [out.take(10).await, out.take(10).await]
            .into_iter()
            .map(|t| t.unwrap().end)
            .collect();
        assert_eq!(ends, [false, true]);
    }

    #[tokio::test]
    async fn a_writer_waiting_at_capacity_learns_the_pump_is_gone() {
        let (mut io, out, _inc) = pipe(4, 4, Vec::new());
        io.write_all(b"full").await.unwrap();
        let writer = tokio::spawn(async move { io.write_all(b"more").await });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        drop(out);
        let e = writer.await.unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn small_payloads_are_copied_together_and_order_is_kept() {
        let (mut io, _out, inc) = pipe(1 << 20, 100, Vec::new());
        let large = Bytes::from(vec![b'L'; SMALL]);
        for b in [&b"a"[..], b"b", &large, b"c", b"d"] {
            inc.push(Bytes::copy_from_slice(b)).await.unwrap();
        }
        {
            let state = inc.shared.inc();
            // "ab", the large one, and "cd" still being added to.
            assert_eq!((state.queue.len(), &state.tail[..]), (2, &b"cd"[..]));
        }
        inc.finish();
        let mut got = Vec::new();
        io.read_to_end(&mut got).await.unwrap();
        let mut want = b"ab".to_vec();
        want.extend_from_slice(&large);
        want.extend_from_slice(b"cd");
        assert_eq!(got, want);
    }

    #[tokio::test]
    async fn letting_go_of_the_user_end_ends_both_directions() {
        let (io, out, inc) = pipe(8, 100, Vec::new());
        drop(io);
        assert!(out.take(10).await.is_none());
        assert!(inc.push(Bytes::from_static(b"late")).await.is_err());
    }

    #[tokio::test]
    async fn the_pumps_letting_go_ends_the_users_reads() {
        let (mut io, _out, inc) = pipe(8, 100, Vec::new());
        inc.push(Bytes::from_static(b"last")).await.unwrap();
        drop(inc);
        let mut rest = Vec::new();
        io.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest, b"last");
    }
}
