//! bifs: backing images served over FUSE, fetched lazily, cached per disk, verified.
pub mod core;
