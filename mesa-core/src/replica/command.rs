//! What a [`Replica`](super::Replica) asks of Redis: typed commands, the exact Redis
//! calls each one stands for, and the values Redis answers with.

use crate::cluster::Namespace;

use super::config::StoreWait;
use super::scripts::Script;

/// Matches a reply to the command that asked for it. Unique for the life of a
/// [`Replica`](super::Replica); a reply to a token the replica no longer waits for
/// (a command of a link that failed since) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

impl Token {
    /// Low bits of a token that name its shard (so at most 256 shards).
    const SHARD_BITS: u32 = 8;

    /// Shards a cluster may have at most.
    pub const MAX_SHARDS: usize = 1 << Self::SHARD_BITS;

    /// The token of the `sequence`th command of shard `shard`.
    pub(crate) fn new(sequence: u64, shard: usize) -> Token {
        Token(sequence << Self::SHARD_BITS | (shard % Self::MAX_SHARDS) as u64)
    }

    /// The Redis instance the command of this token goes to (the index of its URL
    /// among the cluster's; always 0 with one Redis).
    pub fn shard(self) -> usize {
        (self.0 % Self::MAX_SHARDS as u64) as usize
    }
}

/// One piece of work for Redis, executed as the pipelined [`Call`]s of
/// [`calls`](Command::calls) in one round trip, and answered with
/// [`Replica::handle_reply`](super::Replica::handle_reply): one [`RedisValue`] per call, in
/// order, or the error of the round trip.
///
/// Commands are executed in the order they are polled, on one connection (Redis then
/// runs them in that order); the driver may pipeline as many as it has.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub enum Command {
    /// (Re)open the link, dropping any previous one: connect, read the `run_id` of
    /// `INFO server`, load every [`Script`], subscribe to
    /// [`Replica::channels`](super::Replica::channels). Answered with
    /// [`handle_link_up`](super::Replica::handle_link_up), or
    /// [`handle_link_down`](super::Replica::handle_link_down) when it fails; it has
    /// no calls.
    Connect,
    /// `PING` on the subscription connection: any answer proves it alive.
    Ping,
    /// `SUBSCRIBE channels..` on the subscription connection: rooms that got their
    /// first member here. Answered with no value.
    Subscribe {
        /// At most [`CHANNELS_PER_COMMAND`](super::CHANNELS_PER_COMMAND).
        channels: Vec<String>,
    },
    /// `UNSUBSCRIBE channels..` on the subscription connection: rooms that lost their
    /// last member here. Answered with no value.
    Unsubscribe {
        /// At most [`CHANNELS_PER_COMMAND`](super::CHANNELS_PER_COMMAND).
        channels: Vec<String>,
    },
    /// `SMEMBERS ns(available_portals_pool)`: the portals available now.
    LoadPortals,
    /// `PUBLISH channel payload`: a `ws` envelope, a room's envelope, or a portal event.
    Publish {
        /// `ns("ws")`, a room's channel, or `ns("portal")`.
        channel: String,
        /// The encoded envelope or portal event.
        payload: String,
    },
    /// `XADD stream MAXLEN ~ maxlen * fields..`: append a client event to a durable
    /// portal stream ([`QueuedPortalEvent`](crate::cluster::QueuedPortalEvent)).
    /// Answered with the entry's id.
    Enqueue {
        /// `ns("portal_q:<p>")`.
        stream: String,
        /// Entries the stream keeps, about.
        maxlen: usize,
        /// The entry's fields and values.
        event: Vec<String>,
    },
    /// [`Script::Route`]: publish an envelope to `ids` on the channel of each live
    /// replica holding some of them (routing by interest, instead of on `ws`).
    Route {
        /// At most [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND).
        ids: Vec<String>,
        /// The envelope around its recipients
        /// ([`Envelope::halves`](crate::cluster::Envelope::halves)).
        head: String,
        /// See `head`.
        tail: String,
    },
    /// [`Script::StreamPublish`]: append a message to a recoverable room's stream
    /// and publish it on the room's channel with its position; answers the
    /// position.
    StreamPublish {
        /// The room.
        room: String,
        /// The room's envelope without its closing brace
        /// ([`RoomEnvelope::head`](crate::rooms::RoomEnvelope::head)).
        head: String,
        /// The message as the stream keeps it, `{"op","d","t"}`.
        entry: String,
        /// How much the stream keeps.
        keep: StreamKeep,
        /// The run id of the Redis process of the link (`""`: unknown): a record
        /// another process wrote starts a new epoch.
        run_id: String,
    },
    /// [`Script::StreamRead`]: a recoverable room's epoch and last offset, and with
    /// `after` the entries after that offset (at most `keep.size`).
    StreamRead {
        /// The room.
        room: String,
        /// Read the entries after this offset.
        after: Option<u64>,
        /// How much the stream keeps.
        keep: StreamKeep,
        /// As for [`StreamPublish`](Command::StreamPublish).
        run_id: String,
    },
    /// `SMISMEMBER ns(connected_clients) ids..`: which ids are connected anywhere.
    CheckPresence {
        /// At most [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND).
        ids: Vec<String>,
    },
    /// [`Script::AppendMany`]: store one message for each of `ids` not connected by
    /// now, at most `cap` per id; answers which ids were connected.
    StoreMany {
        /// At most [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND) ids.
        ids: Vec<String>,
        /// The stored entry, `{"op","d","t"}`.
        text: String,
        /// Most messages kept per id.
        cap: usize,
        /// Then `WAIT` for this many Redis replicas, this long.
        wait: Option<StoreWait>,
    },
    /// `HGET ns(undelivered_messages) id`: the messages stored for `id`.
    Load {
        /// The id whose messages to read.
        id: String,
    },
    /// [`Script::Trim`]: remove the messages stored for `id` that a redelivery wrote
    /// to its connection (or skipped over the cap): those up to the last entry, among
    /// the first `count`, whose text is `last`.
    Trim {
        /// The id whose messages were redelivered.
        id: String,
        /// The loaded entries up to the last one redelivered, corrupt ones included.
        count: usize,
        /// The stored text of the last entry redelivered.
        last: String,
    },
    /// `HDEL ns(undelivered_messages) id`: the client declined its stored messages.
    Clear {
        /// The id whose messages to delete.
        id: String,
    },
    /// [`Script::Arrive`]: the first connection of each id here authenticated; it
    /// goes to `connected_clients`, this replica's ids set and its route.
    Arrive {
        /// At most [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND).
        ids: Vec<String>,
    },
    /// [`Script::Leave`]: the last connection of `id` here is gone.
    Leave {
        /// The id.
        id: String,
    },
    /// `INCRBY ns(connected_clients_count) delta`, and the same on this replica's
    /// share of it.
    ConnectionsDelta {
        /// Connections opened minus closed.
        delta: i64,
    },
    /// [`Script::Renew`]: renew the lease, register exactly `ids`, reconcile the count.
    Renew {
        /// The lease's time to live, in milliseconds.
        lease_ms: u64,
        /// Connections open here.
        connections: usize,
        /// The run id of the Redis process of this link.
        run_id: String,
        /// The ids with a connection here (none when presence is off).
        ids: Vec<String>,
    },
    /// [`Script::Rooms`]: this replica's presence in rooms. With `clear`, every
    /// membership it registered is taken out first (a new link); then `entries`
    /// (room, id, connections: negative to leave) are added.
    Rooms {
        /// Take out every membership registered before.
        clear: bool,
        /// At most [`IDS_PER_COMMAND`](crate::cluster::IDS_PER_COMMAND).
        entries: Vec<(String, String, i64)>,
    },
    /// `HGETALL ns(mesa_room_members:<room>)`: who is in `room`, with connections.
    RoomMembers {
        /// The room.
        room: String,
    },
    /// [`Script::Janitor`]: clean up after replicas whose lease expired; with
    /// `retire`, give up this replica's own lease first.
    Janitor {
        /// Leave the cluster.
        retire: bool,
        /// The run id of the Redis process of this link.
        run_id: String,
    },
}

