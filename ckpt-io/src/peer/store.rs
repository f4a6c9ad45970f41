//! A peer server's objects and its memory budget.
//!
//! Every byte the server holds for clients is charged to the budget
//! before it is read: object bytes, a fixed overhead per object and per
//! staged chunk, and the path. A charge is released only when the memory
//! is: when a write is dropped, or when the last holder of a stored
//! object (the map, or a reader still sending it) lets go of it, so a
//! deleted object that a slow reader is still receiving stays counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use ckpt_core::{ObjectMeta, PutMode};

/// Bytes charged for each stored or staged object on top of its data and
/// its path (the map entry, the object's header, its list of pieces).
pub const OBJECT_OVERHEAD: u64 = 256;
/// Bytes charged for each non-empty piece of a streamed write (one per
/// `WriteChunk`) on top of its data.
pub const CHUNK_OVERHEAD: u64 = 64;

/// What an object of `len` bytes in one piece under `path` is charged.
pub(crate) fn object_charge(path: &str, len: u64) -> u64 {
    len.saturating_add(path.len() as u64 + OBJECT_OVERHEAD)
}

/// The budget: `used` counts every live [`Reservation`].
#[derive(Debug)]
pub(crate) struct Budget {
    used: AtomicU64,
    limit: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicU64::new(0),
            limit,
        })
    }

    pub(crate) fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    pub(crate) fn limit(&self) -> u64 {
        self.limit
    }

    /// Reserves `n` bytes, or returns the bytes in use if they do not fit.
    pub(crate) fn reserve(self: &Arc<Self>, n: u64) -> Result<Reservation, u64> {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                cur.checked_add(n).filter(|t| *t <= self.limit)
            })
            .map(|_| Reservation {
                budget: self.clone(),
                bytes: n,
            })
    }
}

/// Bytes counted against the budget until dropped.
#[derive(Debug)]
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: u64,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        }
    }
}

impl Reservation {
    /// Takes over `other`'s bytes.
    pub(crate) fn absorb(&mut self, mut other: Reservation) {
        self.bytes += other.bytes;
        other.bytes = 0;
    }
}

/// An object: immutable pieces, as received, and the charge that keeps
/// them counted for as long as anyone holds the object. Reads send slices
/// of the pieces without copying, while they hold the object.
#[derive(Debug)]
pub(crate) struct Object {
    chunks: Vec<Bytes>,
    len: u64,
    _charge: Reservation,
}

impl Object {
    pub(crate) fn new(chunks: Vec<Bytes>, len: u64, charge: Reservation) -> Self {
        debug_assert_eq!(chunks.iter().map(|c| c.len() as u64).sum::<u64>(), len);
        Self {
            chunks,
            len,
            _charge: charge,
        }
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// The pieces covering `start..end` (which must be within the object).
    pub(crate) fn slices(&self, start: u64, end: u64) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0u64;
        for c in &self.chunks {
            let (lo, hi) = (at, at + c.len() as u64);
            at = hi;
            if hi <= start || c.is_empty() {
                continue;
            }
            if lo >= end {
                break;
            }
            let s = start.max(lo) - lo;
            let e = end.min(hi) - lo;
            out.push(c.slice(s as usize..e as usize));
        }
        out
    }
}

/// What [`Store::publish`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Published {
    /// The object is visible.
    Yes,
    /// Create mode, and an object exists there: the new one is dropped.
    Exists,
    /// The object count limit is reached: the new one is dropped.
    TooMany,
}

/// The visible objects.
#[derive(Debug)]
pub(crate) struct Store {
    objects: Mutex<BTreeMap<String, Arc<Object>>>,
    budget: Arc<Budget>,
    max_objects: usize,
}

impl Store {
    pub(crate) fn new(budget: u64, max_objects: usize) -> Arc<Self> {
        Arc::new(Self {
            objects: Mutex::default(),
            budget: Budget::new(budget),
            max_objects,
        })
    }

    pub(crate) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub(crate) fn max_objects(&self) -> usize {
        self.max_objects
    }

