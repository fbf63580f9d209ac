//! The socket side of a driver loop: a WebSocket stream and the frames not yet
//! written, polled without ever blocking the loop on a slow peer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{SinkExt, StreamExt};

/// Most bytes of unparsable input read and discarded after our close frame.
const DRAIN_LIMIT: usize = 64 << 20;

/// Frames read before what they answered is flushed, when the peer has more: the
/// loop reads every frame available and writes the answers with one system call.
const READ_BATCH: u8 = 64;

/// Bytes read at a time while discarding.
const DRAIN_CHUNK: usize = 16 << 10;

/// The socket side of the loop: the stream and the frames not yet written.
pub(crate) struct Io<S> {
    pub(crate) ws: WebSocketStream<S>,
    /// Frames waiting for the sink: the client's and the echo server's queue. A
    /// server connection's frames wait in its session instead, and come here only
    /// to be written while it lingers after the close.
    pub(crate) pending: VecDeque<WsMessage>,
    /// The peer's input failed to parse (too big, invalid UTF-8, a protocol error):
    /// the stream yields nothing more, but the peer may still be writing.
    unparsable: bool,
    /// Frames read since the last flush (capped at [`READ_BATCH`]'s type).
    reads: u8,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    pub(crate) fn new(ws: WebSocketStream<S>) -> Self {
        Io {
            ws,
            pending: VecDeque::new(),
            unparsable: false,
            reads: 0,
        }
    }

    /// The next frame from the peer, remembering a failure for [`linger`](Self::linger).
    pub(crate) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<WsMessage, WsError>>> {
        let read = self.ws.poll_next_unpin(cx);
        match &read {
            Poll::Ready(Some(Err(_))) => self.unparsable = true,
            Poll::Ready(Some(Ok(_))) => self.reads = self.reads.saturating_add(1),
            _ => {}
        }
        read
    }

    /// Hand the sink what it takes, without flushing: tungstenite gathers the frames
    /// (writing only past its gather size), and [`poll_flush`](Self::poll_flush)
    /// sends the batch once the loop has nothing else to do. `Ready(Err)` only on
    /// failure.
    pub(crate) fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let pending = &mut self.pending;
        if !pending.is_empty() {
            match poll_send_from(&mut self.ws, cx, || pending.pop_front()) {
                Poll::Ready(Ok(())) => {}
                not_sent => return not_sent,
            }
        }
        if self.pending.capacity() > 0 {
            // All handed over: an idle connection keeps no queue allocated (most are).
            self.pending = VecDeque::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Write out what the sink gathered; `Ready(Err)` only on failure
    /// (tungstenite's answers to pings and closes included).
    pub(crate) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        let flushed = self.ws.poll_flush_unpin(cx);
        if flushed.is_ready() {
            self.reads = 0;
        }
        flushed
    }

    /// Hand the sink everything and flush it; `Ready(Err)` only on failure.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        match self.poll_send(cx) {
            Poll::Ready(Ok(())) => self.poll_flush(cx),
            other => other,
        }
    }

    /// Whether [`READ_BATCH`] frames were read since the last flush: a peer that
    /// never stops sending still gets its answers that often.
    pub(crate) fn read_batch_full(&self) -> bool {
        self.reads >= READ_BATCH
    }

    /// After the session closed: finish writing (our close frame included) and read
    /// until the peer's close or the end of the stream.
    ///
    /// When the peer's input can no longer be parsed (a frame over the size limit,
    /// invalid UTF-8, a protocol error), our half of the connection is shut and the
    /// rest of its input read and discarded until it closes, up to [`DRAIN_LIMIT`]
    /// bytes: a peer still writing a 20 MiB frame would otherwise make our kernel
    /// answer its bytes with a reset, which destroys the close frame (and its code)
    /// on its way. The caller bounds the time (the close timeout).
    pub(crate) async fn linger(&mut self) {
        let mut drained = 0;
        let mut scratch = Vec::new();
        poll_fn(|cx| {
            match self.poll_write(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            if !self.unparsable {
                loop {
                    match self.poll_read(cx) {
                        Poll::Ready(Some(Ok(_))) => continue,
                        Poll::Ready(Some(Err(_))) => break,
                        Poll::Ready(None) => return Poll::Ready(()),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            }
            if scratch.is_empty() {
                // Our close frame is out: end our half (a lingering close, as web
                // servers do), so a peer that reads it answers and closes its own.
                match Pin::new(self.ws.get_mut()).poll_close(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(())) => scratch = vec![0; DRAIN_CHUNK],
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                }
            }
            while drained < DRAIN_LIMIT {
                match Pin::new(self.ws.get_mut()).poll_read(cx, &mut scratch) {
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(read)) => drained += read,
                    Poll::Pending => return Poll::Pending,
                }
            }
            Poll::Ready(())
        })
        .await
    }
}

/// [`Io::poll_send`] for messages taken from `next` one at a time, only while the
/// sink takes them: those it does not take yet stay where `next` takes them from (a
/// server connection's session), so that they need no queue of their own.
/// `Ready(Ok)` once `next` has none left.
pub(crate) fn poll_send_from<S: AsyncRead + AsyncWrite + Unpin>(
    ws: &mut WebSocketStream<S>,
    cx: &mut Context<'_>,
    mut next: impl FnMut() -> Option<WsMessage>,
) -> Poll<Result<(), WsError>> {
    loop {
        match ws.poll_ready_unpin(cx) {
            Poll::Ready(Ok(())) => {}
            not_ready => return not_ready,
        }
        let Some(message) = next() else {
            return Poll::Ready(Ok(()));
        };
        if let Err(error) = ws.start_send_unpin(message) {
            return Poll::Ready(Err(error));
        }
    }
}
