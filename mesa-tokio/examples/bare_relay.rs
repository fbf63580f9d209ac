//! A bare tokio-tungstenite relay, the transport floor of `mesa-bench`: no Mesa at
//! all (no hello, no authentication, no heartbeats, no JSON parsing), tungstenite's
//! default buffers, and only two behaviours: a text frame containing
//! `"t":"BROADCAST"` goes to every connection (the sender included), one containing
//! `"t":"ECHO"` goes back to its sender; everything else is ignored.
//!
//! ```text
//! cargo run --release -p mesa-tokio --example bare_relay -- 127.0.0.1:0
//! ```
//!
//! Prints `bare relay listening on ws://ADDR/` once bound; runs until killed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_channel::mpsc::{UnboundedSender, unbounded};
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Every connection's queue of frames to write.
type Peers = Arc<Mutex<HashMap<u64, UnboundedSender<Message>>>>;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4000".to_owned())
        .parse()?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    let listener: TcpListener = socket.listen(1024)?;
    println!("bare relay listening on ws://{}/", listener.local_addr()?);

    let peers: Peers = Arc::default();
    let next = AtomicU64::new(0);
    loop {
        let (stream, _) = listener.accept().await?;
        let id = next.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(stream, id, peers.clone()));
    }
}

/// Relay one connection's frames until it ends.
async fn serve(stream: TcpStream, id: u64, peers: Peers) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (sink, mut source) = ws.split();
    let (tx, rx) = unbounded();
    peers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id, tx.clone());
    // The writer feeds what is queued and flushes when the queue runs dry.
    let writer = tokio::spawn(rx.map(Ok).forward(sink));
    while let Some(Ok(frame)) = source.next().await {
        let Message::Text(text) = &frame else {
            continue;
        };
        if text.contains(r#""t":"ECHO""#) {
            let _ = tx.unbounded_send(frame);
        } else if text.contains(r#""t":"BROADCAST""#) {
            let peers = peers.lock().unwrap_or_else(|p| p.into_inner());
            for peer in peers.values() {
                let _ = peer.unbounded_send(frame.clone());
            }
        }
    }
    peers.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    drop(tx);
    let _ = writer.await;
}
