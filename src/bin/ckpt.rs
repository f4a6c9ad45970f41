//! `ckpt`: list, inspect, verify, garbage-collect and export checkpoints
//! in a location (a directory or `s3://bucket/prefix`).

use std::io::Write;
use std::process::ExitCode;

use ckpt::{
    CheckpointStore, DType, Error, Manifest, Result, Retention, TensorMut, VerifyReport,
    format::layout, open_existing_location, schedule::FailureEventKind, store::StepEvent,
};
use clap::{Parser, Subcommand};
use serde_json::json;

#[path = "ckpt/progress.rs"]
mod progress;

use progress::Progress;

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

/// Where the checkpoints are, and which run.
#[derive(clap::Args)]
struct Target {
    /// Directory or s3://bucket/prefix.
    location: String,
    /// Run (needed when the location holds several).
    #[arg(long)]
    run: Option<String>,
}

impl Target {
    /// The store at the location, which must exist: read-only commands
    /// never create anything.
    fn open(&self) -> Result<CheckpointStore> {
        CheckpointStore::new(open_existing_location(&self.location)?)
    }

    /// The run asked for, or the only one the location holds.
    fn run(&self, store: &CheckpointStore) -> Result<String> {
        if let Some(r) = &self.run {
            return Ok(r.clone());
        }
        let runs = store.runs()?;
        match runs.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(Error::NotFound {
                path: format!("{}: no committed checkpoint", store.tier().location()),
            }),
            many => Err(Error::Config(format!(
                "{} holds several runs ({}): pick one with --run",
                store.tier().location(),
                many.join(", ")
            ))),
        }
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// List committed checkpoints.
    Ls {
        #[command(flatten)]
        target: Target,
        /// One JSON object per checkpoint.
        #[arg(long)]
        json: bool,
    },
    /// Show a checkpoint's tensors, shards and loop state.
    Inspect {
        #[command(flatten)]
        target: Target,
        /// Step (default: newest).
        #[arg(long)]
        step: Option<u64>,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Read back every chunk and check its crc32c; exit 0 only if all verify.
    Verify {
        #[command(flatten)]
        target: Target,
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
        #[command(flatten)]
        target: Target,
        /// Keep the newest N committed checkpoints.
        #[arg(long)]
        keep_last: usize,
        /// Also keep every step divisible by K.
        #[arg(long)]
        keep_every: Option<u64>,
        /// Print what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// First copy what kept steps point at in steps to be deleted into
        /// the kept steps' own files (incremental saves), so those steps
        /// can be deleted too. Run it while the run is not saving.
        #[arg(long, conflicts_with = "dry_run")]
        compact: bool,
    },
    /// Run a peer server: RAM for other ranks' checkpoint shards (replicas
    /// or erasure-coded fragments), as a sidecar process. The group secret
    /// comes from --secret-file or CKPT_PEER_SECRET, never the command
    /// line. Stops cleanly on SIGTERM or SIGINT.
    #[cfg(feature = "peer")]
    PeerServe {
        /// Address to listen on, e.g. 10.0.0.5:7070 (port 0: any free one;
        /// the status line says which).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// File holding the group's secret (at least 32 bytes; a trailing
        /// newline is ignored).
        #[arg(long)]
        secret_file: Option<std::path::PathBuf>,
        /// Most bytes held for clients, e.g. 64M or 8G.
        #[arg(long, value_parser = parse_size)]
        budget: u64,
        /// The identity clients dial (default: the bound address, or only
        /// the port when bound to 0.0.0.0).
        #[arg(long)]
        identity: Option<String>,
        /// A machine-readable status line (one JSON object per event).
        #[arg(long)]
        json: bool,
    },
    /// A run's history: saves (math-stop, time to durable, bytes),
    /// restarts and the work each rolled back, where the wall time went,
    /// and the interval the scheduler would pick now.
    Report {
        #[command(flatten)]
        target: Target,
        /// One JSON object.
        #[arg(long)]
        json: bool,
        /// Also draw the timeline and the waterfall into this SVG file.
        #[arg(long)]
        svg: Option<std::path::PathBuf>,
    },
    /// Which tensors and chunks changed between two steps (by checksum).
    Diff {
        #[command(flatten)]
        target: Target,
        /// The older step.
        #[arg(long)]
        from: u64,
        /// The newer step.
        #[arg(long)]
        to: u64,
        /// One JSON object per tensor.
        #[arg(long)]
        json: bool,
    },
    /// Assemble a checkpoint's global tensors into one safetensors file.
    Export {
        #[command(flatten)]
        target: Target,
        /// Step (default: newest).
        #[arg(long)]
        step: Option<u64>,
        /// Output file.
        #[arg(long)]
        out: std::path::PathBuf,
    },
}

fn main() -> ExitCode {
    // `ckpt ls | head` ends quietly, as other command-line tools do, when
    // the reader goes away: printing to a closed stdout panics in Rust,
    // and that one panic exits with 141 (128 + SIGPIPE) and no message.
    // SIGPIPE itself stays ignored: its default disposition would also
    // kill the process, silently, when a server closes a connection the
    // S3 client is writing to (vectored socket writes raise it).
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        default_hook(info);
    }));
    ckpt::log_to_stderr();
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ckpt: {e}");
            ExitCode::from(2)
        }
    }
}

