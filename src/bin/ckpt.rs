//! `ckpt`: list, inspect, verify, garbage-collect and export checkpoints
//! in a location (a directory or `s3://bucket/prefix`).

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;

use ckpt::{
    DType, Error, Manifest, Result, Retention, TensorMut, Tier, VerifyReport, format::layout,
    open_existing_location, store, verify_step,
};
use clap::{Parser, Subcommand};
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "ckpt",
    version,
    about = "Inspect and maintain ckpt checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// List committed checkpoints.
    Ls {
        /// Directory or s3://bucket/prefix.
        location: String,
        /// Only this run.
        #[arg(long)]
        run: Option<String>,
        /// One JSON object per checkpoint.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's tensors, shards and loop state.
    Inspect {
        /// Directory or s3://bucket/prefix.
        location: String,
        /// Run (needed when the location holds several).
        #[arg(long)]
        run: Option<String>,
        /// Step (default: newest).
        #[arg(long)]
        step: Option<u64>,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read back every chunk and check its crc32c; exit 0 only if all verify.
    Verify {
        /// Directory or s3://bucket/prefix.
        location: String,
        /// Run (needed when the location holds several).
        #[arg(long)]
        run: Option<String>,
        /// Step (default: newest).
        #[arg(long, conflicts_with = "all")]
        step: Option<u64>,
        /// Every committed step.
        #[arg(long)]
        all: bool,
        /// One JSON object per step.
        #[arg(long)]
        json: bool,
    },
    /// Apply retention and remove crash leftovers.
    Gc {
        /// Directory or s3://bucket/prefix.
        location: String,
        /// Run (needed when the location holds several).
        #[arg(long)]
        run: Option<String>,
        /// Keep the newest N committed checkpoints.
        #[arg(long)]
        keep_last: usize,
        /// Also keep every step divisible by K.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Assemble a checkpoint's global tensors into one safetensors file.
    Export {
        /// Directory or s3://bucket/prefix.
        location: String,
        /// Run (needed when the location holds several).
        #[arg(long)]
        run: Option<String>,
        /// Step (default: newest).
        #[arg(long)]
        step: Option<u64>,
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ckpt: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match run(cli, &rt) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckpt: {e}");
            ExitCode::from(2)
        }
    }
}

async fn pick_run(tier: &dyn Tier, run: Option<String>) -> Result<String> {
    if let Some(r) = run {
        return Ok(r);
    }
    let runs = store::runs(tier).await?;
    match runs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Error::NotFound {
            path: format!("{}: no committed checkpoint", tier.location()),
        }),
        many => Err(Error::Config(format!(
            "{} holds several runs ({}): pick one with --run",
            tier.location(),
            many.join(", ")
        ))),
    }
}

async fn pick_step(tier: &dyn Tier, run: &str, step: Option<u64>) -> Result<u64> {
    let steps = store::committed_steps(tier, run).await?;
    match step {
        Some(s) if steps.contains(&s) => Ok(s),
        Some(s) => Err(Error::NotFound {
            path: format!(
                "{} (committed steps: {steps:?})",
                layout::manifest_path(run, s)
            ),
        }),
        None => steps.last().copied().ok_or_else(|| Error::NotFound {
            path: format!("{}/{run}: no committed checkpoint", tier.location()),
        }),
    }
}

