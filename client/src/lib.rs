//! failback: the client run on the old primary.
