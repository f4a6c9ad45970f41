//! What a tier's conditional create really guarantees, found by trying it.
//!
//! The commit point of a checkpoint is a `put(MANIFEST, PutMode::Create)`:
//! a step is committed at most once only if a second create of the same
//! object fails, also when several coordinators race. Some S3-compatible
//! servers accept `If-None-Match: *` and overwrite anyway (Garage 2.5), or
//! check and then write without a lock, so that several racers win
//! (s3s-fs 0.14). [`probe_create`] tells the three apart; the commit then
//! reads its MANIFEST back where the server cannot be trusted (see
//! `docs/ARCHITECTURE.md`, "Commit on servers without atomic creates").

use std::fmt;

use bytes::Bytes;

use crate::error::Error;
use crate::tier::{PutMode, Tier};

/// Directory (relative to the tier root) of the probe's objects; they are
/// removed when the probe ends.
pub const PROBE_DIR: &str = ".ckpt-probe";

/// What `put(.., PutMode::Create)` guarantees on a tier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateGuarantee {
    /// A second create of an existing object fails, also under a race:
    /// a step is committed at most once.
    Atomic,
    /// A second create fails, but concurrent creates of one new object
    /// can all succeed (`winners` of `racers` did in the probe).
    Racy {
        /// Concurrent creates in the probe.
        racers: u32,
        /// How many of them reported success.
        winners: u32,
    },
    /// A create overwrites an existing object and reports success.
    Ignored,
    /// The probe could not tell (the tier refused it: read-only
    /// credentials, an outage).
    Unknown {
        /// Why.
        reason: String,
    },
}

impl CreateGuarantee {
    /// Whether the commit may rely on the create alone.
    pub fn is_atomic(&self) -> bool {
        matches!(self, CreateGuarantee::Atomic)
    }

    /// A short machine-readable name: `atomic`, `racy`, `ignored`,
    /// `unknown`.
    pub fn name(&self) -> &'static str {
        match self {
            CreateGuarantee::Atomic => "atomic",
            CreateGuarantee::Racy { .. } => "racy",
            CreateGuarantee::Ignored => "ignored",
            CreateGuarantee::Unknown { .. } => "unknown",
        }
    }

    /// What it means for commits, in a sentence.
    pub fn consequence(&self) -> &'static str {
        match self {
            CreateGuarantee::Atomic => "a step is committed at most once",
            _ => {
                "commits are checked by reading the MANIFEST back; safe with one \
                 coordinator per run (racing coordinators are caught within the \
                 read-back window)"
            }
        }
    }
}

impl fmt::Display for CreateGuarantee {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CreateGuarantee::Atomic => write!(f, "conditional create honoured (atomic)"),
            CreateGuarantee::Racy { racers, winners } => write!(
                f,
                "conditional create racy ({winners} of {racers} concurrent creates won)"
            ),
            CreateGuarantee::Ignored => {
                write!(
                    f,
                    "conditional create ignored (an existing object was overwritten)"
                )
            }
            CreateGuarantee::Unknown { reason } => {
                write!(f, "conditional create not probed: {reason}")
            }
        }
    }
}

/// Probes `tier`: creates one object twice (the second must fail), then
/// up to six rounds of `racers` concurrent creates of another (exactly one
/// must succeed each time), and removes what it wrote. Costs two small
/// puts, a get, at most `6 x racers` puts of 128 KiB and a few deletes under
/// [`PROBE_DIR`]; `nonce` keeps concurrent probes apart.
pub async fn probe_create(tier: &dyn Tier, nonce: &str, racers: u32) -> CreateGuarantee {
    let once = format!("{PROBE_DIR}/{nonce}-once");
    let race = format!("{PROBE_DIR}/{nonce}-race");
    let result = probe(tier, &once, &race, racers.max(2)).await;
    // Remove everything this probe wrote: on a racy server a losing create
    // can land after the delete that followed its round, so list and delete
    // until nothing of this nonce is left (a few tries).
    let mine = format!("{PROBE_DIR}/{nonce}-");
    for _ in 0..4 {
        let left = match tier.list(&mine).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(tier = %tier.location(), error = %e, "probe cleanup: cannot list");
                Vec::new()
            }
        };
        if left.is_empty() {
            break;
        }
        for o in left {
            if let Err(e) = tier.delete(&o.path).await {
                tracing::debug!(tier = %tier.location(), path = o.path, error = %e, "probe cleanup failed");
            }
        }
        tokio::task::yield_now().await;
    }
    result
}

async fn probe(tier: &dyn Tier, once: &str, race: &str, racers: u32) -> CreateGuarantee {
    let unknown = |what: &str, e: Error| CreateGuarantee::Unknown {
        reason: format!("{what}: {e}"),
    };
    if let Err(e) = tier
        .put(once, Bytes::from_static(b"first"), PutMode::Create)
        .await
    {
        return unknown("first create", e);
    }
    match tier
        .put(once, Bytes::from_static(b"second"), PutMode::Create)
        .await
    {
        Ok(()) => return CreateGuarantee::Ignored,
        Err(Error::AlreadyExists { .. }) => {}
        Err(e) => return unknown("second create", e),
    }
    match tier.get(once).await {
        Ok(b) if b.as_ref() == b"first" => {}
        Ok(_) => return CreateGuarantee::Ignored,
        Err(e) => return unknown("read back", e),
    }
    // Several rounds, with payloads large enough that a server which
    // checks and then writes has a window to lose: the first round also
    // opens the connections, which spreads its requests out.
    for round in 0..ROUNDS {
        let path = format!("{race}-{round}");
        let attempts = (0..racers).map(|i| {
            let mut body = vec![i as u8; RACE_PAYLOAD];
            body[..8].copy_from_slice(&u64::from(i).to_le_bytes());
            tier.put(&path, Bytes::from(body), PutMode::Create)
        });
        let outcomes = futures::future::join_all(attempts).await;
        let _ = tier.delete(&path).await;
        let mut winners = 0;
        for o in outcomes {
            match o {
                Ok(()) => winners += 1,
                Err(Error::AlreadyExists { .. }) => {}
                Err(e) => return unknown("concurrent create", e),
            }
        }
        if winners != 1 {
            return CreateGuarantee::Racy { racers, winners };
        }
    }
    CreateGuarantee::Atomic
}

/// Rounds of concurrent creates in a probe (it stops at the first round
/// with more than one winner). A race is found by trying: a server that
/// checks and then writes shows it in most rounds, not in all.
const ROUNDS: u32 = 6;
/// Bytes each racer writes.
const RACE_PAYLOAD: usize = 128 << 10;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tier::memory::MemoryTier;

    #[test]
    fn the_memory_tier_is_atomic_and_the_probe_cleans_up() {
        let tier = MemoryTier::new();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let g = rt.block_on(probe_create(&tier, "t", 16));
        assert_eq!(g, CreateGuarantee::Atomic);
        assert!(rt.block_on(tier.list("")).expect("list").is_empty());
    }
}
