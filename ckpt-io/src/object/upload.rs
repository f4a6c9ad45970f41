//! Writes: single `PUT`s (with conditional create) and the multipart
//! writer behind [`Tier::create`](ckpt_core::Tier::create).

use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use object_store::multipart::PartId;
use object_store::path::Path;
use object_store::{
    MultipartId, MultipartUpload, PutMode as StorePutMode, PutMultipartOptions, PutOptions,
    PutPayload,
};
use tokio::runtime::Handle;
use tokio::task::JoinSet;

use ckpt_core::{Error, PutMode, Result, TierWriter};

use super::{Inner, Op, PartStore, resend_on_digest};

/// `Tier::put`: one atomic `PUT`, conditional for `PutMode::Create`.
pub(super) async fn put(inner: &Inner, path: &str, data: Bytes, mode: PutMode) -> Result<()> {
    let key = inner.key(path)?;
    let store_mode = match mode {
        PutMode::Overwrite => StorePutMode::Overwrite,
        // A server the probe found to ignore `If-None-Match` gets the
        // single-writer fallback too (and still the conditional header,
        // in case it honours it for some requests).
        PutMode::Create
            if inner.config.conditional_put
                && !matches!(
                    inner.create_guarantee.get(),
                    Some(ckpt_core::CreateGuarantee::Ignored)
                ) =>
        {
            StorePutMode::Create
        }
        PutMode::Create => {
            // Single-writer fallback: check, then write.
            match super::download::size(inner, path).await {
                Ok(_) => {
                    return Err(Error::AlreadyExists {
                        path: path.to_string(),
                    });
                }
                Err(Error::NotFound { .. }) if inner.config.conditional_put => StorePutMode::Create,
                Err(Error::NotFound { .. }) => StorePutMode::Overwrite,
                Err(e) => return Err(e),
            }
        }
    };
    let payload = PutPayload::from_bytes(data);
    let sent = match store_mode {
        // An overwrite refused for a checksum mismatch stored nothing
        // (s3s-fs stores it anyway): sending it again is safe.
        StorePutMode::Overwrite => {
            resend_on_digest(path, || {
                inner.store.put_opts(
                    &key,
                    payload.clone(),
                    PutOptions::from(StorePutMode::Overwrite),
                )
            })
            .await
        }
        mode => {
            inner
                .store
                .put_opts(&key, payload, PutOptions::from(mode))
                .await
        }
    };
    match sent {
        Ok(_) => Ok(()),
        Err(e)
            if mode == PutMode::Create
                && (matches!(e, object_store::Error::NotImplemented { .. })
                    || super::http_status(&e) == Some(501)) =>
        {
            Err(inner.backend(
                false,
                format!(
                    "the store ({}) does not support conditional writes (creating `{path}`); \
                     set ObjectTierConfig::with_conditional_put(false) if only one \
                     process writes: {}",
                    inner.target,
                    super::chain_text(&e)
                ),
            ))
        }
        Err(e) => Err(inner.error(Op::Put, path, e)),
    }
}

/// The writer of [`Tier::create`](ckpt_core::Tier::create).
///
/// Data accumulates (as the caller's `Bytes`, uncopied) until a part is
/// full *and* more data arrives; only then does a multipart upload start,
/// so an object no larger than one part goes up as a single `PUT` in
/// `finish`. Parts upload as tasks on the runtime, at most
/// `max_parts_in_flight` at a time, so they progress while the caller
/// waits for its next buffer. A part (or single `PUT`) the server refuses
/// because its body no longer matches its checksum is sent again, up to
/// [`DIGEST_ATTEMPTS`](super::DIGEST_ATTEMPTS) times in all, when the tier
/// has the client's part-level API (tiers from
/// [`ObjectTier::from_url`](super::ObjectTier::from_url)).
pub(super) struct ObjectWriter {
    inner: Arc<Inner>,
    path: String,
    key: Path,
    pending: Vec<Bytes>,
    pending_len: usize,
    upload: Option<Upload>,
    /// Finished parts: `(index, id)` for [`Upload::Parts`].
    parts: JoinSet<object_store::Result<Option<(usize, PartId)>>>,
    /// Parts started so far.
    parts_sent: u64,
    handle: Handle,
}

