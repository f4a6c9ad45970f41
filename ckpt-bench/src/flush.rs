//! `ckpt-bench flush`: time from save to durable on a local directory,
//! beside the raw sequential write bandwidth of the same directory. With
//! `--alongside peer|s3`, the same saves also go to a second tier, and the
//! local tier's time to durable is measured with and without it
//! (interleaved), with the staging pool's occupancy over a save.

use std::sync::Arc;

use ckpt_core::{Checkpointer, TierPolicy};
use clap::Args;
use serde_json::json;

use crate::floors;
use crate::synth;

/// Arguments of `flush`.
#[derive(Debug, Args)]
pub struct FlushArgs {
    /// The state and the directory.
    #[command(flatten)]
    pub state: synth::StateArgs,
    /// The tier under test.
    #[command(flatten)]
    pub target: crate::tiers::TierArgs,
    /// Also attach this tier (to the same saves, from the same staged
    /// blocks) and measure the local tier's time to durable with and
    /// without it; `--tier local` only. `s3` takes the bucket from
    /// `--s3-url`.
    #[arg(long, value_enum)]
    pub alongside: Option<crate::tiers::TierKind>,
    /// Rate limit of the `--alongside` tier, bytes per second (`300M`):
    /// `TierPolicy::rate_limit`, which trades that tier's time to durable
    /// for less interference with the local tier.
    #[arg(long, value_parser = crate::synth::parse_bytes)]
    pub alongside_rate: Option<u64>,
    /// Send blocks to the tiers while the copy runs
    /// (`CheckpointerBuilder::flush_while_staging`): durable sooner, a
    /// longer math-stop.
    #[arg(long)]
    pub flush_while_staging: bool,
    /// One JSON object per result.
    #[arg(long)]
    pub json: bool,
}

/// Writes in flight of the second `O_DIRECT` floor.
const FLOOR_IN_FLIGHT: usize = 4;

