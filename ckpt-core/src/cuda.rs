//! GPU staging (feature `cuda`): a CUDA device with a dedicated copy
//! stream, tensors that live in device memory, and a small owned device
//! allocation for tests and benchmarks.
//!
//! A save copies every [`DeviceTensor`] (any [`TensorView`] whose bytes
//! are [`TensorBytes::Device`]) straight from the GPU into the staging
//! pool with `cuMemcpyDtoHAsync` on the device's copy stream, and hands a
//! block to the flush once its copies have completed. The checkpointer
//! registers its staging pool with the driver
//! ([`crate::CheckpointerBuilder::cuda`]), so those copies are DMA from
//! page-locked memory rather than bounces through the driver's buffers.
//!
//! The driver is loaded at run time: building with this feature needs no
//! CUDA toolkit, and a binary built with it runs on machines without a GPU,
//! where [`CudaDevice::open`] returns [`Error::Cuda`] ("no CUDA driver")
//! instead of panicking.
//!
//! The copy stream is non-blocking: it does not wait for work queued on
//! other streams (including the legacy default stream). Synchronize the
//! stream that produced the tensors before calling
//! [`crate::Checkpointer::save`], and do not write them before `save`
//! returns.
//!
//! ```no_run
//! use std::sync::Arc;
//! use ckpt_core::cuda::{CudaDevice, DeviceBuffer};
//! use ckpt_core::{Checkpointer, DType, MemoryTier, TierPolicy, TrainingState};
//!
//! let gpu = CudaDevice::open(0)?;
//! let ckpt = Checkpointer::builder("gpu")
//!     .tier(Arc::new(MemoryTier::new()), TierPolicy::keep_last(1))
//!     .cuda(gpu.clone())
//!     .build()?;
//! let w = DeviceBuffer::from_host(&gpu, &vec![0u8; 4096])?;
//! let w = w.tensor("w", DType::F32, &[1024]);
//! let state = TrainingState::builder(1)
//!     .model([&w])
//!     .without_optimizer()
//!     .without_rng()
//!     .without_data_loader()
//!     .without_lr_schedule()
//!     .build()?;
//! ckpt.save(&state)?.wait()?;
//! # Ok::<(), ckpt_core::Error>(())
//! ```

use std::ffi::{CStr, c_int};
use std::marker::PhantomData;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, OnceLock};

use cudarc::driver::{result, sys};

use crate::error::{Error, Result};
use crate::model::dtype::DType;
use crate::model::spec::{ShardSpec, TensorSpec};
use crate::model::{DeviceSource, TensorBytes, TensorView};
use crate::save::copy::DeviceCopy;
pub use crate::save::pool::PinnedBuffer;

/// The driver library probed before cudarc is first called; cudarc's own
/// loader panics when it finds no driver, so it is never reached then.
const DRIVER_LIB: &CStr = c"libcuda.so.1";

/// Loads the driver library once (it stays loaded, as cudarc keeps it), or
/// says why it cannot be loaded.
fn probe_driver() -> Result<()> {
    static PROBE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(dlopen_driver)
        .clone()
        .map_err(|why| Error::Cuda(format!("no CUDA driver (libcuda.so.1 not loadable: {why})")))
}

