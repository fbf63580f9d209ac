//! What the generator reads of the cluster's Redis instances (`INFO commandstats cpu`):
//! the commands each executed and its CPU time, summed over the instances, so that a
//! run reports Redis's work per send and its deliveries per Redis CPU-second without
//! knowing where the instances run.
//!
//! Beside every command, the commands of the sends are counted apart: what a send
//! issues or its ROUTE script runs (`PUBLISH`, `EVALSHA`, `SMEMBERS`, `EXISTS`). The
//! rest is mostly the replicas' presence upkeep, which grows with the connections
//! and not with the sends: each lease renewal adds every id a replica holds again
//! (a `SISMEMBER` and a `SADD` each).

/// Counters of one or more Redis instances, summed.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct RedisCounters {
    /// Commands executed, those run by scripts included (`INFO` itself left out).
    pub(super) commands: u64,
    /// The commands of the sends: `PUBLISH`, script calls and the `SMEMBERS` and
    /// `EXISTS` a ROUTE script runs (the replicas' few lease renewals a second run
    /// some too).
    pub(super) sends: u64,
    /// Script calls (`EVALSHA`, `EVAL`).
    pub(super) scripts: u64,
    /// `PUBLISH` commands, those run by scripts included.
    pub(super) publish: u64,
    /// CPU seconds (user plus system) of each instance, in the order of the URLs.
    pub(super) cpu_secs: Vec<f64>,
}

impl RedisCounters {
    /// What changed from `before` to `self`.
    pub(super) fn since(&self, before: &RedisCounters) -> RedisCounters {
        RedisCounters {
            commands: self.commands.saturating_sub(before.commands),
            sends: self.sends.saturating_sub(before.sends),
            scripts: self.scripts.saturating_sub(before.scripts),
            publish: self.publish.saturating_sub(before.publish),
            cpu_secs: self
                .cpu_secs
                .iter()
                .zip(&before.cpu_secs)
                .map(|(after, before)| after - before)
                .collect(),
        }
    }

    /// The CPU seconds of every instance together.
    pub(super) fn cpu_total(&self) -> f64 {
        self.cpu_secs.iter().sum()
    }
}

/// Read the counters of the Redis instances at `urls`, summed.
pub(super) async fn read(urls: &[String]) -> Result<RedisCounters, String> {
    let mut all = RedisCounters::default();
    for url in urls {
        let client = redis::Client::open(url.as_str())
            .map_err(|error| format!("--redis `{url}`: {error}"))?;
        let mut connection = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|error| format!("cannot reach Redis at {url}: {error}"))?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("cpu")
            .query_async(&mut connection)
            .await
            .map_err(|error| format!("INFO at {url} failed: {error}"))?;
        let one = parse(&info);
        all.commands += one.commands;
        all.sends += one.sends;
        all.scripts += one.scripts;
        all.publish += one.publish;
        all.cpu_secs.extend(one.cpu_secs);
    }
    Ok(all)
}

/// The commands of a send to ids (or a room) and of the ROUTE script.
const SEND_COMMANDS: [&str; 5] = ["publish", "evalsha", "eval", "smembers", "exists"];

/// The counters in the text of `INFO commandstats cpu` of one instance.
fn parse(info: &str) -> RedisCounters {
    let mut counters = RedisCounters {
        cpu_secs: vec![0.0],
        ..RedisCounters::default()
    };
    for line in info.lines() {
        if let Some((command, stats)) = line
            .strip_prefix("cmdstat_")
            .and_then(|rest| rest.split_once(':'))
        {
            let calls = stats
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|calls| calls.trim().parse::<u64>().ok())
                .unwrap_or(0);
            match command {
                "evalsha" | "eval" => counters.scripts += calls,
                "publish" => counters.publish += calls,
                _ => {}
            }
            if SEND_COMMANDS.contains(&command) {
                counters.sends += calls;
            }
            if command != "info" {
                counters.commands += calls;
            }
        } else if let Some(secs) = line
            .strip_prefix("used_cpu_user:")
            .or_else(|| line.strip_prefix("used_cpu_sys:"))
        {
            counters.cpu_secs[0] += secs.trim().parse::<f64>().unwrap_or(0.0);
        }
    }
    counters
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_commands_scripts_publishes_and_cpu() {
        let info = "# Commandstats\r\ncmdstat_ping:calls=3,usec=1\r\n\
                    cmdstat_evalsha:calls=5,usec=9,usec_per_call=1.8\r\n\
                    cmdstat_publish:calls=42,usec=100,usec_per_call=2.38\r\n\
                    cmdstat_info:calls=7,usec=1\r\ncmdstat_sadd:calls=100,usec=1\r\n\r\n# CPU\r\nused_cpu_sys:1.25\r\n\
                    used_cpu_user:0.5\r\nused_cpu_sys_children:9.0\r\n";
        let counters = parse(info);
        assert_eq!(counters.commands, 150);
        assert_eq!(counters.sends, 47);
        assert_eq!(counters.scripts, 5);
        assert_eq!(counters.publish, 42);
        assert_eq!(counters.cpu_secs, vec![1.75]);
        let none = parse("# Commandstats\r\n");
        assert_eq!((none.commands, none.publish), (0, 0));
        let later = RedisCounters {
            commands: 160,
            sends: 50,
            scripts: 5,
            publish: 45,
            cpu_secs: vec![2.0],
        };
        let changed = later.since(&counters);
        assert_eq!((changed.commands, changed.publish), (10, 3));
        assert_eq!(changed.cpu_total(), 0.25);
    }
}
