//! A failing tier never stops training, and loses nothing. Each test runs
//! the quickstart binary (`--json`: one event per save) against a tier that
//! fails the way production tiers fail, and checks the outcome:
//!
//! - the S3 server SIGKILLed mid-run and restarted 10 s later on the same
//!   port and data: saves fail with typed errors naming the tier and step,
//!   the loop does not slow down, the tier is back within one probe
//!   interval, and the run ends bit-exact with every committed step
//!   verifying (`s3_outage_*`);
//! - local + S3 with S3 down: the local tier commits every save on time
//!   (`s3_outage_with_a_local_tier_keeps_committing_locally`);
//! - the local disk fills up mid-run (`local_disk_full_mid_run`, a small
//!   tmpfs: needs root, says so when skipped);
//! - an S3 endpoint that wedges mid-run: accepts connections and never
//!   answers (`hanging_server_is_bounded_by_timeouts`);
//! - the only tier cannot be listed at start: no silent fresh start
//!   (`an_unlistable_only_tier_is_not_a_fresh_start`).
//!
//! The tests share the machine's cores, so they run one at a time.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::s3s::{Server, free_port, s3s_fs_binary};
use common::tmpfs::Tmpfs;
use common::{Events, digest, example, median, run};
use serde_json::Value;

/// One test at a time: they compare loop speeds.
static SERIAL: Mutex<()> = Mutex::new(());

const STEP_MS: &str = "20";
const EVERY: &str = "25";
const STATE_MB: &str = "4";
const STEPS: &str = "1000";
/// The checkpointer's longest health-probe interval (ProbeBackoff::max),
/// plus slack for the probe itself.
const PROBE_BACK: Duration = Duration::from_millis(2_700);

fn ckpt_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ckpt")
}

/// The final digest of an uninterrupted run with the outage tests' flags,
/// computed once.
fn outage_reference() -> String {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST
        .get_or_init(|| reference_digest(&training_args()))
        .clone()
}

/// The final digest of an uninterrupted run with these training flags.
fn reference_digest(args: &[&str]) -> String {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(Command::new(example("quickstart"))
        .arg("--dir")
        .arg(dir.path())
        .args(args)
        .arg("--quiet"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    digest(&out)
}

fn final_digest(ev: &Events) -> String {
    let finals = ev.of("final");
    finals
        .last()
        .map(|(_, v)| v["digest"].as_str().expect("digest").to_string())
        .unwrap_or_else(|| panic!("no final event: {:?}", ev.seen))
}

/// The environment a user's S3 setup would have for this server.
fn s3_env(cmd: &mut Command, server: &Server) {
    cmd.env("AWS_ENDPOINT_URL", server.endpoint())
        .env("AWS_ACCESS_KEY_ID", &server.access_key)
        .env("AWS_SECRET_ACCESS_KEY", &server.secret_key)
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ALLOW_HTTP", "true");
}

/// The tier entry named `tier` of a `durable` event.
fn tier_of<'a>(durable: &'a Value, tier: &str) -> &'a Value {
    durable["tiers"]
        .as_array()
        .and_then(|ts| ts.iter().find(|t| t["tier"] == tier))
        .unwrap_or_else(|| panic!("no tier {tier} in {durable}"))
}

/// Steps per second between the first and last of `saves`.
fn step_rate(saves: &[(Instant, Value)]) -> f64 {
    let (Some((t0, a)), Some((t1, b))) = (saves.first(), saves.last()) else {
        return 0.0;
    };
    let steps = b["step"].as_f64().unwrap_or(0.0) - a["step"].as_f64().unwrap_or(0.0);
    steps / (*t1 - *t0).as_secs_f64().max(1e-9)
}

fn math_stops(saves: &[(Instant, Value)]) -> Vec<f64> {
    saves
        .iter()
        .map(|(_, v)| v["math_stop_ms"].as_f64().expect("math_stop_ms"))
        .collect()
}

/// What happened around an outage of the S3 server, from the run's events.
struct Outage {
    killed: Instant,
    back: Instant,
}

