//! Percentiles and the like over timing samples.

use std::time::Duration;

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The order statistics of a set of samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: f64,
    pub p99: f64,
    pub min: f64,
    pub max: f64,
}

/// Nearest-rank percentiles: `p99` of fewer than 100 samples is the maximum.
pub fn summary(samples: &[f64]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let r = (p * s.len() as f64).ceil() as usize;
        s[r.clamp(1, s.len()) - 1]
    };
    Summary {
        n: s.len(),
        p50: rank(0.50),
        p99: rank(0.99),
        min: s[0],
        max: s[s.len() - 1],
    }
}

/// The least-squares slope of `ys` over `xs`; 0 with fewer than two points.
pub fn slope(xs: &[f64], ys: &[f64]) -> f64 {
    let n = xs.len().min(ys.len());
    if n < 2 {
        return 0.0;
    }
    let mx = xs[..n].iter().sum::<f64>() / n as f64;
    let my = ys[..n].iter().sum::<f64>() / n as f64;
    let mut num = 0.0;
    let mut den = 0.0;
    for i in 0..n {
        num += (xs[i] - mx) * (ys[i] - my);
        den += (xs[i] - mx) * (xs[i] - mx);
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let s = summary(&[5.0, 1.0, 3.0, 2.0, 4.0]);
        assert_eq!((s.p50, s.p99, s.min, s.max), (3.0, 5.0, 1.0, 5.0));
        let ten: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(summary(&ten).p50, 5.0);
        assert_eq!(summary(&ten).p99, 10.0);
        assert_eq!(summary(&[7.0]).p99, 7.0);
    }

    #[test]
    fn slopes() {
        assert!((slope(&[1.0, 2.0, 3.0], &[2.0, 4.0, 6.0]) - 2.0).abs() < 1e-9);
        assert_eq!(slope(&[1.0], &[1.0]), 0.0);
    }
}
