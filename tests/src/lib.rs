#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure should abort loudly
//! Shared helpers for strata's end-to-end tests: a generator of sample OCI images covering every
//! layer feature, tree snapshots for entry-by-entry comparison, and process helpers.

pub mod cri;
pub mod image;
pub mod proxy;
pub mod registry;
pub mod semantics;
pub mod snapshot;
pub mod tls;
pub mod util;
