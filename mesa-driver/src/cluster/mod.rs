//! The cluster link of a server: replication through Redis pub/sub, message sync,
//! presence with a lease per replica, and portal events, in upstream's Redis layout.
//!
//! One task per server owns the Redis connections. Connection tasks and handles hand
//! it [`Job`]s; it batches them into pipelines, delivers envelopes from other
//! replicas to local connections, renews this replica's lease, cleans up after
//! replicas whose lease expired, and reconnects (resubscribing and re-registering)
//! after any failure. The decisions (what to publish, store, redeliver) come from
//! `mesa_core`; this module only performs them.

pub(crate) mod link;
mod ops;
pub(crate) mod scripts;
mod task;

use std::time::Duration;

use futures_channel::{mpsc, oneshot};
use mesa_core::{Message, MessageOptions, PortalChoice, PortalEventKind, RemotePlan};

use crate::middleware::Middlewares;

pub(crate) use ops::{BatchOutcome, RemoteSend, send_round};
pub(crate) use task::spawn;

/// How a server joins a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// The Redis URL, e.g. `redis://127.0.0.1:6379/`.
    pub url: String,
    /// Isolates clusters sharing one Redis (`ns(x)` = `x_<namespace>`).
    pub namespace: Option<String>,
    /// How long this replica's presence survives without renewal: the ids of a replica
    /// that crashed (or lost Redis) leave `connected_clients` within about this time.
    /// Default 10 s; renewed every third of it.
    pub lease: Duration,
    /// Forward client events to portals, picking one per event this way.
    pub portals: Option<PortalChoice>,
    /// Most jobs (sends, presence changes, redelivery reads and trims) waiting for
    /// Redis: queued for the cluster task (beyond it, new jobs are refused), and
    /// kept by it while Redis is unreachable (beyond it, they are dropped). Both are
    /// reported to the middleware (`on_error`, `on_cluster_jobs_dropped`).
    /// Default 10 000.
    pub max_pending: usize,
    /// For a `rediss://` URL: PEM certificates to trust instead of the platform's
    /// store (a private CA). Default `None`: the platform's store (which
    /// `SSL_CERT_FILE` replaces). With a `redis://` URL the link cannot be made.
    pub redis_ca_pem: Option<Vec<u8>>,
}

impl ClusterConfig {
    /// A cluster on `url` with the defaults.
    pub fn new(url: impl Into<String>) -> Self {
        ClusterConfig {
            url: url.into(),
            namespace: None,
            lease: Duration::from_secs(10),
            portals: None,
            max_pending: 10_000,
            redis_ca_pem: None,
        }
    }
}

/// Work for the cluster task.
#[derive(Debug)]
pub(crate) enum Job {
    /// The remote part of a send.
    Send(RemoteSend),
    /// A first connection of this id here (SADD `connected_clients`).
    Arrive(String),
    /// The last connection of this id here closed.
    Leave(String),
    /// A connection opened (+1) or closed (-1): `connected_clients_count`.
    Connections(i64),
    /// Read the stored messages of an id.
    Load {
        id: String,
        reply: oneshot::Sender<Vec<Message>>,
    },
    /// Remove the first `count` stored messages of an id (written to its socket).
    Trim { id: String, count: usize },
    /// Delete the stored messages of an id.
    Clear { id: String },
    /// Tell a portal about a client event.
    Portal {
        kind: PortalEventKind,
        client_id: Option<String>,
    },
    /// Leave the cluster: flush, give up the lease, remove this replica's presence.
    Retire { reply: oneshot::Sender<()> },
}

/// What the rest of the server holds to reach the cluster task.
#[derive(Clone)]
pub(crate) struct ClusterHandle {
    jobs: mpsc::Sender<Job>,
    /// Told of every job refused (`on_cluster_jobs_dropped`).
    middleware: Middlewares,
    pub(crate) sync: bool,
    pub(crate) portals: bool,
}

impl ClusterHandle {
    /// Queue a job; `false` when the queue is full (Redis unreachable for long, or
    /// far behind).
    pub(crate) fn submit(&self, job: Job) -> bool {
        match self.jobs.clone().try_send(job) {
            Ok(()) => true,
            Err(refused) => {
                // Presence is re-registered at the next renewal anyway.
                let presence = matches!(
                    refused.into_inner(),
                    Job::Arrive(_) | Job::Leave(_) | Job::Connections(_)
                );
                if !presence {
                    self.middleware.emit(|m| m.on_cluster_jobs_dropped(1));
                }
                false
            }
        }
    }

    /// Queue the remote part of a send, if it has one.
    pub(crate) fn send(
        &self,
        message: &Message,
        options: Option<&MessageOptions>,
        plan: RemotePlan,
    ) -> bool {
        if plan == RemotePlan::Nothing {
            return true;
        }
        self.submit(Job::Send(RemoteSend {
            message: message.clone(),
            options: options.cloned(),
            plan,
        }))
    }
}
