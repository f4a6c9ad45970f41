//! What a checkpoint holds: model and optimizer tensors plus the loop state
//! a resumed run needs (step, RNG, data-loader position, LR schedule).
//!
//! The builder makes the complete state the easy path: leaving out the
//! optimizer, the RNG, the data-loader position or the LR schedule is an
//! error unless the caller says so explicitly (`without_*`), because a
//! checkpoint missing any of them silently changes the resumed run.

use std::marker::PhantomData;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::spec::{ShardSpec, TensorSpec, checked_nbytes};

/// A read-only view of one tensor, the way callers plug their own tensor
/// types into ckpt. The bytes are in host memory ([`TensorView::data`]), or
/// in GPU memory ([`TensorView::device`], feature `cuda`).
pub trait TensorView {
    /// Unique name.
    fn name(&self) -> &str;
    /// Element type.
    fn dtype(&self) -> DType;
    /// Shape of the bytes returned by [`TensorView::data`].
    fn shape(&self) -> &[u64];
    /// Row-major bytes.
    fn data(&self) -> &[u8];
    /// Which part of a global tensor this is; `None` means the whole tensor.
    fn shard(&self) -> Option<&ShardSpec> {
        None
    }
    /// Immutable, reference-counted bytes that ckpt may keep instead of
    /// copying (a zero-copy snapshot). Only return `Some` if the bytes can
    /// never change while referenced.
    fn shared_bytes(&self) -> Option<Bytes> {
        None
    }
    /// Where the bytes live in GPU memory, for a tensor that is not in host
    /// memory. When this returns `Some`, ckpt never calls
    /// [`TensorView::data`] nor [`TensorView::shared_bytes`]: a save copies
    /// the device bytes into the staging pool itself, which needs the
    /// `cuda` feature and a checkpointer given a CUDA device (else the save
    /// fails with a configuration error naming the tensor). Its length must
    /// be dtype × shape. Default: `None` (host memory).
    fn device(&self) -> Option<DeviceSource<'_>> {
        None
    }
}

/// A tensor's bytes in GPU memory: a CUDA device address (`CUdeviceptr`)
/// and a length, borrowed for `'a`. Returned by [`TensorView::device`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceSource<'a> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

impl<'a> DeviceSource<'a> {
    /// A device range from a raw address, e.g. a framework tensor's
    /// `data_ptr()`.
    ///
    /// # Safety
    /// ckpt reads the range only in [`crate::Checkpointer::save`] of a
    /// checkpointer given a CUDA device, and in the `cuda` module's explicit
    /// copies, on that device's own copy stream. Whenever it is read that
    /// way (and `len > 0`), `ptr .. ptr + len` must be memory allocated on
    /// that GPU (or accessible from its context) that stays allocated for
    /// `'a`; work on other streams that writes the range must have completed
    /// before the call (synchronize the producing stream first) and must not
    /// start before it returns.
    pub const unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        Self {
            ptr,
            len,
            _borrow: PhantomData,
        }
    }

    /// The device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The sub-range `offset .. offset + len`, or `None` if it is not
    /// inside this one.
    pub fn range(&self, offset: usize, len: usize) -> Option<DeviceSource<'a>> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        Some(DeviceSource {
            ptr: self.ptr.checked_add(offset as u64)?,
            len,
            _borrow: PhantomData,
        })
    }
}

/// Bytes of a view's data, wherever it lives.
pub(crate) fn view_len(v: &dyn TensorView) -> usize {
    match v.device() {
        Some(d) => d.len(),
        None => v.data().len(),
    }
}

/// A mutable view of one tensor, the destination of a restore.
pub trait TensorViewMut {
    /// Name to look up in the checkpoint.
    fn name(&self) -> &str;
    /// Expected element type.
    fn dtype(&self) -> DType;
    /// Shape of the buffer.
    fn shape(&self) -> &[u64];
    /// Which part of the global tensor to restore into this buffer; `None`
    /// means the whole tensor.
    fn shard(&self) -> Option<&ShardSpec> {
        None
    }
    /// The buffer to fill.
    fn data_mut(&mut self) -> &mut [u8];
}

