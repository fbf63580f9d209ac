//! `mesa dispatch`: send one message (or an op 5 event) to the clients of a cluster
//! through its Redis, like `@cryb/mesa`'s `Dispatcher`, and print what it did as one
//! JSON line.

use std::io::Write;
use std::process::ExitCode;

use mesa_tokio::MessageOptions;
use mesa_tokio::{DispatchReport, Dispatcher, Message, Recipients};
use serde_json::{Value, json};

use crate::Failure;
use crate::bus::{Durability, LegacyBus, Recovery};
use crate::tls::RedisCa;

/// Options of `mesa dispatch`.
#[derive(Debug, clap::Args)]
pub(crate) struct DispatchArgs {
    /// The cluster's Redis, e.g. `redis://127.0.0.1:6379/` (`rediss://` for TLS);
    /// several (repeated, or comma-separated) as the servers' `--redis`.
    #[arg(long, env = "MESA_REDIS", value_delimiter = ',', required = true)]
    redis: Vec<String>,

    #[command(flatten)]
    redis_ca: RedisCa,

    #[command(flatten)]
    bus: LegacyBus,

    #[command(flatten)]
    durability: Durability,

    #[command(flatten)]
    recovery: Recovery,

    /// The cluster's namespace (as the servers' `--namespace`).
    #[arg(long, env = "MESA_NAMESPACE")]
    namespace: Option<String>,

    /// Store the message for recipients connected nowhere (as the servers' `--sync`).
    #[arg(
        long,
        env = "MESA_SYNC",
        value_parser = clap::builder::BoolishValueParser::new(),
        action = clap::ArgAction::SetTrue
    )]
    sync: bool,

    /// Most messages stored per offline id (the oldest are dropped beyond it).
    #[arg(
        long,
        env = "MESA_MAX_STORED",
        default_value_t = 1000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_stored: u64,

    /// Most distinct ids one dispatch may address, after `--except` (as the servers'
    /// `--max-recipients`): a longer list is refused before Redis is touched.
    #[arg(
        long,
        env = "MESA_MAX_RECIPIENTS",
        default_value_t = 100_000,
        value_parser = clap::value_parser!(u64).range(1..)
    )]
    max_recipients: u64,

    /// The message type (`t`), e.g. `NOTICE`.
    #[arg(
        long = "type",
        env = "MESA_TYPE",
        required_unless_present = "event",
        conflicts_with = "event"
    )]
    message_type: Option<String>,

    /// The message data (`d`), any JSON value.
    #[arg(long, env = "MESA_DATA", default_value = "{}", value_parser = parse_json)]
    data: Value,

    /// Message options (`o`) as a JSON object, e.g. `{"sync":false}` so that it is
    /// never stored.
    #[arg(long, env = "MESA_MESSAGE_OPTIONS", value_parser = parse_options)]
    options: Option<MessageOptions>,

    /// Send an internal event (op 5) instead of a message, e.g. `DISCONNECT_CLIENT`
    /// (closes those clients with 1000).
    #[arg(long, env = "MESA_EVENT", conflicts_with_all = ["data", "options"])]
    event: Option<String>,

    /// Recipient ids, comma-separated (default: every connection; `*` too).
    #[arg(long, env = "MESA_TO", value_delimiter = ',')]
    to: Vec<String>,

    /// Publish to the members of this room instead (servers with `--rooms`; best
    /// effort, never stored).
    #[arg(long, env = "MESA_ROOM", conflicts_with_all = ["to", "except", "event", "options"])]
    room: Option<String>,

    /// Ids removed from `--to` (a send to everyone is not filtered, as upstream).
    #[arg(long, env = "MESA_EXCEPT", value_delimiter = ',')]
    except: Vec<String>,
}

fn parse_json(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|error| format!("not JSON: {error}"))
}

fn parse_options(text: &str) -> Result<MessageOptions, String> {
    match parse_json(text)? {
        Value::Object(raw) => Ok(MessageOptions { raw }),
        _ => Err("must be a JSON object, e.g. {\"sync\":false}".to_owned()),
    }
}

/// Dispatch once and print the report.
pub(crate) async fn run(args: DispatchArgs) -> Result<ExitCode, Failure> {
    let max_stored = usize::try_from(args.max_stored).unwrap_or(usize::MAX);
    let max_recipients = usize::try_from(args.max_recipients).unwrap_or(usize::MAX);
    let mut builder = Dispatcher::builder(&args.redis[0])
        .shard_urls(args.redis[1..].iter().cloned())
        .sync(args.sync)
        .max_stored(max_stored)
        .max_recipients(max_recipients)
        .legacy_bus(args.bus.on);
    if let Some(namespace) = &args.namespace {
        builder = builder.namespace(namespace.as_str());
    }
    if let Some(wait) = args.durability.store_wait() {
        builder = builder.store_wait(wait);
    }
    if let Some(recovery) = args.recovery.config() {
        builder = builder.recovery(recovery);
    }
    if let Some(pem) = args.redis_ca.load_for(&args.redis)? {
        builder = builder.redis_ca_pem(pem);
    }
    let dispatcher = builder
        .connect()
        .await
        .map_err(|error| format!("cannot reach the cluster: {error}"))?;
    let to: Vec<String> = args.to.into_iter().filter(|id| !id.is_empty()).collect();
    let recipients = if to.is_empty() {
        Recipients::All
    } else {
        Recipients::from_ids(to)
    };
    let (label, report) = match (&args.event, args.message_type) {
        (None, Some(t)) if args.room.is_some() => {
            let room = args.room.unwrap_or_default();
            let message = Message::dispatch(t.clone(), args.data);
            (
                json!({"type": t, "room": room}),
                dispatcher.dispatch_room(&room, message).await,
            )
        }
        (Some(action), _) => (
            json!({"event": action}),
            dispatcher
                .dispatch_event(action, recipients, &args.except)
                .await,
        ),
        (None, Some(t)) => {
            let message = Message::dispatch(t.clone(), args.data);
            (
                json!({"type": t}),
                dispatcher
                    .dispatch(message, args.options, recipients, &args.except)
                    .await,
            )
        }
        (None, None) => return Err(Failure::usage("--type or --event is required")),
    };
    let report = report.map_err(|error| format!("dispatch failed: {error}"))?;
    print_report(label, &report)?;
    Ok(ExitCode::SUCCESS)
}

/// `{"type"|"event": .., "global", "published", "stored", "dropped", "undeliverable"}`.
fn print_report(label: Value, report: &DispatchReport) -> Result<(), String> {
    let mut line = label;
    line["global"] = json!(report.global);
    line["published"] = json!(report.published);
    line["stored"] = json!(report.stored);
    line["dropped"] = json!(report.dropped);
    line["undeliverable"] = json!(report.undeliverable);
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")
        .and_then(|()| stdout.flush())
        .map_err(|error| format!("cannot write to stdout: {error}"))
}
