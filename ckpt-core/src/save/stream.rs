//! The stream of one save: the dispatcher thread turns staged blocks (in
//! any order) into the shard file's byte stream (header, then every tensor
//! in layout order), sends it to every tier that takes the save, checksums
//! what staging did not (the staged copy, or zero-copy tensors), and
//! publishes this rank's manifest when the last byte has gone out.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use crate::error::{Error, Result};
use crate::format::checksum;
use crate::format::layout;
use crate::format::manifest::{
    FORMAT_VERSION, HeaderSum, Piece, RankManifest, RankTensor, Replication, library_version,
};
use crate::model::dtype;
use crate::model::state::{LoopState, TensorRole};

/// Everything about one save that the background needs, owned.
#[derive(Debug)]
pub(crate) struct SaveCtx {
    pub run: String,
    pub step: u64,
    pub rank: u32,
    pub world_size: u32,
    pub incarnation: String,
    /// This save attempt's id, in its shard file's name.
    pub attempt: String,
    pub chunk_size: u64,
    pub created_unix_ms: u64,
    /// When the save was called (its report's times count from here).
    pub started: std::time::Instant,
    /// The step this process restored or saved before this one.
    pub parent: Option<u64>,
    /// The run's rollbacks as this process knows them.
    pub lineage: std::sync::Arc<crate::format::manifest::Lineage>,
    pub loop_state: LoopState,
    pub header: Bytes,
    pub file_len: u64,
    pub blake3: bool,
    /// Hold the flush until staging has finished. Set when the whole save
    /// fits in the pool (unless `flush_while_staging`): writing while
    /// copying would steal cores and memory bandwidth from the math-stop. A
    /// save larger than the pool must stream, so it flushes while it
    /// stages.
    pub defer_flush: bool,
    /// Send staged blocks on at once and checksum them (and zero-copy
    /// tensors) once staging has ended, from the references kept here
    /// (`flush_while_staging`; only when the save fits the pool, which
    /// holds every block until then anyway).
    pub sum_after_staging: bool,
    /// Whether staging computed the staged tensors' checksums.
    pub crc_while_staging: bool,
    pub commit_timeout: Duration,
    pub tensors: Vec<TensorCtx>,
}

#[derive(Debug, Clone)]
pub(crate) struct TensorCtx {
    pub name: String,
    pub dtype: dtype::DType,
    pub role: TensorRole,
    pub global_shape: Vec<u64>,
    pub global_offsets: Vec<u64>,
    pub shape: Vec<u64>,
    pub offset: u64,
    /// Where the bytes start in the tensor's source (a block of a
    /// replicated tensor; 0 otherwise), a multiple of the chunk size.
    pub src_start: u64,
    pub len: u64,
    /// Zero-copy bytes, or `None` if the tensor was staged.
    pub shared: Option<Bytes>,
    /// Index among staged tensors.
    pub staged_index: Option<usize>,
    /// Its replica group and writer, when replicated.
    pub replication: Option<Replication>,
}

impl TensorCtx {
    /// Whether this rank writes the tensor into its shard file (else a
    /// replica does; it is only checksummed here, for the commit to
    /// compare).
    pub(crate) fn written_by(&self, rank: u32) -> bool {
        self.replication.as_ref().is_none_or(|r| r.writer == rank)
    }
}

impl SaveCtx {
    pub(crate) fn data_path(&self) -> String {
        format!(
            "{}/{}",
            layout::step_dir(&self.run, self.step),
            layout::rank_data_file(self.rank, &self.attempt)
        )
    }
    pub(crate) fn rank_manifest_path(&self, rank: u32) -> String {
        format!(
            "{}/{}",
            layout::step_dir(&self.run, self.step),
            layout::rank_manifest_file(rank)
        )
    }
}

/// Messages from staging to the dispatcher.
pub(crate) enum StageMsg {
    Block(usize, Bytes),
    Done(Vec<Vec<u32>>),
    Failed(Error),
}

pub(crate) type ManifestCell = Option<Result<Arc<RankManifest>>>;

