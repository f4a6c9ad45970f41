//! Erasure-coded data objects on the peer tier.
//!
//! A data object (what [`Tier::create`] writes: a shard file) of `len`
//! bytes is cut into stripes of `k × S` bytes (`S` = [`STRIPE`], the last
//! stripe shorter: `k × s` with `s` the even ceiling of its share). Each
//! stripe's `k` data shards are its bytes in order, plus `m` parity shards
//! from a Reed–Solomon code (`reed-solomon-simd`); fragment `i` of the
//! object is shard `i` of every stripe back to back, stored as the plain
//! object `<path>.ec.<nonce>.<i>` on one server. Fragment `i` of rank `r`
//! goes to rank `(r + i * ranks_per_node) % N`'s server.
//!
//! The object's *descriptor* is stored under `<path>` itself, replicated
//! on every server like a metadata object: [`MAGIC`], then JSON with the
//! length, `k`, `m`, `S`, the nonce, and per fragment its server and the
//! crc32c of each of its stripe shards. It is written last, once every
//! fragment is complete, so an object is visible only whole; an overwrite
//! writes new fragments under a new nonce, replaces the descriptor, then
//! deletes the old fragments, so a torn overwrite leaves the old object
//! intact.
//!
//! Reads fetch the data fragments (the code is systematic: data shards are
//! the object's bytes, no decoding) for the stripes a range touches,
//! whole stripe shards so that each is verified against its crc32c. A
//! fragment that is missing, unreachable or corrupt is replaced by the
//! other fragments of those stripes, fetched together; any `k` verified
//! shards of a stripe decode it. Encoding runs in the writer, on tokio's
//! blocking pool, in the flush: never in the math-stop.
//!
//! [`Tier::create`]: ckpt_core::Tier::create

use std::collections::{BTreeMap, BTreeSet};

use bytes::{Bytes, BytesMut};
use ckpt_core::{Error, ObjectMeta, PutMode, Result, Tier, TierWriter};
use futures::future::{BoxFuture, join_all};
use serde::{Deserialize, Serialize};

use super::protocol::Request;
use super::{PeerTier, Sink};

/// Bytes of each fragment per stripe (the last stripe's are fewer).
pub(crate) const STRIPE: u64 = 1 << 20;
/// Stripes read in one request per fragment.
const BATCH: u64 = 16;
/// The first bytes of a descriptor: no JSON object starts with a NUL.
pub(crate) const MAGIC: &[u8; 8] = b"\0ckpt-ec";
/// A descriptor is at most this long (more is a plain object).
const MAX_DESCRIPTOR: u64 = 4 << 20;

/// Where this rank's fragments go.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    pub k: u32,
    pub m: u32,
    /// Server index of each fragment of this rank's objects.
    pub placement: Vec<usize>,
}

impl Layout {
    pub fn new(k: u32, m: u32, rank: u32, ranks_per_node: u32, n: u32) -> Result<Self> {
        if k == 0 || m == 0 {
            return Err(Error::Config(format!(
                "peer tier: erasure coding ({k}, {m}) needs k >= 1 data and m >= 1 parity fragments"
            )));
        }
        if !reed_solomon_simd::ReedSolomonEncoder::supports(k as usize, m as usize) {
            return Err(Error::Config(format!(
                "peer tier: erasure coding ({k}, {m}) is not supported by the Reed–Solomon code"
            )));
        }
        let nodes = n / ranks_per_node.max(1);
        if k + m > nodes {
            return Err(Error::Config(format!(
                "peer tier: erasure coding {k}+{m} puts each shard's {} fragments on distinct nodes, \
                 but the job has {n} servers on {nodes} nodes ({ranks_per_node} ranks per node)",
                k + m
            )));
        }
        let placement = (0..k + m)
            .map(|i| {
                ((u64::from(rank) + u64::from(i) * u64::from(ranks_per_node)) % u64::from(n))
                    as usize
            })
            .collect();
        Ok(Self { k, m, placement })
    }
}

/// One fragment of an object: its server and the crc32c of each of its
/// stripe shards.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Fragment {
    pub server: u32,
    pub crc32c: Vec<u32>,
}

