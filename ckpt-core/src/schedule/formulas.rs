//! Closed-form checkpoint-interval formulas.
//!
//! Every function is pure and works in `f64` seconds. Notation:
//! `delta` (δ) is the exposed (blocking) save time, `mtbf` (M) the mean
//! time between failures of the whole job, `restart` (R) the time from a
//! failure to the restored state, `latency` (L) the error-detection
//! latency and `tau` (τ) the checkpoint interval.
//!
//! Two interval conventions occur in the literature and are kept apart:
//! Young's and Daly's τ is the *compute time between saves* (a save
//! period is τ + δ), while the availability model of Saxena et al. uses
//! the *save period* (start to start, δ included), since its useful
//! fraction is 1 − δ/τ. Each function states which one it returns.

/// Fleet MTBF of a job on `nodes` nodes that fail independently with
/// exponential lifetimes of mean `node_mtbf_s`: the minimum of `N`
/// exponentials is exponential with N times the rate, so M = M_node / N.
///
/// `nodes == 0` yields infinity (nothing can fail).
///
/// ```
/// use ckpt_core::schedule::fleet_mtbf;
/// // 1024 nodes with a 5-year node MTBF fail about every 43 hours.
/// let m = fleet_mtbf(5.0 * 365.0 * 86_400.0, 1024);
/// assert!((m / 3600.0 - 42.77).abs() < 0.01);
/// ```
pub fn fleet_mtbf(node_mtbf_s: f64, nodes: u64) -> f64 {
    if nodes == 0 {
        return f64::INFINITY;
    }
    node_mtbf_s / nodes as f64
}

/// Probability that a job with MTBF `mtbf_s` fails during one step of
/// `step_time_s` seconds: p = 1 − exp(−step_time / M) (Poisson failures).
///
/// ```
/// use ckpt_core::schedule::failure_prob_per_step;
/// let p = failure_prob_per_step(1.0, 8000.0);
/// assert!((p - 1.0 / 8000.0).abs() < 1e-7);
/// ```
pub fn failure_prob_per_step(step_time_s: f64, mtbf_s: f64) -> f64 {
    -(-step_time_s / mtbf_s).exp_m1()
}

/// Inverse of [`failure_prob_per_step`]: the MTBF implied by a per-step
/// failure probability `p`, M = step_time / (−ln(1 − p)).
/// `p == 0` gives infinity.
///
/// ```
/// use ckpt_core::schedule::{failure_prob_per_step, mtbf_from_failure_prob};
/// let m = mtbf_from_failure_prob(1.0, 0.000125);
/// assert!((m - 7999.5).abs() < 0.01);
/// assert!((failure_prob_per_step(1.0, m) - 0.000125).abs() < 1e-15);
/// ```
pub fn mtbf_from_failure_prob(step_time_s: f64, p: f64) -> f64 {
    step_time_s / -(-p).ln_1p()
}

/// Young's first-order optimum, τ = √(2δM) (compute time between saves).
///
/// Source: J. W. Young, "A first order approximation to the optimum
/// checkpoint interval", Communications of the ACM 17(9), 1974. It
/// minimises the first-order lost-time fraction δ/τ + τ/(2M).
///
/// ```
/// use ckpt_core::schedule::young;
/// assert!((young(1.0, 3600.0) - 84.852_813_742_385_7).abs() < 1e-9);
/// ```
pub fn young(delta: f64, mtbf: f64) -> f64 {
    (2.0 * delta * mtbf).sqrt()
}