/// Runs the benchmark.
pub fn run(a: &FlushArgs) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(&a.state.dir)?;
    let tensors = synth::tensors(a.state.state_bytes, a.state.tensors);
    let bytes: u64 = tensors.iter().map(|t| t.len() as u64).sum();
    let views = synth::views(&tensors);
    let run = format!("bench-flush-{}", std::process::id());
    let opened = crate::tiers::open(
        a.target.tier,
        &a.state.dir,
        &a.target,
        2 * bytes + (64 << 20),
    )?;
    let ckpt = Checkpointer::builder(run.clone())
        .tier(opened.tier.clone(), TierPolicy::keep_last(1))
        .staging_capacity(bytes)
        .flush_while_staging(a.flush_while_staging)
        .build()?;
    // The second tier and a checkpointer that writes to both.
    let alongside = match a.alongside {
        None => None,
        Some(kind) => {
            if a.target.tier != crate::tiers::TierKind::Local
                || kind == crate::tiers::TierKind::Local
            {
                return Err("--alongside takes peer or s3, beside --tier local".into());
            }
            let other = crate::tiers::open(kind, &a.state.dir, &a.target, 2 * bytes + (64 << 20))?;
            let both = Checkpointer::builder(format!("{run}-both"))
                .tier(
                    Arc::new(crate::tiers::local(&a.state.dir, &a.target)?),
                    TierPolicy::keep_last(1),
                )
                .tier(
                    other.tier.clone(),
                    match a.alongside_rate {
                        Some(r) => TierPolicy::keep_last(1).rate_limit(r),
                        None => TierPolicy::keep_last(1),
                    },
                )
                .staging_capacity(bytes)
                .flush_while_staging(a.flush_while_staging)
                .build()?;
            Some((other, both))
        }
    };
    let (mut with_local, mut with_other) = (vec![], vec![]);
    let mut other_failed: Vec<String> = Vec::new();
    let mut last_with: Option<ckpt_core::SaveReport> = None;
    let (mut durable, mut raw) = (vec![], vec![]);
    // Each save's staging copy (the flush is held until it ends when the
    // save fits the pool) and what follows it until durable.
    let (mut copies, mut after_copy) = (vec![], vec![]);
    // The O_DIRECT floor with 1 and with several writes in flight.
    let (mut direct, mut direct_qd) = (vec![], vec![]);
    for i in 0..a.state.iters {
        // Alternate so drift in the device's state affects both alike. The
        // raw floors are for a local directory only, and left out beside a
        // second tier: their 4 GiB of writes before the first save of an
        // iteration slowed that save (by up to 30%), whichever it was.
        if a.target.tier == crate::tiers::TierKind::Local && alongside.is_none() {
            raw.push(floors::raw_write(&a.state.dir, &tensors)?.as_secs_f64());
            if let Some(d) = floors::raw_write_direct(&a.state.dir, &tensors, 1) {
                direct.push(d.as_secs_f64());
            }
            if let Some(d) = floors::raw_write_direct(&a.state.dir, &tensors, FLOOR_IN_FLIGHT) {
                direct_qd.push(d.as_secs_f64());
            }
        }
        let state = synth::state(&views, i as u64 + 1)?;
        let mut alone = |durable: &mut Vec<f64>| -> Result<(), Box<dyn std::error::Error>> {
            let report = ckpt.save(&state)?.wait()?;
            let d = report.durable_after().ok_or("not committed")?.as_secs_f64();
            durable.push(d);
            copies.push(report.copy.as_secs_f64());
            after_copy.push(d - report.copy.as_secs_f64());
            Ok(())
        };
        // With a second tier, every other iteration saves with both tiers
        // first, so neither order favours one of them.
        let both_first = alongside.is_some() && i % 2 == 1;
        if !both_first {
            alone(&mut durable)?;
        }
        if let Some((_, both)) = &alongside {
            let r = both.save(&state)?.wait()?;
            let at = |t: usize| {
                r.tiers
                    .get(t)
                    .and_then(|t| t.durable_at)
                    .map(|d| d.as_secs_f64())
            };
            with_local.push(
                at(0).ok_or_else(|| {
                    format!("the local tier did not commit: {:?}", r.tiers.first())
                })?,
            );
            // A failed save of the attached tier (a server that timed out)
            // is counted and said; the local tier's time is still measured.
            match at(1) {
                Some(d) => with_other.push(d),
                None => other_failed.push(
                    r.tiers
                        .get(1)
                        .and_then(|t| t.error.as_ref())
                        .map_or_else(|| "not committed".to_string(), |e| e.to_string()),
                ),
            }
            last_with = Some(r);
        }
        if both_first {
            alone(&mut durable)?;
        }
    }
    // Each iteration's pair (with / alone), before the medians sort them.
    let mut pairs: Vec<f64> = with_local
        .iter()
        .zip(&durable)
        .map(|(w, d)| w / d)
        .collect();
    let pair_list = pairs.clone();
    // Iterations alternate which save goes first (A B, B A, ...): the
    // geometric mean of two neighbours cancels whatever the position costs.
    let mut balanced: Vec<f64> = pair_list
        .chunks_exact(2)
        .map(|p| (p[0] * p[1]).sqrt())
        .collect();
    let balanced_median = floors::median(&mut balanced);
    let (d, r) = (floors::median(&mut durable), floors::median(&mut raw));
    let (copy, rest) = (floors::median(&mut copies), floors::median(&mut after_copy));
    if direct.is_empty() && !raw.is_empty() {
        eprintln!(
            "no O_DIRECT floor: {} refused O_DIRECT, or memory for the floor's copy of the state was not available",
            a.state.dir.display()
        );
    }
    let od = (!direct.is_empty()).then(|| floors::median(&mut direct));
    let odq = (!direct_qd.is_empty()).then(|| floors::median(&mut direct_qd));
    let best = [od, odq]
        .into_iter()
        .flatten()
        .fold(r, |b, o| if b.is_nan() { o } else { b.min(o) });
    let with = alongside.as_ref().map(|(other, _)| {
        let (l, o) = (
            floors::median(&mut with_local),
            floors::median(&mut with_other),
        );
        (other.tier.location(), l, o)
    });
    let result = json!({
        "bench": "flush",
        "tier": format!("{:?}", a.target.tier).to_lowercase(),
        "location": opened.tier.location(),
        "state_bytes": bytes,
        "iters": a.state.iters,
        "durable_s": d,
        "copy_s": copy,
        "durable_after_copy_s": rest,
        "raw_write_floor_s": r,
        "raw_write_direct_s": od,
        "raw_write_direct_in_flight": FLOOR_IN_FLIGHT,
        "raw_write_direct_in_flight_s": odq,
        "local_writes_in_flight": a.target.local_writes_in_flight,
        "flush_while_staging": a.flush_while_staging,
        "ratio_to_floor": d / r,
        // The headline: against the faster of the two floors.
        "best_floor_s": best,
        "ratio_to_best_floor": d / best,
        "alongside": with.as_ref().map(|(loc, l, o)| json!({
            "location": loc,
            "rate_limit": a.alongside_rate,
            "local_durable_s": l,
            "local_ratio_to_alone": l / d,
            "local_ratio_pairs": pair_list,
            "local_ratio_median_of_pairs": floors::median(&mut pairs),
            // The headline: median over iteration pairs of both orders.
            "local_ratio_balanced": balanced_median,
            "alongside_durable_s": o,
            "alongside_failed_saves": other_failed.len(),
            "staging": last_with.as_ref().map(|r| r.staging.iter()
                .map(|s| json!([s.at.as_secs_f64(), s.in_use_bytes]))
                .collect::<Vec<_>>()),
        })),
    });
    if a.json {
        println!("{result}");
    } else {
        let gib = |s: f64| bytes as f64 / s / (1u64 << 30) as f64;
        println!(
            "flush: {:.2} GiB to {} ({} iterations, median)",
            bytes as f64 / (1u64 << 30) as f64,
            opened.tier.location(),
            a.state.iters
        );
        if !r.is_nan() {
            println!(
                "{:<40} {:>10.3} s {:>8.2} GiB/s",
                "raw write + fsync (floor)",
                r,
                gib(r)
            );
        }
        for (label, floor) in [
            ("raw write O_DIRECT + fsync, 1 in flight".to_string(), od),
            (
                format!("raw write O_DIRECT + fsync, {FLOOR_IN_FLIGHT} in flight"),
                odq,
            ),
        ] {
            if let Some(f) = floor {
                println!("{label:<40} {f:>10.3} s {:>8.2} GiB/s", gib(f));
            }
        }
        println!(
            "{:<40} {:>10.3} s {:>8.2} GiB/s",
            format!(
                "ckpt save -> durable, {} in flight",
                a.target.local_writes_in_flight
            ),
            d,
            gib(d)
        );
        println!(
            "  of which the staging copy {copy:.3} s, then {rest:.3} s to durable ({:.2} GiB/s)",
            gib(rest)
        );
        if !best.is_nan() {
            println!(
                "ratio to the best floor ({}): {:.2}x",
                if od == Some(best) {
                    "O_DIRECT, 1 in flight".to_string()
                } else if odq == Some(best) {
                    format!("O_DIRECT, {FLOOR_IN_FLIGHT} in flight")
                } else {
                    "buffered".to_string()
                },
                d / best
            );
        }
    }
    if let (false, Some((loc, l, o))) = (a.json, &with) {
        let other = if o.is_nan() {
            "never durable".to_string()
        } else {
            format!("durable in {o:.3} s")
        };
        println!(
            "local tier with {loc} attached: durable in {l:.3} s = {:.3}x local alone; {loc} {other}",
            l / d
        );
        let each: Vec<String> = pair_list.iter().map(|p| format!("{p:.3}")).collect();
        println!(
            "  each iteration, with / alone: {} (median {:.3}x)",
            each.join(" "),
            floors::median(&mut pairs.clone())
        );
        println!(
            "  both orders balanced (geometric mean of iterations 2k, 2k+1; median): {balanced_median:.3}x"
        );
        if let Some(first) = other_failed.first() {
            println!(
                "  {loc} failed {} of {} saves (not in its durable time); the first: {first}",
                other_failed.len(),
                a.state.iters
            );
        }
        if let Some(r) = &last_with {
            println!("{}", occupancy(r, bytes));
        }
    }
    drop(ckpt);
    // What the runs left on a remote tier (the last checkpoint of each
    // checkpointer) goes too: a benchmark should not fill the bucket.
    // (The other tier's server, if in process, lives until then.)
    let other = alongside.map(|(other, both)| {
        drop(both);
        other
    });
    let mut remote = Vec::new();
    if a.target.tier != crate::tiers::TierKind::Local {
        remote.push((&opened, run.clone()));
    }
    if let Some(o) = &other {
        remote.push((o, format!("{run}-both")));
    }
    for (o, prefix) in remote {
        if let Err(e) = remove_prefix(o.tier.as_ref(), &format!("{prefix}/")) {
            eprintln!("could not remove {prefix}/ from {}: {e}", o.tier.location());
        }
    }
    drop(other);
    let _ = std::fs::remove_dir_all(a.state.dir.join(format!("{run}-both")));
    let _ = std::fs::remove_dir_all(a.state.dir.join(run));
    Ok(())
}

