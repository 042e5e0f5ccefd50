//! The functions' `/metrics`: Prometheus text, parsed with `prometheus-parse`.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::error::{Result, ensure};
use prometheus_parse::{Scrape, Value};

use super::http::{Request, exchange};

/// The gauge of events being handled, which every function exports.
pub const IN_FLIGHT: &str = "handler_events_in_flight";

/// One scrape of `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics {
    scrape: Scrape,
}

impl Metrics {
    /// Parses Prometheus text; lines it cannot read are left out.
    pub fn parse(text: &str) -> Self {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = Scrape::parse(lines).unwrap_or_else(|_: std::io::Error| Scrape {
            docs: Default::default(),
            samples: Vec::new(),
        });
        Self { scrape }
    }

    /// `GET /metrics` on `addr` (answered 200 within `timeout`), parsed.
    pub fn get(addr: SocketAddr, timeout: Duration) -> Result<Self> {
        let r = exchange(addr, &Request::get(addr, "/metrics"), timeout)?;
        ensure!(r.status == 200, "GET /metrics answered HTTP {}", r.status);
        Ok(Self::parse(&String::from_utf8_lossy(&r.body)))
    }

    /// Plain values (gauge, counter or untyped) of the series called `name` whose labels include
    /// `label` (any with `None`).
    fn values<'a>(
        &'a self,
        name: &'a str,
        label: Option<(&'a str, &'a str)>,
    ) -> impl Iterator<Item = f64> + 'a {
        self.scrape
            .samples
            .iter()
            .filter(move |s| s.metric == name)
            .filter(move |s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
            .filter_map(|s| match s.value {
                Value::Gauge(v) | Value::Counter(v) | Value::Untyped(v) => Some(v),
                Value::Histogram(_) | Value::Summary(_) => None,
            })
    }

    /// The gauge `name` summed over its label sets; `None` when it has no sample.
    pub fn gauge(&self, name: &str) -> Option<f64> {
        self.values(name, None)
            .fold(None, |total, v| Some(total.unwrap_or(0.0) + v))
    }

    /// `(sum, count)` of the histogram `name` over the series whose labels include `label`.
    pub fn histogram(&self, name: &str, label: Option<(&str, &str)>) -> (f64, f64) {
        let sum = format!("{name}_sum");
        let count = format!("{name}_count");
        (
            self.values(&sum, label).sum(),
            self.values(&count, label).sum(),
        )
    }

    /// The mean of the histogram `name` (series with `label`) over what was observed between
    /// `before` and `self`, in ms (the histogram in seconds); `None` when nothing was.
    pub fn mean_ms_since(
        &self,
        before: &Self,
        name: &str,
        label: Option<(&str, &str)>,
    ) -> Option<f64> {
        let (s0, c0) = before.histogram(name, label);
        let (s1, c1) = self.histogram(name, label);
        (c1 > c0).then(|| (s1 - s0) / (c1 - c0) * 1000.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_gauge_sums_label_sets_and_ignores_other_names() {
        let text = "# HELP handler_events_in_flight Events being handled\n\
                    # TYPE handler_events_in_flight gauge\n\
                    handler_events_in_flight 100\n\
                    handler_events_in_flight_other 7\n";
        assert_eq!(Metrics::parse(text).gauge(IN_FLIGHT), Some(100.0));
        let labelled = "handler_events_in_flight{a=\"b\"} 3\nhandler_events_in_flight{a=\"c\"} 2\n";
        assert_eq!(Metrics::parse(labelled).gauge(IN_FLIGHT), Some(5.0));
        let none = Metrics::parse("# TYPE handler_events_in_flight gauge\n");
        assert_eq!(none.gauge(IN_FLIGHT), None);
    }

    #[test]
    fn histogram_sums_matching_series_typed_or_not() {
        let text = "# TYPE chat_stage_duration_seconds histogram\n\
                    chat_stage_duration_seconds_bucket{stage=\"embed\",le=\"0.01\"} 3\n\
                    chat_stage_duration_seconds_sum{stage=\"embed\"} 0.5\n\
                    chat_stage_duration_seconds_count{stage=\"embed\"} 4\n\
                    chat_stage_duration_seconds_sum{stage=\"llm\"} 9\n\
                    chat_stage_duration_seconds_count{stage=\"llm\"} 1\n";
        let m = Metrics::parse(text);
        let embed = Some(("stage", "embed"));
        assert_eq!(
            m.histogram("chat_stage_duration_seconds", embed),
            (0.5, 4.0)
        );
        assert_eq!(m.histogram("chat_stage_duration_seconds", None), (9.5, 5.0));
        let untyped = Metrics::parse(&text.replace("# TYPE", "# NOTYPE"));
        assert_eq!(
            untyped.histogram("chat_stage_duration_seconds", embed),
            (0.5, 4.0)
        );
        let later = Metrics::parse(&text.replace("0.5", "1.5").replace("} 4", "} 8"));
        assert_eq!(
            later.mean_ms_since(&m, "chat_stage_duration_seconds", embed),
            Some(250.0)
        );
        let llm = Some(("stage", "llm"));
        assert_eq!(
            later.mean_ms_since(&m, "chat_stage_duration_seconds", llm),
            None
        );
    }
}