/// Daly's higher-order optimum (compute time between saves):
/// τ = √(2δM)·[1 + ⅓·√(δ/(2M)) + (1/9)·(δ/(2M))] − δ for δ < 2M, and
/// τ = M otherwise.
///
/// Source: J. T. Daly, "A higher order estimate of the optimum checkpoint
/// interval for restart dumps", Future Generation Computer Systems 22(3),
/// 2006, eq. (37). It approximates the minimum of the exact expected run
/// time M·e^{R/M}·(e^{(τ+δ)/M} − 1)·T_s/τ (see
/// [`expected_segment_time`]); R does not move the optimum.
///
/// ```
/// use ckpt_core::schedule::{daly, young};
/// let t = daly(1.0, 3600.0);
/// assert!(t < young(1.0, 3600.0) && (t - 84.187).abs() < 1e-3);
/// assert_eq!(daly(10.0, 4.0), 4.0); // δ ≥ 2M
/// ```
pub fn daly(delta: f64, mtbf: f64) -> f64 {
    if delta < 2.0 * mtbf {
        let x = delta / (2.0 * mtbf);
        young(delta, mtbf) * (1.0 + x.sqrt() / 3.0 + x / 9.0) - delta
    } else {
        mtbf
    }
}

/// Availability of a job that saves every `tau` seconds (save period, δ
/// included): A(τ) = (1 − δ/τ) · M / (M + τ/2 + R).
///
/// Source: A. Saxena, S. Hukerikar, B. Blaz, S. Raj (NVIDIA), "Optimal
/// Checkpoint Interval with Availability as an Objective Function", 2024.
/// The first factor is the fraction of a period not spent saving, the
/// second the fraction of time not lost to failures, each of which costs
/// on average half a period of rework plus the restart.
///
/// Returns 0 for τ ≤ δ (the job would do nothing but save). An infinite
/// M is allowed (then A = 1 − δ/τ).
///
/// ```
/// use ckpt_core::schedule::availability;
/// let a = availability(100.0, 1.0, 3600.0, 240.0);
/// assert!((a - 0.99 * 3600.0 / 3890.0).abs() < 1e-12);
/// assert_eq!(availability(1.0, 1.0, 3600.0, 0.0), 0.0);
/// ```
pub fn availability(tau: f64, delta: f64, mtbf: f64, restart: f64) -> f64 {
    if tau <= delta {
        return 0.0;
    }
    (1.0 - delta / tau) / (1.0 + (tau / 2.0 + restart) / mtbf)
}

/// The save period that maximises [`availability`]:
/// τ* = δ + √(δ² + 2δ(M + R)).
///
/// Source: Saxena et al. 2024 (see [`availability`]). Derivation: with
/// c = 2(M + R), A(τ) ∝ (τ − δ)/(τ(τ + c)); setting
/// d/dτ ln A = 1/(τ − δ) − 1/τ − 1/(τ + c) = 0 gives δ(τ + c) = τ(τ − δ),
/// i.e. τ² − 2δτ − 2δ(M + R) = 0, whose only root above δ is τ*. Since
/// A → 0 as τ → δ⁺ and as τ → ∞ and has this single stationary point on
/// (δ, ∞), τ* is the global maximum (A is unimodal). For δ, R ≪ M it
/// tends to Young's √(2δM).
///
/// ```
/// use ckpt_core::schedule::{availability, availability_optimum};
/// let t = availability_optimum(1.0, 3600.0, 240.0);
/// assert!((t - (1.0 + 7681f64.sqrt())).abs() < 1e-12);
/// let a = |x| availability(x, 1.0, 3600.0, 240.0);
/// assert!(a(t) > a(t * 1.01) && a(t) > a(t * 0.99));
/// ```
pub fn availability_optimum(delta: f64, mtbf: f64, restart: f64) -> f64 {
    delta + (delta * delta + 2.0 * delta * (mtbf + restart)).sqrt()
}

/// Availability when errors are detected `latency` seconds after they
/// happen: A_L(τ) = (1 − δ/τ) · M / (M + τ/2 + L + R).
///
/// Source: Saxena et al. 2024, section 3. Recovery must use the newest
/// checkpoint taken at least L before detection, so each failure costs
/// τ/2 + L + R on average. This is [`availability`] with R replaced by
/// R + L; it assumes enough snapshots are retained (see
/// [`retention_floor`]).
///
/// ```
/// use ckpt_core::schedule::{availability, availability_with_latency};
/// let a = availability_with_latency(100.0, 1.0, 3600.0, 240.0, 120.0);
/// assert_eq!(a, availability(100.0, 1.0, 3600.0, 360.0));
/// ```
pub fn availability_with_latency(
    tau: f64,
    delta: f64,
    mtbf: f64,
    restart: f64,
    latency: f64,
) -> f64 {
    availability(tau, delta, mtbf, restart + latency)
}

