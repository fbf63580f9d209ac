//! The cluster link of a server: one task per server executes its replica's Redis
//! commands (`mesa_core::Replica` decides replication, sync, presence and its lease,
//! portal events, in upstream's Redis layout) and feeds back the answers, the
//! pub/sub messages and the replica's timer. The Redis helpers the Dispatcher and
//! the Portal share live here too.

pub(crate) mod calls;
pub(crate) mod link;
mod task;

use std::time::Duration;

use mesa_core::recovery::RecoveryConfig;
use mesa_core::{DurablePortals, PortalChoice, StoreWait};

pub(crate) use task::spawn;

/// How a server joins a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL, e.g. `redis://127.0.0.1:6379/`, `rediss://` for TLS, or
    /// `redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER` for the primary that Redis
    /// Sentinel names: every (re)connection asks the sentinels, so after a failover
    /// the links reopen on the promoted replica.
    pub url: String,
    /// Further Redis instances to spread the cluster's data over (sharding): each
    /// id's and each room's keys and channels live on one instance, chosen by a
    /// consistent hash ([`mesa_core::cluster::shard_of`]), the global ones (`ws`,
    /// portals, the connection counter) on `url`'s; every replica links to each.
    /// Every replica and Dispatcher of the cluster must list the same URLs in the
    /// same order, and the legacy bus must be off (Node replicas know one Redis).
    /// Default none.
    pub shard_urls: Vec<String>,
    /// Isolates clusters sharing one Redis (`ns(x)` = `x_<namespace>`).
    pub namespace: Option<String>,
    /// How long this replica's presence survives without renewal: the ids of a replica
    /// that crashed (or lost Redis) leave `connected_clients` within about this time.
    /// Default 10 s; renewed every third of it.
    pub lease: Duration,
    /// Forward client events to portals, picking one per event this way.
    pub portals: Option<PortalChoice>,
    /// Also append every client event to the durable portal streams, which durable
    /// portals ([`DurablePortal`](crate::DurablePortal)) consume at least once
    /// (`mesa_core::DurablePortals`); with `portals` off, only there. Default `None`.
    pub durable_portals: Option<DurablePortals>,
    /// Most jobs (sends, redelivery reads, trims and clears, portal events) waiting
    /// for Redis, queued or in flight, also while Redis is unreachable; beyond it a
    /// new job is refused and reported to the middleware (`on_error`,
    /// `on_cluster_jobs_dropped`). Presence changes wait besides, and are registered
    /// anew by the lease renewal anyway (`mesa_core::ReplicaConfig::max_pending`).
    /// Default 10 000.
    pub max_pending: usize,
    /// For a `rediss://` URL: PEM certificates to trust instead of the platform's
    /// store (a private CA). Default `None`: the platform's store (which
    /// `SSL_CERT_FILE` replaces). With a `redis://` URL the link cannot be made.
    pub redis_ca_pem: Option<Vec<u8>>,
    /// Publish sends to ids on the shared `ws` channel, which every replica reads,
    /// @cryb/mesa's too (a mixed cluster needs it). Off, each send is routed to the
    /// replicas that hold its ids, so a replica parses only what its connections need,
    /// but Node replicas no longer get our sends to ids
    /// (`mesa_core::ReplicaConfig::legacy_bus`). Default on.
    pub legacy_bus: bool,
    /// Messages stored for offline ids count as stored only once this many Redis
    /// replicas have them (`WAIT`; `mesa_core::StoreWait`): a failover then cannot lose
    /// them. Default `None`.
    pub store_wait: Option<StoreWait>,
    /// Rooms that keep a stream of their last messages in Redis, so an extended
    /// client that comes back (to any replica) gets exactly what it missed, or is
    /// told it cannot (`mesa_core::recovery`). Every replica and Dispatcher of the
    /// cluster needs the same. Default `None`.
    pub recovery: Option<RecoveryConfig>,
}

impl ClusterConfig {
    /// A cluster on `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ClusterConfig {
            url: url.into(),
            shard_urls: Vec::new(),
            namespace: None,
            lease: Duration::from_secs(10),
            portals: None,
            durable_portals: None,
            max_pending: 10_000,
            redis_ca_pem: None,
            legacy_bus: true,
            store_wait: None,
            recovery: None,
        }
    }

    /// Every Redis instance's URL, in shard order (`url` first).
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.shard_urls.iter().map(String::as_str))
    }
}