/// A multipart upload in progress.
enum Upload {
    /// Through `object_store`'s [`MultipartUpload`] (a store built by the
    /// caller): it numbers the parts, so a refused part cannot be sent
    /// again.
    Managed(Box<dyn MultipartUpload>),
    /// Part by part through the client's `MultipartStore`; `done` holds
    /// each finished part's id at its index.
    Parts {
        store: PartStore,
        id: MultipartId,
        done: Vec<Option<PartId>>,
    },
}

impl Upload {
    async fn complete(&mut self, key: &Path) -> object_store::Result<()> {
        match self {
            Upload::Managed(u) => u.complete().await.map(|_| ()),
            Upload::Parts { store, id, done } => {
                let parts: Option<Vec<PartId>> = std::mem::take(done).into_iter().collect();
                let parts = parts.ok_or_else(|| object_store::Error::Generic {
                    store: "S3",
                    source: "a part of the upload did not finish".into(),
                })?;
                store.0.complete_multipart(key, id, parts).await.map(|_| ())
            }
        }
    }

    async fn abort(&mut self, key: &Path) -> object_store::Result<()> {
        match self {
            Upload::Managed(u) => u.abort().await,
            Upload::Parts { store, id, .. } => store.0.abort_multipart(key, id).await,
        }
    }
}

impl ObjectWriter {
    pub(super) fn new(inner: Arc<Inner>, path: &str) -> Result<Self> {
        let key = inner.key(path)?;
        let handle = Handle::try_current().map_err(|_| {
            Error::InvalidState(format!(
                "writing `{path}` to {}: the object tier must run inside a tokio runtime",
                inner.location
            ))
        })?;
        Ok(Self {
            inner,
            path: path.to_string(),
            key,
            pending: Vec::new(),
            pending_len: 0,
            upload: None,
            parts: JoinSet::new(),
            parts_sent: 0,
            handle,
        })
    }

    async fn append(&mut self, mut data: Bytes) -> Result<()> {
        let part_size = self.inner.config.part_size;
        while !data.is_empty() {
            if self.pending_len == part_size {
                self.send_part().await?;
            }
            let room = part_size - self.pending_len;
            let piece = if data.len() > room {
                data.split_to(room)
            } else {
                std::mem::take(&mut data)
            };
            self.pending_len += piece.len();
            self.pending.push(piece);
        }
        Ok(())
    }

