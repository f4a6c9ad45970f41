//! Full verification of a stored checkpoint: every chunk of every piece is
//! read back and checked against its crc32c, and every file's length
//! against the manifest. Used by `ckpt verify`.

use serde::Serialize;

use crate::format::checksum::verify_chunks;
use crate::format::layout;
use crate::format::manifest::Manifest;
use crate::store;
use crate::tier::Tier;

/// Bytes read per request while verifying.
const VERIFY_UNIT: u64 = 64 << 20;

/// Result of verifying one checkpoint.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// Step verified.
    pub step: u64,
    /// Chunks whose checksum matched.
    pub chunks_ok: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Every problem found, each naming the file (and chunk).
    pub failures: Vec<String>,
}

impl VerifyReport {
    /// A report of a step that could not even be read.
    pub(crate) fn failed(step: u64, why: String) -> Self {
        Self {
            step,
            chunks_ok: 0,
            bytes: 0,
            failures: vec![why],
        }
    }

    /// Whether everything verified.
    pub fn is_ok(&self) -> bool {
        self.failures.is_empty()
    }
}

/// Reads and checks every byte of the checkpoint `m` on `tier`.
pub async fn verify_step(tier: &dyn Tier, m: &Manifest) -> VerifyReport {
    verify_step_with(tier, m, &|_| {}).await
}

/// [`verify_step`], calling `progress` with the bytes of each span as it
/// is read and checked (what a progress bar shows).
pub async fn verify_step_with(
    tier: &dyn Tier,
    m: &Manifest,
    progress: &(dyn Fn(u64) + Sync),
) -> VerifyReport {
    let mut report = VerifyReport {
        step: m.step,
        chunks_ok: 0,
        bytes: 0,
        failures: Vec::new(),
    };
    if let Err(e) = store::check_files(tier, m).await {
        report.failures.push(e.to_string());
        return report;
    }
    let unit = VERIFY_UNIT.max(m.chunk_size) / m.chunk_size * m.chunk_size;
    for (name, t) in &m.tensors {
        for p in &t.pieces {
            let mut whole = p.blake3.as_ref().map(|_| blake3::Hasher::new());
            let mut off = 0u64;
            'piece: while off < p.length {
                let n = unit.min(p.length - off);
                for span in p.spans(&m.run, m.step, m.chunk_size, off, off + n) {
                    let mut buf = vec![0u8; span.len as usize];
                    match crate::restore::read::read_span_into(tier, &span, &mut buf)
                        .await
                        .map(|()| buf)
                    {
                        Ok(bytes) => {
                            match verify_chunks(
                                &span.path,
                                &bytes,
                                m.chunk_size,
                                span.first_chunk,
                                &p.crc32c,
                            ) {
                                Ok(()) => report.chunks_ok += span.len.div_ceil(m.chunk_size),
                                Err(e) => report.failures.push(format!("tensor `{name}`: {e}")),
                            }
                            if let Some(h) = whole.as_mut() {
                                h.update(&bytes);
                            }
                            report.bytes += bytes.len() as u64;
                            progress(bytes.len() as u64);
                        }
                        Err(e) => {
                            report.failures.push(format!("tensor `{name}`: {e}"));
                            whole = None;
                            break 'piece;
                        }
                    }
                }
                off += n;
            }
            // Identity check over the whole piece, when recorded.
            if let (Some(want), Some(h)) = (&p.blake3, whole) {
                let got = h.finalize().to_hex().to_string();
                if &got != want {
                    report.failures.push(format!(
                        "tensor `{name}` in {}/{}: blake3 {got}, expected {want}",
                        layout::step_dir(&m.run, m.step),
                        p.file
                    ));
                }
            }
        }
    }
    report
}
