//! What the generator counts and reports: received messages, latency histograms, the
//! server's memory and CPU time from /proc, and the output lines.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;

use super::Ctx;
use crate::Failure;

/// Linux reports process CPU times in clock ticks of `USER_HZ`, which is 100 on every
/// architecture Linux supports (the value `sysconf(_SC_CLK_TCK)` returns).
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// What one connection of the fanout received.
pub(super) struct Tally {
    /// The messages of the run.
    messages: u64,
    /// Which sequence numbers arrived (a bit set).
    seen: Vec<u64>,
    /// Distinct sequence numbers received.
    pub(super) received: u64,
    /// Sequence numbers received again.
    pub(super) duplicated: u64,
    /// Sequence numbers out of range.
    pub(super) unexpected: u64,
    /// When the last message arrived, in microseconds since the epoch.
    pub(super) last_us: u64,
    /// Whether to record latencies (the publisher's round trips are not).
    record_latency: bool,
    /// Receive time minus send time.
    pub(super) latency: Histogram,
}

impl Tally {
    /// An empty tally for a run of `messages`.
    pub(super) fn new(messages: u64, record_latency: bool) -> Self {
        Tally {
            messages,
            seen: Vec::new(),
            received: 0,
            duplicated: 0,
            unexpected: 0,
            last_us: 0,
            record_latency,
            latency: Histogram::default(),
        }
    }

    /// Count message `seq` sent at `ts`; whether it was new.
    pub(super) fn record(&mut self, ctx: &Ctx, seq: u64, ts: u64) -> bool {
        let now = ctx.now_us();
        self.last_us = self.last_us.max(now);
        if seq >= self.messages {
            self.unexpected += 1;
            return false;
        }
        if self.seen.is_empty() {
            self.seen = vec![0; self.messages.div_ceil(64) as usize];
        }
        let (word, bit) = ((seq / 64) as usize, 1_u64 << (seq % 64));
        if self.seen[word] & bit != 0 {
            self.duplicated += 1;
            return false;
        }
        self.seen[word] |= bit;
        self.received += 1;
        ctx.received.fetch_add(1, Ordering::Relaxed);
        if self.record_latency {
            self.latency.record(now.saturating_sub(ts));
        }
        true
    }

    /// Add `other`'s counts to these.
    pub(super) fn merge(&mut self, other: Tally) {
        self.received += other.received;
        self.duplicated += other.duplicated;
        self.unexpected += other.unexpected;
        self.last_us = self.last_us.max(other.last_us);
        self.latency.merge(&other.latency);
    }
}

/// CPU time from the start of a measured phase: the servers' and the generator's.
pub(super) struct CpuMeter {
    /// The servers' CPU time at the start, in clock ticks.
    server: Option<u64>,
    /// The generator's.
    generator: Option<u64>,
}

impl CpuMeter {
    /// Start measuring the servers of `probe` and the generator.
    pub(super) fn start(probe: &Probe) -> Self {
        CpuMeter {
            server: probe.cpu_ticks(),
            generator: own_cpu_ticks(),
        }
    }

    /// The seconds of CPU since the start.
    pub(super) fn read(&self, probe: &Probe) -> CpuSpent {
        CpuSpent {
            server: cpu_secs(self.server, probe.cpu_ticks()),
            generator: cpu_secs(self.generator, own_cpu_ticks()),
        }
    }
}

/// Seconds of CPU a measured phase cost.
#[derive(Debug, Clone, Copy)]
pub(super) struct CpuSpent {
    /// The servers', summed (unknown without their pids).
    pub(super) server: Option<f64>,
    /// The generator's.
    pub(super) generator: Option<f64>,
}

/// What the receivers of a run got, against what was expected, and what it cost.
pub(super) struct Delivered {
    /// Every receiver's tally, merged.
    pub(super) total: Tally,
    /// Deliveries expected.
    expected: u64,
    /// Seconds from the start of the sending to the last delivery.
    elapsed: f64,
    /// The CPU time meanwhile.
    cpu: CpuSpent,
}

impl Delivered {
    /// `total` received of `expected`, the sending having started at `start_us`.
    pub(super) fn new(total: Tally, expected: u64, start_us: u64, cpu: CpuSpent) -> Self {
        let elapsed = total.last_us.saturating_sub(start_us) as f64 / 1e6;
        Delivered {
            total,
            expected,
            elapsed,
            cpu,
        }
    }

    /// Expected deliveries that did not arrive.
    pub(super) fn lost(&self) -> u64 {
        self.expected.saturating_sub(self.total.received)
    }

    /// Deliveries per second of wall clock.
    fn rate(&self) -> f64 {
        if self.elapsed > 0.0 {
            self.total.received as f64 / self.elapsed
        } else {
            0.0
        }
    }