/// Plain-old-data element types that may be viewed as bytes and filled from
/// bytes: every bit pattern is a valid value and there is no padding.
pub trait Pod: Copy + sealed::Sealed {
    /// The matching [`DType`].
    const DTYPE: DType;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! pod {
    ($($t:ty => $d:ident),*) => {$(
        impl sealed::Sealed for $t {}
        impl Pod for $t { const DTYPE: DType = DType::$d; }
    )*};
}
pod!(u8 => U8, i8 => I8, u16 => U16, i16 => I16, u32 => U32, i32 => I32, f32 => F32, u64 => U64, i64 => I64, f64 => F64);

/// Views a slice of plain-old-data as bytes.
pub fn as_bytes<T: Pod>(v: &[T]) -> &[u8] {
    // SAFETY: `T: Pod` is sealed to primitive numeric types without padding,
    // so every byte of the slice is initialized; u8 has alignment 1 and the
    // length is the slice's size in bytes; the lifetime is the input's.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Views a mutable slice of plain-old-data as bytes.
pub fn as_bytes_mut<T: Pod>(v: &mut [T]) -> &mut [u8] {
    // SAFETY: as in `as_bytes`; in addition every bit pattern is a valid `T`
    // (sealed primitive numeric types), so any bytes written through the
    // returned slice leave valid values behind. The borrow is exclusive.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// A borrowed tensor: name, dtype, shape, bytes. The simplest
/// [`TensorView`].
///
/// ```
/// use ckpt_core::{TensorRef, TensorView};
/// let w = vec![0.5f32; 6];
/// let t = TensorRef::from_slice("w", &[2, 3], &w);
/// assert_eq!(t.data().len(), 24);
/// ```
#[derive(Debug, Clone)]
pub struct TensorRef<'a> {
    spec: TensorSpec,
    shard: Option<ShardSpec>,
    data: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// A tensor over raw bytes.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[u64], data: &'a [u8]) -> Self {
        Self {
            spec: TensorSpec::new(name, dtype, shape),
            shard: None,
            data,
        }
    }

    /// A tensor over a typed slice.
    pub fn from_slice<T: Pod>(name: impl Into<String>, shape: &[u64], data: &'a [T]) -> Self {
        Self::new(name, T::DTYPE, shape, as_bytes(data))
    }

    /// Marks this tensor as one shard of a global tensor.
    pub fn with_shard(mut self, shard: ShardSpec) -> Self {
        self.shard = Some(shard);
        self
    }
}

impl TensorView for TensorRef<'_> {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn dtype(&self) -> DType {
        self.spec.dtype
    }
    fn shape(&self) -> &[u64] {
        &self.spec.shape
    }
    fn data(&self) -> &[u8] {
        self.data
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
    }
}

/// A tensor over immutable [`Bytes`]: saved by reference, without a copy
/// into the staging pool.
#[derive(Debug, Clone)]
pub struct SharedTensor {
    spec: TensorSpec,
    shard: Option<ShardSpec>,
    data: Bytes,
}

impl SharedTensor {
    /// A tensor over shared bytes.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[u64], data: Bytes) -> Self {
        Self {
            spec: TensorSpec::new(name, dtype, shape),
            shard: None,
            data,
        }
    }

    /// Marks this tensor as one shard of a global tensor.
    pub fn with_shard(mut self, shard: ShardSpec) -> Self {
        self.shard = Some(shard);
        self
    }
}

impl TensorView for SharedTensor {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn dtype(&self) -> DType {
        self.spec.dtype
    }
    fn shape(&self) -> &[u64] {
        &self.spec.shape
    }
    fn data(&self) -> &[u8] {
        &self.data
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
    }
    fn shared_bytes(&self) -> Option<Bytes> {
        Some(self.data.clone())
    }
}

