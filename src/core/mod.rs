//! The pure core: no fuser, axum or clap in here. Shells call `Node` and `Image`.
//!
//! Imports go one way (checked by `core_imports_form_no_cycle` in `tests.rs`); by layer:
//! ```text
//!  0 error range format metrics view sync
//!  1 bitmap disk volume decompress yaml
//!  2 spec_sources qcow2_export          3 spec          4 credentials manifest
//!  5 source                             6 store compressed volume_source
//!  7 state verify pieces lifecycle zeros jobs
//!  8 fetch peer                         9 fill readahead peer_source status
//! 10 qcow2_read qcow2  11 image  12 upload  13 sources  14 node  -> shells (fs, server, cli)
//! ```
//! `fetch` owns blocks, files, sources and in-flight jobs and reports events; `verify`
//! hashes a prefix; `fill` drives a fetcher; `qcow2` decodes any `StoredBytes`; only
//! `image` (through `state`) moves an image's state; `node` holds the images of all disks.

pub mod bitmap;
pub mod compressed;
pub mod credentials;
pub mod decompress;
pub mod disk;
pub mod error;
#[cfg(feature = "failpoints")]
pub mod failpoint;
pub mod fetch;
pub mod fill;
pub mod format;
pub mod give_way;
pub mod image;
mod jobs;
pub mod lifecycle;
pub mod manifest;
pub mod mem_source;
pub mod metrics;
pub mod node;
pub mod peer;
pub mod peer_source;
pub mod pieces;
pub mod qcow2;
pub mod qcow2_export;
pub mod qcow2_read;
pub mod range;
pub mod readahead;
pub mod source;
pub mod sources;
pub mod spec;
pub mod spec_sources;
pub mod state;
pub mod status;
pub mod store;
pub(crate) mod sync;
pub mod upload;
pub mod verify;
pub mod view;
pub mod volume;
pub mod volume_source;
pub(crate) mod yaml;
pub mod zeros;

pub use error::{Error, FailureKind, Result, SourceError};
pub use image::{Image, ImageConfig, ImageEvent};
pub use node::{CreateOptions, Node};
pub use spec::ImageSpec;
pub use status::Status;
pub use store::State;
pub use view::View;

#[cfg(all(test, feature = "shuttle"))]
mod model_tests;
#[cfg(test)]
mod tests;