/// Deletes every object under `prefix` on `tier`.
fn remove_prefix(tier: &dyn ckpt_core::Tier, prefix: &str) -> ckpt_core::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ckpt_core::Error::Internal(format!("runtime: {e}")))?;
    rt.block_on(async {
        for o in tier.list(prefix).await? {
            tier.delete(&o.path).await?;
        }
        Ok(())
    })
}

/// The staging pool's occupancy during one save, as a line per tenth of
/// the save, with the moment each tier was durable.
fn occupancy(r: &ckpt_core::SaveReport, bytes: u64) -> String {
    let end = r.total.as_secs_f64();
    let mut out = format!(
        "staging pool during the last save ({:.0} MiB staged):",
        bytes as f64 / (1u64 << 20) as f64
    );
    for i in 0..=10 {
        let t = end * f64::from(i) / 10.0;
        let used = r
            .staging
            .iter()
            .take_while(|s| s.at.as_secs_f64() <= t)
            .last()
            .map_or(0, |s| s.in_use_bytes);
        let held: Vec<&str> = r
            .tiers
            .iter()
            .filter(|tr| tr.durable_at.is_none_or(|d| d.as_secs_f64() > t))
            .map(|tr| tr.tier.as_str())
            .collect();
        out.push_str(&format!(
            "\n  t={t:>6.2} s  {:>6.0} MiB in use  tiers still flushing: {}",
            used as f64 / (1u64 << 20) as f64,
            if held.is_empty() {
                "none".to_string()
            } else {
                held.join(", ")
            }
        ));
    }
    out
}