impl Outage {
    /// Kills `server` once `ev` has seen `healthy` committed saves, keeps it
    /// down for `down`, restarts it on the same port and data.
    fn inject(
        ev: &mut Events,
        server: &mut Server,
        s3: &str,
        healthy: usize,
        down: Duration,
    ) -> Self {
        let mut committed = 0;
        ev.wait_for("healthy commits on S3", Duration::from_secs(60), |v| {
            if v["event"] == "durable" && tier_of(v, s3)["committed"] == true {
                committed += 1;
            }
            committed >= healthy
        });
        server.kill();
        let killed = Instant::now();
        eprintln!("S3 server SIGKILLed");
        while killed.elapsed() < down {
            // Keep reading so the child never blocks on a full pipe.
            let _ = ev.wait_for("any event", down, |_| true);
        }
        server.spawn();
        let back = Instant::now();
        eprintln!("S3 server restarted after {:?}", back - killed);
        Outage { killed, back }
    }

    /// Saves that started while healthy, while down (after the first
    /// failing save had time to fail), and once back.
    fn phases(&self, ev: &Events) -> [Vec<(Instant, Value)>; 3] {
        let saves = ev.of("save");
        let settle = Duration::from_secs(2);
        [
            saves
                .iter()
                .filter(|(t, _)| *t < self.killed)
                .cloned()
                .collect(),
            saves
                .iter()
                .filter(|(t, _)| *t > self.killed + settle && *t < self.back)
                .cloned()
                .collect(),
            saves
                .iter()
                .filter(|(t, _)| *t > self.back + PROBE_BACK)
                .cloned()
                .collect(),
        ]
    }
}

/// The loop neither slowed down nor stopped for longer copies while the
/// tier was down.
fn assert_loop_unaffected(healthy: &[(Instant, Value)], down: &[(Instant, Value)]) {
    assert!(
        healthy.len() >= 3 && down.len() >= 5,
        "too few saves to compare: {} healthy, {} during the outage",
        healthy.len(),
        down.len()
    );
    let (rate_ok, rate_down) = (step_rate(healthy), step_rate(down));
    let (stop_ok, stop_down) = (median(math_stops(healthy)), median(math_stops(down)));
    eprintln!(
        "healthy: {rate_ok:.1} steps/s, median math-stop {stop_ok:.2} ms; outage: {rate_down:.1} steps/s, median math-stop {stop_down:.2} ms"
    );
    assert!(
        rate_down >= 0.8 * rate_ok,
        "the loop slowed down during the outage: {rate_down:.1} vs {rate_ok:.1} steps/s"
    );
    assert!(
        stop_down <= 1.2 * stop_ok + 0.5,
        "math-stop grew during the outage: median {stop_down:.2} ms vs {stop_ok:.2} ms"
    );
}

/// Each save during the outage failed on `s3` with a typed error naming
/// the tier; each save once the tier was back committed there.
fn assert_s3_failed_then_recovered(ev: &Events, outage: &Outage, s3: &str) {
    let [_, down, back] = outage.phases(ev);
    let durable = ev.of("durable");
    let durable_of = |step: &Value| {
        durable
            .iter()
            .map(|(_, v)| v)
            .find(|v| v["step"] == *step)
            .unwrap_or_else(|| panic!("no durable event for step {step}"))
    };
    for (_, save) in &down {
        let d = durable_of(&save["step"]);
        let t = tier_of(d, s3);
        assert_eq!(t["committed"], false, "{d}");
        let kind = t["error_kind"].as_str().unwrap_or_default();
        assert!(matches!(kind, "Backend" | "Unavailable"), "{d}");
        let text = t["error"].as_str().unwrap_or_default();
        assert!(text.contains(s3), "the error must name the tier: {text}");
    }
    assert!(
        back.len() >= 3,
        "too few saves after the server came back: {}",
        back.len()
    );
    for (_, save) in &back {
        let d = durable_of(&save["step"]);
        assert_eq!(
            tier_of(d, s3)["committed"],
            true,
            "a save {PROBE_BACK:?} after the server came back did not commit: {d}"
        );
    }
}

/// `ckpt verify LOC --all` exits 0 and verified at least `min` steps.
fn assert_verifies(location: &str, server: Option<&Server>, min: usize) {
    let mut cmd = Command::new(ckpt_bin());
    cmd.args(["verify", location, "--all", "--json"]);
    if let Some(s) = server {
        s3_env(&mut cmd, s);
    }
    let out = run(&mut cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ckpt verify {location}: {text}");
    let ok = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["ok"] == true)
        .count();
    assert!(
        ok >= min,
        "{location}: {ok} steps verified, want {min}: {text}"
    );
}

