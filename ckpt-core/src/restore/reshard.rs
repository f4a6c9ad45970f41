//! The resharding planner: which bytes of which saved piece land where in
//! a requested shard.
//!
//! Saved pieces and requested shards are hyper-rectangles of the same
//! global tensor, each stored row-major. Their intersection is copied as
//! contiguous runs: trailing dimensions that both sides hold in full are
//! merged into one run, so identical or row-split shardings copy in a few
//! large runs and only column splits produce many small ones.

use crate::model::spec::ShardSpec;

/// One contiguous copy, in elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Element offset in the source piece.
    pub src: u64,
    /// Element offset in the destination shard.
    pub dst: u64,
    /// Elements.
    pub len: u64,
}

fn strides(shape: &[u64]) -> Vec<u64> {
    let mut s = vec![1u64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// The runs that copy the intersection of `src` and `dst` (shards of the
/// same global tensor) from `src`'s layout into `dst`'s. Empty if they do
/// not intersect.
///
/// ```
/// use ckpt_core::ShardSpec;
/// use ckpt_core::restore::reshard::{plan_runs, Run};
/// // saved: rows 0..2 of a 4x3 matrix; wanted: rows 1..4
/// let src = ShardSpec::new(vec![4, 3], vec![0, 0], vec![2, 3]).unwrap();
/// let dst = ShardSpec::new(vec![4, 3], vec![1, 0], vec![3, 3]).unwrap();
/// assert_eq!(plan_runs(&src, &dst), vec![Run { src: 3, dst: 0, len: 3 }]);
/// ```
pub fn plan_runs(src: &ShardSpec, dst: &ShardSpec) -> Vec<Run> {
    let Some(isect) = src.intersect(dst) else {
        return Vec::new();
    };
    let d = isect.shape.len();
    if d == 0 {
        return vec![Run {
            src: 0,
            dst: 0,
            len: 1,
        }];
    }
    if isect.shape.contains(&0) {
        return Vec::new();
    }
    let (ss, ds) = (strides(&src.shape), strides(&dst.shape));
    // Merge trailing dims held in full by both sides into one run.
    let mut k = d - 1;
    while k > 0 && isect.shape[k] == src.shape[k] && isect.shape[k] == dst.shape[k] {
        k -= 1;
    }
    let run_len: u64 = isect.shape[k..].iter().product();
    let outer: u64 = isect.shape[..k].iter().product();
    let mut runs = Vec::with_capacity(outer as usize);
    let mut idx = vec![0u64; k];
    for _ in 0..outer {
        let (mut s, mut t) = (0u64, 0u64);
        for j in 0..d {
            let g = isect.offsets[j] + if j < k { idx[j] } else { 0 };
            s += (g - src.offsets[j]) * ss[j];
            t += (g - dst.offsets[j]) * ds[j];
        }
        runs.push(Run {
            src: s,
            dst: t,
            len: run_len,
        });
        for j in (0..k).rev() {
            idx[j] += 1;
            if idx[j] < isect.shape[j] {
                break;
            }
            idx[j] = 0;
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Reference: element-by-element copy through global coordinates.
    fn naive(src: &ShardSpec, src_data: &[u32], dst: &ShardSpec, dst_data: &mut [u32]) {
        let (ss, ds) = (strides(&src.shape), strides(&dst.shape));
        let gs = strides(&src.global_shape);
        let total: u64 = src.global_shape.iter().product();
        for g in 0..total {
            let coords: Vec<u64> = (0..gs.len())
                .map(|j| (g / gs[j]) % src.global_shape[j])
                .collect();
            let inside = |s: &ShardSpec| {
                (0..coords.len())
                    .all(|j| coords[j] >= s.offsets[j] && coords[j] < s.offsets[j] + s.shape[j])
            };
            if inside(src) && inside(dst) {
                let si: u64 = (0..coords.len())
                    .map(|j| (coords[j] - src.offsets[j]) * ss[j])
                    .sum();
                let di: u64 = (0..coords.len())
                    .map(|j| (coords[j] - dst.offsets[j]) * ds[j])
                    .sum();
                dst_data[di as usize] = src_data[si as usize];
            }
        }
    }

    fn shard_strategy() -> impl Strategy<Value = (ShardSpec, ShardSpec)> {
        prop::collection::vec(1u64..6, 0..4).prop_flat_map(|global| {
            let g1 = global.clone();
            let g2 = global.clone();
            let box_of = move |g: Vec<u64>| {
                g.iter()
                    .map(|&n| (0..n).prop_flat_map(move |o| (Just(o), 1..=n - o)))
                    .collect::<Vec<_>>()
            };
            (box_of(g1.clone()), box_of(g2.clone())).prop_map(move |(a, b)| {
                let mk = |v: Vec<(u64, u64)>| ShardSpec {
                    global_shape: global.clone(),
                    offsets: v.iter().map(|x| x.0).collect(),
                    shape: v.iter().map(|x| x.1).collect(),
                };
                (mk(a), mk(b))
            })
        })
    }

    proptest! {
        #[test]
        fn runs_match_elementwise_copy((src, dst) in shard_strategy()) {
            let src_data: Vec<u32> = (0..src.numel() as u32).map(|i| i + 1).collect();
            let mut want = vec![0u32; dst.numel() as usize];
            naive(&src, &src_data, &dst, &mut want);
            let mut got = vec![0u32; dst.numel() as usize];
            for r in plan_runs(&src, &dst) {
                let (s, t, n) = (r.src as usize, r.dst as usize, r.len as usize);
                got[t..t + n].copy_from_slice(&src_data[s..s + n]);
            }
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn identical_shards_copy_in_one_run() {
        let s = ShardSpec::new(vec![8, 4, 2], vec![2, 0, 0], vec![3, 4, 2]).expect("shard");
        assert_eq!(
            plan_runs(&s, &s),
            vec![Run {
                src: 0,
                dst: 0,
                len: 24
            }]
        );
    }
}