#[cfg(unix)]
fn dlopen_driver() -> std::result::Result<(), String> {
    // SAFETY: `DRIVER_LIB` is NUL-terminated. The handle is deliberately
    // never closed: the library stays loaded for the process, as it does
    // once cudarc has loaded it.
    let handle = unsafe { libc::dlopen(DRIVER_LIB.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns null or a NUL-terminated string that stays
    // valid until the next dl* call on this thread; it is copied at once.
    let why = unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown reason".to_string()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    };
    Err(why)
}

#[cfg(not(unix))]
fn dlopen_driver() -> std::result::Result<(), String> {
    // No probe here; `CudaDevice::open` still catches cudarc's panic.
    Ok(())
}

/// `CUDA_ERROR_NAME (description)`.
fn describe(e: result::DriverError) -> String {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    match e.error_string() {
        Ok(s) => format!("{name} ({})", s.to_string_lossy()),
        Err(_) => name,
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "the driver loader panicked".to_string())
}

/// One GPU: its primary context (shared with CUDA runtime users such as
/// PyTorch) and a dedicated non-blocking stream for device-to-host copies.
/// Open it once with [`CudaDevice::open`] and share the `Arc`.
pub struct CudaDevice {
    ordinal: usize,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    name: String,
}

// SAFETY: driver handles (context, stream) are plain identifiers that the
// CUDA driver API accepts from any thread; every call made through this type
// first pushes the context on the calling thread (`bind`). Nothing here is
// mutated after `open`.
unsafe impl Send for CudaDevice {}
// SAFETY: see `Send`; the driver serializes concurrent calls on one stream.
unsafe impl Sync for CudaDevice {}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// The device's context, pushed on this thread's context stack until drop.
pub(crate) struct Bound<'d> {
    _device: PhantomData<&'d CudaDevice>,
    /// The context stack is per thread: the guard must not move.
    _not_send: PhantomData<*const ()>,
}

impl Drop for Bound<'_> {
    fn drop(&mut self) {
        let mut popped = std::ptr::null_mut();
        // SAFETY: pops the context `bind` pushed on this same thread (the
        // guard is neither Send nor Sync); `popped` is a valid out-pointer.
        let _ = unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: loads the driver, retains the device's primary
    /// context and creates a non-blocking copy stream. Fails with
    /// [`Error::Cuda`] (never a panic) when there is no driver
    /// (`libcuda.so.1` not loadable), no such device, or the driver refuses.
    pub fn open(ordinal: usize) -> Result<Arc<Self>> {
        probe_driver()?;
        let ord = c_int::try_from(ordinal)
            .map_err(|_| Error::Cuda(format!("device {ordinal}: no such CUDA device ordinal")))?;
        // cudarc panics when a library or symbol is missing; the probe above
        // makes that unlikely, this makes it an error.
        match catch_unwind(AssertUnwindSafe(|| Self::open_loaded(ordinal, ord))) {
            Ok(r) => r.map(Arc::new),
            Err(panic) => Err(Error::Cuda(format!(
                "device {ordinal}: the CUDA driver could not be loaded: {}",
                panic_message(panic.as_ref())
            ))),
        }
    }

    fn open_loaded(ordinal: usize, ord: c_int) -> Result<Self> {
        let fail = |call: &str, e: result::DriverError| {
            Error::Cuda(format!(
                "device {ordinal}: CUDA driver call {call} failed: {}",
                describe(e)
            ))
        };
        result::init().map_err(|e| fail("cuInit", e))?;
        let device = result::device::get(ord).map_err(|e| fail("cuDeviceGet", e))?;
        let name = result::device::get_name(device).map_err(|e| fail("cuDeviceGetName", e))?;
        // SAFETY: `device` comes from cuDeviceGet. The reference is released
        // by `Drop` (also when the stream creation below fails).
        let ctx = unsafe { result::primary_ctx::retain(device) }
            .map_err(|e| fail("cuDevicePrimaryCtxRetain", e))?;
        let mut dev = CudaDevice {
            ordinal,
            device,
            ctx,
            stream: std::ptr::null_mut(),
            name,
        };
        let stream = {
            let _bound = dev.bind()?;
            result::stream::create(result::stream::StreamKind::NonBlocking)
                .map_err(|e| fail("cuStreamCreate", e))?
        };
        dev.stream = stream;
        Ok(dev)
    }

    /// The device ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name, e.g. `NVIDIA H100 80GB HBM3`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Pushes the device's context on this thread until the guard drops,
    /// so the caller's current context (e.g. PyTorch's) is left as it was.
    pub(crate) fn bind(&self) -> Result<Bound<'_>> {
        // SAFETY: `ctx` was retained in `open` and is released only in
        // `Drop`, so it is live while `self` is borrowed.
        let r = unsafe { sys::cuCtxPushCurrent_v2(self.ctx) };
        self.check("cuCtxPushCurrent", r)?;
        Ok(Bound {
            _device: PhantomData,
            _not_send: PhantomData,
        })
    }

    /// Maps a driver status to [`Error::Cuda`] naming this device and `call`.
    pub(crate) fn check(&self, call: &str, r: sys::CUresult) -> Result<()> {
        r.result().map_err(|e| {
            Error::Cuda(format!(
                "device {} ({}): {call} failed: {}",
                self.ordinal,
                self.name,
                describe(e)
            ))
        })
    }

    /// Copies each device range into its host buffer on the copy stream
    /// and returns once all of them have completed. Into page-locked memory
    /// (a registered staging pool, a [`PinnedBuffer`]) the
    /// copies are DMA; into pageable memory the driver bounces them.
    pub fn copy_to_host(&self, copies: &mut [(DeviceSource<'_>, &mut [u8])]) -> Result<()> {
        self.copy_to_host_while(copies, &mut || ())
    }

    /// Issues the copies, runs `during` while they are in flight, then waits
    /// for exactly these copies (an event recorded after them), not for
    /// copies other threads queued later on the same stream.
    fn copy_to_host_while(
        &self,
        copies: &mut [(DeviceSource<'_>, &mut [u8])],
        during: &mut dyn FnMut(),
    ) -> Result<()> {
        /// Does not let the function return or unwind while the stream may
        /// still be writing into the borrowed buffers.
        struct Drain {
            stream: sys::CUstream,
            armed: bool,
        }
        impl Drop for Drain {
            fn drop(&mut self) {
                if self.armed {
                    // SAFETY: the stream is live (owned by the device, which
                    // the caller borrows); waiting on it has no other effect.
                    let _ = unsafe { sys::cuStreamSynchronize(self.stream) };
                }
            }
        }

        let _bound = self.bind()?;
        let mut drain = Drain {
            stream: self.stream,
            armed: false,
        };
        for (src, dst) in copies.iter_mut() {
            if src.len() != dst.len() {
                return Err(Error::Internal(format!(
                    "device copy of {} bytes into a host buffer of {} bytes",
                    src.len(),
                    dst.len()
                )));
            }
            if dst.is_empty() {
                continue;
            }
            drain.armed = true;
            // SAFETY: `dst` is an exclusive borrow of `dst.len()` bytes that
            // lasts for this whole call, and this function neither returns
            // nor unwinds before the stream has finished the copy (the event
            // wait below, else `drain`). `src` is device memory readable for
            // its lifetime (the contract of `DeviceSource::from_raw`), of the
            // same length. The stream belongs to the bound context.
            let r = unsafe {
                sys::cuMemcpyDtoHAsync_v2(
                    dst.as_mut_ptr().cast(),
                    src.ptr(),
                    dst.len(),
                    self.stream,
                )
            };
            self.check(
                &format!(
                    "cuMemcpyDtoHAsync of {} bytes from {:#x}",
                    dst.len(),
                    src.ptr()
                ),
                r,
            )?;
        }
        during();
        if !drain.armed {
            return Ok(());
        }
        let mut event = std::ptr::null_mut();
        // Blocking sync: a waiting staging thread sleeps instead of spinning
        // on a core that host copies or the flush could use.
        let flags = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: `event` is a valid out-pointer; the context is bound.
        let r = unsafe { sys::cuEventCreate(&mut event, flags) };
        self.check("cuEventCreate", r)?;
        // SAFETY: `event` was just created in this context and `stream` is
        // live; the event is destroyed below, after the wait.
        let recorded = self.check("cuEventRecord", unsafe {
            sys::cuEventRecord(event, self.stream)
        });
        let waited = recorded.and_then(|()| {
            // SAFETY: as above; waits for the work recorded by the event.
            self.check("cuEventSynchronize", unsafe {
                sys::cuEventSynchronize(event)
            })
        });
        // SAFETY: created above, destroyed once; destroying an event that is
        // still pending is allowed.
        let _ = unsafe { sys::cuEventDestroy_v2(event) };
        waited?;
        drain.armed = false;
        Ok(())
    }
}

impl DeviceCopy for CudaDevice {
    fn copy_block(
        &self,
        copies: &mut [(DeviceSource<'_>, &mut [u8])],
        during: &mut dyn FnMut(),
    ) -> Result<()> {
        self.copy_to_host_while(copies, during)
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        if !self.stream.is_null()
            && let Ok(_bound) = self.bind()
        {
            // SAFETY: the stream was created in `open` and is destroyed once;
            // pending work completes before its resources are released.
            let _ = unsafe { sys::cuStreamDestroy_v2(self.stream) };
        }
        // SAFETY: releases the reference retained in `open`, once.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

/// Device memory owned by ckpt: for tests, benchmarks and callers without a
/// framework allocator. Freed on drop.
pub struct DeviceBuffer {
    device: Arc<CudaDevice>,
    ptr: sys::CUdeviceptr,
    len: usize,
}

impl std::fmt::Debug for DeviceBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("device", &self.device.ordinal)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .finish()
    }
}

impl DeviceBuffer {
    /// Allocates `len` bytes on `device` (contents unspecified until
    /// written; reading them is still sound, they are plain bytes).
    pub fn alloc(device: &Arc<CudaDevice>, len: usize) -> Result<Self> {
        let mut ptr: sys::CUdeviceptr = 0;
        if len > 0 {
            let _bound = device.bind()?;
            // SAFETY: `ptr` is a valid out-pointer; the context is bound.
            let r = unsafe { sys::cuMemAlloc_v2(&mut ptr, len) };
            device.check(&format!("cuMemAlloc of {len} bytes"), r)?;
        }
        Ok(Self {
            device: device.clone(),
            ptr,
            len,
        })
    }

    /// Allocates a buffer on `device` holding a copy of `data`.
    pub fn from_host(device: &Arc<CudaDevice>, data: &[u8]) -> Result<Self> {
        let mut buf = Self::alloc(device, data.len())?;
        buf.copy_from_host(data)?;
        Ok(buf)
    }

    /// Overwrites the whole buffer with `src` (of the same length) and
    /// returns once the copy has completed on the copy stream, so later
    /// saves read the new bytes.
    pub fn copy_from_host(&mut self, src: &[u8]) -> Result<()> {
        if src.len() != self.len {
            return Err(Error::InvalidInput(format!(
                "device buffer of {} bytes cannot take {} bytes",
                self.len,
                src.len()
            )));
        }
        if src.is_empty() {
            return Ok(());
        }
        let _bound = self.device.bind()?;
        // SAFETY: the allocation holds `len` bytes and lives as long as
        // `self`; `src` is borrowed for the call, which waits for the copy
        // to finish below before returning.
        let r = unsafe {
            sys::cuMemcpyHtoDAsync_v2(self.ptr, src.as_ptr().cast(), src.len(), self.device.stream)
        };
        self.device
            .check(&format!("cuMemcpyHtoDAsync of {} bytes", src.len()), r)?;
        // SAFETY: the device's stream is live. On failure the context is
        // unusable and no copy is left running.
        let r = unsafe { sys::cuStreamSynchronize(self.device.stream) };
        self.device.check("cuStreamSynchronize", r)
    }

    /// Copies the whole buffer into `dst` (of the same length).
    pub fn copy_to_host(&self, dst: &mut [u8]) -> Result<()> {
        if dst.len() != self.len {
            return Err(Error::InvalidInput(format!(
                "device buffer of {} bytes cannot fill a host buffer of {} bytes",
                self.len,
                dst.len()
            )));
        }
        self.device.copy_to_host(&mut [(self.source(), dst)])
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The device address.
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// The device it lives on.
    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The whole buffer as a save source, borrowed from it.
    pub fn source(&self) -> DeviceSource<'_> {
        // SAFETY: the allocation of `len` bytes is freed only in `Drop`, so
        // it outlives the borrow the source carries.
        unsafe { DeviceSource::from_raw(self.ptr, self.len) }
    }

    /// A tensor over the whole buffer.
    pub fn tensor(&self, name: impl Into<String>, dtype: DType, shape: &[u64]) -> DeviceTensor<'_> {
        DeviceTensor::new(name, dtype, shape, self.source())
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        if let Ok(_bound) = self.device.bind() {
            // SAFETY: allocated in `alloc`, freed once. Every copy that reads
            // it was waited for before its call returned.
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// A tensor in GPU memory: name, dtype, shape and a [`DeviceSource`]. Saved
/// like any [`TensorView`]; its bytes are copied from the device into the
/// staging pool during the save.
#[derive(Debug, Clone)]
pub struct DeviceTensor<'a> {
    spec: TensorSpec,
    shard: Option<ShardSpec>,
    source: DeviceSource<'a>,
}

impl<'a> DeviceTensor<'a> {
    /// A tensor over a device range.
    pub fn new(
        name: impl Into<String>,
        dtype: DType,
        shape: &[u64],
        source: DeviceSource<'a>,
    ) -> Self {
        Self {
            spec: TensorSpec::new(name, dtype, shape),
            shard: None,
            source,
        }
    }

    /// A tensor over a raw device address, e.g. a framework tensor's
    /// `data_ptr()` of `len` bytes.
    ///
    /// # Safety
    /// As for [`DeviceSource::from_raw`]: the range must be device memory
    /// of the checkpointer's GPU, allocated for `'a`, and not written while
    /// a save runs.
    pub unsafe fn from_raw(
        name: impl Into<String>,
        dtype: DType,
        shape: &[u64],
        ptr: u64,
        len: usize,
    ) -> Self {
        // SAFETY: the caller upholds `DeviceSource::from_raw`'s contract.
        let source = unsafe { DeviceSource::from_raw(ptr, len) };
        Self::new(name, dtype, shape, source)
    }

    /// Marks this tensor as one shard of a global tensor.
    pub fn with_shard(mut self, shard: ShardSpec) -> Self {
        self.shard = Some(shard);
        self
    }

    /// Where its bytes are.
    pub fn source(&self) -> DeviceSource<'a> {
        self.source
    }
}

impl TensorView for DeviceTensor<'_> {
    fn spec(&self) -> &TensorSpec {
        &self.spec
    }
    fn bytes(&self) -> TensorBytes<'_> {
        TensorBytes::Device(self.source)
    }
    fn shard(&self) -> Option<&ShardSpec> {
        self.shard.as_ref()
    }
}
