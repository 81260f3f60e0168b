//! What `--version` prints: the package version and the commit the binary was built from.
//!
//! The commit is read at build time by each binary's package (its `build.rs` calls
//! `failback_build_info::emit_commit`, see packaging/build-info) and handed to the compiler
//! as the environment variable `FAILBACK_COMMIT`. The macro expands where it is used, so
//! `env!` reads the using crate's build environment, not this crate's.

/// `"<version> (commit <commit>)"`, e.g. `0.1.0 (commit 3f2a9c01be47)`, as a `&'static str`.
///
/// For clap: `#[command(version = failback_common::long_version!())]` makes `--version`
/// print `failback 0.1.0 (commit 3f2a9c01be47)`.
#[macro_export]
macro_rules! long_version {
    () => {
        concat!(
            env!("CARGO_PKG_VERSION"),
            " (commit ",
            env!(
                "FAILBACK_COMMIT",
                "FAILBACK_COMMIT is set by the package's build.rs: add \
                 `fn main() { failback_build_info::emit_commit() }` as build.rs and \
                 failback-build-info to [build-dependencies]"
            ),
            ")"
        )
    };
}
