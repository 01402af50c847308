//! strata-fs: reading container images lazily.
//!
//! - [`format`]: the strata layer format (a leaf: bytes only).
//! - [`reference`]: image references with Docker's defaults.
//! - [`store`]: the local content store (an OCI image layout).
//! - [`tree`]: the merged view of a layer stack.
//! - [`fuse`]: the FUSE filesystem serving a tree.

pub mod blob;
pub mod cache;
pub mod chunks;
pub mod format;
pub mod fuse;
pub mod fuse_upper;
pub mod image;
pub mod layout;
pub mod oci;
pub mod opstats;
pub mod packs;
pub mod passthrough;
pub mod profile;
pub mod reference;
pub mod registry;
pub mod rfc3339;
pub mod service;
pub mod store;
pub mod transfer;
pub mod tree;
pub mod upper;
