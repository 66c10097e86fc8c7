//! bifs: backing images served over FUSE, fetched lazily, cached per disk, verified.
pub mod cli;
pub mod core;
pub mod daemon;
pub mod fs;
pub mod manifests;
pub mod mountpoint;
pub mod serve;
pub mod server;
pub mod upload_client;