/// What the plain object under an erasure-coded object's path holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Descriptor {
    pub len: u64,
    pub k: u32,
    pub m: u32,
    /// Bytes per fragment per stripe.
    pub stripe: u64,
    pub nonce: String,
    pub fragments: Vec<Fragment>,
}

impl Descriptor {
    fn encode(&self) -> Result<Bytes> {
        let mut v = MAGIC.to_vec();
        serde_json::to_writer(&mut v, self).map_err(|e| Error::Internal(e.to_string()))?;
        Ok(Bytes::from(v))
    }

    /// The descriptor in `b`, `None` when `b` is a plain object.
    fn parse(path: &str, b: &[u8]) -> Result<Option<Self>> {
        let Some(json) = b.strip_prefix(MAGIC.as_slice()) else {
            return Ok(None);
        };
        let bad = |why: String| Error::Incomplete {
            path: path.to_string(),
            reason: format!("erasure-coded object: {why}"),
        };
        let d: Self =
            serde_json::from_slice(json).map_err(|e| bad(format!("bad descriptor: {e}")))?;
        let stripes = d.stripes();
        if d.k == 0
            || d.m == 0
            || d.fragments.len() != (d.k + d.m) as usize
            || d.stripe == 0
            || !d.stripe.is_multiple_of(2)
            || d.fragments.iter().any(|f| f.crc32c.len() as u64 != stripes)
        {
            return Err(bad(format!(
                "inconsistent descriptor ({}+{} fragments of {} stripes)",
                d.k, d.m, stripes
            )));
        }
        Ok(Some(d))
    }

    fn stripes(&self) -> u64 {
        self.len.div_ceil(self.k as u64 * self.stripe)
    }

    /// Bytes of each shard of stripe `j`.
    fn shard_len(&self, j: u64) -> u64 {
        let full = self.k as u64 * self.stripe;
        if j + 1 < self.stripes() || self.len.is_multiple_of(full) {
            self.stripe
        } else {
            let rest = self.len - j * full;
            rest.div_ceil(self.k as u64).next_multiple_of(2)
        }
    }
}

fn fragment_path(path: &str, nonce: &str, i: usize) -> String {
    format!("{path}.ec.{nonce}.{i}")
}

/// The object a fragment's path belongs to and the fragment's nonce, if
/// `name` is a fragment.
fn fragment_of(name: &str) -> Option<(&str, &str)> {
    let (rest, i) = name.rsplit_once('.')?;
    let (rest, nonce) = rest.rsplit_once('.')?;
    let obj = rest.strip_suffix(".ec")?;
    let ok = !i.is_empty()
        && i.bytes().all(|c| c.is_ascii_digit())
        && nonce.len() == 16
        && nonce.bytes().all(|c| c.is_ascii_hexdigit());
    ok.then_some((obj, nonce))
}

fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&std::process::id().to_le_bytes());
    h.update(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.update(&t.as_nanos().to_le_bytes());
    h.finalize().to_hex()[..16].to_string()
}

