//! Who publishes the messages of `mesa-bench rooms`: a [`Dispatcher`] on the cluster's
//! Redis (the default: the cheapest for the generator, and an envelope without an
//! origin), or one extended client per replica, each sending a share of the messages
//! the way an application's clients would (`mesa:publish` to a room, or a relay
//! BROADCAST with `d.to` naming the ids), so that what a replica does with the sends
//! of its own clients is measured too.

use std::sync::Arc;

use async_tungstenite::tungstenite::Message as WsMessage;
use futures_util::StreamExt;
use mesa_tokio::{Dispatcher, Message, Recipients};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::{Ctx, Parsed, Ws, close, heartbeat_ack, open, parse};

/// Dispatches in flight at most; past it the publisher waits (and the wait shows in
/// the latency, each message being stamped with when it was due).
const MAX_IN_FLIGHT: usize = 256;

/// Who publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(super) enum Via {
    /// A Dispatcher on the cluster's Redis.
    Dispatcher,
    /// One client per replica, each message from one of them picked by a hash of its
    /// number (independent of where its room's members are).
    Replicas,
}

impl Via {
    /// The option's value, for the report.
    pub(super) fn name(self) -> &'static str {
        match self {
            Via::Dispatcher => "dispatcher",
            Via::Replicas => "replicas",
        }
    }
}

/// A message to publish: its data, and where it goes.
pub(super) struct Publication {
    /// The data of the BROADCAST dispatch (`ts` and `seq`).
    pub(super) data: Value,
    /// The room.
    pub(super) room: String,
    /// The room's members' ids, to send to them instead of the room.
    pub(super) ids: Option<Vec<String>>,
}

/// Publishes a run's messages.
pub(super) enum Publisher {
    /// Through a Dispatcher: each dispatch a task, a bounded number in flight.
    Dispatcher {
        /// The Dispatcher.
        dispatcher: Arc<Dispatcher>,
        /// The dispatches not answered yet; each says whether it succeeded.
        in_flight: JoinSet<bool>,
        /// Dispatches that failed.
        failed: u64,
    },
    /// Through a client per replica: the frames each is to send.
    Replicas {
        /// Frames for the client on replica `i`.
        senders: Vec<mpsc::UnboundedSender<WsMessage>>,
        /// The clients' tasks; each returns how many of its publishes failed.
        clients: JoinSet<u64>,
        /// Messages published so far.
        sent: u64,
    },
}

impl Publisher {
    /// Publish through `dispatcher`.
    pub(super) fn dispatcher(dispatcher: Arc<Dispatcher>) -> Self {
        Publisher::Dispatcher {
            dispatcher,
            in_flight: JoinSet::new(),
            failed: 0,
        }
    }

    /// Connect and authenticate one client per replica of `ctx` (`publisher<i>`),
    /// numbered past the `connections` of the members.
    pub(super) async fn replicas(ctx: &Arc<Ctx>, connections: u32) -> Result<Self, String> {
        let replicas = ctx.targets.len() as u32;
        let first = connections.next_multiple_of(replicas);
        let mut senders = Vec::new();
        let mut clients = JoinSet::new();
        for replica in 0..replicas {
            let token = format!("publisher{replica}");
            let ws = timeout(ctx.connect_timeout, open(ctx, first + replica, &token))
                .await
                .map_err(|_| format!("{token} timed out connecting"))?
                .map_err(|error| format!("{token} failed: {error}"))?;
            let (sender, frames) = mpsc::unbounded_channel();
            senders.push(sender);
            clients.spawn(client(ws, frames));
        }
        Ok(Publisher::Replicas {
            senders,
            clients,
            sent: 0,
        })
    }

    /// Publish `publication`.
    pub(super) async fn publish(&mut self, publication: Publication) {
        let Publication { data, room, ids } = publication;
        match self {
            Publisher::Dispatcher {
                dispatcher,
                in_flight,
                failed,
            } => {
                while in_flight.len() >= MAX_IN_FLIGHT {
                    *failed += failure(in_flight.join_next().await);
                }
                let dispatcher = dispatcher.clone();
                let message = Message::dispatch("BROADCAST", data);
                in_flight.spawn(async move {
                    match ids {
                        None => dispatcher.dispatch_room(&room, message).await.is_ok(),
                        Some(ids) => {
                            let to = Recipients::Ids(ids);
                            dispatcher.dispatch(message, None, to, &[]).await.is_ok()
                        }
                    }
                });
            }
            Publisher::Replicas { senders, sent, .. } => {
                let frame = match ids {
                    None => {
                        json!({"op": 0, "t": "mesa:publish", "d": {"room": room, "t": "BROADCAST", "d": data}})
                    }
                    Some(ids) => {
                        let mut data = data;
                        data["to"] = json!(ids);
                        json!({"op": 0, "t": "BROADCAST", "d": data})
                    }
                };
                // Fibonacci hashing: the rooms' layout repeats with the message number,
                // and the publisher's replica must not follow it.
                let pick = (sent.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) % senders.len() as u64;
                let sender = &senders[pick as usize];
                // A client that is gone counts its own failure.
                let _ = sender.send(WsMessage::text(frame.to_string()));
                *sent += 1;
            }
        }
    }

    /// Wait for what is still in flight (bounded by the dispatches' and the
    /// connections' own timeouts); how many publishes failed or were refused.
    pub(super) async fn finish(self) -> u64 {
        match self {
            Publisher::Dispatcher {
                mut in_flight,
                mut failed,
                ..
            } => {
                while !in_flight.is_empty() {
                    failed += failure(in_flight.join_next().await);
                }
                failed
            }
            Publisher::Replicas {
                senders,
                mut clients,
                ..
            } => {
                drop(senders);
                let mut failed = 0;
                while let Some(joined) = clients.join_next().await {
                    failed += joined.unwrap_or(1);
                }
                failed
            }
        }
    }
}

/// 1 for a dispatch that failed (or whose task did), else 0.
fn failure(joined: Option<Result<bool, tokio::task::JoinError>>) -> u64 {
    u64::from(!matches!(joined, Some(Ok(true))))
}

/// A publishing client: send `frames` until there are no more, answer heartbeats,
/// count refusals (`mesa:error`), then close; how many publishes failed (1 more when
/// the connection ended early).
async fn client(mut ws: Ws, mut frames: mpsc::UnboundedReceiver<WsMessage>) -> u64 {
    let mut refused = 0;
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(frame) => {
                    if ws.send(frame).await.is_err() {
                        return refused + 1;
                    }
                }
                None => break,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(WsMessage::Text(text))) => match parse(text.as_str()) {
                    Parsed::Heartbeat => {
                        let _ = ws.send(heartbeat_ack()).await;
                    }
                    Parsed::RoomError => refused += 1,
                    _ => {}
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return refused + 1,
            },
        }
    }
    close(&mut ws).await;
    refused
}
