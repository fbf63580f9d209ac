// The crate documentation, with its run-loop doctest, lives in `docs/crate.md`: the
// doctest plays the adapter, and only an adapter reads the clock.
#![doc = include_str!("../docs/crate.md")]
#![warn(missing_docs, unreachable_pub)]

pub mod backoff;
pub mod client;
pub mod close;
pub mod cluster;
pub mod config;
pub mod heartbeat;
pub mod hello;
pub mod hub;
pub mod limits;
pub mod portal;
pub mod rate;
pub mod recovery;
pub mod relay;
pub mod replica;
pub mod rng;
pub mod room_table;
pub mod rooms;
pub mod session;
#[cfg(feature = "sim")]
pub mod sim;
mod subscriptions;
pub mod sync;
mod timer;
pub mod wire;

pub use backoff::{Backoff, BackoffConfig};
pub use client::{
    ClientConfig, ClientError, ClientEvent, ClientSession, ClientTransmit, Reference,
};
pub use close::{Close, CloseCode};
pub use cluster::{
    DEFAULT_PORTAL_PARTITIONS, Envelope, Namespace, PortalChoice, PortalEvent, PortalEventKind,
    PortalPool, PortalUpdate, PresenceSplit, QueuedPortalEvent, RemotePlan, Round, plan_remote,
    portal_partition, split_by_presence,
};
pub use config::{
    AuthConfig, ConfigError, HeartbeatConfig, ServerConfig, ServerConfigBuilder, SyncConfig,
};
pub use hello::{Hello, Rule};
pub use hub::{
    Action, ConnId, Delivery, Departure, Hub, Recipients, TooManyRecipients, distinct_ids,
};
pub use limits::{Limits, RateLimitPolicy};
pub use portal::durable::{
    DurableCommand, DurableDelivery, DurableKeys, DurablePortal, DurablePortalConfig,
    DurablePortalEvent,
};
pub use portal::{PortalCommand, PortalKeys, PortalMember, PortalMemberConfig, PortalMemberEvent};
pub use rate::TokenBucket;
pub use relay::{RelayAction, dev_authenticate, relay};
pub use replica::{
    Call, Command, Dispatch, DispatchConfig, DispatchReport, DurablePortals, Keys, LocalDelivery,
    Loss, RedisValue, Replica, ReplicaConfig, ReplicaEvent, Reply, Script, SendReport, StoreWait,
    Token,
};
pub use session::{EventInterest, ServerSession, SessionError, SessionEvent, Transmit};
pub use sync::{MessageOptions, Redelivery};
pub use wire::{DecodeError, Frame, Message, Opcode};
