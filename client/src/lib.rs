//! failback: the client run on the old primary.
pub mod fsutil;
pub mod inspect;
pub mod source;