/// A mutable borrowed tensor, the simplest [`TensorViewMut`].
#[derive(Debug)]
pub struct TensorMut<'a> {
    spec: TensorSpec,
    shard: Option<ShardSpec>,
    data: &'a mut [u8],
}

impl<'a> TensorMut<'a> {
    /// A destination over raw bytes.
    pub fn new(name: impl Into<String>, dtype: DType, shape: &[u64], data: &'a mut [u8]) -> Self {
        Self {
            spec: TensorSpec::new(name, dtype, shape),
            shard: None,
            data,
        }
    }

    /// A destination over a typed slice.
    pub fn from_slice<T: Pod>(name: impl Into<String>, shape: &[u64], data: &'a mut [T]) -> Self {
        Self::new(name, T::DTYPE, shape, as_bytes_mut(data))
    }

    /// Restores only `shard` of the global tensor into this buffer.
    pub fn with_shard(mut self, shard: ShardSpec) -> Self {
        self.shard = Some(shard);
        self
    }
}

impl TensorViewMut for TensorMut<'_> {
    fn name(&self) -> &str {
        &self.spec.name
    }
    fn dtype(&self) -> DType {
        self.spec.dtype
    }
    fn shape(&self) -> &[u64] {
        &self.spec.shape
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
    }
    fn data_mut(&mut self) -> &mut [u8] {
        self.data
    }
}

/// What a tensor is for; shown by `ckpt inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorRole {
    /// Model parameters (and buffers).
    Model,
    /// Optimizer state: moments, accumulators.
    Optimizer,
    /// Anything else the caller wants restored bit-exact.
    Other,
}

/// The non-tensor part of a training run's state. Values are arbitrary JSON
/// produced by the caller's serde types; `Value::Null` means "declared
/// absent" (the caller called `without_*`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct LoopState {
    /// Training step the checkpoint was taken after.
    pub step: u64,
    /// Random number generator state(s).
    pub rng: Value,
    /// Data-loader position (epoch, cursor, shuffle seed...).
    pub data_loader: Value,
    /// Learning-rate schedule state.
    pub lr_schedule: Value,
    /// Anything else.
    pub extra: Value,
}

impl LoopState {
    /// Decodes the RNG state into the caller's type.
    pub fn rng<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        decode("rng", &self.rng)
    }
    /// Decodes the data-loader position.
    pub fn data_loader<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        decode("data_loader", &self.data_loader)
    }
    /// Decodes the LR-schedule state.
    pub fn lr_schedule<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        decode("lr_schedule", &self.lr_schedule)
    }
    /// Decodes the extra state.
    pub fn extra<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        decode("extra", &self.extra)
    }
}

fn decode<T: serde::de::DeserializeOwned>(what: &str, v: &Value) -> Result<T> {
    serde_json::from_value(v.clone()).map_err(|e| Error::Decode {
        what: format!("{what} state"),
        reason: e.to_string(),
    })
}

fn encode<T: Serialize + ?Sized>(what: &str, v: &T) -> Result<Value> {
    serde_json::to_value(v)
        .map_err(|e| Error::InvalidInput(format!("cannot encode the {what} state: {e}")))
}

/// One tensor of a [`TrainingState`].
#[derive(Clone)]
pub struct StateTensor<'a> {
    /// Role of the tensor.
    pub role: TensorRole,
    /// The caller's view.
    pub view: &'a dyn TensorView,
}

impl std::fmt::Debug for StateTensor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateTensor")
            .field("role", &self.role)
            .field("name", &self.view.name())
            .field("dtype", &self.view.dtype())
            .field("shape", &self.view.shape())
            .finish()
    }
}

/// Everything one rank saves at one step. Build it with
/// [`TrainingState::builder`].
#[derive(Debug, Clone)]
pub struct TrainingState<'a> {
    pub(crate) tensors: Vec<StateTensor<'a>>,
    pub(crate) loop_state: LoopState,
}

