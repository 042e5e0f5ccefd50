//! Percentiles and summaries of samples.

use std::time::Duration;

use serde::Serialize;

/// The `p`-th percentile (0..=100) of sorted `values`, nearest-rank; `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Milliseconds as `f64`.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Bytes or KiB to MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A summary of durations, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Fastest.
    pub min: f64,
    /// Slowest.
    pub max: f64,
    /// Number of samples.
    pub count: usize,
}

impl Summary {
    /// Summarises `samples`; `None` when there are none.
    pub fn of(samples: &[Duration]) -> Option<Self> {
        let v: Vec<f64> = samples.iter().copied().map(ms).collect();
        Self::of_ms(&v)
    }

    /// Summarises values already in milliseconds (which may be negative, e.g. differences);
    /// `None` when there are none.
    pub fn of_ms(samples: &[f64]) -> Option<Self> {
        let mut v = samples.to_vec();
        v.sort_by(f64::total_cmp);
        Some(Self {
            p50: percentile(&v, 50.0)?,
            p90: percentile(&v, 90.0)?,
            p99: percentile(&v, 99.0)?,
            min: *v.first()?,
            max: *v.last()?,
            count: v.len(),
        })
    }
}

/// The mean of `values` in milliseconds; `None` when there are none.
pub fn mean_ms(values: impl Iterator<Item = Duration>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), d| (s + ms(d), n + 1));
    (n > 0).then(|| sum / n as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=21).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(11.0));
        assert_eq!(percentile(&v, 90.0), Some(19.0));
        assert_eq!(percentile(&v, 100.0), Some(21.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&[], 50.0), None);
        let s = Summary::of(&[Duration::from_millis(2), Duration::from_millis(1)]).unwrap();
        assert_eq!((s.p50, s.max, s.count), (1.0, 2.0, 2));
        let d = Summary::of_ms(&[0.5, -0.25, 0.125]).unwrap();
        assert_eq!((d.min, d.p50, d.max), (-0.25, 0.125, 0.5));
    }
}