/// Unconstrained maximiser of [`availability_with_latency`]:
/// τ*_L = δ + √(δ² + 2δ(M + L + R)) (save period).
///
/// Source: Saxena et al. 2024, section 3; same derivation as
/// [`availability_optimum`] with R + L in place of R.
///
/// ```
/// use ckpt_core::schedule::{availability_optimum, latency_aware_optimum};
/// assert_eq!(latency_aware_optimum(1.0, 3600.0, 240.0, 0.0),
///            availability_optimum(1.0, 3600.0, 240.0));
/// assert!((latency_aware_optimum(1.0, 3600.0, 240.0, 120.0) - (1.0 + 7921f64.sqrt())).abs() < 1e-12);
/// ```
pub fn latency_aware_optimum(delta: f64, mtbf: f64, restart: f64, latency: f64) -> f64 {
    availability_optimum(delta, mtbf, restart + latency)
}

/// Availability-optimal save period when only `keep` snapshots are
/// retained and errors surface `latency` seconds late:
/// τ = max(τ*_L, L/(K − 1)).
///
/// Source: Saxena et al. 2024, section 3. The newest trustworthy
/// checkpoint (taken at least L before detection) must still be retained,
/// which with K snapshots spaced τ apart needs (K − 1)·τ ≥ L. A_L is
/// unimodal, so the constrained maximum is the unconstrained one clamped
/// to the feasible region. With K = 2 the interval is at least L.
///
/// Returns `None` when no interval is feasible: `keep == 0`, or
/// `keep == 1` with a positive latency. With `latency <= 0` the
/// constraint is void and τ*_L (= [`availability_optimum`]) is returned.
///
/// ```
/// use ckpt_core::schedule::latency_aware_interval;
/// // L = 2 min exceeds the unconstrained optimum (≈ 90 s): K = 2 clamps to L.
/// assert_eq!(latency_aware_interval(1.0, 3600.0, 240.0, 120.0, 2), Some(120.0));
/// // With 4 snapshots the optimum (≈ 90 s) already satisfies 3·τ ≥ L.
/// let t = latency_aware_interval(1.0, 3600.0, 240.0, 120.0, 4).unwrap_or(0.0);
/// assert!((t - (1.0 + 7921f64.sqrt())).abs() < 1e-12);
/// assert_eq!(latency_aware_interval(1.0, 3600.0, 240.0, 120.0, 1), None);
/// ```
pub fn latency_aware_interval(
    delta: f64,
    mtbf: f64,
    restart: f64,
    latency: f64,
    keep: u64,
) -> Option<f64> {
    let latency = latency.max(0.0);
    let unconstrained = latency_aware_optimum(delta, mtbf, restart, latency);
    match keep {
        0 => None,
        _ if latency == 0.0 => Some(unconstrained),
        1 => None,
        k => Some(unconstrained.max(latency / (k - 1) as f64)),
    }
}

/// Smallest number of retained snapshots K that keeps a trustworthy
/// checkpoint available with save period `tau` and detection latency
/// `latency`: K = ⌈L/τ⌉ + 1, and 1 when L = 0.
///
/// Source: Saxena et al. 2024, section 3 ((K − 1)·τ ≥ L). A ratio L/τ
/// within a relative 1e-9 of an integer counts as that integer, so that
/// the clamped interval L/(K − 1) of [`latency_aware_interval`] maps back
/// to exactly K despite rounding. `tau <= 0` with a positive latency
/// gives `u64::MAX`.
///
/// ```
/// use ckpt_core::schedule::retention_floor;
/// assert_eq!(retention_floor(120.0, 120.0), 2);
/// assert_eq!(retention_floor(84.85, 120.0), 3);
/// assert_eq!(retention_floor(100.0 / 3.0, 100.0), 4);
/// assert_eq!(retention_floor(60.0, 0.0), 1);
/// ```
pub fn retention_floor(tau: f64, latency: f64) -> u64 {
    if latency <= 0.0 {
        return 1;
    }
    if tau <= 0.0 {
        return u64::MAX;
    }
    let q = latency / tau;
    let r = q.round();
    let steps = if (q - r).abs() <= 1e-9 * q.max(1.0) {
        r
    } else {
        q.ceil()
    };
    // Any positive latency needs the previous snapshot as well.
    let steps = steps.max(1.0);
    // `as` saturates for huge ratios.
    (steps as u64).saturating_add(1)
}

