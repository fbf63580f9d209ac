//! `mesa serve`: a Mesa server with the relay behaviour, heartbeats and optional
//! authentication, that shuts down cleanly on SIGTERM or ctrl-c; optionally with
//! Prometheus metrics and health checks (`--metrics-listen`), as the chat demo
//! (`--demo`), and over TLS (`--tls-cert`, `--tls-key`: `wss://` and `https://`,
//! the certificate reloaded on SIGHUP).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use mesa_tokio::metrics::Metrics;
use mesa_tokio::{
    ClusterConfig, DevAuthenticator, Handler, Ignore, Limits, RateLimitPolicy, Relay, Server,
    ServerBuilder, TransportConfig,
};
use mesa_tokio::{DurablePortals, PortalChoice, RoomPolicy, SyncConfig};

use crate::Failure;
use crate::auth::{AuthMode, JwtAuthenticator};
use crate::bus::{Durability, LegacyBus, Recovery};
use crate::demo::DemoChat;
use crate::http::{Health, Http};
use crate::logging::LogConnections;
use crate::signals::{Hangups, Signals};
use crate::tls::{RedisCa, TlsFiles};

/// How long open connections get to finish their closing handshake at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);

/// Options of `mesa serve`.
#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on (`host:port`; port 0 picks a free port).
    #[arg(long, env = "MESA_LISTEN", default_value = "127.0.0.1:4000")]
    listen: String,

    /// Path of the WebSocket endpoint; other paths get 404.
    #[arg(long, env = "MESA_PATH", default_value = "/", value_parser = parse_path)]
    path: String,

    /// Milliseconds between heartbeats (0 turns heartbeats off).
    #[arg(long, env = "MESA_HEARTBEAT_INTERVAL", default_value_t = 10_000)]
    heartbeat_interval: u64,

    /// Missed heartbeats in a row before a client is disconnected.
    #[arg(
        long,
        env = "MESA_HEARTBEAT_MAX_ATTEMPTS",
        default_value_t = 3,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    heartbeat_max_attempts: u32,

    /// Milliseconds between reconnection attempts, announced to clients (0: not announced).
    #[arg(long, env = "MESA_RECONNECT_INTERVAL", default_value_t = 5_000)]
    reconnect_interval: u64,

    /// How clients authenticate: `none`, `dev` (any token is the id; demos only) or
    /// `jwt` (an HS256 token signed with --jwt-secret, sent as `token`).
    #[arg(long, env = "MESA_AUTH", value_enum, default_value_t = AuthMode::None)]
    auth: AuthMode,

    /// Secret of `--auth jwt` (prefer the environment variable to the command line).
    #[arg(long, env = "MESA_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,

    /// Milliseconds a client has to authenticate before it is closed with 1008.
    #[arg(
        long,
        env = "MESA_AUTH_TIMEOUT",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    auth_timeout: u64,

    /// Server-wide sends skip connections that have not authenticated.
    #[arg(
        long,
        env = "MESA_AUTH_REQUIRED",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    auth_required: bool,

    /// Do not relay ECHO and BROADCAST: messages are only logged at debug level.
    #[arg(
        long,
        env = "MESA_NO_RELAY",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    no_relay: bool,

    /// Replicate through this Redis (e.g. `redis://127.0.0.1:6379/`, `rediss://` for
    /// TLS, `redis+sentinel://HOST:PORT,HOST:PORT/MASTER` for the primary that Redis
    /// Sentinel names, followed through failovers): replicas of ours and of
    /// @cryb/mesa on it deliver each other's sends.
    /// Several (repeated, or comma-separated) spread ids and rooms over them by a
    /// consistent hash, in the order given (the same on every replica and
    /// Dispatcher; needs --legacy-bus off).
    #[arg(long, env = "MESA_REDIS", value_delimiter = ',')]
    redis: Vec<String>,

    #[command(flatten)]
    redis_ca: RedisCa,

    #[command(flatten)]
    bus: LegacyBus,

    #[command(flatten)]
    durability: Durability,

    #[command(flatten)]
    recovery: Recovery,

    /// Isolate this cluster from others on the same Redis.
    #[arg(long, env = "MESA_NAMESPACE", requires = "redis")]
    namespace: Option<String>,

    /// Store messages for offline ids and redeliver them when they authenticate.
    #[arg(
        long,
        env = "MESA_SYNC",
        requires = "redis",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    sync: bool,

    /// Milliseconds between two redelivered messages.
    #[arg(long, env = "MESA_REDELIVERY_INTERVAL", default_value_t = 0)]
    redelivery_interval: u64,

    /// Most messages stored per offline id (the oldest are dropped beyond it).
    #[arg(
        long,
        env = "MESA_MAX_STORED",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_stored: u64,

    /// Forward client events to portals: `round-robin` (upstream's distributeLoad) or `random`.
    #[arg(long, env = "MESA_PORTALS", value_enum, requires = "redis")]
    portals: Option<PortalMode>,

    #[command(flatten)]
    durable_portals: DurablePortalsArgs,

    /// Rooms (docs/protocol.md): `off`; `authenticated`: any authenticated client may
    /// subscribe to and publish in any room; `open`: any client at all (demos only).
    #[arg(long, env = "MESA_ROOMS", value_enum, default_value = "off")]
    rooms: RoomsMode,

    /// Milliseconds this replica's presence survives without renewal (a crashed
    /// replica's ids leave `connected_clients` within about this time).
    #[arg(
        long,
        env = "MESA_LEASE",
        default_value_t = 10_000,
        value_parser = clap::value_parser!(u64).range(300..)
    )]
    lease: u64,

    /// Sustained inbound messages per second one connection may send (beyond it and
    /// --max-message-burst, --rate-limit-policy applies).
    #[arg(
        long,
        env = "MESA_MAX_MESSAGES_PER_SECOND",
        default_value_t = Limits::default().max_messages_per_second,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_messages_per_second: u32,

    /// Inbound messages one connection may send at once above the sustained rate.
    #[arg(
        long,
        env = "MESA_MAX_MESSAGE_BURST",
        default_value_t = Limits::default().max_message_burst,
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    max_message_burst: u32,

    /// Most distinct ids one send may address, after excluding: a client's BROADCAST
    /// listing more closes it with 1008 `too many recipients: N > max`.
    #[arg(
        long,
        env = "MESA_MAX_RECIPIENTS",
        default_value_t = Limits::default().max_recipients,
        value_parser = parse_positive
    )]
    max_recipients: usize,
    /// What happens to a connection past its message rate and burst: `slow` (stop
    /// reading from it until it is within its rate again; nothing is lost) or `close`
    /// (close 1008 `rate limit exceeded`, for servers that treat it as abuse).
    #[arg(
        long,
        env = "MESA_RATE_LIMIT_POLICY",
        value_enum,
        default_value_t = RatePolicy::Slow
    )]
    rate_limit_policy: RatePolicy,

    /// Largest accepted message, in bytes (close 1009 above it).
    #[arg(
        long,
        env = "MESA_MAX_MESSAGE_BYTES",
        default_value_t = Limits::default().max_message_bytes,
        value_parser = parse_positive
    )]
    max_message_bytes: usize,

    /// Deepest accepted JSON nesting of a message (close 1009 above it).
    #[arg(
        long,
        env = "MESA_MAX_JSON_DEPTH",
        default_value_t = Limits::default().max_json_depth,
        value_parser = parse_positive
    )]
    max_json_depth: usize,

    /// Most connections open at once; WebSocket upgrades past it get HTTP 503
    /// (0: no limit but the process's file descriptors).
    #[arg(long, env = "MESA_MAX_CONNECTIONS", default_value_t = 0)]
    max_connections: usize,

    /// Milliseconds a new connection has for its TLS handshake and WebSocket
    /// upgrade, holding a slot of --max-connections meanwhile; it is dropped past them.
    #[arg(
        long,
        env = "MESA_HANDSHAKE_TIMEOUT",
        default_value_t = duration_ms(TransportConfig::default().handshake_timeout),
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    handshake_timeout: u64,

    /// Accept WebSocket upgrades only from pages of this origin, e.g.
    /// `https://app.example.com` (repeatable; the variable takes a comma-separated
    /// list). Others get HTTP 403: a defence against cross-site WebSocket hijacking.
    /// Requests without an Origin header (non-browser clients) are accepted. Off by
    /// default: every origin.
    #[arg(
        long = "allowed-origin",
        env = "MESA_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Vec<String>,

    /// Serve Prometheus metrics at `GET /metrics`, and `GET /healthz` and `GET /readyz`,
    /// on this address (`host:port`; port 0 picks a free port). Off by default.
    #[arg(long, env = "MESA_METRICS_LISTEN")]
    metrics_listen: Option<String>,

    /// Serve the chat demo: a web page at `http://<listen>/` whose WebSocket is `/ws`
    /// (unless --path says otherwise). Uses dev authentication unless --auth jwt, and
    /// rooms (`--rooms authenticated` unless --rooms open).
    #[arg(
        long,
        env = "MESA_DEMO",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    demo: bool,

    /// Serve TLS (`wss://`, and `https://` for the demo) with this PEM certificate
    /// chain, leaf first; reloaded with --tls-key on SIGHUP without dropping
    /// connections.
    #[arg(long, env = "MESA_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// The PEM private key of --tls-cert (PKCS #8, PKCS #1 or SEC1).
    #[arg(long, env = "MESA_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

