//! The pure core: no fuser, axum or clap in here. Shells call `Node` and `Image`.

pub mod bitmap;
pub mod error;
pub mod fetch;
pub mod fill;
pub mod format;
pub mod image;
pub mod node;
pub mod qcow2;
pub mod source;
pub mod spec;
pub mod store;
pub mod verify;
pub mod view;

pub use error::{Error, Result, SourceError};
pub use image::{Image, ImageConfig, ImageEvent, Status};
pub use node::{CreateOptions, Node};
pub use spec::ImageSpec;
pub use store::State;
pub use view::View;