/// How much of a recoverable room's stream Redis keeps
/// ([`RecoveryConfig`](crate::recovery::RecoveryConfig)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamKeep {
    /// Entries at most.
    pub size: usize,
    /// Seconds the stream lives after its last append.
    pub ttl_secs: u64,
    /// Seconds the meta record lives after its last use.
    pub meta_ttl_secs: u64,
}

impl StreamKeep {
    /// What `config` keeps (a TTL of at least one second: Redis takes whole ones).
    pub fn new(config: &crate::recovery::RecoveryConfig) -> Self {
        StreamKeep {
            size: config.size,
            ttl_secs: config.ttl.as_secs().max(1),
            meta_ttl_secs: config.meta_ttl.as_secs().max(1),
        }
    }
}

/// One Redis call of a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    /// A plain command: its name and arguments.
    Plain {
        /// `PUBLISH`, `SMISMEMBER`, `HGET`, ...
        name: &'static str,
        /// The arguments, keys included.
        args: Vec<String>,
    },
    /// `EVALSHA` of one of our scripts (`EVAL` with its source when Redis answers
    /// `NOSCRIPT`).
    Script {
        /// Which script.
        script: Script,
        /// `KEYS`.
        keys: Vec<String>,
        /// `ARGV`.
        args: Vec<String>,
    },
}

