//! Building images: file operations of build steps on a stage's root.

pub mod fsops;
