//! A client that authenticates, sends an `ECHO` every second and prints what happens.
//! Stop and restart the server: it reconnects with jittered backoff, authenticates
//! again by itself, and sends what was queued while it was away.
//!
//! ```sh
//! cargo run -p mesa-tokio --example relay_server &
//! cargo run -p mesa-tokio --example reconnecting_client -- ws://127.0.0.1:4000/ alice
//! ```

use std::time::{Duration, Instant};

use mesa_tokio::{ClientEvent, Close, CloseCode, Message};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "ws://127.0.0.1:4000/".to_owned());
    let token = args.next().unwrap_or_else(|| "alice".to_owned());

    // Reconnection with backoff is on by default.
    let (client, mut events) = mesa_tokio::client(url.clone()).build()?;
    println!("connecting to {url} as {token}");

    // `authenticate` resolves at the first op 22 (the events report every one); the
    // client sends the credentials again after every reconnection without being asked.
    let auth = client.clone();
    tokio::spawn(async move {
        if let Err(error) = auth.authenticate(json!({ "token": token }), true).await {
            eprintln!("authentication failed: {error}");
        }
    });

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0u64;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                sent += 1;
                // While disconnected this queues (bounded); a full queue is an error.
                let message = Message::dispatch("ECHO", json!({ "n": sent }));
                if let Err(error) = client.send(message).await {
                    eprintln!("message {sent} not sent: {error}");
                }
            }
            event = events.next() => match event {
                Some(ClientEvent::Connected { is_automatic_reconnection, .. }) => {
                    println!("connected (automatic reconnection: {is_automatic_reconnection})");
                }
                Some(ClientEvent::Authenticated { user }) => println!("authenticated as {user}"),
                Some(ClientEvent::Message(message)) => println!("<- {}", message.to_value()),
                Some(ClientEvent::Disconnected { close, reconnect_at }) => match reconnect_at {
                    Some(at) => println!(
                        "disconnected: {close}; next attempt in {:?}",
                        at.saturating_duration_since(Instant::now())
                    ),
                    None => {
                        println!("disconnected for good: {close}");
                        break;
                    }
                },
                Some(ClientEvent::InvalidFrame(error)) => eprintln!("skipped a frame: {error}"),
                // Rooms: this client subscribes to none, but a server may join it to some.
                Some(room_event) => println!("{room_event:?}"),
                None => break,
            },
            _ = tokio::signal::ctrl_c() => {
                client.disconnect(Close::new(CloseCode::NORMAL, "bye")).await?;
                // Give the closing handshake a moment before the runtime stops.
                tokio::time::sleep(Duration::from_millis(200)).await;
                break;
            }
        }
    }
    Ok(())
}