/// A value Redis answered one [`Call`] with (RESP2, as redis-rs reports it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisValue {
    /// A nil bulk string or array.
    Nil,
    /// An integer.
    Int(i64),
    /// A bulk or simple string.
    Text(String),
    /// An array.
    Array(Vec<RedisValue>),
}

/// What Redis answered a [`Command`]: one [`RedisValue`] per call, or the error that
/// failed the round trip (a Redis error reply, or a broken connection).
pub type Reply = Result<Vec<RedisValue>, String>;

/// Where a replica keeps its data: the namespace's keys, and the per-replica keys
/// of this replica's presence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    ns: Namespace,
    replica: String,
}

impl Keys {
    /// The keys of replica `replica` in namespace `ns`.
    pub fn new(ns: Namespace, replica: impl Into<String>) -> Self {
        Keys {
            ns,
            replica: replica.into(),
        }
    }

    /// The namespace.
    pub fn namespace(&self) -> &Namespace {
        &self.ns
    }

    /// This replica's id (the `origin` of its envelopes).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The keys and the first arguments of every presence script (see
    /// [`Script::Leave`]).
    fn replica_call(&self, script: Script, extra: impl IntoIterator<Item = String>) -> Call {
        let mut args = vec![
            self.replica.clone(),
            "mesa_replica_ids:".to_owned(),
            "mesa_replica_lease:".to_owned(),
            "mesa_replica_conns:".to_owned(),
            self.ns.key(""),
        ];
        args.extend(extra);
        Call::Script {
            script,
            keys: vec![
                self.ns.connected_clients(),
                self.ns.replicas(),
                self.ns.connected_clients_count(),
            ],
            args,
        }
    }
}

fn plain(name: &'static str, args: Vec<String>) -> Call {
    Call::Plain { name, args }
}

/// `key` followed by `rest`.
fn with_key(key: String, rest: &[String]) -> Vec<String> {
    let mut args = Vec::with_capacity(rest.len() + 1);
    args.push(key);
    args.extend_from_slice(rest);
    args
}

