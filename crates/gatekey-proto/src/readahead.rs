//! Read-ahead under TLS. rustls asks its transport for at most 4 KiB at a
//! time, so a bulk transfer would cost one read(2) per 4 KiB. [`ReadAhead`]
//! reads up to [`READ_AHEAD`] bytes per system call and serves rustls from
//! memory. The buffer exists only while data is flowing: it is freed as soon
//! as it is drained and the socket has nothing more, so an idle connection
//! (an idle agent on the control plane) pays nothing for it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes asked of the socket per read while data flows.
pub const READ_AHEAD: usize = 64 * 1024;

/// A transport wrapper that reads ahead; writes pass straight through.
#[derive(Debug)]
pub struct ReadAhead<T> {
    inner: T,
    buf: Vec<u8>,
    pos: usize,
}

impl<T> ReadAhead<T> {
    pub fn new(inner: T) -> Self {
        ReadAhead {
            inner,
            buf: Vec::new(),
            pos: 0,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadAhead<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pos == this.buf.len() {
            // A large read gains nothing from the buffer.
            if out.remaining() >= READ_AHEAD {
                this.release();
                return Pin::new(&mut this.inner).poll_read(cx, out);
            }
            this.buf.clear();
            this.pos = 0;
            this.buf.reserve_exact(READ_AHEAD);
            let spare = this.buf.spare_capacity_mut();
            let mut fill = ReadBuf::uninit(&mut spare[..READ_AHEAD]);
            match Pin::new(&mut this.inner).poll_read(cx, &mut fill) {
                Poll::Ready(Ok(())) => {
                    let n = fill.filled().len();
                    // SAFETY: `fill` initialised the first n spare bytes.
                    unsafe { this.buf.set_len(n) };
                }
                Poll::Ready(Err(e)) => {
                    this.release();
                    return Poll::Ready(Err(e));
                }
                Poll::Pending => {
                    this.release();
                    return Poll::Pending;
                }
            }
        }
        let n = out.remaining().min(this.buf.len() - this.pos);
        out.put_slice(&this.buf[this.pos..this.pos + n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<T> ReadAhead<T> {
    /// Frees the (drained) buffer.
    fn release(&mut self) {
        debug_assert_eq!(self.pos, self.buf.len());
        self.buf = Vec::new();
        self.pos = 0;
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadAhead<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn small_reads_are_served_from_one_large_read_and_nothing_is_lost() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        a.write_all(&data).await.unwrap();
        drop(a);
        let mut r = ReadAhead::new(b);
        let mut got = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, data);
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_buffer() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let mut r = ReadAhead::new(b);
        a.write_all(b"hello").await.unwrap();
        let mut chunk = [0u8; 16];
        assert_eq!(r.read(&mut chunk).await.unwrap(), 5);
        // Drained and the peer has nothing more: the next read is pending.
        let pending =
            tokio::time::timeout(std::time::Duration::from_millis(20), r.read(&mut chunk)).await;
        assert!(pending.is_err());
        assert_eq!(r.buf.capacity(), 0);
    }
}