/// Whether a checkpoint taken at `ckpt_time` can be trusted after an
/// error detected at `detection_time` with detection latency `latency`
/// (all in the same clock, e.g. Unix seconds): the error may have
/// happened up to L before detection and been saved into any checkpoint
/// newer than `detection_time − latency`, so only checkpoints at or before
/// that instant are trustworthy.
///
/// Source: Saxena et al. 2024, section 3.
///
/// ```
/// use ckpt_core::schedule::checkpoint_is_trustworthy;
/// assert!(checkpoint_is_trustworthy(1000.0, 1120.0, 120.0));
/// assert!(!checkpoint_is_trustworthy(1000.5, 1120.0, 120.0));
/// assert!(checkpoint_is_trustworthy(1119.0, 1120.0, 0.0));
/// ```
pub fn checkpoint_is_trustworthy(ckpt_time: f64, detection_time: f64, latency: f64) -> bool {
    ckpt_time <= detection_time - latency.max(0.0)
}

/// Expected fraction of wall time that is not useful work for save period
/// `tau`: 1 − A_L(τ) (pass `latency = 0` for the plain model).
///
/// Source: Saxena et al. 2024 (see [`availability`]).
///
/// ```
/// use ckpt_core::schedule::{expected_overhead, availability};
/// let o = expected_overhead(100.0, 1.0, 3600.0, 240.0, 0.0);
/// assert!((o + availability(100.0, 1.0, 3600.0, 240.0) - 1.0).abs() < 1e-15);
/// ```
pub fn expected_overhead(tau: f64, delta: f64, mtbf: f64, restart: f64, latency: f64) -> f64 {
    1.0 - availability_with_latency(tau, delta, mtbf, restart, latency)
}

/// First-order cost terms of save period `tau`: the writing term δ/τ and
/// the rollback term (τ/2 + L + R)/M. Their sum approximates
/// [`expected_overhead`] when both are small, and for fixed R and L it is
/// minimised at Young's √(2δM).
///
/// Source: Young 1974 (with Saxena et al. 2024's restart and latency
/// terms).
///
/// ```
/// use ckpt_core::schedule::{cost_terms, young};
/// let (w, r) = cost_terms(young(1.0, 3600.0), 1.0, 3600.0, 0.0, 0.0);
/// assert!((w - r).abs() < 1e-12); // balanced at Young's optimum
/// ```
pub fn cost_terms(tau: f64, delta: f64, mtbf: f64, restart: f64, latency: f64) -> (f64, f64) {
    (delta / tau, (tau / 2.0 + latency + restart) / mtbf)
}

