//! Benchmarks of failback, each side by side with its anchor in one run.

pub mod args;
pub mod host;
pub mod measure;
pub mod pair;
pub mod runs;
pub mod wan;