/// `--durable-portals --durable-partitions N --durable-maxlen N`.
#[derive(Debug, clap::Args)]
pub(crate) struct DurablePortalsArgs {
    /// Also append every client event to Redis streams (`portal_q:<p>`), which
    /// `mesa portal --durable` consumes at least once; with --portals unset, only
    /// there (Node portals then get nothing).
    #[arg(
        long,
        env = "MESA_DURABLE_PORTALS",
        requires = "redis",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    durable_portals: bool,

    /// Streams the durable portal events are spread over by client id (the portals'
    /// --partitions must match).
    #[arg(
        long,
        env = "MESA_DURABLE_PARTITIONS",
        default_value_t = mesa_tokio::DEFAULT_PORTAL_PARTITIONS as u64,
        requires = "durable_portals",
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    durable_partitions: u64,

    /// Entries each durable portal stream keeps, about (`MAXLEN ~`).
    #[arg(
        long,
        env = "MESA_DURABLE_MAXLEN",
        default_value_t = 1_000_000,
        requires = "durable_portals",
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    durable_maxlen: u64,
}

impl DurablePortalsArgs {
    /// The servers' setting, when on.
    fn settings(&self) -> Option<DurablePortals> {
        self.durable_portals.then_some(DurablePortals {
            partitions: self.durable_partitions as usize,
            maxlen: self.durable_maxlen as usize,
        })
    }
}