impl<'a> TrainingState<'a> {
    /// Starts a state for `step`.
    ///
    /// ```
    /// use ckpt_core::{TensorRef, TrainingState};
    /// let w = vec![1.0f32; 4];
    /// let (m, v) = (vec![0.0f32; 4], vec![0.0f32; 4]);
    /// let (w, m, v) = (
    ///     TensorRef::from_slice("w", &[4], &w),
    ///     TensorRef::from_slice("adam.m.w", &[4], &m),
    ///     TensorRef::from_slice("adam.v.w", &[4], &v),
    /// );
    /// let state = TrainingState::builder(10)
    ///     .model([&w as _])
    ///     .optimizer([&m as _, &v as _])
    ///     .rng(&[1u64, 2, 3, 4]).unwrap()
    ///     .data_loader(&(0u32, 640u64)).unwrap()
    ///     .lr_schedule(&3e-4f64).unwrap()
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(state.step(), 10);
    ///
    /// // Forgetting the optimizer is an error, not a silent omission.
    /// let err = TrainingState::builder(10).model([&w as _]).without_rng()
    ///     .without_data_loader().without_lr_schedule().build().unwrap_err();
    /// assert!(err.to_string().contains("optimizer"));
    /// ```
    pub fn builder(step: u64) -> TrainingStateBuilder<'a> {
        TrainingStateBuilder {
            step,
            tensors: Vec::new(),
            has_model: false,
            optimizer: Declared::Missing,
            rng: Declared::Missing,
            data_loader: Declared::Missing,
            lr_schedule: Declared::Missing,
            extra: Value::Null,
        }
    }

    /// The step this state belongs to.
    pub fn step(&self) -> u64 {
        self.loop_state.step
    }

    /// The non-tensor state.
    pub fn loop_state(&self) -> &LoopState {
        &self.loop_state
    }

    /// The tensors, in the order given.
    pub fn tensors(&self) -> &[StateTensor<'a>] {
        &self.tensors
    }

    /// Bytes of tensor data.
    pub fn nbytes(&self) -> u64 {
        self.tensors.iter().map(|t| view_len(t.view) as u64).sum()
    }

    /// Checks every tensor: unique names, bytes match dtype × shape, shard
    /// consistent with the local shape.
    pub fn validate(&self) -> Result<()> {
        let mut names = std::collections::HashSet::new();
        for t in &self.tensors {
            let v = t.view;
            let name = v.name();
            if name.is_empty() || name.len() > 1024 || name.starts_with("__") {
                return Err(Error::tensor(
                    name,
                    "names must be 1..=1024 bytes and must not start with `__`",
                ));
            }
            if !names.insert(name) {
                return Err(Error::tensor(name, "appears twice in the state"));
            }
            let want = checked_nbytes(v.shape(), v.dtype())
                .ok_or_else(|| Error::tensor(name, format!("shape {:?} overflows", v.shape())))?;
            let len = view_len(v);
            if want != len as u64 {
                return Err(Error::tensor(
                    name,
                    format!(
                        "{} x {:?} needs {want} bytes but the view holds {len}",
                        v.dtype(),
                        v.shape(),
                    ),
                ));
            }
            if let Some(s) = v.shard() {
                s.validate()
                    .map_err(|e| Error::tensor(name, e.to_string()))?;
                if s.shape != v.shape() {
                    return Err(Error::tensor(
                        name,
                        format!(
                            "shard shape {:?} differs from the tensor's shape {:?}",
                            s.shape,
                            v.shape()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone)]
enum Declared {
    Missing,
    Absent,
    Present(Value),
}

impl Declared {
    fn into_value(self, what: &str, how: &str) -> Result<Value> {
        match self {
            Declared::Missing => Err(Error::InvalidInput(format!(
                "training state has no {what}: call .{how}(..) or, if the run truly has none, .without_{how}()"
            ))),
            Declared::Absent => Ok(Value::Null),
            Declared::Present(v) => Ok(v),
        }
    }
}

/// Builder of a [`TrainingState`]; see [`TrainingState::builder`].
#[derive(Debug)]
#[must_use]
pub struct TrainingStateBuilder<'a> {
    step: u64,
    tensors: Vec<StateTensor<'a>>,
    has_model: bool,
    optimizer: Declared,
    rng: Declared,
    data_loader: Declared,
    lr_schedule: Declared,
    extra: Value,
}

impl<'a> TrainingStateBuilder<'a> {
    fn push(
        mut self,
        role: TensorRole,
        views: impl IntoIterator<Item = &'a dyn TensorView>,
    ) -> Self {
        self.tensors
            .extend(views.into_iter().map(|view| StateTensor { role, view }));
        self
    }

    /// Adds model tensors.
    pub fn model(mut self, views: impl IntoIterator<Item = &'a dyn TensorView>) -> Self {
        self.has_model = true;
        self.push(TensorRole::Model, views)
    }

    /// Adds optimizer tensors (e.g. Adam's first and second moments).
    pub fn optimizer(mut self, views: impl IntoIterator<Item = &'a dyn TensorView>) -> Self {
        self.optimizer = Declared::Present(Value::Bool(true));
        self.push(TensorRole::Optimizer, views)
    }

    /// Declares that the run has no optimizer state (plain SGD).
    pub fn without_optimizer(mut self) -> Self {
        self.optimizer = Declared::Absent;
        self
    }

    /// Adds other tensors to restore bit-exact.
    pub fn other(self, views: impl IntoIterator<Item = &'a dyn TensorView>) -> Self {
        self.push(TensorRole::Other, views)
    }

    /// Records the RNG state.
    pub fn rng<T: Serialize + ?Sized>(mut self, rng: &T) -> Result<Self> {
        self.rng = Declared::Present(encode("rng", rng)?);
        Ok(self)
    }

    /// Declares that the run uses no random numbers.
    pub fn without_rng(mut self) -> Self {
        self.rng = Declared::Absent;
        self
    }

    /// Records the data-loader position.
    pub fn data_loader<T: Serialize + ?Sized>(mut self, pos: &T) -> Result<Self> {
        self.data_loader = Declared::Present(encode("data_loader", pos)?);
        Ok(self)
    }

    /// Declares that the run has no data-loader position to keep.
    pub fn without_data_loader(mut self) -> Self {
        self.data_loader = Declared::Absent;
        self
    }

    /// Records the learning-rate schedule state.
    pub fn lr_schedule<T: Serialize + ?Sized>(mut self, s: &T) -> Result<Self> {
        self.lr_schedule = Declared::Present(encode("lr_schedule", s)?);
        Ok(self)
    }

    /// Declares that the learning rate is constant.
    pub fn without_lr_schedule(mut self) -> Self {
        self.lr_schedule = Declared::Absent;
        self
    }

    /// Records anything else as JSON.
    pub fn extra<T: Serialize + ?Sized>(mut self, extra: &T) -> Result<Self> {
        self.extra = encode("extra", extra)?;
        Ok(self)
    }

    /// Validates and builds the state. Fails if a part of the state was
    /// neither given nor declared absent, or if a tensor is malformed.
    pub fn build(self) -> Result<TrainingState<'a>> {
        if !self.has_model {
            return Err(Error::InvalidInput(
                "training state has no model tensors: call .model(..)".into(),
            ));
        }
        self.optimizer.into_value("optimizer state", "optimizer")?;
        let loop_state = LoopState {
            step: self.step,
            rng: self.rng.into_value("RNG state", "rng")?,
            data_loader: self
                .data_loader
                .into_value("data-loader position", "data_loader")?,
            lr_schedule: self
                .lr_schedule
                .into_value("LR-schedule state", "lr_schedule")?,
            extra: self.extra,
        };
        let state = TrainingState {
            tensors: self.tensors,
            loop_state,
        };
        state.validate()?;
        Ok(state)
    }
}