    /// Starts uploading the pending bytes as the next part, once fewer than
    /// `max_parts_in_flight` parts are uploading.
    async fn send_part(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let started = match &self.inner.parts {
                Some(store) => store
                    .0
                    .create_multipart(&self.key)
                    .await
                    .map(|id| Upload::Parts {
                        store: store.clone(),
                        id,
                        done: Vec::new(),
                    }),
                None => self
                    .inner
                    .store
                    .put_multipart_opts(&self.key, PutMultipartOptions::default())
                    .await
                    .map(Upload::Managed),
            };
            self.upload =
                Some(started.map_err(|e| self.inner.error(Op::CreateUpload, &self.path, e))?);
        }
        while let Some(done) = self.parts.try_join_next() {
            self.part_result(done)?;
        }
        while self.parts.len() >= self.inner.config.max_parts_in_flight {
            self.join_one().await?;
        }
        // The part after the last one allowed: fail now rather than upload
        // the rest and be refused at completion.
        if self.parts_sent >= self.inner.config.max_parts {
            return Err(Error::Config(format!(
                "`{}` needs more than {} parts of {} bytes: raise the object tier's part size",
                self.path, self.inner.config.max_parts, self.inner.config.part_size
            )));
        }
        let index = self.parts_sent as usize;
        self.parts_sent += 1;
        let payload: PutPayload = self.pending.drain(..).collect();
        self.pending_len = 0;
        match self.upload.as_mut() {
            Some(Upload::Managed(upload)) => {
                let part = upload.put_part(payload);
                self.parts
                    .spawn_on(async move { part.await.map(|()| None) }, &self.handle);
            }
            Some(Upload::Parts { store, id, done }) => {
                done.push(None);
                let (store, id, key) = (store.clone(), id.clone(), self.key.clone());
                let what = format!("part {} of `{}`", index + 1, self.path);
                self.parts.spawn_on(
                    async move {
                        resend_on_digest(&what, || {
                            store.0.put_part(&key, &id, index, payload.clone())
                        })
                        .await
                        .map(|part| Some((index, part)))
                    },
                    &self.handle,
                );
            }
            None => {}
        }
        Ok(())
    }

    async fn join_one(&mut self) -> Result<()> {
        match self.parts.join_next().await {
            Some(done) => self.part_result(done),
            None => Ok(()),
        }
    }

    fn part_result(
        &mut self,
        done: std::result::Result<
            object_store::Result<Option<(usize, PartId)>>,
            tokio::task::JoinError,
        >,
    ) -> Result<()> {
        match done {
            Ok(Ok(None)) => Ok(()),
            Ok(Ok(Some((index, part)))) => {
                if let Some(Upload::Parts { done, .. }) = self.upload.as_mut()
                    && let Some(slot) = done.get_mut(index)
                {
                    *slot = Some(part);
                }
                Ok(())
            }
            Ok(Err(e)) => Err(self.inner.error(Op::UploadPart, &self.path, e)),
            Err(e) => Err(self.inner.backend(
                false,
                format!("uploading a part of `{}` stopped: {e}", self.path),
            )),
        }
    }

    async fn complete(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let payload: PutPayload = self.pending.drain(..).collect();
            self.pending_len = 0;
            let (store, key) = (&self.inner.store, &self.key);
            return resend_on_digest(&self.path, || {
                store.put_opts(key, payload.clone(), PutOptions::default())
            })
            .await
            .map(|_| ())
            .map_err(|e| self.inner.error(Op::Put, &self.path, e));
        }
        if self.pending_len > 0 {
            self.send_part().await?;
        }
        while !self.parts.is_empty() {
            self.join_one().await?;
        }
        if let Some(mut upload) = self.upload.take()
            && let Err(e) = upload.complete(&self.key).await
        {
            let err = self.inner.error(Op::CompleteUpload, &self.path, e);
            if let Err(abort) = upload.abort(&self.key).await {
                tracing::warn!(path = %self.path, error = %abort, "abort after a failed multipart completion failed");
            }
            return Err(err);
        }
        Ok(())
    }

    async fn cancel(&mut self) -> Result<()> {
        self.pending.clear();
        self.pending_len = 0;
        self.parts.shutdown().await;
        if let Some(mut upload) = self.upload.take() {
            match upload.abort(&self.key).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(self.inner.error(Op::AbortUpload, &self.path, e)),
            }
        }
        Ok(())
    }
}

impl TierWriter for ObjectWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(self.append(data))
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let mut this = self;
        Box::pin(async move {
            let result = this.complete().await;
            if result.is_err() {
                // Nothing may become visible: drop queued parts and abort.
                if let Err(e) = this.cancel().await {
                    tracing::warn!(path = %this.path, error = %e, "abort after a failed upload failed");
                }
            }
            result
        })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let mut this = self;
        Box::pin(async move { this.cancel().await })
    }
}

impl Drop for ObjectWriter {
    fn drop(&mut self) {
        // Dropped mid-upload (neither finished nor aborted): stop the parts
        // and abort the upload in the background, best effort.
        self.parts.abort_all();
        if let Some(mut upload) = self.upload.take() {
            let path = std::mem::take(&mut self.path);
            let key = self.key.clone();
            self.handle.spawn(async move {
                if let Err(e) = upload.abort(&key).await {
                    tracing::debug!(path, error = %e, "background abort of a dropped upload failed");
                }
            });
        }
    }
}
