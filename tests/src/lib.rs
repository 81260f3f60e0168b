//! The test bed: real PostgreSQL clusters of every supported major version.