impl Command {
    /// The Redis calls this command stands for, pipelined in one round trip, with
    /// every key and argument decided here (the driver adds nothing).
    pub fn calls(&self, keys: &Keys) -> Vec<Call> {
        let ns = &keys.ns;
        match self {
            Command::Connect => Vec::new(),
            Command::Ping => vec![plain("PING", Vec::new())],
            Command::Subscribe { channels } => vec![plain("SUBSCRIBE", channels.clone())],
            Command::Unsubscribe { channels } => vec![plain("UNSUBSCRIBE", channels.clone())],
            Command::LoadPortals => vec![plain("SMEMBERS", vec![ns.available_portals_pool()])],
            Command::Publish { channel, payload } => {
                vec![plain("PUBLISH", vec![channel.clone(), payload.clone()])]
            }
            Command::StreamPublish {
                room,
                head,
                entry,
                keep,
                run_id,
            } => vec![Call::Script {
                script: Script::StreamPublish,
                keys: vec![
                    ns.room_stream(room),
                    ns.room_stream_meta(room),
                    ns.stream_epochs(),
                    ns.room_channel(room),
                ],
                args: vec![
                    keep.meta_ttl_secs.to_string(),
                    entry.clone(),
                    keep.size.to_string(),
                    keep.ttl_secs.to_string(),
                    head.clone(),
                    run_id.clone(),
                ],
            }],
            Command::StreamRead {
                room,
                after,
                keep,
                run_id,
            } => vec![Call::Script {
                script: Script::StreamRead,
                keys: vec![
                    ns.room_stream(room),
                    ns.room_stream_meta(room),
                    ns.stream_epochs(),
                ],
                args: vec![
                    keep.meta_ttl_secs.to_string(),
                    after.map(|after| after.to_string()).unwrap_or_default(),
                    keep.size.to_string(),
                    run_id.clone(),
                ],
            }],
            Command::Enqueue {
                stream,
                maxlen,
                event,
            } => {
                let head = [stream.clone(), "MAXLEN".into(), "~".into()];
                let args = head
                    .into_iter()
                    .chain([maxlen.to_string(), "*".into()])
                    .chain(event.iter().cloned());
                vec![plain("XADD", args.collect())]
            }
            Command::CheckPresence { ids } => {
                vec![plain("SMISMEMBER", with_key(ns.connected_clients(), ids))]
            }
            Command::StoreMany {
                ids,
                text,
                cap,
                wait,
            } => {
                let mut args = Vec::with_capacity(ids.len() + 2);
                args.push(text.clone());
                args.push(cap.to_string());
                args.extend_from_slice(ids);
                let mut calls = vec![Call::Script {
                    script: Script::AppendMany,
                    keys: vec![ns.undelivered_messages(), ns.connected_clients()],
                    args,
                }];
                if let Some(wait) = wait {
                    let timeout = wait.timeout.as_millis().max(1).to_string();
                    calls.push(plain("WAIT", vec![wait.replicas.to_string(), timeout]));
                }
                calls
            }
            Command::Load { id } => {
                vec![plain("HGET", vec![ns.undelivered_messages(), id.clone()])]
            }
            Command::Trim { id, count, last } => vec![Call::Script {
                script: Script::Trim,
                keys: vec![ns.undelivered_messages()],
                args: vec![id.clone(), count.to_string(), last.clone()],
            }],
            Command::Clear { id } => {
                vec![plain("HDEL", vec![ns.undelivered_messages(), id.clone()])]
            }
            Command::Arrive { ids } => vec![keys.replica_call(Script::Arrive, ids.clone())],
            Command::Route { ids, head, tail } => {
                let args = [head.clone(), tail.clone()].into_iter();
                vec![keys.replica_call(Script::Route, args.chain(ids.iter().cloned()))]
            }
            Command::Leave { id } => vec![keys.replica_call(Script::Leave, [id.clone()])],
            Command::ConnectionsDelta { delta } => vec![
                plain(
                    "INCRBY",
                    vec![ns.connected_clients_count(), delta.to_string()],
                ),
                plain(
                    "INCRBY",
                    vec![ns.replica_connections(&keys.replica), delta.to_string()],
                ),
            ],
            Command::Renew {
                lease_ms,
                connections,
                run_id,
                ids,
            } => {
                let head = [
                    lease_ms.to_string(),
                    connections.to_string(),
                    run_id.clone(),
                ];
                let args = head.into_iter().chain(ids.iter().cloned());
                vec![keys.replica_call(Script::Renew, args)]
            }
            Command::Rooms { clear, entries } => {
                let mode = if *clear { "clear" } else { "add" };
                let mut args = vec![ns.key(""), mode.to_owned()];
                for (room, id, by) in entries {
                    args.extend([room.clone(), id.clone(), by.to_string()]);
                }
                vec![Call::Script {
                    script: Script::Rooms,
                    keys: vec![ns.replica_rooms(&keys.replica)],
                    args,
                }]
            }
            Command::RoomMembers { room } => vec![plain("HGETALL", vec![ns.room_members(room)])],
            Command::Janitor { retire, run_id } => {
                let mode = if *retire { "retire" } else { "" };
                vec![keys.replica_call(Script::Janitor, [mode.to_owned(), run_id.clone()])]
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_use_upstream_keys_and_our_script_layout() {
        let keys = Keys::new(Namespace::new(Some("prod".into())), "r1");
        let arrive = Command::Arrive {
            ids: vec!["a".into(), "b".into()],
        };
        let Call::Script { script, args, .. } = &arrive.calls(&keys)[0] else {
            panic!()
        };
        assert_eq!(*script, Script::Arrive);
        assert_eq!(&args[5..], ["a", "b"]);
        let route = Command::Route {
            ids: vec!["a".into()],
            head: "{".into(),
            tail: "}".into(),
        };
        let Call::Script { script, args, .. } = &route.calls(&keys)[0] else {
            panic!()
        };
        assert_eq!(*script, Script::Route);
        assert_eq!(&args[5..], ["{", "}", "a"]);
        let Call::Script {
            script,
            keys: k,
            args,
        } = &Command::Leave { id: "a".into() }.calls(&keys)[0]
        else {
            panic!()
        };
        assert_eq!(*script, Script::Leave);
        assert_eq!(k[0], "connected_clients_prod");
        assert_eq!(
            args,
            &[
                "r1",
                "mesa_replica_ids:",
                "mesa_replica_lease:",
                "mesa_replica_conns:",
                "_prod",
                "a"
            ]
        );
        let store = Command::StoreMany {
            ids: vec!["x".into()],
            text: "{}".into(),
            cap: 3,
            wait: None,
        };
        let Call::Script { args, .. } = &store.calls(&keys)[0] else {
            panic!()
        };
        assert_eq!(args, &["{}", "3", "x"]);
        let waiting = Command::StoreMany {
            ids: vec!["x".into()],
            text: "{}".into(),
            cap: 3,
            wait: Some(StoreWait {
                replicas: 1,
                timeout: std::time::Duration::from_millis(250),
            }),
        };
        assert_eq!(
            waiting.calls(&keys)[1],
            plain("WAIT", vec!["1".into(), "250".into()])
        );
        assert!(Command::Connect.calls(&keys).is_empty());
        assert!(
            Script::ALL
                .iter()
                .all(|s| s.source().contains("redis.call") || s.source().contains("redis.pcall"))
        );
    }
}
