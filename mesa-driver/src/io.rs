//! The socket side of a driver loop: a WebSocket stream and the frames not yet
//! written, polled without ever blocking the loop on a slow peer.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::task::{Context, Poll};

use async_tungstenite::WebSocketStream;
use async_tungstenite::tungstenite::{Error as WsError, Message as WsMessage};
use futures_io::{AsyncRead, AsyncWrite};
use futures_util::{SinkExt, StreamExt};

/// The socket side of the loop: the stream and the frames not yet written.
pub(crate) struct Io<S> {
    pub(crate) ws: WebSocketStream<S>,
    pub(crate) pending: VecDeque<WsMessage>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Io<S> {
    pub(crate) fn new(ws: WebSocketStream<S>) -> Self {
        Io {
            ws,
            pending: VecDeque::new(),
        }
    }

    /// Write what the sink takes and flush; `Ready(Err)` only on failure.
    pub(crate) fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
        if self.pending.is_empty() && self.pending.capacity() > 0 {
            // All written: an idle connection keeps no queue allocated (most are idle).
            self.pending = VecDeque::new();
        }
        while !self.pending.is_empty() {
            match self.ws.poll_ready_unpin(cx) {
                Poll::Ready(Ok(())) => {
                    let Some(message) = self.pending.pop_front() else {
                        break;
                    };
                    if let Err(error) = self.ws.start_send_unpin(message) {
                        return Poll::Ready(Err(error));
                    }
                }
                Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.ws.poll_flush_unpin(cx)
    }

    /// After the session closed: finish writing (our close frame included) and read
    /// until the peer's close or the end of the stream.
    pub(crate) async fn linger(&mut self) {
        poll_fn(|cx| {
            match self.poll_write(cx) {
                Poll::Ready(Err(_)) => return Poll::Ready(()),
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(())) => {}
            }
            loop {
                match self.ws.poll_next_unpin(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await
    }
}