/// `ckpt report`.
fn report(target: &Target, json: bool, svg: Option<&std::path::Path>) -> Result<()> {
    let store = target.open()?;
    let run = target.run(&store)?;
    let r = store.report(&run)?;
    if let Some(path) = svg {
        std::fs::write(path, report_svg(&r)).map_err(|e| Error::io(path, e))?;
    }
    if json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(|e| Error::Internal(e.to_string()))?
        );
        return Ok(());
    }
    let w = &r.waterfall;
    println!(
        "run {run}: {} saves, {} starts, {} restarts, {:.1} s of wall time",
        r.saves.len(),
        r.starts,
        r.restarts.len(),
        w.wall_s
    );
    println!(
        "{:>8} {:>12} {:>14} {:>12}  DURABLE PER TIER",
        "STEP", "MATH-STOP", "BYTES", "AT (s)"
    );
    let t0 = r.saves.first().map_or(0.0, |s| s.started_unix_s);
    for s in &r.saves {
        let tiers: Vec<String> = s
            .tiers
            .iter()
            .map(|t| {
                if t.committed {
                    format!("{} {:.3} s", t.tier, t.durable_s)
                } else {
                    format!("{} not committed", t.tier)
                }
            })
            .collect();
        println!(
            "{:>8} {:>9.2} ms {:>14} {:>12.2}  {}",
            s.step,
            s.math_stop_s * 1e3,
            s.bytes,
            s.started_unix_s - t0,
            tiers.join(", ")
        );
    }
    for (i, x) in r.restarts.iter().enumerate() {
        println!(
            "restart {}: {} at step {}{}, restored step {}: rolled back {} steps ({:.2} s), down {:.2} s",
            i + 1,
            if x.detected_error {
                "detected error"
            } else {
                "failure"
            },
            x.ended_step,
            if x.recorded {
                ""
            } else {
                " (estimated from its last save: no crash record)"
            },
            x.restored_step,
            x.rollback_steps,
            x.rollback_s,
            x.downtime_s
        );
    }
    let pct = |v: f64| {
        if w.wall_s > 0.0 {
            100.0 * v / w.wall_s
        } else {
            0.0
        }
    };
    println!(
        "wall time: useful {:.2} s ({:.1}%), checkpoint stalls {:.3} s ({:.1}%), rolled back {:.2} s ({:.1}%), restarts {:.2} s ({:.1}%)",
        w.useful_s,
        pct(w.useful_s),
        w.checkpoint_stall_s,
        pct(w.checkpoint_stall_s),
        w.rolled_back_s,
        pct(w.rolled_back_s),
        w.restart_s,
        pct(w.restart_s)
    );
    match (
        r.exposed_save_s,
        r.mtbf_s,
        r.interval_young_s,
        r.interval_daly_s,
    ) {
        (Some(d), Some(m), Some(y), Some(da)) => println!(
            "exposed save time {:.2} ms, MTBF {m:.1} s ({} failures over {:.1} s): interval {y:.1} s (Young), {da:.1} s (Daly)",
            d * 1e3,
            r.failures,
            r.exposure_s
        ),
        (Some(d), _, _, _) => println!(
            "exposed save time {:.2} ms; no failure yet ({:.1} s of running time): no MTBF to pick an interval from",
            d * 1e3,
            r.exposure_s
        ),
        _ => println!("no save recorded"),
    }
    Ok(())
}