    /// Deliveries per second of the servers' CPU.
    fn per_cpu(&self) -> Option<f64> {
        self.cpu
            .server
            .filter(|&secs| secs > 0.0)
            .map(|secs| self.total.received as f64 / secs)
    }

    /// `.. deliveries/s in ..s  lost=.. dup=..  latency ..  server cpu=..`, for a
    /// human-readable line.
    pub(super) fn human(&self) -> String {
        format!(
            "{:.0} deliveries/s in {:.2}s  lost={} dup={}  {}  {}",
            self.rate(),
            self.elapsed,
            self.lost(),
            self.total.duplicated,
            self.total.latency.human(),
            human_cpu(
                self.cpu.server,
                self.per_cpu(),
                "deliveries",
                self.cpu.generator
            ),
        )
    }

    /// The JSON fields of the deliveries, their cost and their latency.
    pub(super) fn fields(&self) -> serde_json::Value {
        let mut fields = serde_json::json!({
            "expected": self.expected,
            "received": self.total.received,
            "lost": self.lost(),
            "duplicated": self.total.duplicated,
            "unexpected": self.total.unexpected,
            "elapsed_secs": round3(self.elapsed),
            "deliveries_per_sec": self.rate().round(),
            "server_cpu_secs": self.cpu.server,
            "deliveries_per_server_cpu_sec": self.per_cpu().map(f64::round),
            "generator_cpu_secs": self.cpu.generator,
        });
        if let (Some(fields), serde_json::Value::Object(latency)) =
            (fields.as_object_mut(), self.total.latency.fields())
        {
            fields.extend(latency);
        }
        fields
    }
}

/// Bits of the sub-bucket within a power of two: 32 sub-buckets, about 3% precision.
const SUB_BITS: u32 = 5;

/// Values below this are counted exactly.
const EXACT: u64 = 2 << SUB_BITS;

/// A log-linear histogram of microseconds: exact below 64, then 32 buckets per power
/// of two; allocated at the first value.
#[derive(Default)]
pub(super) struct Histogram {
    /// The counts per bucket.
    counts: Vec<u64>,
    /// How many values.
    total: u64,
    /// The largest value.
    max: u64,
}

impl Histogram {
    /// The bucket of `value`.
    fn index(value: u64) -> usize {
        if value < EXACT {
            return value as usize;
        }
        let exponent = 63 - value.leading_zeros(); // at least SUB_BITS + 1
        let shift = exponent - SUB_BITS;
        let top = value >> shift; // in 32..64
        (EXACT + u64::from(shift - 1) * (1 << SUB_BITS) + (top - (1 << SUB_BITS))) as usize
    }

    /// The middle of bucket `index`.
    fn value(index: usize) -> u64 {
        let index = index as u64;
        if index < EXACT {
            return index;
        }
        let shift = (index - EXACT) / (1 << SUB_BITS) + 1;
        let top = (index - EXACT) % (1 << SUB_BITS) + (1 << SUB_BITS);
        (top << shift) + (1 << (shift - 1))
    }

    /// Count `value`.
    pub(super) fn record(&mut self, value: u64) {
        let index = Self::index(value);
        if self.counts.len() <= index {
            self.counts.resize(index + 1, 0);
        }
        self.counts[index] += 1;
        self.total += 1;
        self.max = self.max.max(value);
    }

    /// Add `other`'s values.
    pub(super) fn merge(&mut self, other: &Histogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.total += other.total;
        self.max = self.max.max(other.max);
    }

    /// The value at quantile `q` (0..=1), or `None` when empty.
    pub(super) fn quantile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (index, count) in self.counts.iter().enumerate() {
            seen += count;
            if seen >= rank {
                return Some(Self::value(index).min(self.max));
            }
        }
        Some(self.max)
    }

    /// `latency p50=.. p99=.. max=..`, for a human-readable line.
    pub(super) fn human(&self) -> String {
        format!(
            "latency p50={} p99={} max={}",
            human_micros(self.quantile(0.50)),
            human_micros(self.quantile(0.99)),
            human_micros(self.max())
        )
    }

    /// The JSON fields of the latency: p50, p99 and max, in microseconds.
    pub(super) fn fields(&self) -> serde_json::Value {
        serde_json::json!({
            "latency_p50_us": self.quantile(0.50),
            "latency_p99_us": self.quantile(0.99),
            "latency_max_us": self.max(),
        })
    }

    /// How many values.
    pub(super) fn count(&self) -> u64 {
        self.total
    }

    /// The largest value, or `None` when empty.
    pub(super) fn max(&self) -> Option<u64> {
        (self.total > 0).then_some(self.max)
    }
}

/// The server processes of a run, read from /proc: memory and CPU time, summed over
/// every process (the replicas of a cluster).
pub(super) struct Probe {
    /// The process ids; none when the generator was not told.
    pids: Vec<u32>,
}

