//! Latency histograms and the numbers quoted from them.
//!
//! Latencies are recorded in nanoseconds in an HdrHistogram (3 significant
//! digits, 1 ns to 60 s; larger values saturate). Workers ship histograms to
//! the parent as `[value, count]` pairs of the recorded buckets; the parent
//! merges them and reduces each to a [`Summary`] in microseconds.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest trackable latency: a minute, in ns.
const MAX_NS: u64 = 60_000_000_000;

pub type Hist = Histogram<u64>;

pub fn new_hist() -> Hist {
    // Bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low, sigfig <= 5).
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// The recorded buckets as `[value, count]`, each value the highest
/// equivalent value of its bucket, so that re-recording lands in the same one.
pub fn to_pairs(h: &Hist) -> Vec<[u64; 2]> {
    h.iter_recorded().map(|v| [v.value_iterated_to(), v.count_at_value()]).collect()
}

/// Adds pairs made by [`to_pairs`] into `h`.
pub fn add_pairs(h: &mut Hist, pairs: &[[u64; 2]]) {
    for &[value, count] in pairs {
        h.saturating_record_n(value, count);
    }
}

/// A latency distribution reduced to the usual quantiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub count: u64,
    pub min_us: f64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

impl Summary {
    pub fn of(h: &Hist) -> Summary {
        if h.is_empty() {
            return Summary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        Summary {
            count: h.len(),
            min_us: us(h.min()),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
        }
    }
}

/// `count / seconds`, 0 when no time passed.
pub fn per_sec(count: u64, seconds: f64) -> f64 {
    if seconds > 0.0 { count as f64 / seconds } else { 0.0 }
}

/// `part / whole` in percent, 0 when `whole` is 0.
pub fn percent(part: f64, whole: f64) -> f64 {
    if whole > 0.0 { 100.0 * part / whole } else { 0.0 }
}

/// Log-spaced bins for the HTML histogram: `(upper bound in µs, count)`,
/// `per_decade` bins per power of ten, from the smallest to the largest value.
pub fn log_bins(h: &Hist, per_decade: u32) -> Vec<(f64, u64)> {
    if h.is_empty() {
        return Vec::new();
    }
    let step = 10f64.powf(1.0 / f64::from(per_decade));
    let mut bins: Vec<(f64, u64)> = Vec::new();
    let mut upper = 10f64.powf((h.min().max(1) as f64).log10().floor());
    for v in h.iter_recorded() {
        let value = v.value_iterated_to() as f64;
        while value > upper {
            upper *= step;
            bins.push((upper / 1000.0, 0));
        }
        match bins.last_mut() {
            Some(last) => last.1 += v.count_at_value(),
            None => bins.push((upper / 1000.0, v.count_at_value())),
        }
    }
    bins
}

#[cfg(test)]
mod tests {
    use super::*;

    fn uniform_1_to_10000_us() -> Hist {
        let mut h = new_hist();
        for us in 1..=10_000u64 {
            h.record(us * 1000).unwrap();
        }
        h
    }

    /// hdrhistogram with 3 significant digits is within 0.1% of the exact value.
    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() <= want * 0.001 + 1e-9
    }

    #[test]
    fn summary_quantiles_of_a_uniform_distribution() {
        let s = Summary::of(&uniform_1_to_10000_us());
        assert_eq!(s.count, 10_000);
        assert!(close(s.min_us, 1.0), "{s:?}");
        assert!(close(s.mean_us, 5000.5), "{s:?}");
        assert!(close(s.p50_us, 5000.0), "{s:?}");
        assert!(close(s.p90_us, 9000.0), "{s:?}");
        assert!(close(s.p99_us, 9900.0), "{s:?}");
        assert!(close(s.p999_us, 9990.0), "{s:?}");
        assert!(close(s.max_us, 10_000.0), "{s:?}");
    }

    #[test]
    fn empty_histogram_summarises_to_zeroes() {
        assert_eq!(Summary::of(&new_hist()), Summary::default());
        assert!(log_bins(&new_hist(), 10).is_empty());
    }

    #[test]
    fn pairs_round_trip_and_merge_like_add() {
        let a = uniform_1_to_10000_us();
        let mut b = new_hist();
        b.record(123_456).unwrap();
        b.record(60_000_000_000).unwrap();

        let mut merged = new_hist();
        add_pairs(&mut merged, &to_pairs(&a));
        add_pairs(&mut merged, &to_pairs(&b));
        let mut direct = a.clone();
        direct.add(&b).unwrap();
        assert_eq!(Summary::of(&merged), Summary::of(&direct));
        assert_eq!(to_pairs(&merged), to_pairs(&direct));
    }

    #[test]
    fn values_beyond_the_range_saturate_instead_of_failing() {
        let mut h = new_hist();
        add_pairs(&mut h, &[[MAX_NS * 10, 2], [0, 1]]);
        assert_eq!(h.len(), 3);
        assert!(h.max() >= MAX_NS);
    }

    #[test]
    fn rates_and_percentages_guard_against_zero() {
        assert_eq!(per_sec(500, 2.0), 250.0);
        assert_eq!(per_sec(500, 0.0), 0.0);
        assert_eq!(percent(1.0, 4.0), 25.0);
        assert_eq!(percent(1.0, 0.0), 0.0);
    }

    #[test]
    fn log_bins_keep_every_count_in_increasing_bins() {
        let h = uniform_1_to_10000_us();
        let bins = log_bins(&h, 10);
        assert_eq!(bins.iter().map(|b| b.1).sum::<u64>(), h.len());
        assert!(bins.windows(2).all(|w| w[0].0 < w[1].0));
        // 1 µs .. 10 ms is four decades: about 40 bins.
        assert!((38..=42).contains(&bins.len()), "{}", bins.len());
    }
}