/// The timeline (process lives, saves, restarts) and the waterfall of the
/// wall time, as a small self-contained SVG.
fn report_svg(r: &ckpt::store::report::RunReport) -> String {
    use std::fmt::Write as _;
    let (width, left) = (900.0f64, 20.0f64);
    let span = r.waterfall.wall_s.max(1e-9);
    let t0 = r.started_unix_s;
    let x = |t: f64| left + (t - t0).max(0.0) / span * (width - 2.0 * left);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="190" font-family="sans-serif" font-size="12">"#
    );
    let _ = write!(
        s,
        r#"<text x="{left}" y="16">run {} : timeline (saves, restarts)</text>"#,
        r.run
    );
    let _ = write!(
        s,
        r##"<rect x="{left}" y="28" width="{}" height="24" fill="#cfe8cf"/>"##,
        width - 2.0 * left
    );
    for x0 in &r.restarts {
        let (a, b) = (x(x0.ended_unix_s - x0.rollback_s), x(x0.ended_unix_s));
        let _ = write!(
            s,
            r##"<rect x="{a:.1}" y="28" width="{:.1}" height="24" fill="#f4b6b6"><title>rolled back {} steps</title></rect>"##,
            (b - a).max(1.0),
            x0.rollback_steps
        );
        let c = x(x0.started_unix_s);
        let _ = write!(
            s,
            r##"<rect x="{b:.1}" y="28" width="{:.1}" height="24" fill="#999"><title>restart, restored step {}</title></rect>"##,
            (c - b).max(1.0),
            x0.restored_step
        );
    }
    for sv in &r.saves {
        let _ = write!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="26" y2="54" stroke="#1f5fa8"><title>save of step {1}</title></line>"##,
            x(sv.started_unix_s),
            sv.step
        );
    }
    let w = &r.waterfall;
    let _ = write!(
        s,
        r#"<text x="{left}" y="84">waterfall of {:.1} s of wall time</text>"#,
        w.wall_s
    );
    let mut at = left;
    for (name, v, color) in [
        ("useful", w.useful_s, "#7bc47b"),
        ("checkpoint stalls", w.checkpoint_stall_s, "#1f5fa8"),
        ("rolled back", w.rolled_back_s, "#e06666"),
        ("restarts", w.restart_s, "#999999"),
    ] {
        let len = v / span * (width - 2.0 * left);
        let _ = write!(
            s,
            r#"<rect x="{at:.1}" y="96" width="{:.1}" height="24" fill="{color}"><title>{name}: {v:.3} s</title></rect>"#,
            len.max(0.0)
        );
        at += len;
    }
    let mut ly = 140.0;
    for (name, v) in [
        ("useful", w.useful_s),
        ("checkpoint stalls", w.checkpoint_stall_s),
        ("rolled back", w.rolled_back_s),
        ("restarts", w.restart_s),
    ] {
        let _ = write!(s, r#"<text x="{left}" y="{ly}">{name}: {v:.3} s</text>"#);
        ly += 14.0;
    }
    s.push_str("</svg>\n");
    s
}