/// How `--portals` picks a portal per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum PortalMode {
    /// Each event to the next portal in turn.
    RoundRobin,
    /// Each event to a random portal.
    Random,
}

/// Who `--rooms` lets subscribe and publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RoomsMode {
    /// No rooms: the hello announces none.
    Off,
    /// Any authenticated client.
    Authenticated,
    /// Any client, authenticated or not: for demos only.
    Open,
}

/// How `--rate-limit-policy` treats a connection past its message rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum RatePolicy {
    /// Stop reading from it until it is within its rate again.
    Slow,
    /// Close it with 1008.
    Close,
}

/// A default duration as a flag's milliseconds.
fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A count that must be at least 1.
fn parse_positive(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(0) => Err("must be at least 1".to_owned()),
        Ok(n) => Ok(n),
        Err(error) => Err(error.to_string()),
    }
}

/// `--path` must be an absolute path.
fn parse_path(path: &str) -> Result<String, String> {
    if path.starts_with('/') {
        Ok(path.to_owned())
    } else {
        Err(format!("`{path}` must start with `/`"))
    }
}

/// Build the server from `args`, serve until a signal, then shut down.
pub(crate) async fn run(mut args: ServeArgs) -> Result<ExitCode, Failure> {
    if args.demo {
        if args.no_relay {
            return Err(Failure::usage("--demo and --no-relay do not go together"));
        }
        if args.auth == AuthMode::None {
            args.auth = AuthMode::Dev;
        }
        args.auth_required = true;
        // The page subscribes to the rooms it joins.
        if args.rooms == RoomsMode::Off {
            args.rooms = RoomsMode::Authenticated;
        }
        if args.path == "/" {
            args.path = "/ws".to_owned();
        }
        if crate::demo::PAGES.contains(&args.path.as_str()) {
            return Err(Failure::usage(format!(
                "--path {} is a page of the demo: pick another",
                args.path
            )));
        }
    }
    let mut builder = configure(&args)?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsFiles::load(cert, key)?),
        _ => None,
    };
    if let Some(tls) = &tls {
        builder = builder.tls(tls.tls.clone());
    }
    let addr = resolve(&args.listen).await?;
    let mut http = Http {
        metrics: None,
        demo: args.demo,
        health: Health::new(!args.redis.is_empty()),
    };
    if let Some(listen) = &args.metrics_listen {
        let metrics = Metrics::new();
        builder = builder.middleware(metrics.clone());
        http.metrics = Some((resolve(listen).await?, metrics));
    }
    if args.demo {
        let demo = DemoChat::new(args.sync);
        Ok(serve(builder.handler(demo), addr, &args.path, http, tls).await?)
    } else if args.no_relay {
        Ok(serve(builder.handler(Ignore), addr, &args.path, http, tls).await?)
    } else {
        Ok(serve(builder.handler(Relay), addr, &args.path, http, tls).await?)
    }
}

