//! Tensor and shard descriptions: what a tensor is, and which part of a
//! global tensor one rank holds.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::dtype::DType;

/// Most dimensions a tensor may have; a bound for hardened parsing.
pub const MAX_DIMS: usize = 32;

/// Number of elements of `shape`, or `None` on overflow.
pub fn checked_numel(shape: &[u64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// Bytes of a tensor of `shape` and `dtype`, or `None` on overflow.
pub fn checked_nbytes(shape: &[u64], dtype: DType) -> Option<u64> {
    checked_numel(shape)?.checked_mul(dtype.size() as u64)
}

/// A named tensor's type and (local) shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// Unique name, e.g. `layers.0.attn.wq`.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Shape of the bytes this caller holds.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Builds a spec.
    pub fn new(name: impl Into<String>, dtype: DType, shape: impl Into<Vec<u64>>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape: shape.into(),
        }
    }

    /// Size of the tensor's data in bytes, checked.
    pub fn nbytes(&self) -> Result<u64> {
        checked_nbytes(&self.shape, self.dtype)
            .ok_or_else(|| Error::tensor(&self.name, format!("shape {:?} overflows", self.shape)))
    }
}

/// The part of a global tensor held by one rank: a hyper-rectangle
/// `offsets .. offsets + shape` of `global_shape`, stored row-major.
///
/// ```
/// use ckpt_core::ShardSpec;
/// // rows 4..8 of an 8x16 matrix
/// let s = ShardSpec::new(vec![8, 16], vec![4, 0], vec![4, 16]).unwrap();
/// assert_eq!(s.numel(), 64);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ShardSpec {
    /// Shape of the whole tensor across all ranks.
    pub global_shape: Vec<u64>,
    /// Where this shard starts, per dimension.
    pub offsets: Vec<u64>,
    /// Shape of this shard.
    pub shape: Vec<u64>,
}

impl ShardSpec {
    /// Builds and validates a shard: same rank everywhere, inside the global
    /// shape, no overflow.
    pub fn new(global_shape: Vec<u64>, offsets: Vec<u64>, shape: Vec<u64>) -> Result<Self> {
        let s = Self {
            global_shape,
            offsets,
            shape,
        };
        s.validate()?;
        Ok(s)
    }

    /// The whole tensor as a single shard.
    pub fn full(global_shape: Vec<u64>) -> Self {
        Self {
            offsets: vec![0; global_shape.len()],
            shape: global_shape.clone(),
            global_shape,
        }
    }

    /// Splits dimension `dim` of `global_shape` into `parts` nearly equal
    /// contiguous blocks and returns block `index` (the usual row/column
    /// sharding of data and tensor parallelism). Earlier blocks get the
    /// remainder.
    ///
    /// ```
    /// use ckpt_core::ShardSpec;
    /// let s = ShardSpec::split(vec![10, 4], 0, 3, 2).unwrap();
    /// assert_eq!((s.offsets[0], s.shape[0]), (7, 3));
    /// ```
    pub fn split(global_shape: Vec<u64>, dim: usize, parts: u64, index: u64) -> Result<Self> {
        let n = *global_shape.get(dim).ok_or_else(|| {
            Error::InvalidInput(format!(
                "split dim {dim} out of range for shape {global_shape:?}"
            ))
        })?;
        if parts == 0 || index >= parts {
            return Err(Error::InvalidInput(format!(
                "split part {index} of {parts} is out of range"
            )));
        }
        let base = n / parts;
        let rem = n % parts;
        let len = base + u64::from(index < rem);
        let start = index * base + index.min(rem);
        let mut offsets = vec![0; global_shape.len()];
        let mut shape = global_shape.clone();
        offsets[dim] = start;
        shape[dim] = len;
        Self::new(global_shape, offsets, shape)
    }

    /// Checks internal consistency.
    pub fn validate(&self) -> Result<()> {
        let d = self.global_shape.len();
        if d > MAX_DIMS {
            return Err(Error::InvalidInput(format!(
                "{d} dimensions exceed the limit of {MAX_DIMS}"
            )));
        }
        if self.offsets.len() != d || self.shape.len() != d {
            return Err(Error::InvalidInput(format!(
                "shard rank mismatch: global {:?}, offsets {:?}, shape {:?}",
                self.global_shape, self.offsets, self.shape
            )));
        }
        for i in 0..d {
            let end = self.offsets[i].checked_add(self.shape[i]);
            if end.is_none_or(|e| e > self.global_shape[i]) {
                return Err(Error::InvalidInput(format!(
                    "shard offsets {:?} + shape {:?} exceed global shape {:?} in dim {i}",
                    self.offsets, self.shape, self.global_shape
                )));
            }
        }
        checked_numel(&self.global_shape).ok_or_else(|| {
            Error::InvalidInput(format!("global shape {:?} overflows", self.global_shape))
        })?;
        Ok(())
    }

    /// Elements in this shard.
    pub fn numel(&self) -> u64 {
        checked_numel(&self.shape).unwrap_or(u64::MAX)
    }

    /// Whether the shard is the whole tensor.
    pub fn is_full(&self) -> bool {
        self.shape == self.global_shape
    }

    /// The intersection of two shards of the same global tensor, if any
    /// element is shared.
    pub fn intersect(&self, other: &ShardSpec) -> Option<ShardSpec> {
        if self.global_shape != other.global_shape {
            return None;
        }
        let d = self.global_shape.len();
        let mut offsets = Vec::with_capacity(d);
        let mut shape = Vec::with_capacity(d);
        for i in 0..d {
            let lo = self.offsets[i].max(other.offsets[i]);
            let hi = (self.offsets[i] + self.shape[i]).min(other.offsets[i] + other.shape[i]);
            if hi <= lo {
                return None;
            }
            offsets.push(lo);
            shape.push(hi - lo);
        }
        Some(ShardSpec {
            global_shape: self.global_shape.clone(),
            offsets,
            shape,
        })
    }
}
