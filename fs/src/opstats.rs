//! Latency histograms of FUSE operations, kept per mount with relaxed atomic counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the histogram buckets, in seconds (the last bucket is +Inf).
pub const BOUNDS: [f64; 8] = [1e-5, 5e-5, 1e-4, 5e-4, 1e-3, 1e-2, 1e-1, 1.0];

/// The operations measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Lookup,
    Getattr,
    Readdir,
    Read,
    Readlink,
    Getxattr,
    Open,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Lookup,
        Op::Getattr,
        Op::Readdir,
        Op::Read,
        Op::Readlink,
        Op::Getxattr,
        Op::Open,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Lookup => "lookup",
            Op::Getattr => "getattr",
            Op::Readdir => "readdir",
            Op::Read => "read",
            Op::Readlink => "readlink",
            Op::Getxattr => "getxattr",
            Op::Open => "open",
        }
    }
}

#[derive(Default)]
struct Histogram {
    /// Non-cumulative counts per bucket; index `BOUNDS.len()` is +Inf.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_micros: AtomicU64,
}

/// Per-operation latency histograms.
#[derive(Default)]
pub struct OpStats {
    ops: [Histogram; Op::ALL.len()],
}

/// One operation's histogram: cumulative counts per bucket bound, as Prometheus wants them.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct OpHistogram {
    pub op: String,
    /// `(upper bound in seconds, cumulative count)`; the last bound is `f64::INFINITY`
    /// (serialised as null).
    pub buckets: Vec<(Option<f64>, u64)>,
    pub count: u64,
    pub sum_seconds: f64,
}

pub type OpSnapshot = Vec<OpHistogram>;

impl OpStats {
    pub fn record(&self, op: Op, took: Duration) {
        let Some(i) = Op::ALL.iter().position(|o| *o == op) else {
            return;
        };
        let h = &self.ops[i];
        let secs = took.as_secs_f64();
        let b = BOUNDS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(BOUNDS.len());
        h.buckets[b].fetch_add(1, Ordering::Relaxed);
        h.sum_micros
            .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> OpSnapshot {
        Op::ALL
            .iter()
            .zip(&self.ops)
            .map(|(op, h)| {
                let mut total = 0;
                let mut buckets = Vec::with_capacity(BOUNDS.len() + 1);
                for (i, c) in h.buckets.iter().enumerate() {
                    total += c.load(Ordering::Relaxed);
                    buckets.push((BOUNDS.get(i).copied(), total));
                }
                OpHistogram {
                    op: op.name().to_string(),
                    buckets,
                    count: total,
                    sum_seconds: h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative() {
        let s = OpStats::default();
        s.record(Op::Read, Duration::from_micros(5));
        s.record(Op::Read, Duration::from_millis(5));
        s.record(Op::Read, Duration::from_secs(5));
        let snap = s.snapshot();
        let read = snap.iter().find(|h| h.op == "read").unwrap();
        assert_eq!(read.count, 3);
        assert_eq!(read.buckets[0], (Some(1e-5), 1));
        assert_eq!(read.buckets[5], (Some(1e-2), 2));
        assert_eq!(read.buckets.last().unwrap(), &(None, 3));
    }
}