    fn map(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Object>>> {
        self.objects.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn len(&self) -> usize {
        self.map().len()
    }

    /// Whether a new object could be stored at `path` now (an existing one
    /// would be replaced, or there is room for one more).
    pub(crate) fn has_room_for(&self, path: &str) -> bool {
        let map = self.map();
        map.len() < self.max_objects || map.contains_key(path)
    }

    /// Makes `object` visible under `path`. In create mode an existing
    /// object wins. A replaced object is released when its last reader
    /// lets go of it.
    pub(crate) fn publish(&self, path: String, object: Object, mode: PutMode) -> Published {
        let old = {
            let mut map = self.map();
            let exists = map.contains_key(&path);
            if mode == PutMode::Create && exists {
                return Published::Exists;
            }
            if !exists && map.len() >= self.max_objects {
                return Published::TooMany;
            }
            map.insert(path, Arc::new(object))
        };
        // Dropped outside the lock.
        drop(old);
        Published::Yes
    }

    pub(crate) fn get(&self, path: &str) -> Option<Arc<Object>> {
        self.map().get(path).cloned()
    }

    pub(crate) fn delete(&self, path: &str) {
        let old = self.map().remove(path);
        drop(old);
    }

    pub(crate) fn list(&self, prefix: &str) -> Vec<ObjectMeta> {
        self.map()
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| ObjectMeta {
                path: k.clone(),
                size: v.len,
            })
            .collect()
    }

    /// Drops every object (released as their readers finish).
    pub(crate) fn clear(&self) {
        let all = std::mem::take(&mut *self.map());
        drop(all);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(budget: &Arc<Budget>, path: &str, data: &[u8]) -> Object {
        let r = budget
            .reserve(object_charge(path, data.len() as u64))
            .expect("fits");
        Object::new(vec![Bytes::copy_from_slice(data)], data.len() as u64, r)
    }

    #[test]
    fn object_slices_cover_exactly_the_range() {
        let budget = Budget::new(1 << 20);
        let r = budget.reserve(8).expect("fits");
        let o = Object::new(
            vec![
                Bytes::from_static(b"abc"),
                Bytes::new(),
                Bytes::from_static(b"defg"),
                Bytes::from_static(b"h"),
            ],
            8,
            r,
        );
        let cat = |s: Vec<Bytes>| s.iter().flat_map(|b| b.to_vec()).collect::<Vec<u8>>();
        for start in 0..=8 {
            for end in start..=8 {
                assert_eq!(
                    cat(o.slices(start, end)),
                    b"abcdefgh"[start as usize..end as usize].to_vec()
                );
            }
        }
    }

    #[test]
    fn charges_are_released_by_the_last_holder() {
        let store = Store::new(1000, 2);
        let b = store.budget().clone();
        let r = b.reserve(600).expect("fits");
        assert_eq!(b.reserve(401).err(), Some(600));
        drop(r);
        assert_eq!(b.used(), 0);
        // Empty objects are charged their path and overhead.
        let a = object(&b, "a", b"");
        assert_eq!(b.used(), 1 + OBJECT_OVERHEAD);
        assert_eq!(
            store.publish("a".into(), a, PutMode::Create),
            Published::Yes
        );
        // Create on an existing object: refused, charge released.
        let again = object(&b, "a", b"xyz");
        assert_eq!(
            store.publish("a".into(), again, PutMode::Create),
            Published::Exists
        );
        assert_eq!(b.used(), 1 + OBJECT_OVERHEAD);
        // The count limit: a third object is refused, an overwrite is not.
        let c = object(&b, "c", b"c");
        assert_eq!(
            store.publish("c".into(), c, PutMode::Create),
            Published::Yes
        );
        assert!(!store.has_room_for("d") && store.has_room_for("a"));
        let d = object(&b, "d", b"d");
        assert_eq!(
            store.publish("d".into(), d, PutMode::Overwrite),
            Published::TooMany
        );
        let a2 = object(&b, "a", b"12345");
        assert_eq!(
            store.publish("a".into(), a2, PutMode::Overwrite),
            Published::Yes
        );
        let held = 2 + 6 + 2 * OBJECT_OVERHEAD;
        assert_eq!(b.used(), held);
        // A reader holding an object keeps it counted after the delete.
        let reader = store.get("a").expect("a");
        store.delete("a");
        store.delete("a");
        assert_eq!(b.used(), held);
        drop(reader);
        assert_eq!(b.used(), 2 + OBJECT_OVERHEAD);
        store.clear();
        assert_eq!((b.used(), store.len()), (0, 0));
    }
}