/// Runs on its own thread: reorders staged blocks, emits the shard file's
/// bytes in order to every tier, checksums zero-copy tensors, and finally
/// publishes the rank manifest.
pub(crate) fn dispatch(
    ctx: Arc<SaveCtx>,
    rx: std_mpsc::Receiver<StageMsg>,
    outs: Vec<mpsc::UnboundedSender<Bytes>>,
    manifest_tx: watch::Sender<ManifestCell>,
) {
    let result = dispatch_inner(&ctx, &rx, &outs);
    drop(outs);
    let cell = match result {
        Ok(m) => Ok(Arc::new(m)),
        Err(e) => Err(e),
    };
    let _ = manifest_tx.send(Some(cell));
}

struct Reorder<'a> {
    rx: &'a std_mpsc::Receiver<StageMsg>,
    pending: BTreeMap<usize, Bytes>,
    next: usize,
    current: Bytes,
    crcs: Option<Vec<Vec<u32>>>,
}

impl Reorder<'_> {
    fn recv(&mut self) -> Result<()> {
        match self.rx.recv() {
            Ok(StageMsg::Block(k, b)) => {
                self.pending.insert(k, b);
                Ok(())
            }
            Ok(StageMsg::Done(crcs)) => {
                self.crcs = Some(crcs);
                Ok(())
            }
            Ok(StageMsg::Failed(e)) => Err(e),
            Err(_) => Err(Error::Internal("staging ended without finishing".into())),
        }
    }

    /// Takes the next `n` bytes of the staged stream as one or more slices.
    fn take(&mut self, mut n: usize, out: &mut impl FnMut(Bytes)) -> Result<()> {
        while n > 0 {
            if self.current.is_empty() {
                while !self.pending.contains_key(&self.next) {
                    self.recv()?;
                }
                self.current = self.pending.remove(&self.next).unwrap_or_default();
                self.next += 1;
                continue;
            }
            let k = n.min(self.current.len());
            out(self.current.split_to(k));
            n -= k;
        }
        Ok(())
    }
}