/// A size such as `4096`, `64K`, `64M`, `8G` or `1T` (powers of 1024).
#[cfg(feature = "peer")]
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("`{s}`: unknown unit `{c}` (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .parse()
        .map_err(|e| format!("`{s}`: not a size ({e}); e.g. 64M or 8G"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}`: too large"))
}

/// `ckpt peer-serve`: a peer server until SIGTERM or SIGINT.
#[cfg(feature = "peer")]
fn peer_serve(
    listen: std::net::SocketAddr,
    secret_file: Option<&std::path::Path>,
    budget: u64,
    identity: Option<String>,
    json: bool,
) -> Result<ExitCode> {
    let secret = match (secret_file, std::env::var_os("CKPT_PEER_SECRET")) {
        (Some(f), _) => {
            let mut b = std::fs::read(f).map_err(|e| Error::io(f, e))?;
            while b.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                b.pop();
            }
            b
        }
        (None, Some(v)) => v.into_encoded_bytes(),
        (None, None) => {
            return Err(Error::Config(
                "peer-serve: no secret: give --secret-file FILE or set CKPT_PEER_SECRET \
                 (never on the command line)"
                    .into(),
            ));
        }
    };
    let mut config = ckpt_io::PeerServerConfig::new(secret, budget).with_bind(listen);
    if let Some(id) = identity {
        config = config.with_identity(id);
    }
    let (signal, held, objects) = ckpt_io::PeerServer::run_until(
        config,
        |server| {
            let addr = server.local_addr();
            if json {
                println!(
                    "{}",
                    json!({"event": "listening", "addr": addr.to_string(), "budget": budget, "pid": std::process::id()})
                );
            } else {
                println!(
                    "ckpt peer-serve: listening on {addr}, budget {budget} bytes ({:.2} GiB), pid {}",
                    budget as f64 / (1u64 << 30) as f64,
                    std::process::id()
                );
            }
            std::io::stdout().flush().ok();
        },
        |_| {
            // Installed now, before the status line.
            use tokio::signal::unix::{SignalKind, signal};
            let term =
                signal(SignalKind::terminate()).map_err(|e| Error::io("<SIGTERM handler>", e));
            let int = signal(SignalKind::interrupt()).map_err(|e| Error::io("<SIGINT handler>", e));
            async move {
                let (mut term, mut int) = (term?, int?);
                let name = tokio::select! {
                    _ = term.recv() => "SIGTERM",
                    _ = int.recv() => "SIGINT",
                };
                Ok::<_, Error>(name)
            }
        },
    )?;
    if json {
        println!(
            "{}",
            json!({"event": "stopped", "signal": signal, "held_bytes": held, "objects": objects})
        );
    } else {
        println!("ckpt peer-serve: {signal}: stopped ({objects} objects, {held} bytes dropped)");
    }
    Ok(ExitCode::SUCCESS)
}

fn pick_step(store: &CheckpointStore, run: &str, step: Option<u64>) -> Result<u64> {
    let steps = store.steps(run)?;
    match step {
        Some(s) if steps.contains(&s) => Ok(s),
        Some(s) => Err(Error::NotFound {
            path: format!(
                "{} (committed steps: {steps:?})",
                layout::manifest_path(run, s)
            ),
        }),
        None => steps.last().copied().ok_or_else(|| Error::NotFound {
            path: format!("{}/{run}: no committed checkpoint", store.tier().location()),
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

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Ls { target, json } => ls(&target, json),
        Cmd::Inspect { target, step, json } => {
            let store = target.open()?;
            let run = target.run(&store)?;
            let step = pick_step(&store, &run, step)?;
            let m = store.manifest(&run, step)?;
            if json {
                println!("{}", String::from_utf8_lossy(&m.to_json()?));
            } else {
                print_manifest(&m);
                print_guarantee(&store, false)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Verify {
            target,
            step,
            all,
            json,
        } => verify(&target, step, all, json),
        Cmd::Gc {
            target,
            keep_last,
            keep_every,
            dry_run,
            compact,
        } => {
            let store = target.open()?;
            let mut retention = Retention::keep_last(keep_last);
            if let Some(k) = keep_every {
                retention = retention.with_keep_every(k);
            }
            retention.validate()?;
            let run = target.run(&store)?;
            if dry_run {
                let (keep, delete, for_refs) = store.gc_plan(&run, &retention)?;
                println!("would keep {keep:?}, delete {delete:?}");
                if !for_refs.is_empty() {
                    println!(
                        "would keep {for_refs:?} because kept steps point into their files (incremental saves)"
                    );
                }
            } else {
                if compact {
                    let c = store.compact(&run, &retention)?;
                    println!(
                        "compacted {:?}: copied {} chunks ({} bytes), pointed {} more at the copies",
                        c.compacted_steps, c.copied_chunks, c.copied_bytes, c.redirected_chunks
                    );
                }
                let bar = Progress::new(format!("gc {run}"), None, false);
                let r =
                    store.gc_with_progress(&run, &retention, &|_, bytes| bar.add_item(bytes, 1))?;
                bar.finish();
                println!(
                    "kept {:?}, deleted {:?}, removed leftovers {:?}",
                    r.kept_steps, r.deleted_steps, r.removed_leftovers
                );
                if !r.kept_for_references.is_empty() {
                    println!(
                        "kept {:?} because kept steps point into their files (incremental saves)",
                        r.kept_for_references
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Diff {
            target,
            from,
            to,
            json,
        } => diff(&target, from, to, json),
        #[cfg(feature = "peer")]
        Cmd::PeerServe {
            listen,
            secret_file,
            budget,
            identity,
            json,
        } => peer_serve(listen, secret_file.as_deref(), budget, identity, json),
        Cmd::Report { target, json, svg } => {
            report(&target, json, svg.as_deref())?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Export { target, step, out } => {
            export(&target, step, &out)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn ls(target: &Target, json: bool) -> Result<ExitCode> {
    let store = target.open()?;
    let runs = match &target.run {
        Some(r) => vec![r.clone()],
        None => store.runs()?,
    };
    if !json {
        println!(
            "{:<24} {:>12} {:>14} {:>6}  CREATED",
            "RUN", "STEP", "BYTES", "WORLD"
        );
    }
    for r in runs {
        for step in store.steps(&r)? {
            match store.manifest(&r, step) {
                Ok(m) if json => println!(
                    "{}",
                    json!({"run": r, "step": step, "bytes": m.data_bytes(), "world_size": m.world_size,
                        "created_unix_ms": m.created_unix_ms, "created": time_str(m.created_unix_ms),
                        "tensors": m.tensors.len()})
                ),
                Ok(m) => println!(
                    "{:<24} {:>12} {:>14} {:>6}  {}",
                    r,
                    step,
                    m.data_bytes(),
                    m.world_size,
                    time_str(m.created_unix_ms)
                ),
                Err(e) if json => {
                    println!(
                        "{}",
                        json!({"run": r, "step": step, "error": e.to_string()})
                    )
                }
                Err(e) => println!("{:<24} {:>12} unreadable manifest: {e}", r, step),
            }
        }
        print_step_notes(&store, &r, json)?;
    }
    print_guarantee(&store, json)?;
    Ok(ExitCode::SUCCESS)
}

/// What the location's commits rest on: whether its conditional create is
/// atomic (an S3 server is probed once).
fn print_guarantee(store: &CheckpointStore, json: bool) -> Result<()> {
    let g = store.create_guarantee()?;
    let location = store.tier().location();
    if json {
        println!(
            "{}",
            json!({"location": location, "create_guarantee": g.name(), "detail": g.to_string(),
                "commits": g.consequence()})
        );
    } else {
        println!("location {location}: {g}: {}", g.consequence());
    }
    Ok(())
}

/// The saves of `run` the coordinator refused (replicas that differed, a
/// rank that never reported) and the commits a resumed run took back, as
/// long as their step directories are kept; and the detected errors of the
/// failure log.
fn print_step_notes(store: &CheckpointStore, run: &str, json: bool) -> Result<()> {
    for n in store.step_notes(run)? {
        let again = if n.committed {
            "committed again later"
        } else {
            "not committed"
        };
        match &n.what {
            StepEvent::Refused(a) if json => println!(
                "{}",
                json!({"run": run, "step": n.step, "refused": {"incarnation": a.incarnation,
                    "kind": a.kind, "tensor": a.tensor, "chunk": a.chunk, "ranks": a.ranks,
                    "message": a.message}, "committed": n.committed})
            ),
            StepEvent::Refused(a) => println!(
                "{run:<24} {:>12} REFUSED by incarnation {} ({again}): {}",
                n.step, a.incarnation, a.message
            ),
            StepEvent::Uncommitted { file } if json => println!(
                "{}",
                json!({"run": run, "step": n.step, "uncommitted": file, "committed": n.committed})
            ),
            StepEvent::Uncommitted { file } => println!(
                "{run:<24} {:>12} UNCOMMITTED when the job resumed from an older step ({again}; audit copy {file})",
                n.step
            ),
        }
    }
    let detected: Vec<u64> = store
        .failure_log(run)?
        .iter()
        .filter(|e| e.kind == FailureEventKind::DetectedError)
        .map(|e| e.step)
        .collect();
    if !detected.is_empty() {
        if json {
            println!("{}", json!({"run": run, "detected_errors": detected}));
        } else {
            println!(
                "{run:<24} failure log: {} detected error(s) (replicas that differed), at steps {detected:?}",
                detected.len()
            );
        }
    }
    Ok(())
}

/// Per tensor of `to`: the chunks whose checksum differs from the same
/// piece and chunk of `from` (a piece that moved or is new counts whole).
fn diff(target: &Target, from: u64, to: u64, json: bool) -> Result<ExitCode> {
    let store = target.open()?;
    let run = target.run(&store)?;
    let (a, b) = (store.manifest(&run, from)?, store.manifest(&run, to)?);
    if a.chunk_size != b.chunk_size {
        return Err(ckpt::Error::InvalidInput(format!(
            "steps {from} and {to} use different chunk sizes ({} and {}): every chunk differs",
            a.chunk_size, b.chunk_size
        )));
    }
    let mut changed_total = 0usize;
    for (name, t) in &b.tensors {
        let old = a.tensors.get(name);
        let (mut changed, mut chunks) = (Vec::new(), 0usize);
        for p in &t.pieces {
            let prev = old.and_then(|o| {
                o.pieces
                    .iter()
                    .find(|q| q.global_offsets == p.global_offsets && q.shape == p.shape)
            });
            for (i, crc) in p.crc32c.iter().enumerate() {
                if prev.and_then(|q| q.crc32c.get(i)) != Some(crc) {
                    changed.push((p.global_offsets.clone(), i));
                }
            }
            chunks += p.crc32c.len();
        }
        changed_total += changed.len();
        let status = match (old, changed.len()) {
            (None, _) => "new",
            (Some(_), 0) => "same",
            (Some(_), n) if n == chunks => "changed",
            _ => "partly changed",
        };
        if json {
            println!(
                "{}",
                json!({"tensor": name, "status": status, "chunks": chunks,
                    "changed": changed.iter().map(|(o, i)| json!({"piece": o, "chunk": i})).collect::<Vec<_>>()})
            );
        } else if status != "same" {
            let list: Vec<String> = changed
                .iter()
                .take(16)
                .map(|(_, i)| i.to_string())
                .collect();
            println!(
                "{name:<40} {status:<15} {}/{chunks} chunks{}",
                changed.len(),
                if changed.is_empty() || status == "changed" || status == "new" {
                    String::new()
                } else {
                    format!(
                        ": {}{}",
                        list.join(","),
                        if changed.len() > 16 { ",..." } else { "" }
                    )
                }
            );
        }
    }
    for name in a.tensors.keys().filter(|n| !b.tensors.contains_key(*n)) {
        if json {
            println!("{}", json!({"tensor": name, "status": "removed"}));
        } else {
            println!("{name:<40} removed");
        }
    }
    if !json {
        println!(
            "{changed_total} chunks of {} changed from step {from} to step {to}",
            b.chunk_size
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn verify(target: &Target, step: Option<u64>, all: bool, json: bool) -> Result<ExitCode> {
    let store = target.open()?;
    let run = target.run(&store)?;
    let steps = if all {
        store.steps(&run)?
    } else {
        vec![pick_step(&store, &run, step)?]
    };
    let mut bad = 0;
    for s in steps {
        let report = match store.manifest(&run, s) {
            Ok(m) => {
                let bar =
                    Progress::new(format!("verify {run} step {s}"), Some(m.data_bytes()), json);
                let r = store.verify_with_progress(&m, &|n| bar.add(n));
                bar.finish();
                r
            }
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
            println!(
                "{}",
                json!({"run": run, "step": s, "ok": report.is_ok(), "chunks_ok": report.chunks_ok,
                    "bytes": report.bytes, "failures": report.failures})
            );
        } else if report.is_ok() {
            println!(
                "ok     {run} step {s}: {} chunks, {} bytes verified",
                report.chunks_ok, report.bytes
            );
        } else {
            for f in &report.failures {
                println!("FAILED {run} step {s}: {f}");
            }
        }
    }
    Ok(if bad == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
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
    let referenced = m.referenced_bytes();
    if referenced > 0 {
        let mut steps: Vec<u64> = m
            .tensors
            .values()
            .flat_map(|t| t.pieces.iter().flat_map(|p| p.referenced_steps()))
            .collect();
        steps.sort_unstable();
        steps.dedup();
        println!(
            "incremental: {} bytes written by this step, {referenced} bytes referenced in steps {steps:?}",
            m.written_bytes()
        );
    }
    println!();
    let replicated = m
        .tensors
        .values()
        .any(|t| t.pieces.iter().any(|p| p.replicas.len() > 1));
    println!(
        "{:<40} {:<6} {:<10} {:<20} {:>6}  {}",
        "TENSOR",
        "DTYPE",
        "ROLE",
        "SHAPE",
        "PIECES",
        if replicated {
            "WRITTEN BY (OF REPLICAS)"
        } else {
            "WRITTEN BY"
        }
    );
    for (name, t) in &m.tensors {
        println!(
            "{:<40} {:<6} {:<10} {:<20} {:>6}  {}",
            name,
            t.dtype.name(),
            format!("{:?}", t.role).to_lowercase(),
            format!("{:?}", t.shape),
            t.pieces.len(),
            writers(&t.pieces)
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

/// Which rank wrote each piece, with its replica group when replicated
/// (`0 (0,1)`: rank 0 wrote it, ranks 0 and 1 hold identical copies); the
/// first eight pieces.
fn writers(pieces: &[ckpt::format::manifest::Piece]) -> String {
    let mut out: Vec<String> = pieces
        .iter()
        .take(8)
        .map(|p| match p.replicas.len() {
            0 | 1 => p.rank.to_string(),
            _ => {
                let group: Vec<String> = p.replicas.iter().map(ToString::to_string).collect();
                format!("{} ({})", p.rank, group.join(","))
            }
        })
        .collect();
    if pieces.len() > 8 {
        out.push(format!("... {} more", pieces.len() - 8));
    }
    out.join("  ")
}

/// Writes the global tensors of one checkpoint into one standard
/// safetensors file, tensor by tensor (memory: the largest tensor), every
/// chunk verified as read; the file appears under its name only when
/// complete and synced.
fn export(target: &Target, step: Option<u64>, out: &std::path::Path) -> Result<()> {
    let store = target.open()?;
    let run = target.run(&store)?;
    let step = pick_step(&store, &run, step)?;
    let m = store.manifest(&run, step)?;
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
    let bar = Progress::new(
        format!("export {run} step {}", m.step),
        Some(m.data_bytes()),
        false,
    );
    for (name, t) in &m.tensors {
        let n = ckpt::checked_nbytes(&t.shape, t.dtype)
            .ok_or_else(|| Error::tensor(name, "size overflows"))?;
        let mut buf = vec![0u8; usize::try_from(n).map_err(|_| Error::tensor(name, "too large"))?];
        let mut target = TensorMut::new(name.clone(), t.dtype, &t.shape, &mut buf);
        store.read(&m, &mut [&mut target])?;
        w.write_all(&buf).map_err(|e| Error::io(&tmp, e))?;
        bar.add(n);
    }
    bar.finish();
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
