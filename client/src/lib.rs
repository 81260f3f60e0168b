//! failback: the client run on the old primary.
//!
//! - [`rewind`]: the rewind, phase by phase, and its report;
//! - [`source`]: where the new primary's files come from (a local directory, failbackd over gRPC
//!   or QUIC), and `--max-rate`;
//! - [`copy`]: carrying a plan out, from the source to the target;
//! - [`target`]: the one owner of every change to the target, and why it is crash-safe;
//! - [`error`]: why a rewind stopped, and the exit status that says whether to run it again;
//! - [`certs`]: `failback certs`: certificates for failbackd and failback, and fingerprints;
//! - [`pg_rewind_cli`]: failback installed or linked as `pg_rewind`: pg_rewind's command
//!   line, exit statuses and stderr lines;
//! - [`inspect`], [`progress`], [`pgbin`], [`fsutil`], [`fault`]: what the CLI shows, how
//!   progress reaches a terminal, the target's own `postgres`, durable file operations and the
//!   crash tests' fault hook.
pub mod certs;
pub mod cli;
pub mod copy;
pub mod error;
pub mod fault;
pub mod fsutil;
pub mod inspect;
pub mod pg_rewind_cli;
pub mod pgbin;
pub mod progress;
pub mod rewind;
pub mod source;
pub mod target;

/// The longest run at the front of `items` whose costs add up to at most `most`, and at least
/// one item (a single one over the bound goes alone); and the rest. How requests are cut so
/// that what one holds, or what its answer makes the client hold, stays bounded.
pub(crate) fn first_batch<T>(items: &[T], most: u64, cost: impl Fn(&T) -> u64) -> (&[T], &[T]) {
    let mut total = 0u64;
    let take = items
        .iter()
        .take_while(|item| {
            total = total.saturating_add(cost(item));
            total <= most
        })
        .count()
        .max(1)
        .min(items.len());
    items.split_at(take)
}