fn start_s3(test: &str) -> Option<(Server, tempfile::TempDir)> {
    let bin = s3s_fs_binary(test)?;
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir(root.path().join("ckpt")).expect("bucket dir");
    let server = Server::start(bin, root.path().to_path_buf(), free_port());
    Some((server, root))
}

fn training_args() -> Vec<&'static str> {
    vec!["--steps", STEPS, "--state-mb", STATE_MB]
}

fn spawn_quickstart(dirs: &[&str], server: &Server) -> Events {
    let mut cmd = Command::new(example("quickstart"));
    cmd.args(["--dir", dirs[0]]);
    if let Some(m) = dirs.get(1) {
        cmd.args(["--mirror", m]);
    }
    cmd.args(training_args()).args([
        "--every",
        EVERY,
        "--step-ms",
        STEP_MS,
        "--keep",
        "3",
        "--json",
    ]);
    s3_env(&mut cmd, server);
    Events::spawn(&mut cmd)
}

/// Runs the quickstart on `dirs` (the last one on S3) through a 10 s
/// outage of its S3 server; checks the run ended bit-exact, the loop did
/// not slow down and S3 failed, then recovered. Returns the events, the
/// outage's times and the server (still up, for verification).
fn run_through_outage(
    test: &str,
    dirs: &[&str],
) -> Option<(Events, Outage, Server, tempfile::TempDir)> {
    let (mut server, data) = start_s3(test)?;
    let want = outage_reference();
    let s3 = *dirs.last().expect("an S3 location");
    let mut ev = spawn_quickstart(dirs, &server);
    let outage = Outage::inject(&mut ev, &mut server, s3, 3, Duration::from_secs(10));
    let status = ev.finish(Duration::from_secs(120));
    assert!(status.success(), "the run failed: {status}");
    assert_eq!(final_digest(&ev), want, "the run diverged");
    let [healthy, down, _] = outage.phases(&ev);
    assert_loop_unaffected(&healthy, &down);
    assert_s3_failed_then_recovered(&ev, &outage, s3);
    Some((ev, outage, server, data))
}

#[test]
fn s3_outage_does_not_stall_training_and_loses_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let s3 = "s3://ckpt/outage";
    let Some((ev, _outage, server, _data)) =
        run_through_outage("s3_outage_does_not_stall_training_and_loses_nothing", &[s3])
    else {
        return;
    };
    // The handle's own error: typed, naming the step.
    for (_, d) in ev.of("durable") {
        if tier_of(&d, s3)["committed"] == false {
            assert_eq!(d["error_kind"], "NotCommitted", "{d}");
            let text = d["error"].as_str().unwrap_or_default();
            assert!(text.contains(&format!("step {}", d["step"])), "{text}");
        }
    }
    assert_verifies(s3, Some(&server), 3);
}

#[test]
fn s3_outage_with_a_local_tier_keeps_committing_locally() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let local = tempfile::tempdir().expect("tempdir");
    let local_loc = local.path().to_str().expect("utf-8 path").to_string();
    let s3 = "s3://ckpt/mirror";
    let Some((ev, outage, server, _data)) = run_through_outage(
        "s3_outage_with_a_local_tier_keeps_committing_locally",
        &[&local_loc, s3],
    ) else {
        return;
    };
    let [healthy, down, _] = outage.phases(&ev);
    // The local tier committed every save, and on time.
    let local_tier = Path::new(&local_loc)
        .canonicalize()
        .expect("canonical")
        .display()
        .to_string();
    let durable = ev.of("durable");
    let times = |phase: &[(Instant, Value)]| -> Vec<f64> {
        phase
            .iter()
            .map(|(_, s)| {
                let d = &durable
                    .iter()
                    .find(|(_, d)| d["step"] == s["step"])
                    .unwrap_or_else(|| panic!("no durable event for {s}"))
                    .1;
                let t = tier_of(d, &local_tier);
                assert_eq!(t["committed"], true, "local tier missed a save: {d}");
                t["durable_ms"].as_f64().expect("durable_ms")
            })
            .collect()
    };
    let (ok_ms, down_ms) = (median(times(&healthy)), median(times(&down)));
    eprintln!("local durable: median {ok_ms:.1} ms healthy, {down_ms:.1} ms with S3 down");
    assert!(
        down_ms <= 1.2 * ok_ms + 20.0,
        "the local tier slowed down while S3 was down: {down_ms:.1} vs {ok_ms:.1} ms"
    );
    assert_eq!(
        durable.len(),
        ev.of("save").len(),
        "every save reports once"
    );
    assert_verifies(&local_loc, None, 3);
    assert_verifies(s3, Some(&server), 3);
}