/// Everything but the handler: path, heartbeats, reconnect interval, authentication.
fn configure(args: &ServeArgs) -> Result<ServerBuilder, Failure> {
    let mut builder = mesa_tokio::server()
        .path(args.path.clone())
        .middleware(LogConnections);
    if args.heartbeat_interval > 0 {
        builder = builder.heartbeat(
            Duration::from_millis(args.heartbeat_interval),
            args.heartbeat_max_attempts,
        );
    }
    if args.reconnect_interval > 0 {
        builder = builder.reconnect_interval(Duration::from_millis(args.reconnect_interval));
    }
    builder = builder.limits(Limits {
        max_stored_per_id: usize::try_from(args.max_stored).unwrap_or(usize::MAX),
        max_messages_per_second: args.max_messages_per_second,
        max_message_burst: args.max_message_burst,
        rate_limit_policy: match args.rate_limit_policy {
            RatePolicy::Slow => RateLimitPolicy::Slow,
            RatePolicy::Close => RateLimitPolicy::Close,
        },
        max_message_bytes: args.max_message_bytes,
        max_json_depth: args.max_json_depth,
        max_recipients: args.max_recipients,
        ..Limits::default()
    });
    builder = builder.transport(TransportConfig {
        handshake_timeout: Duration::from_millis(args.handshake_timeout),
        ..TransportConfig::default()
    });
    if args.max_connections > 0 {
        builder = builder.max_connections(args.max_connections);
    }
    if !args.allowed_origins.is_empty() {
        builder = builder.allowed_origins(args.allowed_origins.iter().cloned());
    }
    match args.rooms {
        RoomsMode::Off => {}
        RoomsMode::Authenticated => builder = builder.rooms(RoomPolicy::Authenticated),
        RoomsMode::Open => {
            tracing::warn!(
                "--rooms open lets any client, even unauthenticated, subscribe to and publish in any room: for demos only"
            );
            builder = builder.rooms(RoomPolicy::Open);
        }
    }
    if let Some((url, shard_urls)) = args.redis.split_first() {
        let mut cluster = ClusterConfig::new(url.clone());
        cluster.shard_urls = shard_urls.to_vec();
        cluster.namespace = args.namespace.clone();
        cluster.lease = Duration::from_millis(args.lease);
        cluster.legacy_bus = args.bus.on;
        cluster.store_wait = args.durability.store_wait();
        cluster.recovery = args.recovery.config();
        cluster.durable_portals = args.durable_portals.settings();
        cluster.portals = args.portals.map(|mode| match mode {
            PortalMode::RoundRobin => PortalChoice::RoundRobin,
            PortalMode::Random => PortalChoice::Random,
        });
        cluster.redis_ca_pem = args.redis_ca.load_for(&args.redis)?;
        builder = builder.cluster(cluster);
    }
    if args.sync {
        let redelivery_interval = Duration::from_millis(args.redelivery_interval);
        builder = builder.sync(SyncConfig {
            redelivery_interval,
            ..SyncConfig::default()
        });
    }
    builder = match args.auth {
        AuthMode::None => {
            if args.auth_required {
                return Err(Failure::usage(
                    "--auth-required needs --auth dev or --auth jwt",
                ));
            }
            if args.jwt_secret.is_some() {
                tracing::warn!("--jwt-secret is ignored without --auth jwt");
            }
            return Ok(builder);
        }
        AuthMode::Dev => {
            tracing::warn!(
                "--auth dev accepts any non-empty token as the user's id: for demos and tests only, never in production"
            );
            builder.authenticate(DevAuthenticator)
        }
        AuthMode::Jwt => {
            let secret = match args.jwt_secret.as_deref() {
                Some(secret) if !secret.is_empty() => secret,
                _ => {
                    return Err(Failure::usage(
                        "--auth jwt needs a non-empty --jwt-secret (or MESA_JWT_SECRET)",
                    ));
                }
            };
            if secret.len() < 32 {
                tracing::warn!("the JWT secret is shorter than 32 bytes: use a longer one");
            }
            builder.authenticate(JwtAuthenticator::hs256(secret.as_bytes()))
        }
    };
    Ok(builder
        .auth_timeout(Duration::from_millis(args.auth_timeout))
        .auth_required(args.auth_required))
}

