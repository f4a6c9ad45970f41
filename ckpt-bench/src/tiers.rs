//! Which tier a benchmark writes to and reads from: a local directory, a
//! peer-memory server started in this process on 127.0.0.1, or an
//! S3-compatible bucket.

use std::path::Path;
use std::sync::Arc;

use ckpt_core::Tier;
use clap::ValueEnum;

/// The tier under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TierKind {
    /// Files in `--dir`.
    Local,
    /// A peer server in this process (loopback TCP, authenticated).
    Peer,
    /// The bucket named by `--s3-url` (credentials and endpoint from the
    /// usual AWS_* variables).
    S3,
}

/// `--tier` and `--s3-url`, shared by `flush` and `restore`.
#[derive(Debug, clap::Args)]
pub struct TierArgs {
    /// Tier under test.
    #[arg(long, value_enum, default_value = "local")]
    pub tier: TierKind,
    /// Bucket and prefix for `--tier s3`.
    #[arg(long)]
    pub s3_url: Option<String>,
    /// How S3 request bodies are checked in transit.
    #[arg(long, value_enum, default_value = "crc64nvme")]
    pub s3_payload_checksum: S3Checksum,
    /// `O_DIRECT` writes of a shard file in flight at once on a local
    /// tier (`LocalTier::with_writes_in_flight`).
    #[arg(long, default_value_t = ckpt_io::DEFAULT_WRITES_IN_FLIGHT)]
    pub local_writes_in_flight: usize,
}

/// The local tier in `dir` as `args` configure it.
pub fn local(dir: &Path, args: &TierArgs) -> Result<ckpt_io::LocalTier, ckpt_core::Error> {
    Ok(ckpt_io::LocalTier::new(dir)?.with_writes_in_flight(args.local_writes_in_flight))
}

/// `--s3-payload-checksum`: [`ckpt_io::PayloadChecksum`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum S3Checksum {
    /// A CRC64-NVME header on every body, unsigned payload (the default).
    Crc64nvme,
    /// The SHA-256 of every body in the SigV4 signature.
    Sha256,
}

/// A tier and whatever keeps it alive (the peer server and its runtime).
pub struct Opened {
    /// The tier.
    pub tier: Arc<dyn Tier>,
    _keep: Option<(tokio::runtime::Runtime, ckpt_io::peer::PeerServerHandle)>,
}

/// Opens the tier of `kind`. The peer server's memory budget is `budget`.
pub fn open(
    kind: TierKind,
    dir: &Path,
    args: &TierArgs,
    budget: u64,
) -> Result<Opened, Box<dyn std::error::Error>> {
    match kind {
        TierKind::Local => Ok(Opened {
            tier: Arc::new(local(dir, args)?),
            _keep: None,
        }),
        TierKind::Peer => {
            // The server stands in for another node's: its threads run at
            // the lowest priority, so the CPU it spends receiving does not
            // count against the saving side on the same cores.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .on_thread_start(lowest_priority)
                .enable_all()
                .build()?;
            let secret = b"ckpt-bench-peer-secret-32-bytes!".to_vec();
            let server = {
                let _g = rt.enter();
                ckpt_io::peer::PeerServer::spawn(ckpt_io::peer::PeerServerConfig::new(
                    secret.clone(),
                    budget,
                ))?
            };
            let cfg = ckpt_io::peer::PeerConfig::new(vec![server.local_addr()], 0, secret);
            Ok(Opened {
                tier: Arc::new(ckpt_io::peer::PeerTier::new(cfg)?),
                _keep: Some((rt, server)),
            })
        }
        TierKind::S3 => {
            let url = args
                .s3_url
                .as_deref()
                .ok_or("--tier s3 needs --s3-url s3://bucket/prefix")?;
            let checksum = match args.s3_payload_checksum {
                S3Checksum::Crc64nvme => ckpt_io::PayloadChecksum::Crc64Nvme,
                S3Checksum::Sha256 => ckpt_io::PayloadChecksum::SignedSha256,
            };
            Ok(Opened {
                tier: Arc::new(ckpt_io::ObjectTier::from_url(
                    url,
                    ckpt_io::ObjectTierConfig::default().with_payload_checksum(checksum),
                )?),
                _keep: None,
            })
        }
    }
}

/// Lowers the calling thread's priority to nice 19 (best effort).
fn lowest_priority() {
    // SAFETY: `setpriority` on the calling thread (`who` 0 is the caller's
    // thread id on Linux) has no memory-safety preconditions.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
}
