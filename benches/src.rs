//! strata's benchmarks: `benches/format.rs` (criterion) and `benches/e2e/*.sh` (end to end).
