//! An in-memory tier: the reference implementation of [`Tier`], used by
//! tests and as the simplest example of the trait.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::error::{Error, Result};
use crate::tier::{Capabilities, ObjectMeta, PutMode, Tier, TierWriter};

/// Objects in a `BTreeMap` behind a mutex. Clones share the same objects.
#[derive(Debug, Clone, Default)]
pub struct MemoryTier {
    objects: Arc<Mutex<BTreeMap<String, Bytes>>>,
    name: String,
}

impl MemoryTier {
    /// An empty tier.
    pub fn new() -> Self {
        Self {
            objects: Arc::default(),
            name: "memory".into(),
        }
    }

    /// An empty tier with a name for reports.
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            objects: Arc::default(),
            name: name.into(),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Bytes>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces an object's bytes behind the checkpointer's back (for fault
    /// injection in tests).
    pub fn tamper(&self, path: &str, f: impl FnOnce(&mut Vec<u8>)) -> bool {
        let mut map = self.map();
        match map.get(path) {
            Some(b) => {
                let mut v = b.to_vec();
                f(&mut v);
                map.insert(path.to_string(), Bytes::from(v));
                true
            }
            None => false,
        }
    }
}

struct MemoryWriter {
    tier: MemoryTier,
    path: String,
    buf: BytesMut,
}

impl TierWriter for MemoryWriter {
    fn write(&mut self, data: Bytes) -> BoxFuture<'_, Result<()>> {
        self.buf.extend_from_slice(&data);
        Box::pin(async { Ok(()) })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        let MemoryWriter { tier, path, buf } = *self;
        tier.map().insert(path, buf.freeze());
        Box::pin(async { Ok(()) })
    }

    fn abort(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

impl Tier for MemoryTier {
    fn location(&self) -> String {
        format!("mem://{}", self.name)
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::NONE.with_atomic_create(true)
    }

    fn create<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Box<dyn TierWriter>>> {
        Box::pin(async move {
            Ok(Box::new(MemoryWriter {
                tier: self.clone(),
                path: path.to_string(),
                buf: BytesMut::new(),
            }) as Box<dyn TierWriter>)
        })
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes, mode: PutMode) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let mut map = self.map();
            if mode == PutMode::Create && map.contains_key(path) {
                return Err(Error::AlreadyExists {
                    path: path.to_string(),
                });
            }
            map.insert(path.to_string(), data);
            Ok(())
        })
    }

    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            self.map()
                .get(path)
                .cloned()
                .ok_or_else(|| Error::NotFound {
                    path: path.to_string(),
                })
        })
    }

    fn get_range<'a>(&'a self, path: &'a str, range: Range<u64>) -> BoxFuture<'a, Result<Bytes>> {
        Box::pin(async move {
            let b = self.get(path).await?;
            if range.end > b.len() as u64 || range.start > range.end {
                return Err(Error::Incomplete {
                    path: path.to_string(),
                    reason: format!("range {range:?} past the end ({} bytes)", b.len()),
                });
            }
            Ok(b.slice(range.start as usize..range.end as usize))
        })
    }

    fn size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<u64>> {
        Box::pin(async move { Ok(self.get(path).await?.len() as u64) })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, Result<Vec<ObjectMeta>>> {
        Box::pin(async move {
            Ok(self
                .map()
                .range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| ObjectMeta {
                    path: k.clone(),
                    size: v.len() as u64,
                })
                .collect())
        })
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.map().remove(path);
            Ok(())
        })
    }
}
