//! failbackd: answers questions about one PostgreSQL data directory; decides nothing.
pub mod datadir;