fn time_str(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn run(cli: Cli, rt: &tokio::runtime::Runtime) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Ls {
            location,
            run,
            json,
        } => {
            let tier = open_existing_location(&location)?;
            rt.block_on(async {
                let runs = match run {
                    Some(r) => vec![r],
                    None => store::runs(tier.as_ref()).await?,
                };
                if !json {
                    println!("{:<24} {:>12} {:>14} {:>6}  CREATED", "RUN", "STEP", "BYTES", "WORLD");
                }
                for r in runs {
                    for step in store::committed_steps(tier.as_ref(), &r).await? {
                        match store::load_manifest(tier.as_ref(), &r, step).await {
                            Ok(m) if json => println!(
                                "{}",
                                json!({"run": r, "step": step, "bytes": m.data_bytes(), "world_size": m.world_size, "created_unix_ms": m.created_unix_ms, "created": time_str(m.created_unix_ms), "tensors": m.tensors.len()})
                            ),
                            Ok(m) => println!("{:<24} {:>12} {:>14} {:>6}  {}", r, step, m.data_bytes(), m.world_size, time_str(m.created_unix_ms)),
                            Err(e) if json => println!("{}", json!({"run": r, "step": step, "error": e.to_string()})),
                            Err(e) => println!("{:<24} {:>12} unreadable manifest: {e}", r, step),
                        }
                    }
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Inspect {
            location,
            run,
            step,
            json,
        } => {
            let tier = open_existing_location(&location)?;
            rt.block_on(async {
                let run = pick_run(tier.as_ref(), run).await?;
                let step = pick_step(tier.as_ref(), &run, step).await?;
                let m = store::load_manifest(tier.as_ref(), &run, step).await?;
                if json {
                    println!("{}", String::from_utf8_lossy(&m.to_json()?));
                } else {
                    print_manifest(&m);
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Verify {
            location,
            run,
            step,
            all,
            json,
        } => {
            let tier = open_existing_location(&location)?;
            rt.block_on(async {
                let run = pick_run(tier.as_ref(), run).await?;
                let steps = if all {
                    store::committed_steps(tier.as_ref(), &run).await?
                } else {
                    vec![pick_step(tier.as_ref(), &run, step).await?]
                };
                let mut bad = 0;
                for s in steps {
                    let report = match store::load_manifest(tier.as_ref(), &run, s).await {
                        Ok(m) => verify_step(tier.as_ref(), &m).await,
                        Err(e) => VerifyReport {
                            step: s,
                            chunks_ok: 0,
                            bytes: 0,
                            failures: vec![e.to_string()],
                        },
                    };
                    if !report.is_ok() {
                        bad += 1;
                    }
                    if json {
                        println!("{}", json!({"run": run, "step": s, "ok": report.is_ok(), "chunks_ok": report.chunks_ok, "bytes": report.bytes, "failures": report.failures}));
                    } else if report.is_ok() {
                        println!("ok     {run} step {s}: {} chunks, {} bytes verified", report.chunks_ok, report.bytes);
                    } else {
                        for f in &report.failures {
                            println!("FAILED {run} step {s}: {f}");
                        }
                    }
                }
                Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
            })
        }
        Cmd::Gc {
            location,
            run,
            keep_last,
            keep_every,
            dry_run,
        } => {
            let tier = open_existing_location(&location)?;
            let mut retention = Retention::keep_last(keep_last);
            if let Some(k) = keep_every {
                retention = retention.with_keep_every(k);
            }
            rt.block_on(async {
                let run = pick_run(tier.as_ref(), run).await?;
                if dry_run {
                    let steps = store::committed_steps(tier.as_ref(), &run).await?;
                    let (keep, delete) = retention.select(&steps);
                    println!("would keep {keep:?}, delete {delete:?}");
                } else {
                    let r = store::gc(tier.as_ref(), &run, &retention).await?;
                    println!(
                        "kept {:?}, deleted {:?}, removed leftovers {:?}",
                        r.kept_steps, r.deleted_steps, r.removed_leftovers
                    );
                }
                Ok(ExitCode::SUCCESS)
            })
        }
        Cmd::Export {
            location,
            run,
            step,
            out,
        } => {
            let tier = open_existing_location(&location)?;
            export(rt, tier, run, step, &out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_manifest(m: &Manifest) {
    println!(
        "run {}  step {}  world size {}  created {}  {}",
        m.run,
        m.step,
        m.world_size,
        time_str(m.created_unix_ms),
        m.library
    );
    println!(
        "{} tensors, {} bytes, crc32c per {} bytes",
        m.tensors.len(),
        m.data_bytes(),
        m.chunk_size
    );
    println!();
    println!(
        "{:<40} {:<6} {:<10} {:<20} PIECES",
        "TENSOR", "DTYPE", "ROLE", "SHAPE"
    );
    for (name, t) in &m.tensors {
        println!(
            "{:<40} {:<6} {:<10} {:<20} {}",
            name,
            t.dtype.name(),
            format!("{:?}", t.role).to_lowercase(),
            format!("{:?}", t.shape),
            t.pieces.len()
        );
    }
    println!();
    for r in &m.ranks {
        println!("rank {} file {} ({} bytes)", r.rank, r.file, r.file_len);
        let s = &r.loop_state;
        println!(
            "  step {}  rng {}  data_loader {}  lr_schedule {}  extra {}",
            s.step, s.rng, s.data_loader, s.lr_schedule, s.extra
        );
    }
}

fn export(
    rt: &tokio::runtime::Runtime,
    tier: Arc<dyn Tier>,
    run: Option<String>,
    step: Option<u64>,
    out: &std::path::Path,
) -> Result<()> {
    let (m, run) = rt.block_on(async {
        let run = pick_run(tier.as_ref(), run).await?;
        let step = pick_step(tier.as_ref(), &run, step).await?;
        Ok::<_, Error>((store::load_manifest(tier.as_ref(), &run, step).await?, run))
    })?;
    let specs: Vec<(&str, DType, &[u64])> = m
        .tensors
        .iter()
        .map(|(n, t)| (n.as_str(), t.dtype, t.shape.as_slice()))
        .collect();
    let meta = std::collections::BTreeMap::from([
        ("run".to_string(), run.clone()),
        ("step".to_string(), m.step.to_string()),
        (
            "exported_by".to_string(),
            ckpt::format::manifest::library_version(),
        ),
    ]);
    let layout = ckpt::format::shard_file::layout(&specs, &meta)?;
    let tmp = out.with_extension("safetensors.partial");
    let file = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
    let mut w = std::io::BufWriter::with_capacity(8 << 20, file);
    w.write_all(&layout.header)
        .map_err(|e| Error::io(&tmp, e))?;
    for (name, t) in &m.tensors {
        let n = ckpt::checked_nbytes(&t.shape, t.dtype)
            .ok_or_else(|| Error::tensor(name, "size overflows"))?;
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| Error::tensor(name, "too large"))?];
        let mut target = TensorMut::new(name.clone(), t.dtype, &t.shape, &mut buf);
        ckpt::restore::read_targets(rt.handle(), tier.as_ref(), &m, &mut [&mut target], 4)?;
        w.write_all(&buf).map_err(|e| Error::io(&tmp, e))?;
    }
    let file = w
        .into_inner()
        .map_err(|e| Error::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    println!(
        "exported {} tensors ({} bytes) of {run} step {} to {}",
        m.tensors.len(),
        m.data_bytes(),
        m.step,
        out.display()
    );
    Ok(())
}
