//! failback: the client run on the old primary.
pub mod execute;
pub mod fault;
pub mod fsutil;
pub mod inspect;
pub mod pgbin;
pub mod progress;
pub mod rewind;
pub mod source;
pub mod unfinished;
pub mod walread;