/// Fills the file system holding `path` with `path` itself.
fn fill(path: &Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).expect("filler");
    let block = vec![0xa5u8; 1 << 20];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
}

#[test]
fn local_disk_full_mid_run() {
    const TEST: &str = "local_disk_full_mid_run";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let disk = match Tmpfs::mount(24) {
        Ok(d) => d,
        Err(why) => {
            eprintln!("SKIPPED {TEST}: needs a 24 MiB tmpfs (run as root): {why}");
            return;
        }
    };
    let args = ["--steps", "900", "--state-mb", "1"];
    let want = reference_digest(&args);
    let dir = disk.path().join("ckpt");
    let mut ev = Events::spawn(
        Command::new(example("quickstart"))
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .args(["--every", "20", "--step-ms", "10", "--keep", "2", "--json"]),
    );
    let mut committed = 0;
    ev.wait_for("two commits", Duration::from_secs(60), |v| {
        if v["event"] == "durable" && v["tiers"][0]["committed"] == true {
            committed += 1;
        }
        committed >= 2
    });
    let filler = disk.path().join("filler");
    fill(&filler);
    let mut failed = Vec::new();
    ev.wait_for(
        "two saves failing on the full disk",
        Duration::from_secs(60),
        |v| {
            if v["event"] == "durable" && v["tiers"][0]["committed"] == false {
                failed.push(v.clone());
            }
            failed.len() >= 2
        },
    );
    for d in &failed {
        let t = &d["tiers"][0];
        assert_eq!(t["storage_full"], true, "{d}");
        assert_eq!(t["error_kind"], "Io", "{d}");
        let text = t["error"].as_str().unwrap_or_default();
        assert!(
            text.contains("disk full") && text.contains(&*dir.to_string_lossy()),
            "the error must say the disk is full and name the path: {text}"
        );
    }
    // Failed saves leave no temporary files behind, and every committed
    // step still verifies.
    let temps: Vec<_> = walk(&dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(temps.is_empty(), "failed saves left {temps:?}");
    assert_verifies(dir.to_str().expect("utf-8"), None, 1);
    // Space comes back: the next save commits.
    std::fs::remove_file(&filler).expect("free the space");
    ev.wait_for(
        "a commit once space is free",
        Duration::from_secs(60),
        |v| v["event"] == "durable" && v["tiers"][0]["committed"] == true,
    );
    let status = ev.finish(Duration::from_secs(120));
    assert!(status.success(), "the run failed: {status}");
    assert_eq!(final_digest(&ev), want, "the run diverged");
    assert_verifies(dir.to_str().expect("utf-8"), None, 2);
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// A TCP proxy on 127.0.0.1 in front of an S3 server that can freeze:
/// once frozen it still accepts connections but never forwards a byte in
/// either direction (a wedged server). Stops when dropped.
struct Freezer {
    port: u16,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Freezer {
    fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (f, st) = (frozen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let (f, st) = (f.clone(), st.clone());
                    std::thread::spawn(move || pump(from, to, &f, &st));
                }
            }
        });
        Self { port, frozen, stop }
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either side closes; while `frozen`, reads
/// nothing and keeps both sockets open.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    use std::io::{Read, Write};
    let _ = from.set_read_timeout(Some(Duration::from_millis(20)));
    let mut buf = vec![0u8; 64 << 10];
    while !stop.load(Ordering::Relaxed) {
        if frozen.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Write);
}