/// Exact expected wall time to complete a segment of `work` seconds of
/// computation followed by a blocking save of `cost` seconds, with
/// Poisson failures of mean `mtbf` that roll the segment back to its start
/// and each cost a restart of `restart` seconds which itself restarts if a
/// failure strikes during it:
/// E = M · e^{R/M} · (e^{(W+C)/M} − 1).
///
/// Source: Daly 2006 (FGCS 22(3)), the exact model behind [`daly`].
/// Derivation: an attempt of length x = W + C succeeds with probability
/// e^{−x/M}, so the expected number of failures is e^{x/M} − 1, the
/// expected time in attempts is M(e^{x/M} − 1), and each failure adds a
/// restart phase whose expected length is M(e^{R/M} − 1) by the same
/// argument; summing gives the formula. With `mtbf` infinite it is W + C.
///
/// ```
/// use ckpt_core::schedule::expected_segment_time;
/// assert_eq!(expected_segment_time(100.0, 10.0, 20.0, f64::INFINITY), 110.0);
/// let e = expected_segment_time(100.0, 10.0, 20.0, 500.0);
/// assert!((e - 500.0 * 0.04f64.exp() * 0.22f64.exp_m1()).abs() < 1e-9);
/// ```
pub fn expected_segment_time(work: f64, cost: f64, restart: f64, mtbf: f64) -> f64 {
    if mtbf.is_infinite() {
        return work + cost;
    }
    mtbf * (restart / mtbf).exp() * ((work + cost) / mtbf).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Golden-section search for the maximum of a unimodal `f` on [lo, hi].
    fn golden_max(f: impl Fn(f64) -> f64, mut lo: f64, mut hi: f64) -> f64 {
        let g = (5f64.sqrt() - 1.0) / 2.0;
        let mut c = hi - g * (hi - lo);
        let mut d = lo + g * (hi - lo);
        let (mut fc, mut fd) = (f(c), f(d));
        for _ in 0..200 {
            if fc > fd {
                hi = d;
                d = c;
                fd = fc;
                c = hi - g * (hi - lo);
                fc = f(c);
            } else {
                lo = c;
                c = d;
                fc = fd;
                d = lo + g * (hi - lo);
                fd = f(d);
            }
            if hi - lo <= 1e-15 * hi.abs() {
                break;
            }
        }
        (lo + hi) / 2.0
    }

    /// Maximiser of `f` over τ in [lo, hi], searched in ln τ.
    fn argmax_log(f: impl Fn(f64) -> f64, lo: f64, hi: f64) -> f64 {
        golden_max(|u| f(u.exp()), lo.ln(), hi.ln()).exp()
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs()
    }

    #[test]
    fn young_and_daly_reference_values() {
        assert!((young(1.0, 3600.0) - 7200f64.sqrt()).abs() < 1e-12);
        let x: f64 = 1.0 / 7200.0;
        let d = 7200f64.sqrt() * (1.0 + x.sqrt() / 3.0 + x / 9.0) - 1.0;
        assert!((daly(1.0, 3600.0) - d).abs() < 1e-12);
        assert_eq!(daly(2.0, 1.0), 1.0);
        assert_eq!(daly(7.5, 1.0), 1.0);
        assert!(daly(1.999, 1.0) > 0.0);
    }

    #[test]
    fn availability_optimum_reference_value() {
        // M = 1 h, δ = 1 s, R = 4 min: τ* = 1 + √(1 + 2·3840).
        let t = availability_optimum(1.0, 3600.0, 240.0);
        assert!((t - 88.641_314_458_42).abs() < 1e-6, "{t}");
        // τ* solves τ² − 2δτ − 2δ(M+R) = 0.
        assert!((t * t - 2.0 * t - 2.0 * 3840.0).abs() < 1e-9);
    }

    #[test]
    fn availability_handles_edges() {
        assert_eq!(availability(0.5, 1.0, 100.0, 0.0), 0.0);
        assert_eq!(availability(1.0, 1.0, 100.0, 0.0), 0.0);
        assert_eq!(availability(10.0, 1.0, f64::INFINITY, 5.0), 0.9);
        assert!(availability_optimum(1.0, f64::INFINITY, 0.0).is_infinite());
    }

    #[test]
    fn delta_to_zero_limit() {
        // τ* → 0 and A(τ*) → M/(M+R); with R = 0, A(τ*) → 1.
        let (m, r) = (3600.0, 240.0);
        let mut prev = f64::INFINITY;
        for k in 1..12 {
            let delta = 10f64.powi(-k);
            let t = availability_optimum(delta, m, r);
            assert!(t < prev);
            prev = t;
            let a = availability(t, delta, m, r);
            assert!(a < m / (m + r));
            let a0 = availability(availability_optimum(delta, m, 0.0), delta, m, 0.0);
            assert!(a0 > 1.0 - 3.0 * (delta / m).sqrt(), "{a0}");
        }
        let delta = 1e-12;
        assert!(availability_optimum(delta, m, r) < 1e-4);
        let a = availability(availability_optimum(delta, m, r), delta, m, r);
        assert!(rel(a, m / (m + r)) < 1e-6);
        let a0 = availability(availability_optimum(delta, m, 0.0), delta, m, 0.0);
        assert!((1.0 - a0) < 1e-7);
    }

    #[test]
    fn availability_optimum_approaches_young_when_r_and_delta_small() {
        let m = 86_400.0;
        let mut prev = f64::INFINITY;
        for k in 0..8 {
            let scale = 10f64.powi(-k);
            let delta = 10.0 * scale;
            let r = 1000.0 * scale;
            let ratio = availability_optimum(delta, m, r) / young(delta, m);
            let err = (ratio - 1.0).abs();
            assert!(err < prev, "ratio must converge monotonically");
            prev = err;
        }
        assert!(prev < 1e-3, "{prev}");
    }

    #[test]
    fn latency_aware_matches_plain_when_latency_small() {
        let (d, m, r) = (2.0, 7200.0, 300.0);
        let plain = availability_optimum(d, m, r);
        assert_eq!(latency_aware_interval(d, m, r, 0.0, 2), Some(plain));
        assert_eq!(latency_aware_interval(d, m, r, 0.0, 1), Some(plain));
        let tiny = latency_aware_interval(d, m, r, 1e-3, 2).unwrap_or(f64::NAN);
        assert!(rel(tiny, plain) < 1e-6);
        assert_eq!(retention_floor(tiny, 1e-3), 2);
    }

    #[test]
    fn latency_aware_clamps_with_two_snapshots() {
        let (d, m, r) = (1.0, 3600.0, 240.0);
        for l in [100.0, 120.0, 600.0, 3600.0] {
            let t = latency_aware_interval(d, m, r, l, 2).unwrap_or(f64::NAN);
            assert!(t >= l);
            if l > latency_aware_optimum(d, m, r, l) {
                assert_eq!(t, l);
            }
            assert_eq!(retention_floor(t, l), 2);
        }
        assert_eq!(latency_aware_interval(d, m, r, 10.0, 0), None);
        assert_eq!(latency_aware_interval(d, m, r, 0.0, 0), None);
    }

    #[test]
    fn retention_floor_examples() {
        assert_eq!(retention_floor(60.0, 0.0), 1);
        assert_eq!(retention_floor(60.0, -5.0), 1);
        assert_eq!(retention_floor(60.0, 1.0), 2);
        assert_eq!(retention_floor(60.0, 60.0), 2);
        assert_eq!(retention_floor(60.0, 61.0), 3);
        assert_eq!(retention_floor(0.0, 1.0), u64::MAX);
        assert_eq!(retention_floor(1e12, 1e-6), 2);
    }

    #[test]
    fn trustworthy_boundary() {
        assert!(checkpoint_is_trustworthy(100.0, 220.0, 120.0));
        assert!(!checkpoint_is_trustworthy(100.000_001, 220.0, 120.0));
        assert!(checkpoint_is_trustworthy(220.0, 220.0, 0.0));
        assert!(!checkpoint_is_trustworthy(220.1, 220.0, 0.0));
        assert!(checkpoint_is_trustworthy(220.0, 220.0, -3.0));
    }

    #[test]
    fn fleet_and_step_probability() {
        assert_eq!(fleet_mtbf(3600.0 * 1000.0, 1000), 3600.0);
        assert!(fleet_mtbf(1.0, 0).is_infinite());
        assert_eq!(failure_prob_per_step(1.0, f64::INFINITY), 0.0);
        assert!(mtbf_from_failure_prob(1.0, 0.0).is_infinite());
        assert_eq!(mtbf_from_failure_prob(1.0, 1.0), 0.0);
    }

    #[test]
    fn expected_segment_time_small_rate_expansion() {
        // E ≈ x + x²/(2M) + xR/M for large M.
        let (w, c, r, m) = (100.0, 10.0, 20.0, 1e7);
        let e = expected_segment_time(w, c, r, m);
        let x: f64 = w + c;
        let approx = x + x * x / (2.0 * m) + x * r / m;
        assert!(rel(e, approx) < 1e-8);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn availability_optimum_is_numerical_maximum(
            delta in 0.01f64..3600.0,
            m in 60.0f64..1e7,
            r in 0.0f64..1e4,
        ) {
            prop_assume!(delta < m);
            let a = |t: f64| availability(t, delta, m, r);
            let t_star = availability_optimum(delta, m, r);
            let t_num = argmax_log(a, delta, 4.0 * (delta + m + r));
            prop_assert!(a(t_star) >= a(t_num) * (1.0 - 1e-13),
                "closed form {t_star} worse than numeric {t_num}");
            prop_assert!(rel(t_star, t_num) < 1e-4, "{t_star} vs {t_num}");
            prop_assert!(t_star > delta);
        }

        #[test]
        fn latency_aware_optimum_is_numerical_maximum(
            delta in 0.01f64..600.0,
            m in 60.0f64..1e7,
            r in 0.0f64..1e4,
            l in 0.0f64..1e4,
        ) {
            prop_assume!(delta < m);
            let a = |t: f64| availability_with_latency(t, delta, m, r, l);
            let t_star = latency_aware_optimum(delta, m, r, l);
            let t_num = argmax_log(a, delta, 4.0 * (delta + m + r + l));
            prop_assert!(a(t_star) >= a(t_num) * (1.0 - 1e-13));
            prop_assert!(rel(t_star, t_num) < 1e-4, "{t_star} vs {t_num}");
        }

        #[test]
        fn constrained_interval_is_constrained_maximum(
            delta in 0.01f64..600.0,
            m in 60.0f64..1e7,
            r in 0.0f64..1e4,
            l in 0.001f64..1e5,
            keep in 2u64..16,
        ) {
            prop_assume!(delta < m);
            let a = |t: f64| availability_with_latency(t, delta, m, r, l);
            let t = latency_aware_interval(delta, m, r, l, keep);
            prop_assert!(t.is_some());
            let t = t.unwrap_or(f64::NAN);
            let lo = (l / (keep - 1) as f64).max(delta);
            prop_assert!(t >= lo);
            prop_assert!((keep - 1) as f64 * t >= l * (1.0 - 1e-12));
            prop_assert!(retention_floor(t, l) <= keep);
            let hi = 4.0 * (delta + m + r + l) + 2.0 * lo;
            let t_num = argmax_log(a, lo, hi);
            prop_assert!(a(t) >= a(t_num) * (1.0 - 1e-13), "{t} vs {t_num}");
        }

        #[test]
        fn retention_floor_is_minimal(tau in 0.01f64..1e5, l in 0.0f64..1e6) {
            let k = retention_floor(tau, l);
            prop_assert!(k >= 1);
            // K satisfies the constraint (up to the 1e-9 integer snap) ...
            prop_assert!((k - 1) as f64 * tau >= l * (1.0 - 1e-9));
            // ... and K − 1 does not.
            if k >= 2 {
                prop_assert!(((k - 2) as f64) * tau < l);
            }
        }

        #[test]
        fn young_minimises_first_order_cost(delta in 0.001f64..1e3, m in 1.0f64..1e8) {
            let cost = |t: f64| { let (w, r) = cost_terms(t, delta, m, 0.0, 0.0); w + r };
            let t_num = argmax_log(|t| -cost(t), 1e-6 * young(delta, m), 1e3 * young(delta, m));
            prop_assert!(rel(young(delta, m), t_num) < 1e-4);
        }

        #[test]
        fn daly_tracks_exact_optimum(ratio in 1e-4f64..0.5, m in 1.0f64..1e7) {
            // Exact model: minimise wall time per unit compute,
            // (e^{(τ+δ)/M} − 1)/τ.
            let delta = ratio * m;
            let g = |t: f64| -(((t + delta) / m).exp_m1() / t);
            let exact = argmax_log(g, 1e-3 * young(delta, m), 100.0 * m);
            let d = daly(delta, m);
            prop_assert!(rel(d, exact) < 0.01, "daly {d} exact {exact}");
            if ratio > 1e-3 {
                prop_assert!(rel(d, exact) < rel(young(delta, m), exact));
            }
        }

        #[test]
        fn optimum_monotone_in_parameters(
            delta in 0.01f64..100.0,
            m in 100.0f64..1e6,
            r in 0.0f64..1e3,
            f in 1.01f64..10.0,
        ) {
            let t = availability_optimum(delta, m, r);
            prop_assert!(availability_optimum(delta * f, m, r) > t);
            prop_assert!(availability_optimum(delta, m * f, r) > t);
            prop_assert!(availability_optimum(delta, m, r * f + 1.0) > t);
            prop_assert!(young(delta, m) <= availability_optimum(delta, m, r));
        }

        #[test]
        fn fleet_mtbf_matches_any_node_failing(
            node_mtbf in 1e3f64..1e9,
            nodes in 1u64..100_000,
            st in 0.01f64..100.0,
        ) {
            // P(some node fails in a step) = 1 − (1 − p_node)^N.
            let p_node = failure_prob_per_step(st, node_mtbf);
            let any = -((nodes as f64) * (-p_node).ln_1p()).exp_m1();
            let fleet = failure_prob_per_step(st, fleet_mtbf(node_mtbf, nodes));
            prop_assert!(rel(fleet, any) < 1e-9, "{fleet} vs {any}");
        }

        #[test]
        fn first_order_terms_bound_exact_overhead(
            delta in 0.01f64..100.0,
            m in 100.0f64..1e7,
            r in 0.0f64..1e3,
            l in 0.0f64..1e3,
            f in 1.01f64..100.0,
        ) {
            // 1 − A = (w + x)/(1 + x) ≤ w + x, with equality to first order.
            let tau = delta * f;
            let (w, x) = cost_terms(tau, delta, m, r, l);
            let exact = expected_overhead(tau, delta, m, r, l);
            prop_assert!(exact <= w + x + 1e-12);
            prop_assert!((w + x - exact) <= x * (w + x) + 1e-12);
        }

        #[test]
        fn segment_time_bounds_and_monotone(
            w in 0.0f64..1e4,
            c in 0.0f64..1e3,
            r in 0.0f64..1e3,
            m in 10.0f64..1e7,
            k in 1.01f64..2.0,
        ) {
            let e = expected_segment_time(w, c, r, m);
            prop_assert!(e >= (w + c) * (1.0 - 1e-12));
            prop_assert!(expected_segment_time(w * k + 1.0, c, r, m) > e);
            prop_assert!(expected_segment_time(w, c, r * k + 1.0, m) >= e);
            prop_assert!(expected_segment_time(w, c, r, m / k) >= e);
        }

        #[test]
        fn step_probability_roundtrip(st in 1e-3f64..100.0, m in 1.0f64..1e9) {
            let p = failure_prob_per_step(st, m);
            prop_assert!(p > 0.0 && p < 1.0);
            prop_assert!(rel(mtbf_from_failure_prob(st, p), m) < 1e-9);
        }

        #[test]
        fn trustworthy_is_monotone(c in 0.0f64..1e6, d in 0.0f64..1e6, l in 0.0f64..1e5, x in 0.0f64..1e5) {
            // An older checkpoint is trustworthy whenever a newer one is,
            // and a longer latency never makes a checkpoint trustworthy.
            if checkpoint_is_trustworthy(c, d, l) {
                prop_assert!(checkpoint_is_trustworthy(c - x, d, l));
            }
            if !checkpoint_is_trustworthy(c, d, l) {
                prop_assert!(!checkpoint_is_trustworthy(c, d, l + x));
            }
            prop_assert!(checkpoint_is_trustworthy(d - l - x, d, l));
        }
    }
}
