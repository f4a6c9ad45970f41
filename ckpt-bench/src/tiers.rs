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
    s3_url: Option<&str>,
    budget: u64,
) -> Result<Opened, Box<dyn std::error::Error>> {
    match kind {
        TierKind::Local => Ok(Opened {
            tier: Arc::new(ckpt_io::LocalTier::new(dir)?),
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
            let url = s3_url.ok_or("--tier s3 needs --s3-url s3://bucket/prefix")?;
            Ok(Opened {
                tier: Arc::new(ckpt_io::ObjectTier::from_url(
                    url,
                    ckpt_io::ObjectTierConfig::default(),
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