impl Drop for Freezer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[test]
fn hanging_server_is_bounded_by_timeouts() {
    const TEST: &str = "hanging_server_is_bounded_by_timeouts";
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let Some((server, _data)) = start_s3(TEST) else {
        return;
    };
    let args = ["--steps", "400", "--state-mb", "1"];
    let want = reference_digest(&args);
    // Each request is bounded by AWS_TIMEOUT, and retried at most 3 times
    // within 20 s: no save, restore listing or close may take longer.
    let bound = Duration::from_secs(30);
    let run_hanging = |dirs: &[&str]| {
        let proxy = Freezer::start(server.port);
        let mut cmd = Command::new(example("quickstart"));
        cmd.args(["--dir", dirs[0]]);
        if let Some(m) = dirs.get(1) {
            cmd.args(["--mirror", m]);
        }
        cmd.args(args)
            .args(["--every", "20", "--step-ms", "10", "--json"]);
        s3_env(&mut cmd, &server);
        cmd.env(
            "AWS_ENDPOINT_URL",
            format!("http://127.0.0.1:{}", proxy.port),
        )
        .env("AWS_TIMEOUT", "1s");
        let mut ev = Events::spawn(&mut cmd);
        let s3 = dirs.last().expect("an S3 location").to_string();
        let mut committed = 0;
        ev.wait_for("two commits on S3", Duration::from_secs(60), |v| {
            if v["event"] == "durable" && tier_of(v, &s3)["committed"] == true {
                committed += 1;
            }
            committed >= 2
        });
        proxy.freeze();
        let frozen = Instant::now();
        eprintln!("S3 frozen");
        // The rest of the run, and close, with the server wedged.
        let status = ev.finish(Duration::from_secs(120));
        eprintln!("finished {:?} after the freeze", frozen.elapsed());
        // The training goes to the end either way. With S3 alone, the
        // final save is committed nowhere, and the run says so by its exit
        // status; with a local tier beside it, the run is kept.
        if dirs.len() == 1 {
            assert!(!status.success(), "no checkpoint kept, yet exit 0");
        } else {
            assert!(status.success(), "the run failed: {status}");
        }
        assert_eq!(final_digest(&ev), want, "the run diverged");
        let after: Vec<_> = ev
            .of("durable")
            .into_iter()
            .filter(|(t, _)| *t > frozen + Duration::from_secs(1))
            .collect();
        assert!(!after.is_empty(), "no save reported after the freeze");
        for (_, d) in &after {
            let t = tier_of(d, &s3);
            assert_eq!(t["committed"], false, "{d}");
            assert!(
                matches!(t["error_kind"].as_str(), Some("Backend" | "Unavailable")),
                "{d}"
            );
        }
        let worst = math_stops(&ev.of("save"))
            .into_iter()
            .fold(0.0f64, f64::max);
        assert!(
            worst < bound.as_secs_f64() * 1e3,
            "a save stopped the loop for {worst:.0} ms"
        );
        ev
    };
    // Local + a wedged S3: every save still commits locally.
    let local = tempfile::tempdir().expect("tempdir");
    let local_loc = local.path().to_str().expect("utf-8").to_string();
    let ev = run_hanging(&[&local_loc, "s3://ckpt/hang"]);
    for (_, d) in ev.of("durable") {
        assert_eq!(d["tiers"][0]["committed"], true, "{d}");
    }
    assert_eq!(ev.of("durable").len(), ev.of("save").len());
    assert_verifies(&local_loc, None, 1);
    // A wedged S3 as the only tier: saves fail, training finishes.
    let ev = run_hanging(&["s3://ckpt/hang-only"]);
    assert!(
        ev.of("durable")
            .iter()
            .any(|(_, d)| d["error_kind"] == "NotCommitted"),
        "{:?}",
        ev.seen
    );
}

#[test]
fn an_unlistable_only_tier_is_not_a_fresh_start() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Nothing listens on this port: the only tier cannot be listed, so the
    // quickstart cannot know whether a checkpoint exists and must not
    // start from scratch over it.
    let port = free_port();
    let mut cmd = Command::new(example("quickstart"));
    cmd.args([
        "--dir",
        "s3://ckpt/nowhere",
        "--steps",
        "10",
        "--state-mb",
        "1",
    ])
    .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}"))
    .env("AWS_ACCESS_KEY_ID", "k")
    .env("AWS_SECRET_ACCESS_KEY", "s")
    .env("AWS_REGION", "us-east-1")
    .env("AWS_ALLOW_HTTP", "true");
    // Bounded: a quickstart retrying an unreachable store without end is
    // killed, and the test fails (a hang guard, not a figure).
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start the quickstart");
    let id = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(common::hang_guard(Duration::from_secs(100))) {
        Ok(out) => out.expect("quickstart output"),
        Err(_) => {
            // SAFETY: kill(2) on the child this test started; no memory
            // is involved.
            unsafe { libc::kill(id as libc::pid_t, libc::SIGKILL) };
            panic!("the quickstart kept retrying an unreachable store");
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started fresh: {stderr}");
    assert!(
        stderr.contains("cannot tell whether run quickstart has a checkpoint")
            && stderr.contains("s3://ckpt/nowhere"),
        "{stderr}"
    );
}
