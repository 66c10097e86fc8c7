//! The persisted state of one image and its transitions: pending -> in-progress ->
//! ready | failed, and back from failed to in-progress only for a failure whose kind
//! allows a retry. Every transition is written to state.json before anyone hears of it
//! (watchers through `subscribe`). The image decides when to move; this type decides
//! which moves are legal, so no other code edits a `StoredState`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::error;

use super::error::{Error, FailureKind, Result};
use super::store::{ImageFiles, State, StoredState};

pub struct StateCell {
    name: String,
    files: Arc<ImageFiles>,
    inner: Mutex<StoredState>,
    tx: watch::Sender<State>,
    /// Read on every FUSE read: an atomic, not the mutex.
    failed: AtomicBool,
}

impl StateCell {
    pub fn new(name: String, files: Arc<ImageFiles>, state: StoredState) -> Self {
        let (tx, _) = watch::channel(state.state);
        Self {
            name,
            files,
            failed: AtomicBool::new(state.state == State::Failed),
            inner: Mutex::new(state),
            tx,
        }
    }

    pub fn get(&self) -> State {
        self.inner.lock().unwrap().state
    }

    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    pub fn snapshot(&self) -> StoredState {
        self.inner.lock().unwrap().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.tx.subscribe()
    }

    fn save(&self, st: &StoredState) {
        if let Err(e) = self.files.save_state(st) {
            error!(image = %self.name, error = %e, "cannot save state");
        }
    }

    /// Pending -> in-progress (the first block landed). True if it moved.
    pub fn start(&self) -> bool {
        let mut st = self.inner.lock().unwrap();
        if st.state != State::Pending {
            return false;
        }
        st.state = State::InProgress;
        self.save(&st);
        drop(st);
        self.tx.send_replace(State::InProgress);
        true
    }

    /// -> ready with the verified `checksum`; refused (false) once failed.
    pub fn ready(&self, checksum: String) -> Result<bool> {
        let mut st = self.inner.lock().unwrap();
        if st.state == State::Failed {
            return Ok(false);
        }
        st.state = State::Ready;
        st.checksum = checksum;
        st.error = None;
        st.failure = None;
        self.files.save_state(&st)?;
        drop(st);
        self.tx.send_replace(State::Ready);
        Ok(true)
    }

    /// -> failed with `err` (its kind persisted). False if already ready or failed.
    pub fn fail(&self, err: &Error) -> bool {
        let mut st = self.inner.lock().unwrap();
        if st.state.is_final() {
            return false;
        }
        st.state = State::Failed;
        st.error = Some(err.to_string());
        st.failure = Some(FailureKind::of(err));
        if let Error::Checksum { got, .. } = err {
            st.checksum = got.clone();
        }
        self.failed.store(true, Ordering::Release);
        self.save(&st);
        drop(st);
        self.tx.send_replace(State::Failed);
        true
    }

    /// Failed -> in-progress (or pending when `has_blocks` is false), if the failure's
    /// kind allows a retry; an error that says why not otherwise. False if not failed.
    pub fn clear_failure(&self, has_blocks: bool) -> Result<bool> {
        let mut st = self.inner.lock().unwrap();
        if st.state != State::Failed {
            return Ok(false);
        }
        let kind = st.failure_kind();
        if !kind.retry_allowed() {
            return Err(Error::Failed {
                name: self.name.clone(),
                msg: format!(
                    "{}; this cannot be retried: delete and recreate the image",
                    st.error.clone().unwrap_or_default()
                ),
                kind,
            });
        }
        st.state = if has_blocks {
            State::InProgress
        } else {
            State::Pending
        };
        st.error = None;
        st.failure = None;
        self.files.save_state(&st)?;
        self.failed.store(false, Ordering::Release);
        self.tx.send_replace(st.state);
        Ok(true)
    }

    /// The error readers of a failed image get.
    pub fn failure(&self) -> Error {
        let st = self.inner.lock().unwrap();
        Error::Failed {
            name: self.name.clone(),
            msg: st.error.clone().unwrap_or_else(|| "unknown error".into()),
            kind: st.failure_kind(),
        }
    }
}
