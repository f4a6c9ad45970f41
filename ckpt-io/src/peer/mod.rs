//! A tier in the memory of peer processes: every rank's checkpoint shard
//! is replicated into a neighbour's RAM, so a restarted rank restores
//! from the network instead of from remote storage.
//!
//! [`Tier::create`]: ckpt_core::Tier::create
//! [`Tier::put`]: ckpt_core::Tier::put
//! [`Tier::get`]: ckpt_core::Tier::get
//! [`Tier::get_range`]: ckpt_core::Tier::get_range
//! [`Tier::read_into`]: ckpt_core::Tier::read_into
//! [`Tier::size`]: ckpt_core::Tier::size
//! [`Tier::capabilities`]: ckpt_core::Tier::capabilities
//!
//! # Roles
//!
//! A job of N ranks runs N [`PeerServer`]s (one per rank, started by the
//! rank or by a per-node launcher), each keeping objects in RAM within a
//! memory budget. Each rank's [`PeerTier`] is a client of the whole group:
//! it knows every server's address, in rank order. Rank `r`'s *buddy* is
//! rank `(r + ranks_per_node) % N` (the same local rank on the next node),
//! or [`PeerConfig::buddy`].
//!
//! - **Data objects** (the shard files written through [`Tier::create`])
//!   go to the rank's buddy server only: one replica, in a neighbour's
//!   RAM.
//! - **Metadata objects** ([`Tier::put`]: rank manifests, the step's
//!   `MANIFEST.json`) go to every server. The buddy's copy is required;
//!   copies on other servers are best effort (a failure is logged). A
//!   `PutMode::Create` is decided by the buddy alone: it succeeds if and
//!   only if the create succeeds there, and only then is the object copied
//!   to the others (where finding it present already is fine). The commit
//!   of a step happens once, on the coordinator's buddy. Creates are
//!   therefore exclusive among clients that share a buddy (every create of
//!   a `MANIFEST.json` comes from the coordinator), not across clients
//!   with different buddies.
//! - Objects larger than one frame (8 MiB) are streamed, also by `put`.
//!   Each `write` of a streamed object is staged on the server when it
//!   returns, so the caller's buffers (a checkpoint's staging blocks) are
//!   released at once; small writes are copied together and sent in one
//!   frame.
//! - **Reads** ([`Tier::get`], [`Tier::get_range`], [`Tier::read_into`],
//!   [`Tier::size`]) ask the buddy first, then the other servers in rank
//!   order, until one has the object. **Listings** are the union over all
//!   servers (by path; the buddy's size wins). **Deletes** go to every
//!   server.
//! - A server that cannot be reached (refused, reset, timed out), or
//!   that fails its handshake (another secret, another identity, another
//!   protocol version), is skipped by reads, listings, deletes and
//!   metadata copies, with a `tracing` warning; one that failed its
//!   handshake is not dialled again for a while (1 s, doubling up to
//!   30 s). An object on no reachable server is
//!   [`Error::NotFound`](ckpt_core::Error::NotFound); if no server at all
//!   answers, the error is a retryable
//!   [`Error::Backend`](ckpt_core::Error::Backend). Writes of data
//!   objects need the buddy.
//!
//! **Erasure coding** ([`PeerConfig::erasure`]): instead of the buddy
//! replica, each data object is cut into `k` data and `m` parity
//! fragments (Reed–Solomon, stripes of `k` x 1 MiB, a crc32c per stripe
//! shard) on the servers of ranks `r, r + ranks_per_node, ...`: `k + m`
//! distinct nodes, any `k` of which rebuild it. The object's descriptor
//! (lengths, fragment servers, checksums) is a replicated metadata object
//! under its own path, written once every fragment is complete. See
//! `docs/peer.md`.
//!
//! With this placement the storage-based commit protocol of ckpt-core
//! works unchanged: each rank streams its shard to its buddy and puts its
//! rank manifest everywhere; the coordinator finds every rank manifest on
//! its own buddy and creates `MANIFEST.json` there; the other ranks find
//! that manifest on any server.
//!
//! # What survives what
//!
//! [`Tier::capabilities`] reports `atomic_create: true` (the buddy's map
//! decides under a lock), `survives_process: true` (another process holds
//! the bytes: a rank that crashes and restarts finds its shard on its
//! buddy) and `survives_node: false`. A lost server loses the shards it
//! held — one replica each — and since a checkpoint is restorable only
//! when every rank's shard file is present, the loss of any server that
//! held a shard makes that step unrestorable from this tier (restore then
//! falls back to the next tier). Pair the peer tier with a durable tier.
//! With the default buddy the replicas sit on the next node, so the loss
//! of one rank process, or of its own server, loses nothing; a single-node
//! job (`ranks_per_node` = N) would make every rank its own buddy, which
//! protects nothing and is logged as a warning.
//!
//! Old replicas are removed only through deletes (ckpt-core's retention);
//! a server never evicts. Size each server's budget for `keep_last + 1`
//! steps of the shards it holds: the next step's shard arrives before
//! retention deletes the oldest. A stale copy on a server that was unreachable
//! during a delete comes back in listings when the server does, and is
//! deleted by the next retention pass.
//!
//! # Security
//!
//! The group shares a secret of at least 32 bytes that never travels.
//! Each connection starts with a handshake in which the server proves
//! first that it holds the secret, bound to this session and to the
//! address the client dialled; then the client proves it. Every later
//! frame in either direction carries a keyed-BLAKE3 tag under a
//! per-direction session key and an implicit sequence number, checked
//! before anything is stored or returned: an on-path attacker cannot
//! alter, inject, replay, reorder or drop frames unnoticed, nor pass for
//! a server. Traffic is not encrypted: bind servers to a private network.
//! See [`protocol`] for the wire format, the threat model in
//! `docs/peer.md`, and what a server rejects.
//!
//! ```
//! use std::sync::Arc;
//! use ckpt_core::{PutMode, Tier};
//! use ckpt_io::peer::{PeerConfig, PeerServer, PeerServerConfig, PeerTier};
//!
//! let rt = tokio::runtime::Runtime::new().unwrap();
//! rt.block_on(async {
//!     let secret = b"the group secret: at least 32 bytes".to_vec();
//!     let servers: Vec<_> = (0..2)
//!         .map(|_| PeerServer::spawn(PeerServerConfig::new(secret.clone(), 1 << 30)).unwrap())
//!         .collect();
//!     let addrs: Vec<_> = servers.iter().map(|s| s.local_addr()).collect();
//!     let rank0 = PeerTier::new(PeerConfig::new(addrs.clone(), 0, secret.clone())).unwrap();
//!     assert_eq!(rank0.buddy(), 1);
//!     rank0.put("run/a.json", "{}".into(), PutMode::Create).await.unwrap();
//!     let rank1 = PeerTier::new(PeerConfig::new(addrs, 1, secret)).unwrap();
//!     assert_eq!(rank1.get("run/a.json").await.unwrap(), "{}");
//!     for s in servers {
//!         s.shutdown().await;
//!     }
//! });
//! ```

mod client;
pub mod protocol;
mod server;
mod session;
mod store;
mod wire;

pub use client::{PeerConfig, PeerTier};
pub use server::{PeerServer, PeerServerConfig, PeerServerHandle};
pub use store::{CHUNK_OVERHEAD, OBJECT_OVERHEAD};
