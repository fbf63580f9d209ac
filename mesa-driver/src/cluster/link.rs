//! What every Redis user of the driver shares (the cluster task, the Dispatcher, the
//! Portal): one timeout, command connections that honour it, and the shape of a live
//! subscription.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{AsyncConnectionConfig, Msg, RedisResult};

/// Time Redis has to answer any command before the link counts as broken.
pub(crate) const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// A client of the Redis at `url`. With `ca_pem` (PEM certificates; a `rediss://`
/// URL only, or this fails) its TLS link trusts those roots instead of the platform's
/// store: redis-rs's [`TlsCertificates`](redis::TlsCertificates), the same for the
/// tokio and the smol runtime of redis-rs (async-std uses the smol one).
pub(crate) fn client(url: &str, ca_pem: Option<&[u8]>) -> RedisResult<redis::Client> {
    match ca_pem {
        None => redis::Client::open(url),
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
    }
}

/// Where a Redis instance is: at a URL, or behind Redis Sentinel, written
/// `redis+sentinel://HOST:PORT[,HOST:PORT...]/MASTER` (the sentinels, and the name
/// of the master they watch). Through Sentinel, every (re)connection asks the
/// sentinels for the current primary, so a link broken by a failover reopens on the
/// new one.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    Direct(redis::Client),
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

/// The scheme of a Redis instance behind Sentinel.
const SENTINEL_SCHEME: &str = "redis+sentinel://";

impl Target {
    /// The instance `url` names; `ca_pem` as for [`client`] (not with Sentinel).
    pub(crate) fn parse(url: &str, ca_pem: Option<&[u8]>) -> RedisResult<Target> {
        let Some(rest) = url.strip_prefix(SENTINEL_SCHEME) else {
            return client(url, ca_pem).map(Target::Direct);
        };
        let invalid = |what: &'static str| {
            redis::RedisError::from((redis::ErrorKind::InvalidClientConfig, what))
        };
        if ca_pem.is_some() {
            return Err(invalid("TLS is not supported through Sentinel"));
        }
        let (hosts, master) = rest
            .split_once('/')
            .ok_or_else(|| invalid("redis+sentinel:// needs /MASTER after the sentinels"))?;
        let master = master.trim_end_matches('/');
        let sentinels: Vec<String> = hosts
            .split(',')
            .filter(|host| !host.is_empty())
            .map(|host| format!("redis://{host}/"))
            .collect();
        if master.is_empty() || sentinels.is_empty() {
            return Err(invalid(
                "redis+sentinel:// needs sentinels and a master name",
            ));
        }
        // Checked now, so that a wrong address fails when the URL is given.
        redis::sentinel::Sentinel::build(sentinels.clone())?;
        Ok(Target::Sentinel {
            sentinels,
            master: master.to_owned(),
        })
    }

    /// A client of the instance now: through Sentinel, of the current primary.
    pub(crate) async fn client(&self) -> RedisResult<redis::Client> {
        match self {
            Target::Direct(client) => Ok(client.clone()),
            Target::Sentinel { sentinels, master } => {
                let mut sentinel = redis::sentinel::Sentinel::build(sentinels.clone())?;
                sentinel.async_master_for(master, None).await
            }
        }
    }
}

/// Check that `pem` holds certificates before redis-rs gets it (an empty input would
/// only fail later, as an unknown issuer at every connection).
pub(crate) fn check_ca_pem(pem: &[u8]) -> Result<(), crate::tls::TlsError> {
    crate::tls::certificates_from_pem(pem).map(drop)
}

/// A command connection whose connects and replies are bounded by [`REDIS_TIMEOUT`].
pub(crate) async fn commands(client: &redis::Client) -> RedisResult<MultiplexedConnection> {
    let settings = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(REDIS_TIMEOUT))
        .set_response_timeout(Some(REDIS_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&settings)
        .await
}

/// A live link: commands, and a subscription's sink and messages.
pub(crate) struct Link {
    pub(crate) conn: MultiplexedConnection,
    pub(crate) sink: PubSubSink,
    pub(crate) messages: Pin<Box<dyn Stream<Item = Msg> + Send>>,
}