impl Probe {
    /// Watch `pids`; an error when one of them cannot be read.
    pub(super) fn new(pids: &[u32]) -> Result<Self, Failure> {
        for &pid in pids {
            if cpu_ticks(&pid.to_string()).is_none() || rss_bytes(pid).is_none() {
                return Err(format!("cannot read /proc/{pid}/stat and /proc/{pid}/status").into());
            }
        }
        Ok(Probe {
            pids: pids.to_vec(),
        })
    }

    /// The process ids.
    pub(super) fn pids(&self) -> &[u32] {
        &self.pids
    }

    /// Resident memory (VmRSS), summed; `None` without pids or when one is gone.
    pub(super) fn rss(&self) -> Option<u64> {
        self.sum(rss_bytes)
    }

    /// CPU time (user plus system), summed, in clock ticks; `None` without pids or
    /// when one is gone.
    pub(super) fn cpu_ticks(&self) -> Option<u64> {
        self.sum(|pid| cpu_ticks(&pid.to_string()))
    }

    /// `read` of every pid, summed.
    fn sum(&self, read: impl Fn(u32) -> Option<u64>) -> Option<u64> {
        if self.pids.is_empty() {
            return None;
        }
        self.pids.iter().map(|&pid| read(pid)).sum()
    }
}

/// Seconds of CPU between two readings in clock ticks.
pub(super) fn cpu_secs(before: Option<u64>, after: Option<u64>) -> Option<f64> {
    Some(after?.saturating_sub(before?) as f64 / CLOCK_TICKS_PER_SEC)
}

/// The CPU time of the generator itself, in clock ticks.
pub(super) fn own_cpu_ticks() -> Option<u64> {
    cpu_ticks("self")
}

/// The resident memory of process `pid` (VmRSS in /proc/PID/status), in bytes.
pub(super) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The CPU time of process `pid` (a number or `self`), user plus system, in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The fields after the command name (which may hold spaces and parentheses) start
    // with field 3 (state); utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Print `line` on stdout and flush it; a closed stdout is not worth a panic.
pub(super) fn emit(line: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// Exit 1 when no connection could be set up: nothing was measured.
pub(super) fn exit_code(ok: u64) -> ExitCode {
    if ok == 0 {
        eprintln!("mesa-bench: no connection was set up");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Round to three decimals (for the JSON line).
pub(super) fn round3(value: f64) -> f64 {
    (value * 1000.0).round() / 1000.0
}

/// `12.3 MiB`, or `-` when unknown.
pub(super) fn human_bytes(bytes: Option<f64>) -> String {
    match bytes {
        None => "-".to_owned(),
        Some(bytes) if bytes.abs() >= 1024.0 * 1024.0 => {
            format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
        }
        Some(bytes) if bytes.abs() >= 1024.0 => format!("{:.1} KiB", bytes / 1024.0),
        Some(bytes) => format!("{bytes:.0} B"),
    }
}

/// `1.23s`, or `-` when unknown.
pub(super) fn human_secs(secs: Option<f64>) -> String {
    secs.map_or("-".to_owned(), |secs| format!("{secs:.2}s"))
}

/// `12345` (a rate, rounded), or `-` when unknown.
pub(super) fn human_rate(rate: Option<f64>) -> String {
    rate.map_or("-".to_owned(), |rate| format!("{rate:.0}"))
}

/// `server cpu=.. (.. UNIT/cpu-s)  generator cpu=..`, for a human-readable line.
pub(super) fn human_cpu(
    server: Option<f64>,
    per_cpu: Option<f64>,
    unit: &str,
    generator: Option<f64>,
) -> String {
    format!(
        "server cpu={} ({} {unit}/cpu-s)  generator cpu={}",
        human_secs(server),
        human_rate(per_cpu),
        human_secs(generator)
    )
}

/// `1.23ms`, or `-` when unknown.
fn human_micros(micros: Option<u64>) -> String {
    match micros {
        None => "-".to_owned(),
        Some(us) if us >= 1000 => format!("{:.2}ms", us as f64 / 1000.0),
        Some(us) => format!("{us}us"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_ordered_and_close() {
        let mut previous = 0;
        for value in [
            0,
            1,
            63,
            64,
            65,
            100,
            1000,
            12_345,
            1 << 20,
            u64::from(u32::MAX),
        ] {
            let index = Histogram::index(value);
            assert!(index >= previous, "{value}");
            previous = index;
            let middle = Histogram::value(index);
            let error = (middle as f64 - value as f64).abs() / (value.max(1) as f64);
            assert!(error <= 0.04, "{value} -> {middle}");
        }
    }

    #[test]
    fn quantiles() {
        let mut histogram = Histogram::default();
        for value in 1..=1000 {
            histogram.record(value);
        }
        let p50 = histogram.quantile(0.5).unwrap_or_default();
        assert!((485..=515).contains(&p50), "{p50}");
        assert_eq!(histogram.max(), Some(1000));
    }
}
