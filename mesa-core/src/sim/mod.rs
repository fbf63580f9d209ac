//! A deterministic simulation of Mesa clusters, for tests and for reasoning about
//! scale (feature `sim`): real [`ServerSession`](crate::ServerSession)s,
//! [`ClientSession`](crate::ClientSession)s and [`Replica`](crate::Replica)s, joined
//! by simulated WebSockets ([`net`]) and a model of Redis ([`redis`]), on a virtual
//! clock that jumps from one event to the next ([`schedule`]). No sockets, no
//! sleeps, no clock: the caller passes the one starting instant, and every random
//! choice comes from a seed.
//!
//! [`cluster::ClusterSim`] runs N replicas and many clients with faults (cuts,
//! crashes, partitions, slow answers, Redis restarts); [`track`] holds the records
//! of every message and the properties checked over them; [`portal::PortalRig`]
//! drives one [`PortalMember`](crate::PortalMember) through a failing link.

pub mod cluster;
pub mod durable_portal;
pub mod net;
pub mod portal;
pub mod redis;
pub mod schedule;
pub mod track;

pub use cluster::{ClusterSim, Counters, SimConfig, SimReplica};
pub use durable_portal::DurableRig;
pub use portal::PortalRig;
pub use redis::RedisModel;
