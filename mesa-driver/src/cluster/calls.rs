//! The replica's commands as redis-rs calls, and redis-rs's answers as the
//! replica's values: the only translation between the two.

use mesa_core::{Call, Command, Keys, RedisValue, Reply, Script, Token};
use redis::RedisResult;
use redis::aio::MultiplexedConnection;

/// The SHA1 of each of our scripts, as `EVALSHA` names it.
pub(crate) struct ScriptHashes(Vec<(Script, String)>);

impl ScriptHashes {
    pub(crate) fn new() -> Self {
        let hashes = Script::ALL
            .iter()
            .map(|script| {
                (
                    *script,
                    redis::Script::new(script.source()).get_hash().to_owned(),
                )
            })
            .collect();
        ScriptHashes(hashes)
    }

    fn hash(&self, script: Script) -> &str {
        self.0
            .iter()
            .find(|(known, _)| *known == script)
            .map_or("", |(_, hash)| hash)
    }
}

/// Load every script of ours, so that `EVALSHA` finds them.
pub(crate) async fn load_scripts(conn: &mut MultiplexedConnection) -> RedisResult<()> {
    for script in Script::ALL {
        redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(script.source())
            .exec_async(conn)
            .await?;
    }
    Ok(())
}

/// Commands in one pipeline, and how many calls each one put in it.
pub(crate) struct Batch {
    pipe: redis::Pipeline,
    shares: Vec<(Token, usize)>,
}

impl Batch {
    /// The calls of `commands`, in order.
    pub(crate) fn new(
        commands: impl IntoIterator<Item = (Token, Command)>,
        keys: &Keys,
        hashes: &ScriptHashes,
    ) -> Self {
        let mut pipe = redis::pipe();
        // Error replies come back in place, as their command's reply.
        pipe.ignore_errors();
        let shares = commands
            .into_iter()
            .map(|(token, command)| (token, add_calls(&mut pipe, &command, keys, hashes)))
            .collect();
        Batch { pipe, shares }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.shares.is_empty()
    }

    /// The tokens of the commands.
    pub(crate) fn tokens(&self) -> impl Iterator<Item = Token> + '_ {
        self.shares.iter().map(|(token, _)| *token)
    }

    /// Execute in one round trip: each command's reply, in order; `Err` when the
    /// round trip failed.
    pub(crate) async fn execute(
        self,
        conn: &mut MultiplexedConnection,
    ) -> RedisResult<Vec<(Token, Reply)>> {
        let values: Vec<redis::Value> = self.pipe.query_async(conn).await?;
        let mut values = values.into_iter();
        let replies = self
            .shares
            .into_iter()
            .map(|(token, calls)| {
                let mine: Vec<redis::Value> = values.by_ref().take(calls).collect();
                if mine.len() < calls {
                    return (
                        token,
                        Err("Redis answered fewer calls than were sent".to_owned()),
                    );
                }
                (token, reply(mine))
            })
            .collect();
        Ok(replies)
    }
}

/// Add the calls of `command` to `pipe`; returns how many.
fn add_calls(
    pipe: &mut redis::Pipeline,
    command: &Command,
    keys: &Keys,
    hashes: &ScriptHashes,
) -> usize {
    let calls = command.calls(keys);
    for call in &calls {
        match call {
            Call::Plain { name, args } => {
                pipe.cmd(name).arg(args);
            }
            // A script Redis lost (SCRIPT FLUSH) answers NOSCRIPT: that fails the
            // link, and the reconnection loads every script again.
            Call::Script { script, keys, args } => {
                pipe.cmd("EVALSHA")
                    .arg(hashes.hash(*script))
                    .arg(keys.len())
                    .arg(keys)
                    .arg(args);
            }
        }
    }
    calls.len()
}

/// The reply of one command from the values of its calls: an error reply among them
/// fails it.
pub(crate) fn reply(values: Vec<redis::Value>) -> Reply {
    values.into_iter().map(to_value).collect()
}

/// One value as the replica reads it (RESP2 shapes).
fn to_value(value: redis::Value) -> Result<RedisValue, String> {
    Ok(match value {
        redis::Value::Nil => RedisValue::Nil,
        redis::Value::Int(n) => RedisValue::Int(n),
        redis::Value::Boolean(b) => RedisValue::Int(i64::from(b)),
        redis::Value::BulkString(bytes) => {
            RedisValue::Text(String::from_utf8_lossy(&bytes).into_owned())
        }
        redis::Value::SimpleString(text) => RedisValue::Text(text),
        redis::Value::Okay => RedisValue::Text("OK".to_owned()),
        redis::Value::Array(items) | redis::Value::Set(items) => {
            RedisValue::Array(items.into_iter().map(to_value).collect::<Result<_, _>>()?)
        }
        redis::Value::ServerError(error) => return Err(error.to_string()),
        other => RedisValue::Text(format!("{other:?}")),
    })
}
