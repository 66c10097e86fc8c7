//! The two views of an image the mount shows: the stored bytes (`<mnt>/<name>`) and the
//! guest's raw view (`<mnt>/.raw/<name>`): identical for RAW images, decoded through
//! qcow2-rs for QCOW2 ones.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::error::Result;
use super::fetch::ReadState;
use super::format::Format;
use super::image::Image;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Stored,
    Raw,
}

impl Image {
    /// The size a view shows (`st_size`).
    pub fn view_size(&self, view: View) -> u64 {
        // The stored view needs no format: `ls -l` of a thousand images must not read
        // a thousand headers.
        match view {
            View::Stored => self.size,
            View::Raw => match self.format() {
                Some(Format::Qcow2(h)) => h.virtual_size,
                _ => self.size,
            },
        }
    }

    /// Whether reads of `view` are plain reads of the data file (passthrough is possible).
    pub fn view_is_stored_bytes(&self, view: View) -> bool {
        view == View::Stored || matches!(self.format(), Some(Format::Raw))
    }

    pub async fn read_view(
        self: &Arc<Self>,
        view: View,
        offset: u64,
        len: u32,
        ra: Option<&Mutex<ReadState>>,
    ) -> Result<Bytes> {
        match (view, self.format()) {
            (View::Stored, _) | (View::Raw, Some(Format::Raw)) => self.read(offset, len, ra).await,
            (View::Raw, Some(Format::Qcow2(h))) => self.read_qcow2(&h, offset, len).await,
            (View::Raw, None) => {
                self.ensure(0..1).await?;
                Box::pin(self.read_view(view, offset, len, ra)).await
            }
        }
    }
}
