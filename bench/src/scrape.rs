//! A replica's Prometheus figures, read from `mesa serve --metrics-listen`: one
//! HTTP/1.0 GET over a plain TCP connection, which is all a text exposition needs (no
//! HTTP client in the generator).

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// How long one scrape may take.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// The figures of one replica that `mesa-bench rooms` reads.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct ClusterFigures {
    /// `mesa_cluster_messages_received_total`: envelopes received from Redis.
    pub(super) received: f64,
    /// `mesa_cluster_messages_unneeded_total`: of those, the ones for nobody here.
    pub(super) unneeded: f64,
    /// `mesa_room_memberships`: room memberships on the replica.
    pub(super) memberships: f64,
}

impl ClusterFigures {
    /// What changed from `before` to `self` (the counters; the gauge as it is now).
    pub(super) fn since(self, before: ClusterFigures) -> ClusterFigures {
        ClusterFigures {
            received: self.received - before.received,
            unneeded: self.unneeded - before.unneeded,
            memberships: self.memberships,
        }
    }
}

/// Read the figures of the metrics endpoint at `url` (`http://host:port/metrics`).
pub(super) async fn cluster_figures(url: &str) -> Result<ClusterFigures, String> {
    let text = timeout(SCRAPE_TIMEOUT, get(url))
        .await
        .map_err(|_| format!("{url}: timed out"))??;
    let sample = |series: &str| sample(&text, series).unwrap_or(0.0);
    Ok(ClusterFigures {
        received: sample("mesa_cluster_messages_received_total"),
        unneeded: sample("mesa_cluster_messages_unneeded_total"),
        memberships: sample("mesa_room_memberships"),
    })
}

/// The body of `GET url`.
async fn get(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("--metrics `{url}` must start with http://"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = TcpStream::connect(host)
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    let request = format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|error| format!("{url}: {error}"))?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.to_owned())
        }
        _ => Err(format!(
            "{url}: unexpected answer {:?}",
            response.lines().next()
        )),
    }
}

/// The value of `series` (a name without labels) in a text exposition.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .find_map(|value| value.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sample_without_labels() {
        let text = "# TYPE mesa_rooms gauge\nmesa_rooms 12\nmesa_room_memberships 120\n\
                    mesa_cluster_messages_received_total 7\n# EOF\n";
        assert_eq!(sample(text, "mesa_rooms"), Some(12.0));
        assert_eq!(sample(text, "mesa_room_memberships"), Some(120.0));
        assert_eq!(
            sample(text, "mesa_cluster_messages_received_total"),
            Some(7.0)
        );
        assert_eq!(sample(text, "mesa_cluster_messages_unneeded_total"), None);
    }
}