/// The first address `listen` resolves to.
async fn resolve(listen: &str) -> Result<SocketAddr, String> {
    let mut addrs = tokio::net::lookup_host(listen)
        .await
        .map_err(|error| format!("cannot resolve --listen `{listen}`: {error}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("--listen `{listen}` resolves to no address"))
}

/// Bind, announce the URL on stdout, serve until a signal (reloading the TLS
/// certificate on SIGHUP), then drain.
async fn serve<H: Handler>(
    builder: ServerBuilder<H>,
    addr: SocketAddr,
    path: &str,
    http: Http,
    tls: Option<TlsFiles>,
) -> Result<ExitCode, String> {
    let server = builder
        .build()
        .map_err(|error| format!("invalid settings: {error}"))?;
    // Listen for signals before announcing, so a signal sent as soon as the URL is
    // printed is not fatal.
    let mut signals = Signals::new().map_err(|error| format!("cannot handle signals: {error}"))?;
    let mut hangups = match &tls {
        Some(_) => Some(Hangups::new().map_err(|error| format!("cannot handle SIGHUP: {error}"))?),
        None => None,
    };
    let (ws, page) = if tls.is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let health = http.health.clone();
    if let Some((metrics_addr, metrics)) = http.metrics {
        let local = crate::http::serve_metrics(metrics_addr, metrics, health.clone()).await?;
        announce(&format!("mesa metrics on http://{local}/metrics"))?;
        tracing::info!(%local, "metrics and health checks");
    }
    let run: crate::http::Run = if http.demo {
        let demo_tls = tls.as_ref().map(|files| files.tls.clone());
        let (local, run) = crate::http::serve_demo(&server, addr, path, demo_tls).await?;
        // Bound: connections wait in the backlog until the loop runs.
        health.set_accepting(true);
        announce(&format!("mesa listening on {ws}://{local}{path}"))?;
        announce(&format!("mesa demo on {page}://{local}/"))?;
        tracing::info!(%local, path, "listening, with the chat demo at /");
        run
    } else {
        let listening = server
            .bind(addr)
            .await
            .map_err(|error| format!("cannot listen on {addr}: {error}"))?;
        let local = listening.local_addr();
        health.set_accepting(true);
        announce(&format!("mesa listening on {ws}://{local}{path}"))?;
        tracing::info!(%local, path, "listening");
        Box::pin(listening.run())
    };

    let mut run = run;
    loop {
        let hangup = async {
            match hangups.as_mut() {
                Some(hangups) => hangups.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            outcome = &mut run => {
                outcome.map_err(|error| format!("the server stopped: {error}"))?;
                return Ok(ExitCode::SUCCESS);
            }
            signal = signals.recv() => {
                tracing::info!(signal, "shutting down");
                break;
            }
            () = hangup => {
                if let Some(tls) = &tls {
                    tls.reload();
                }
            }
        }
    }
    health.set_accepting(false);
    drain(&server, &mut signals).await;
    tracing::info!("stopped");
    Ok(ExitCode::SUCCESS)
}

/// Print `line` on stdout and flush it (tests and scripts wait for it).
fn announce(line: &str) -> Result<(), String> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|error| format!("cannot write to stdout: {error}"))
}

/// Shut down gracefully: close clients with 1001, let them finish their closing
/// handshake and leave the cluster, within [`DRAIN_TIMEOUT`]; a second signal stops
/// waiting.
async fn drain<H: Handler>(server: &Server<H>, signals: &mut Signals) {
    tokio::select! {
        () = server.shutdown_gracefully(DRAIN_TIMEOUT) => {
            let left = server.handle().connection_count();
            if left > 0 {
                tracing::warn!(left, "connections still open after the drain timeout");
            }
        }
        signal = signals.recv() => tracing::warn!(signal, "second signal: not waiting for connections"),
    }
}
