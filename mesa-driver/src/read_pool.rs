//! A server connection's socket reads, through a buffer borrowed from a per-thread
//! pool only while it holds bytes: most connections are idle, and an idle one then
//! holds no read buffer, while a busy one still takes in many frames per system call.
//! tungstenite's own buffer under it only assembles a frame
//! ([`TransportConfig::server_websocket`](crate::transport::TransportConfig::server_websocket)).

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_io::{AsyncRead, AsyncWrite, IoSlice};

/// Buffers a thread keeps for reuse: a few, since a buffer is borrowed only while
/// its connection's task runs.
const KEEP: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Box<[u8]>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` bytes from this thread's pool, or a new one.
fn borrow(len: usize) -> Box<[u8]> {
    let pooled = POOL.try_with(|pool| pool.borrow_mut().pop()).ok().flatten();
    match pooled {
        Some(buffer) if buffer.len() == len => buffer,
        _ => vec![0; len].into_boxed_slice(),
    }
}

/// Give a buffer back to this thread's pool (dropped when the pool is full, or
/// while the thread exits).
fn give_back(buffer: Box<[u8]>) {
    let _ = POOL.try_with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool.len() < KEEP {
            pool.push(buffer);
        }
    });
}

/// Bytes read from the socket and not yet handed on.
struct Borrowed {
    buffer: Box<[u8]>,
    start: usize,
    end: usize,
}

/// A stream that reads through a pooled buffer of `chunk` bytes; writes pass
/// through.
pub(crate) struct PooledRead<S> {
    inner: S,
    chunk: usize,
    borrowed: Option<Borrowed>,
}

impl<S> PooledRead<S> {
    /// Read `inner` `chunk` bytes at a time.
    pub(crate) fn new(inner: S, chunk: usize) -> Self {
        PooledRead {
            inner,
            chunk: chunk.max(1),
            borrowed: None,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PooledRead<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let borrowed = match this.borrowed.as_mut() {
            Some(borrowed) => borrowed,
            None if out.len() >= this.chunk => return Pin::new(&mut this.inner).poll_read(cx, out),
            None => {
                let mut buffer = borrow(this.chunk);
                match Pin::new(&mut this.inner).poll_read(cx, &mut buffer) {
                    Poll::Ready(Ok(read)) if read > 0 => this.borrowed.insert(Borrowed {
                        buffer,
                        start: 0,
                        end: read,
                    }),
                    other => {
                        give_back(buffer);
                        return other;
                    }
                }
            }
        };
        let len = out.len().min(borrowed.end - borrowed.start);
        out[..len].copy_from_slice(&borrowed.buffer[borrowed.start..borrowed.start + len]);
        borrowed.start += len;
        if borrowed.start == borrowed.end {
            if let Some(drained) = this.borrowed.take() {
                give_back(drained.buffer);
            }
        }
        Poll::Ready(Ok(len))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PooledRead<S> {
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
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_on_every_byte_and_keeps_no_buffer_once_drained() {
        let input: Vec<u8> = (0..100u8).collect();
        let mut stream = PooledRead::new(futures_util::io::Cursor::new(input.clone()), 16);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let (mut output, mut small) = (Vec::new(), [0u8; 5]);
        loop {
            let Poll::Ready(Ok(read)) = Pin::new(&mut stream).poll_read(&mut cx, &mut small) else {
                panic!("a cursor is always ready");
            };
            if read == 0 {
                break;
            }
            output.extend_from_slice(&small[..read]);
            if output.len() % 16 == 0 {
                assert!(stream.borrowed.is_none(), "a drained buffer goes back");
            }
        }
        assert_eq!(output, input);
        assert!(stream.borrowed.is_none());
    }
}
