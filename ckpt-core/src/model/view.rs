//! How callers plug their own tensors into ckpt: a small view trait, as
//! safetensors' `View` does. A view says what the tensor is (its
//! [`TensorSpec`]: name, dtype, shape), where its bytes are
//! ([`TensorBytes`]: host memory, immutable shared bytes, or GPU memory)
//! and, for a shard of a larger tensor, which part it is ([`ShardSpec`]).
//! [`TensorRef`], [`SharedTensor`] and [`TensorMut`] are the plain
//! implementations over slices and [`Bytes`].

use std::marker::PhantomData;

use bytes::Bytes;

use crate::model::dtype::DType;
use crate::model::spec::{ShardSpec, TensorSpec};

/// Where a tensor's bytes are, for a save.
#[derive(Debug, Clone)]
pub enum TensorBytes<'a> {
    /// Row-major bytes in host memory, copied into the staging pool.
    Host(&'a [u8]),
    /// Immutable, reference-counted bytes that ckpt keeps instead of
    /// copying (a zero-copy snapshot). Only for bytes that can never change
    /// while referenced.
    Shared(Bytes),
    /// Bytes in GPU memory, copied into the staging pool by DMA (feature
    /// `cuda`, and a checkpointer given a CUDA device; else the save fails
    /// with a configuration error naming the tensor).
    Device(DeviceSource<'a>),
}

impl TensorBytes<'_> {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        match self {
            TensorBytes::Host(h) => h.len(),
            TensorBytes::Shared(b) => b.len(),
            TensorBytes::Device(d) => d.len(),
        }
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A read-only view of one tensor: what a save reads.
///
/// Implement [`spec`](TensorView::spec) and [`bytes`](TensorView::bytes)
/// (and [`shard`](TensorView::shard) for a piece of a larger tensor); the
/// bytes must be `dtype × shape` long. `name`, `dtype` and `shape` are read
/// from the spec.
pub trait TensorView {
    /// Name, element type and shape of the bytes.
    fn spec(&self) -> &TensorSpec;
    /// Where the bytes are.
    fn bytes(&self) -> TensorBytes<'_>;
    /// Which part of a global tensor this is; `None` means the whole tensor.
    fn shard(&self) -> Option<&ShardSpec> {
        None
    }
    /// The tensor's name (from [`TensorView::spec`]).
    fn name(&self) -> &str {
        &self.spec().name
    }
    /// Its element type.
    fn dtype(&self) -> DType {
        self.spec().dtype
    }
    /// The shape of its bytes.
    fn shape(&self) -> &[u64] {
        &self.spec().shape
    }
}

/// A mutable view of one tensor, the destination of a restore.
pub trait TensorViewMut {
    /// Name to look up in the checkpoint, expected element type, and the
    /// shape of the buffer.
    fn spec(&self) -> &TensorSpec;
    /// Which part of the global tensor to restore into this buffer; `None`
    /// means the whole tensor.
    fn shard(&self) -> Option<&ShardSpec> {
        None
    }
    /// The buffer to fill (`dtype × shape` bytes).
    fn bytes_mut(&mut self) -> &mut [u8];
    /// The tensor's name (from [`TensorViewMut::spec`]).
    fn name(&self) -> &str {
        &self.spec().name
    }
    /// Its element type.
    fn dtype(&self) -> DType {
        self.spec().dtype
    }
    /// The shape of its buffer.
    fn shape(&self) -> &[u64] {
        &self.spec().shape
    }
}

/// Anything a [`TrainingStateBuilder`](crate::TrainingStateBuilder) takes
/// as a tensor: a reference to any [`TensorView`], or a `&dyn TensorView`.
/// So `.model([&w])` works without casts, and so does a mix of view types
/// as `&dyn TensorView`.
pub trait IntoView<'a> {
    /// The view as a trait object.
    fn into_view(self) -> &'a dyn TensorView;
}

impl<'a, T: TensorView + 'a> IntoView<'a> for &'a T {
    fn into_view(self) -> &'a dyn TensorView {
        self
    }
}

impl<'a> IntoView<'a> for &'a dyn TensorView {
    fn into_view(self) -> &'a dyn TensorView {
        self
    }
}

/// A tensor's bytes in GPU memory: a CUDA device address (`CUdeviceptr`)
/// and a length, borrowed for `'a`. Returned in [`TensorBytes::Device`].
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
/// use ckpt_core::{TensorBytes, TensorRef, TensorView};
/// let w = vec![0.5f32; 6];
/// let t = TensorRef::from_slice("w", &[2, 3], &w);
/// assert_eq!(t.bytes().len(), 24);
/// assert!(matches!(t.bytes(), TensorBytes::Host(_)));
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
    fn spec(&self) -> &TensorSpec {
        &self.spec
    }
    fn bytes(&self) -> TensorBytes<'_> {
        TensorBytes::Host(self.data)
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
    fn spec(&self) -> &TensorSpec {
        &self.spec
    }
    fn bytes(&self) -> TensorBytes<'_> {
        TensorBytes::Shared(self.data.clone())
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
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
    fn spec(&self) -> &TensorSpec {
        &self.spec
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.data
    }
}