/// The descriptor of `path`, if it is an erasure-coded object (`None`: a
/// plain object, or none).
async fn descriptor(tier: &PeerTier, path: &str) -> Result<Option<Descriptor>> {
    match tier.raw_size(path).await {
        Ok(n) if n <= MAX_DESCRIPTOR && n >= MAGIC.len() as u64 => {}
        Ok(_) => return Ok(None),
        Err(Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e),
    }
    match tier.raw_get(path).await {
        Ok(b) => Descriptor::parse(path, &b),
        // Deleted between the two requests.
        Err(Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

pub(super) async fn create(
    tier: &PeerTier,
    layout: &Layout,
    path: &str,
) -> Result<Box<dyn TierWriter>> {
    tier.check_path(path)?;
    let nonce = nonce();
    let mut writers = Vec::with_capacity(layout.placement.len());
    for (i, &idx) in layout.placement.iter().enumerate() {
        let frag = fragment_path(path, &nonce, i);
        match tier.create_on(idx, &frag).await {
            Ok(w) => writers.push(w),
            Err(e) => {
                for w in writers {
                    let _ = w.abort().await;
                }
                return Err(e);
            }
        }
    }
    Ok(Box::new(EcWriter {
        tier: tier.clone(),
        layout: layout.clone(),
        path: path.to_string(),
        nonce,
        buf: BytesMut::new(),
        writers,
        crcs: vec![Vec::new(); layout.placement.len()],
        len: 0,
    }))
}

/// Streams one erasure-coded object: stripes are encoded as they fill.
struct EcWriter {
    tier: PeerTier,
    layout: Layout,
    path: String,
    nonce: String,
    buf: BytesMut,
    writers: Vec<Box<dyn TierWriter>>,
    crcs: Vec<Vec<u32>>,
    len: u64,
}

/// Encodes one stripe of `k` data shards of `s` bytes each: the `m`
/// parity shards, and the crc32c of all `k + m`.
fn encode_stripe(stripe: &Bytes, k: usize, m: usize, s: usize) -> Result<(Vec<Bytes>, Vec<u32>)> {
    let data: Vec<&[u8]> = (0..k).map(|i| &stripe[i * s..(i + 1) * s]).collect();
    let parity = reed_solomon_simd::encode(k, m, &data)
        .map_err(|e| Error::Internal(format!("erasure coding a stripe: {e}")))?;
    let mut crcs: Vec<u32> = data.iter().map(|d| crc32c::crc32c(d)).collect();
    crcs.extend(parity.iter().map(|p| crc32c::crc32c(p)));
    Ok((parity.into_iter().map(Bytes::from).collect(), crcs))
}

impl EcWriter {
    /// Encodes and sends one stripe of shards of `s` bytes.
    async fn stripe(&mut self, stripe: Bytes, s: usize) -> Result<()> {
        let (k, m) = (self.layout.k as usize, self.layout.m as usize);
        let data = stripe.clone();
        let (parity, crcs) = tokio::task::spawn_blocking(move || encode_stripe(&data, k, m, s))
            .await
            .map_err(|e| Error::Internal(format!("erasure coding task: {e}")))??;
        let shards: Vec<Bytes> = (0..k)
            .map(|i| stripe.slice(i * s..(i + 1) * s))
            .chain(parity)
            .collect();
        for (c, crc) in self.crcs.iter_mut().zip(crcs) {
            c.push(crc);
        }
        let sends = self
            .writers
            .iter_mut()
            .zip(shards)
            .map(|(w, shard)| w.write(shard));
        for r in join_all(sends).await {
            r?;
        }
        Ok(())
    }

    async fn drain_full(&mut self) -> Result<()> {
        let full = (self.layout.k as u64 * STRIPE) as usize;
        while self.buf.len() >= full {
            let stripe = self.buf.split_to(full).freeze();
            self.stripe(stripe, STRIPE as usize).await?;
        }
        Ok(())
    }

    async fn abort_all(writers: Vec<Box<dyn TierWriter>>) {
        for w in writers {
            let _ = w.abort().await;
        }
    }

    async fn finish_inner(mut self) -> Result<()> {
        self.drain_full().await?;
        if !self.buf.is_empty() {
            let k = self.layout.k as usize;
            let s = self.buf.len().div_ceil(k).next_multiple_of(2);
            self.buf.resize(k * s, 0);
            let stripe = std::mem::take(&mut self.buf).freeze();
            self.stripe(stripe, s).await?;
        }
        let writers = std::mem::take(&mut self.writers);
        for r in join_all(writers.into_iter().map(|w| w.finish())).await {
            r?;
        }
        let old = descriptor(&self.tier, &self.path).await.ok().flatten();
        let d = Descriptor {
            len: self.len,
            k: self.layout.k,
            m: self.layout.m,
            stripe: STRIPE,
            nonce: self.nonce.clone(),
            fragments: self
                .layout
                .placement
                .iter()
                .zip(std::mem::take(&mut self.crcs))
                .map(|(&server, crc32c)| Fragment {
                    server: server as u32,
                    crc32c,
                })
                .collect(),
        };
        // The commit point of the object: every fragment is complete.
        self.tier
            .put(&self.path, d.encode()?, PutMode::Overwrite)
            .await?;
        if let Some(old) = old.filter(|o| o.nonce != d.nonce) {
            delete_fragments(&self.tier, &self.path, &old).await;
        }
        Ok(())
    }
}

impl TierWriter for EcWriter {
    fn write(&mut self, mut data: Bytes) -> BoxFuture<'_, Result<()>> {
        Box::pin(async move {
            self.len += data.len() as u64;
            let full = (self.layout.k as u64 * STRIPE) as usize;
            // Whole stripes straight from the caller's (staged, immutable)
            // bytes: shards are slices of them, nothing is copied.
            while self.buf.is_empty() && data.len() >= full {
                let stripe = data.split_to(full);
                self.stripe(stripe, STRIPE as usize).await?;
            }
            self.buf.extend_from_slice(&data);
            self.drain_full().await
        })
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        // A failure leaves fragments unfinished (never visible) and no
        // descriptor.
        Box::pin(async move { (*self).finish_inner().await })
    }

    fn abort(mut self: Box<Self>) -> BoxFuture<'static, Result<()>> {
        Box::pin(async move {
            Self::abort_all(std::mem::take(&mut self.writers)).await;
            Ok(())
        })
    }
}

/// Deletes `d`'s fragments of `path`, each on its server (best effort: a
/// fragment on a server that is gone went with it).
async fn delete_fragments(tier: &PeerTier, path: &str, d: &Descriptor) {
    let reqs: Vec<(usize, Request)> = d
        .fragments
        .iter()
        .enumerate()
        .map(|(i, f)| {
            (
                f.server as usize,
                Request::Delete {
                    path: fragment_path(path, &d.nonce, i),
                },
            )
        })
        .collect();
    let results =
        join_all(reqs.iter().map(|(idx, req)| async move {
            (*idx, tier.request(*idx, req, &mut Sink::None).await)
        }))
        .await;
    for (idx, r) in results {
        if let Err(f) = r {
            tracing::debug!(server = %tier.addr(idx), path, error = %tier.error(idx, "delete", path, f), "peer tier: fragment not deleted");
        }
    }
}

/// Reads `dst.len()` bytes of the object `d` describes at `offset`.
async fn read_range(
    tier: &PeerTier,
    path: &str,
    d: &Descriptor,
    offset: u64,
    dst: &mut [u8],
) -> Result<()> {
    let end = offset + dst.len() as u64;
    if end > d.len {
        return Err(Error::Incomplete {
            path: path.to_string(),
            reason: format!("range {offset}..{end} is past the end ({} bytes)", d.len),
        });
    }
    if dst.is_empty() {
        return Ok(());
    }
    let full = d.k as u64 * d.stripe;
    let (j0, j1) = (offset / full, (end - 1) / full + 1);
    let mut j = j0;
    while j < j1 {
        let jn = (j + BATCH).min(j1);
        read_batch(tier, path, d, j, jn, offset, dst).await?;
        j = jn;
    }
    Ok(())
}

/// One fragment's stripe shards `j0..j1`, each verified: `None` where a
/// shard is missing or corrupt (and why, for the error).
async fn fetch(
    tier: &PeerTier,
    path: &str,
    d: &Descriptor,
    i: usize,
    j0: u64,
    j1: u64,
) -> (usize, std::result::Result<Vec<Bytes>, String>) {
    let f = &d.fragments[i];
    let idx = f.server as usize;
    let start = j0 * d.stripe;
    let lens: Vec<u64> = (j0..j1).map(|j| d.shard_len(j)).collect();
    let total: u64 = lens.iter().sum();
    let frag = fragment_path(path, &d.nonce, i);
    let mut buf = vec![0u8; total as usize];
    let req = Request::GetRange {
        path: frag.clone(),
        start,
        end: start + total,
    };
    if idx >= tier.inner.servers.len() {
        return (
            i,
            Err(format!("fragment {i}: server {idx} is not in this group")),
        );
    }
    match tier.request(idx, &req, &mut Sink::Into(&mut buf)).await {
        Ok(_) => {}
        Err(fail) => return (i, Err(tier.error(idx, "read", &frag, fail).to_string())),
    }
    let buf = Bytes::from(buf);
    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0usize;
    for (n, (j, len)) in (j0..j1).zip(lens).enumerate() {
        let shard = buf.slice(at..at + len as usize);
        let want = f.crc32c[j as usize];
        let got = crc32c::crc32c(&shard);
        if got != want {
            return (
                i,
                Err(format!(
                    "fragment {i} on {}: stripe {j} (shard {n} of this read): crc32c {got:#010x}, expected {want:#010x}",
                    tier.addr(idx)
                )),
            );
        }
        out.push(shard);
        at += len as usize;
    }
    (i, Ok(out))
}

#[allow(clippy::too_many_arguments)]
async fn read_batch(
    tier: &PeerTier,
    path: &str,
    d: &Descriptor,
    j0: u64,
    j1: u64,
    offset: u64,
    dst: &mut [u8],
) -> Result<()> {
    let (k, m) = (d.k as usize, d.m as usize);
    let full = d.k as u64 * d.stripe;
    let end = offset + dst.len() as u64;
    // The data fragments these stripes' wanted bytes lie in.
    let mut wanted = BTreeSet::new();
    for j in j0..j1 {
        let s = d.shard_len(j);
        for i in 0..k as u64 {
            let a = j * full + i * s;
            if a < end && a + s > offset {
                wanted.insert(i as usize);
            }
        }
    }
    let mut got: BTreeMap<usize, Vec<Bytes>> = BTreeMap::new();
    let mut why: Vec<String> = Vec::new();
    for (i, r) in join_all(wanted.iter().map(|&i| fetch(tier, path, d, i, j0, j1))).await {
        match r {
            Ok(s) => {
                got.insert(i, s);
            }
            Err(e) => why.push(e),
        }
    }
    let missing: Vec<usize> = wanted
        .iter()
        .copied()
        .filter(|i| !got.contains_key(i))
        .collect();
    if !missing.is_empty() {
        // Any k verified shards rebuild a stripe: fetch the others.
        let others: Vec<usize> = (0..k + m).filter(|i| !wanted.contains(i)).collect();
        for (i, r) in join_all(others.iter().map(|&i| fetch(tier, path, d, i, j0, j1))).await {
            match r {
                Ok(s) => {
                    got.insert(i, s);
                }
                Err(e) => why.push(e),
            }
        }
        if got.len() < k {
            return Err(Error::Incomplete {
                path: path.to_string(),
                reason: format!(
                    "erasure-coded {}+{}: {} of {} fragments readable for stripes {j0}..{j1}, {k} needed ({})",
                    d.k,
                    d.m,
                    got.len(),
                    k + m,
                    why.join("; ")
                ),
            });
        }
        tracing::warn!(path, missing = ?missing, "peer tier: rebuilding erasure-coded stripes from parity ({})", why.join("; "));
        let have = got.clone();
        let rebuilt = tokio::task::spawn_blocking(move || rebuild(&have, k, m, (j1 - j0) as usize))
            .await
            .map_err(|e| Error::Internal(format!("erasure decoding task: {e}")))?
            .map_err(|e| Error::Incomplete {
                path: path.to_string(),
                reason: format!("erasure decoding stripes {j0}..{j1}: {e}"),
            })?;
        for (i, shards) in rebuilt {
            got.insert(i, shards);
        }
    }
    for j in j0..j1 {
        let s = d.shard_len(j);
        for &i in &wanted {
            let a = j * full + i as u64 * s;
            let (lo, hi) = (a.max(offset), (a + s).min(end).min(d.len));
            if lo >= hi {
                continue;
            }
            let shard = &got[&i][(j - j0) as usize];
            dst[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&shard[(lo - a) as usize..(hi - a) as usize]);
        }
    }
    Ok(())
}

/// One decoding thread's output: (fragment, stripe, shard), or its error.
type Rebuilt = std::result::Result<Vec<(usize, usize, Bytes)>, reed_solomon_simd::Error>;

/// The data shards missing from `have` (fragment index to its shards of
/// `stripes` stripes), rebuilt from any `k` of those present.
fn rebuild(
    have: &BTreeMap<usize, Vec<Bytes>>,
    k: usize,
    m: usize,
    stripes: usize,
) -> std::result::Result<BTreeMap<usize, Vec<Bytes>>, reed_solomon_simd::Error> {
    // Stripes decode independently: split them over the cores.
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(stripes.max(1));
    let per = stripes.div_ceil(threads).max(1);
    let parts: Vec<Rebuilt> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..stripes)
            .step_by(per)
            .map(|from| {
                s.spawn(move || {
                    let mut out = Vec::new();
                    let mut dec: Option<(usize, reed_solomon_simd::ReedSolomonDecoder)> = None;
                    for t in from..(from + per).min(stripes) {
                        let bytes = have.values().next().map_or(0, |v| v[t].len());
                        let dec = match &mut dec {
                            Some((n, d)) if *n == bytes => d,
                            _ => {
                                let d = reed_solomon_simd::ReedSolomonDecoder::new(k, m, bytes)?;
                                &mut dec.insert((bytes, d)).1
                            }
                        };
                        for (i, sh) in have.iter().filter(|(i, _)| **i < k) {
                            dec.add_original_shard(*i, &sh[t])?;
                        }
                        for (i, sh) in have.iter().filter(|(i, _)| **i >= k).take(k) {
                            dec.add_recovery_shard(*i - k, &sh[t])?;
                        }
                        let r = dec.decode()?;
                        for (i, shard) in r.restored_original_iter() {
                            out.push((i, t, Bytes::copy_from_slice(shard)));
                        }
                    }
                    Ok(out)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a decoding thread panicked"))
            .collect()
    });
    let mut out: BTreeMap<usize, Vec<Bytes>> = BTreeMap::new();
    let mut all = Vec::new();
    for p in parts {
        all.extend(p?);
    }
    all.sort_by_key(|(i, t, _)| (*i, *t));
    for (i, _, shard) in all {
        out.entry(i).or_default().push(shard);
    }
    Ok(out)
}

pub(super) async fn get(tier: &PeerTier, _layout: &Layout, path: &str) -> Result<Bytes> {
    let b = tier.raw_get(path).await?;
    match Descriptor::parse(path, &b)? {
        None => Ok(b),
        Some(d) => {
            let mut out = vec![0u8; d.len as usize];
            read_range(tier, path, &d, 0, &mut out).await?;
            Ok(Bytes::from(out))
        }
    }
}

pub(super) async fn get_range(
    tier: &PeerTier,
    _layout: &Layout,
    path: &str,
    range: std::ops::Range<u64>,
) -> Result<Bytes> {
    match descriptor(tier, path).await? {
        None => tier.raw_get_range(path, range).await,
        Some(d) => {
            if range.start > range.end {
                return Err(Error::Incomplete {
                    path: path.to_string(),
                    reason: format!("empty range {range:?}"),
                });
            }
            let mut out = vec![0u8; (range.end - range.start) as usize];
            read_range(tier, path, &d, range.start, &mut out).await?;
            Ok(Bytes::from(out))
        }
    }
}

pub(super) async fn read_into(
    tier: &PeerTier,
    _layout: &Layout,
    path: &str,
    offset: u64,
    buf: &mut [u8],
) -> Result<()> {
    match descriptor(tier, path).await? {
        None => tier.raw_read_into(path, offset, buf).await,
        Some(d) => read_range(tier, path, &d, offset, buf).await,
    }
}

pub(super) async fn size(tier: &PeerTier, _layout: &Layout, path: &str) -> Result<u64> {
    match descriptor(tier, path).await? {
        None => tier.raw_size(path).await,
        Some(d) => Ok(d.len),
    }
}

/// The union listing with each erasure-coded object at its own length and
/// its fragments left out (descriptors are read only for objects whose
/// fragments the listing shows). Fragments no descriptor names (left by a
/// writer that stopped between its fragments and its descriptor, or by a
/// plain `put` over a coded object) are listed as they are, so retention
/// and gc delete them with their step.
pub(super) async fn list(
    tier: &PeerTier,
    _layout: &Layout,
    prefix: &str,
) -> Result<Vec<ObjectMeta>> {
    let all = tier.raw_list(prefix).await?;
    let coded: BTreeSet<String> = all
        .iter()
        .filter_map(|o| fragment_of(&o.path).map(|(obj, _)| obj.to_string()))
        .collect();
    // Fragments of live objects: (object, nonce).
    let mut live: BTreeSet<(String, String)> = BTreeSet::new();
    let mut out = Vec::with_capacity(all.len());
    for o in &all {
        if fragment_of(&o.path).is_some() {
            continue;
        }
        if coded.contains(&o.path) && o.size <= MAX_DESCRIPTOR {
            match tier.raw_get(&o.path).await {
                Ok(b) => match Descriptor::parse(&o.path, &b) {
                    Ok(Some(d)) => {
                        out.push(ObjectMeta {
                            path: o.path.clone(),
                            size: d.len,
                        });
                        live.insert((o.path.clone(), d.nonce));
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(path = %o.path, error = %e, "peer tier: unreadable descriptor listed as is");
                    }
                },
                // Deleted since the listing.
                Err(Error::NotFound { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        out.push(o.clone());
    }
    for o in all {
        if let Some((obj, nonce)) = fragment_of(&o.path)
            && !live.contains(&(obj.to_string(), nonce.to_string()))
        {
            out.push(o);
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// Deletes the object: its descriptor first (everywhere: the object is
/// gone), then its fragments.
pub(super) async fn delete(tier: &PeerTier, _layout: &Layout, path: &str) -> Result<()> {
    let d = match descriptor(tier, path).await {
        Ok(d) => d,
        Err(e @ Error::Incomplete { .. }) => {
            tracing::warn!(path, error = %e, "peer tier: deleting an object whose descriptor is unreadable");
            None
        }
        Err(e) => return Err(e),
    };
    tier.raw_delete(path).await?;
    if let Some(d) = d {
        delete_fragments(tier, path, &d).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(len: u64, k: u32) -> Descriptor {
        let mut d = Descriptor {
            len,
            k,
            m: 2,
            stripe: 64,
            nonce: "0123456789abcdef".into(),
            fragments: vec![],
        };
        let n = d.stripes();
        d.fragments = (0..k + 2)
            .map(|i| Fragment {
                server: i,
                crc32c: vec![0; n as usize],
            })
            .collect();
        d
    }

    #[test]
    fn stripes_cover_the_object_and_round_trip() {
        for (len, k) in [
            (0u64, 4u32),
            (1, 4),
            (255, 4),
            (256, 4),
            (257, 4),
            (1000, 3),
            (64, 1),
        ] {
            let d = desc(len, k);
            let covered: u64 = (0..d.stripes()).map(|j| d.shard_len(j) * k as u64).sum();
            assert!(covered >= len, "{len} {k}");
            for j in 0..d.stripes() {
                assert_eq!(d.shard_len(j) % 2, 0);
            }
            let b = d.encode().expect("encode");
            assert_eq!(Descriptor::parse("p", &b).expect("parse"), Some(d));
        }
        assert_eq!(Descriptor::parse("p", b"{}").expect("plain"), None);
        let mut bad = desc(300, 4);
        bad.fragments.pop();
        let b = bad.encode().expect("encode");
        assert!(Descriptor::parse("p", &b).is_err());
    }

    #[test]
    fn fragment_names_are_recognised() {
        let f = fragment_path(
            "run/step-1/rank-00000.abc.safetensors",
            "0123456789abcdef",
            3,
        );
        assert_eq!(
            fragment_of(&f),
            Some(("run/step-1/rank-00000.abc.safetensors", "0123456789abcdef"))
        );
        assert_eq!(fragment_of("run/step-1/rank-00000.json"), None);
        assert_eq!(fragment_of("a.ec.xyz.1"), None);
    }

    #[test]
    fn any_k_shards_rebuild_a_stripe() {
        let (k, m, s) = (4usize, 2usize, 128usize);
        let stripe = Bytes::from((0..k * s).map(|i| (i * 7 % 251) as u8).collect::<Vec<u8>>());
        let (parity, crcs) = encode_stripe(&stripe, k, m, s).expect("encode");
        assert_eq!(crcs.len(), k + m);
        let mut shards: Vec<Bytes> = (0..k).map(|i| stripe.slice(i * s..(i + 1) * s)).collect();
        shards.extend(parity);
        // Lose every pair of fragments in turn.
        for a in 0..k + m {
            for b in a + 1..k + m {
                let have: BTreeMap<usize, Vec<Bytes>> = (0..k + m)
                    .filter(|i| *i != a && *i != b)
                    .map(|i| (i, vec![shards[i].clone()]))
                    .collect();
                let rebuilt = rebuild(&have, k, m, 1).expect("rebuild");
                for i in [a, b].into_iter().filter(|i| *i < k) {
                    assert_eq!(rebuilt[&i][0], shards[i], "lost {a} and {b}");
                }
            }
        }
    }
}