fn dispatch_inner(
    ctx: &SaveCtx,
    rx: &std_mpsc::Receiver<StageMsg>,
    outs: &[mpsc::UnboundedSender<Bytes>],
) -> Result<RankManifest> {
    let emit = |b: Bytes| {
        for o in outs {
            // A tier that gave up has closed its channel; the others go on.
            let _ = o.send(b.clone());
        }
    };
    let mut reorder = Reorder {
        rx,
        pending: BTreeMap::new(),
        next: 0,
        current: Bytes::new(),
        crcs: None,
    };
    if ctx.defer_flush {
        while reorder.crcs.is_none() {
            reorder.recv()?;
        }
    }
    emit(ctx.header.clone());
    let later = ctx.sum_after_staging;
    let mut shared_crcs: Vec<Option<Vec<u32>>> = Vec::with_capacity(ctx.tensors.len());
    let mut hashes: Vec<Option<String>> = Vec::with_capacity(ctx.tensors.len());
    // With `sum_after_staging`: each tensor's bytes, and whether its crcs
    // are this thread's to compute, summed once staging has ended.
    let mut kept: Vec<(Vec<Bytes>, bool)> = Vec::new();
    for t in &ctx.tensors {
        let mut hasher = (ctx.blake3 && !later).then(blake3::Hasher::new);
        // A replica another rank writes is checksummed, not sent.
        let write = t.written_by(ctx.rank);
        if let Some(bytes) = &t.shared {
            if later {
                kept.push((vec![bytes.clone()], true));
                shared_crcs.push(None);
            } else {
                shared_crcs.push(Some(checksum::chunk_crcs(bytes, ctx.chunk_size)));
            }
            if let Some(h) = hasher.as_mut() {
                h.update(bytes);
            }
            if write {
                emit(bytes.clone());
            }
        } else {
            let len = usize::try_from(t.len).map_err(|_| Error::tensor(&t.name, "too large"))?;
            // Checksum the staged copy here unless staging already did (or
            // it is summed after staging): it is immutable, and the manifest
            // that makes it visible is built only from these sums.
            let mut crc = (!ctx.crc_while_staging && !later)
                .then(|| checksum::ChunkedCrc::new(ctx.chunk_size));
            let mut slices = Vec::new();
            reorder.take(len, &mut |b: Bytes| {
                if later {
                    slices.push(b.clone());
                }
                if let Some(c) = crc.as_mut() {
                    c.update(&b);
                }
                if let Some(h) = hasher.as_mut() {
                    h.update(&b);
                }
                if write {
                    emit(b);
                }
            })?;
            if later {
                kept.push((slices, !ctx.crc_while_staging));
            }
            shared_crcs.push(crc.map(checksum::ChunkedCrc::finish));
        }
        hashes.push(hasher.map(|h| h.finalize().to_hex().to_string()));
    }
    while reorder.crcs.is_none() {
        reorder.recv()?;
    }
    // Staging has ended: the cores are free to sum what went out.
    for (i, (slices, crc)) in kept.into_iter().enumerate() {
        if crc {
            let mut c = checksum::ChunkedCrc::new(ctx.chunk_size);
            slices.iter().for_each(|b| c.update(b));
            shared_crcs[i] = Some(c.finish());
        }
        if ctx.blake3 {
            let mut h = blake3::Hasher::new();
            slices.iter().for_each(|b| {
                h.update(b);
            });
            hashes[i] = Some(h.finalize().to_hex().to_string());
        }
    }
    let staged_crcs = reorder.crcs.take().unwrap_or_default();
    let file = layout::rank_data_file(ctx.rank, &ctx.attempt);
    let mut tensors = Vec::with_capacity(ctx.tensors.len());
    for ((t, shared), blake3) in ctx.tensors.iter().zip(shared_crcs).zip(hashes) {
        let crc32c = match (shared, t.staged_index) {
            (Some(c), _) => c,
            (None, Some(i)) => {
                // A block's checksums are its share of its tensor's.
                let first = (t.src_start / ctx.chunk_size) as usize;
                let end = first + t.len.div_ceil(ctx.chunk_size) as usize;
                staged_crcs
                    .get(i)
                    .and_then(|c| c.get(first..end))
                    .map(<[u32]>::to_vec)
                    .ok_or_else(|| {
                        Error::Internal(format!("no checksums for tensor `{}`", t.name))
                    })?
            }
            (None, None) => {
                return Err(Error::Internal(format!(
                    "tensor `{}` has no data source",
                    t.name
                )));
            }
        };
        let (rank, file) = match &t.replication {
            // Held here, written by the writer into its own file, which
            // the merge takes the piece from: the name only says whose.
            Some(r) if r.writer != ctx.rank => (r.writer, layout::held_piece_file(r.writer)),
            _ => (ctx.rank, file.clone()),
        };
        tensors.push(RankTensor {
            name: t.name.clone(),
            dtype: t.dtype,
            global_shape: t.global_shape.clone(),
            role: t.role,
            piece: Piece {
                rank,
                file,
                offset: t.offset,
                length: t.len,
                global_offsets: t.global_offsets.clone(),
                shape: t.shape.clone(),
                crc32c,
                blake3,
                replicas: Vec::new(),
                chunks: Vec::new(),
                chunk_blake3: Vec::new(),
            },
            replication: t.replication.clone(),
        });
    }
    Ok(RankManifest {
        format: FORMAT_VERSION,
        library: library_version(),
        run: ctx.run.clone(),
        step: ctx.step,
        world_size: ctx.world_size,
        rank: ctx.rank,
        incarnation: ctx.incarnation.clone(),
        chunk_size: ctx.chunk_size,
        created_unix_ms: ctx.created_unix_ms,
        parent: ctx.parent,
        file,
        file_len: ctx.file_len,
        header: Some(HeaderSum {
            len: ctx.header.len() as u64,
            crc32c: crc32c::crc32c(&ctx.header),
        }),
        loop_state: ctx.loop_state.clone(),
        tensors,
    })
}
