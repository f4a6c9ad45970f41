//! # ckpt-burn
//!
//! Asynchronous, verified [ckpt](ckpt_core) checkpoints of a [burn] module
//! and its optimizer, restored into a freshly initialized model and
//! optimizer so that training continues bit-exactly.
//!
//! Built against **burn 0.22.1** (`burn = { version = "=0.22.1" }`, the
//! newest release that builds with Rust 1.95).
//!
//! - The module's parameters are walked with burn's own
//!   [`ModuleVisitor`] and saved under their
//!   module path: `model.layers.0.weight`. Each is read once, in the form
//!   burn saves (`Param::transform_for_save`), into a host buffer that ckpt
//!   then flushes *by reference* ([`SharedTensor`]): no second copy into
//!   the staging pool.
//! - The optimizer's state comes from burn's
//!   [`OptimizerRecord`]: each state tensor is
//!   saved under the path of the parameter it belongs to,
//!   `optimizer.layers.0.weight.momentum.moment_1`, and its scalars (Adam's
//!   step count, ...) in a small JSON tensor `burn.meta` beside the
//!   parameter ids, so the optimizer's per-parameter state finds its
//!   parameters again after a restart.
//! - The loop state (step, data-loader position, RNG, LR schedule) is the
//!   caller's, added to the [`TrainingStateBuilder`] that
//!   [`BurnSnapshot::state`] returns, as with any ckpt save.
//!
//! ```
//! use burn::module::Module;
//! use burn::nn::{Linear, LinearConfig};
//! use burn::optim::{AdamConfig, GradientsParams};
//! use burn::tensor::{Device, Tensor};
//! use ckpt_core::{Checkpointer, MemoryTier, TierPolicy};
//! use std::sync::Arc;
//!
//! let device = Device::default().autodiff();
//! let mut model: Linear = LinearConfig::new(4, 2).init(&device);
//! let mut optim = AdamConfig::new().init();
//! let x = Tensor::<2>::ones([3, 4], &device);
//! let grads = GradientsParams::from_grads(model.forward(x.clone()).sum().backward(), &model);
//! model = optim.step(1e-2, model, grads);
//!
//! let tier = Arc::new(MemoryTier::new());
//! let ckpt = Checkpointer::builder("doc").tier(tier, TierPolicy::keep_last(2)).build()?;
//! let snap = ckpt_burn::BurnSnapshot::capture(&model, &optim)?;
//! let state = snap.state(1).rng(&7u64).data_loader(&3u64).lr_schedule(&1e-2).build()?;
//! ckpt.save(&state)?.wait()?;
//!
//! // A fresh process: a new model and optimizer, then the checkpoint.
//! let fresh: Linear = LinearConfig::new(4, 2).init(&device);
//! let back = ckpt_burn::restore(&ckpt, fresh, AdamConfig::new().init())?.expect("a checkpoint");
//! assert_eq!(back.restored.step, 1);
//! assert_eq!(back.model.weight.val().into_data(), model.weight.val().into_data());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::{ModuleOptimizer, OptimizerRecord};
use burn::tensor::{BoolStore, Bytes as BurnBytes, DType as BurnDType, Tensor, TensorData};
use burn_pack::Scalar;
use ckpt_core::{
    CheckpointStore, Checkpointer, DType, Error, RestoreOptions, Restored, Result, SharedTensor,
    TensorMut, TensorRole, TensorView, TensorViewMut, TrainingState, TrainingStateBuilder,
};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The burn crate this integration is built against (0.22.1), for the
/// derive macros and types of code that reaches burn through ckpt.
pub use burn;

/// Prefix of the module's parameters in ckpt's tensor names.
pub const MODEL_PREFIX: &str = "model.";
/// Prefix of the optimizer's state tensors.
pub const OPTIMIZER_PREFIX: &str = "optimizer.";
/// The tensor holding the parameter ids and the optimizer's scalars (JSON).
pub const META_TENSOR: &str = "burn.meta";

/// What ckpt keeps beside the tensors to rebuild burn's records.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Meta {
    /// Layout version of this record.
    version: u32,
    /// Parameter id of each module path: burn's optimizer state is keyed
    /// by id, so a restored parameter gets its old id back.
    params: BTreeMap<String, u64>,
    /// ckpt tensor name → (burn's record name, parameter id) of each
    /// optimizer state tensor.
    optimizer: BTreeMap<String, (String, Option<u64>)>,
    /// The optimizer record's scalars (step counts, parameter ranks).
    scalars: BTreeMap<String, Scalar>,
    /// The optimizer record's string metadata (parameter group paths).
    metadata: BTreeMap<String, String>,
    /// Whether an optimizer was captured at all.
    with_optimizer: bool,
}

const META_VERSION: u32 = 1;

/// A burn module (and optimizer) read into host memory, ready to save.
///
/// Capturing reads every tensor once (burn gives no borrowed view of a
/// backend's storage); [`state`](Self::state) hands the buffers to ckpt by
/// reference, so the save itself copies nothing more and its math-stop is
/// the bookkeeping only. The snapshot can be dropped as soon as `save`
/// returns: the flush holds its own references.
#[derive(Debug, Clone)]
pub struct BurnSnapshot {
    model: Vec<SharedTensor>,
    optimizer: Vec<SharedTensor>,
    meta: SharedTensor,
    nbytes: u64,
}

impl BurnSnapshot {
    /// Reads `model`'s parameters and `optim`'s state.
    pub fn capture<M: Module>(model: &M, optim: &ModuleOptimizer) -> Result<Self> {
        Self::build(model, Some(optim))
    }

    /// Reads `model`'s parameters only (inference, evaluation, or an
    /// optimizer whose state lives elsewhere).
    pub fn capture_model<M: Module>(model: &M) -> Result<Self> {
        Self::build(model, None)
    }

    fn build<M: Module>(model: &M, optim: Option<&ModuleOptimizer>) -> Result<Self> {
        let mut collector = Collector::default();
        model.visit(&mut collector);
        if let Some(e) = collector.error {
            return Err(e);
        }
        let mut meta = Meta {
            version: META_VERSION,
            params: collector.ids.clone(),
            with_optimizer: optim.is_some(),
            ..Meta::default()
        };
        let mut nbytes: u64 = collector.tensors.iter().map(|t| t.1.len() as u64).sum();
        let mut optimizer = Vec::new();
        if let Some(optim) = optim {
            let by_id: BTreeMap<u64, &str> = collector
                .ids
                .iter()
                .map(|(path, id)| (*id, path.as_str()))
                .collect();
            let record = optim.to_record();
            let reader = burn_pack::Reader::from_bytes(
                record
                    .into_bytes()
                    .map_err(|e| Error::InvalidInput(format!("burn optimizer record: {e}")))?,
            )
            .map_err(|e| Error::InvalidInput(format!("burn optimizer record: {e}")))?;
            meta.scalars = reader.scalars().clone();
            meta.metadata = reader.metadata().clone();
            let tensors = reader
                .into_tensors()
                .map_err(|e| Error::InvalidInput(format!("burn optimizer record: {e}")))?;
            for t in tensors {
                let (name, dtype, shape, param_id, bytes) = t
                    .into_parts()
                    .map_err(|e| Error::InvalidInput(format!("burn optimizer record: {e}")))?;
                let ckpt_name = optimizer_name(&name, param_id, &by_id);
                let dtype = to_ckpt_dtype(&ckpt_name, dtype)?;
                let shape: Vec<u64> = shape.iter().map(|d| *d as u64).collect();
                nbytes += bytes.len() as u64;
                optimizer.push(SharedTensor::new(
                    ckpt_name.clone(),
                    dtype,
                    &shape,
                    shared(bytes),
                ));
                meta.optimizer.insert(ckpt_name, (name, param_id));
            }
        }
        // burn keeps the optimizer's state in a hash map: its order
        // changes from process to process, ckpt's does not.
        optimizer.sort_by(|a, b| a.spec().name.cmp(&b.spec().name));
        let model = collector
            .tensors
            .into_iter()
            .map(|(spec, data)| SharedTensor::new(spec.0, spec.1, &spec.2, data))
            .collect();
        let json = serde_json::to_vec(&meta)
            .map_err(|e| Error::Internal(format!("burn meta as JSON: {e}")))?;
        let meta = SharedTensor::new(
            META_TENSOR,
            DType::U8,
            &[json.len() as u64],
            bytes::Bytes::from(json),
        );
        Ok(Self {
            model,
            optimizer,
            meta,
            nbytes,
        })
    }

    /// A [`TrainingState`] builder at `step` holding the module's
    /// parameters (role model), the optimizer's state (role optimizer) and
    /// the `burn.meta` record (role other). Add the loop state (`rng`,
    /// `data_loader`, `lr_schedule`) and `build()`.
    pub fn state(&self, step: u64) -> TrainingStateBuilder<'_> {
        let b = TrainingState::builder(step).model(self.model.iter());
        let b = if self.optimizer.is_empty() {
            b.without_optimizer()
        } else {
            b.optimizer(self.optimizer.iter())
        };
        b.other([&self.meta])
    }

    /// Bytes of tensor data captured (parameters and optimizer state).
    pub fn nbytes(&self) -> u64 {
        self.nbytes
    }

    /// The captured tensors, parameters first, then the optimizer's state
    /// (without `burn.meta`).
    pub fn tensors(&self) -> impl Iterator<Item = &SharedTensor> {
        self.model.iter().chain(&self.optimizer)
    }

    /// The ckpt names of the captured tensors, parameters first.
    pub fn tensor_names(&self) -> Vec<&str> {
        self.tensors().map(|t| t.spec().name.as_str()).collect()
    }
}

/// A [`BurnSnapshot`] being captured on a thread of its own
/// ([`BurnSnapshot::capture_in_background`]).
pub struct PendingSnapshot {
    handle: std::thread::JoinHandle<Result<BurnSnapshot>>,
}

impl PendingSnapshot {
    /// Whether the capture has finished ([`wait`](Self::wait) then returns
    /// at once).
    pub fn is_ready(&self) -> bool {
        self.handle.is_finished()
    }

    /// The snapshot, once captured.
    pub fn wait(self) -> Result<BurnSnapshot> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(Error::Internal("the burn capture thread panicked".into())))
    }
}

impl BurnSnapshot {
    /// Captures `model` and `optim` (clones of the training loop's, which
    /// cost a reference count per tensor) on a thread of its own, while
    /// training goes on.
    ///
    /// This is safe because burn's tensors are values: an operation never
    /// writes a buffer another tensor still holds (it reuses a buffer in
    /// place only when it is the buffer's sole owner), so the clones keep
    /// this step's parameters and optimizer state while the loop's
    /// optimizer step makes new ones. The memory cost is one step's state
    /// held until the capture is done. Save the snapshot with the loop
    /// state of the step it was taken at.
    pub fn capture_in_background<M: Module + 'static>(
        model: M,
        optim: ModuleOptimizer,
    ) -> Result<PendingSnapshot> {
        let handle = std::thread::Builder::new()
            .name("ckpt-burn-capture".into())
            .spawn(move || BurnSnapshot::capture(&model, &optim))
            .map_err(|e| Error::Internal(format!("cannot start the capture thread: {e}")))?;
        Ok(PendingSnapshot { handle })
    }
}

/// A module and optimizer brought back from a checkpoint.
pub struct Resumed<M> {
    /// The module, with the saved parameters (and their ids).
    pub model: M,
    /// The optimizer, with the saved state.
    pub optimizer: ModuleOptimizer,
    /// What ckpt restored: the step, the loop state, the tier, what was
    /// skipped.
    pub restored: Restored,
}

/// Restores the newest verified checkpoint of `ckpt`'s run into `model`
/// and `optim` (freshly initialized, as at the start of training).
/// `Ok(None)`: no tier holds a checkpoint of the run (a fresh start).
///
/// Every parameter of `model` must be in the checkpoint with its shape
/// and dtype (an [`Error::TensorMismatch`] names the first that is not);
/// parameters the checkpoint has and `model` lacks are reported in
/// `restored.unrequested`.
pub fn restore<M: Module>(
    ckpt: &Checkpointer,
    model: M,
    optim: ModuleOptimizer,
) -> Result<Option<Resumed<M>>> {
    restore_with(ckpt, model, optim, &RestoreOptions::default())
}

/// [`restore`] with options (a given step, a trust limit).
pub fn restore_with<M: Module>(
    ckpt: &Checkpointer,
    model: M,
    optim: ModuleOptimizer,
    opts: &RestoreOptions,
) -> Result<Option<Resumed<M>>> {
    // The optimizer's state tensors are not known before the checkpoint
    // is read (a fresh optimizer has none): their names, dtypes and shapes
    // come from the manifest of the step the restore will look at first.
    let Some(layout) = peek_layout(ckpt, opts)? else {
        return Ok(None);
    };
    let mut buffers: Vec<(String, DType, Vec<u64>, Vec<u8>)> = layout
        .into_iter()
        .map(|(name, dtype, shape)| {
            let n = ckpt_core::checked_nbytes(&shape, dtype)
                .ok_or_else(|| Error::tensor(&name, "shape overflows"))?;
            let len = usize::try_from(n).map_err(|_| Error::tensor(&name, "too large"))?;
            Ok((name, dtype, shape, vec![0u8; len]))
        })
        .collect::<Result<_>>()?;
    let mut views: Vec<TensorMut<'_>> = buffers
        .iter_mut()
        .map(|(name, dtype, shape, data)| TensorMut::new(name.clone(), *dtype, shape, data))
        .collect();
    let mut targets: Vec<&mut dyn TensorViewMut> = views
        .iter_mut()
        .map(|v| v as &mut dyn TensorViewMut)
        .collect();
    let Some(restored) = ckpt.restore_with(&mut targets, opts)? else {
        return Ok(None);
    };
    drop(targets);
    drop(views);

    let mut meta = None;
    let mut params = BTreeMap::new();
    let mut opt_tensors = BTreeMap::new();
    for (name, dtype, shape, data) in buffers {
        if name == META_TENSOR {
            meta = Some(
                serde_json::from_slice::<Meta>(&data)
                    .map_err(|e| Error::tensor(META_TENSOR, format!("not a burn record: {e}")))?,
            );
        } else if let Some(path) = name.strip_prefix(MODEL_PREFIX) {
            params.insert(path.to_string(), (dtype, shape, data));
        } else {
            opt_tensors.insert(name, (dtype, shape, data));
        }
    }
    let meta = meta.ok_or_else(|| {
        Error::tensor(
            META_TENSOR,
            format!(
                "step {} has no {META_TENSOR}: it was not saved by ckpt-burn",
                restored.step
            ),
        )
    })?;
    if meta.version > META_VERSION {
        return Err(Error::tensor(
            META_TENSOR,
            format!(
                "layout version {} is newer than this ckpt-burn ({META_VERSION})",
                meta.version
            ),
        ));
    }

    let mut loader = Loader {
        path: Vec::new(),
        tensors: params,
        ids: meta.params.clone(),
        error: None,
    };
    let model = model.map(&mut loader);
    if let Some(e) = loader.error {
        return Err(e);
    }

    let optimizer = if meta.with_optimizer {
        let mut tensors = Vec::with_capacity(opt_tensors.len());
        for (name, (burn_name, param_id)) in &meta.optimizer {
            let (dtype, shape, data) = opt_tensors.remove(name).ok_or_else(|| {
                Error::tensor(name, format!("named in {META_TENSOR} but not restored"))
            })?;
            tensors.push(burn_pack::Tensor::new(
                burn_name.clone(),
                to_burn_dtype(dtype),
                shape.iter().map(|d| *d as usize).collect::<Vec<_>>(),
                *param_id,
                BurnBytes::from_bytes_vec(data),
            ));
        }
        let mut writer = burn_pack::Writer::new(tensors);
        for (k, v) in &meta.scalars {
            writer = writer.with_scalar(k, *v);
        }
        for (k, v) in &meta.metadata {
            writer = writer.with_metadata(k, v);
        }
        let bytes = writer
            .into_bytes()
            .map_err(|e| Error::Internal(format!("burn optimizer record: {e}")))?;
        let record = OptimizerRecord::from_bytes(bytes)
            .map_err(|e| Error::Internal(format!("burn optimizer record: {e}")))?;
        optim.load_record(record)
    } else {
        optim
    };
    Ok(Some(Resumed {
        model,
        optimizer,
        restored,
    }))
}

/// The tensors ckpt-burn restores from the step a restore with `opts`
/// looks at first: the newest committed step of the first tier that has
/// one (or the given step). A restore that falls back to an older step
/// finds the same tensors there (a model's and its optimizer's tensors
/// do not change between steps of one run).
fn peek_layout(ckpt: &Checkpointer, opts: &RestoreOptions) -> Result<Option<Vec<Spec>>> {
    let mut last_err = None;
    let mut best: Option<ckpt_core::Manifest> = None;
    for tier in ckpt.tiers() {
        let store = CheckpointStore::new(tier)?;
        let steps = match store.steps(ckpt.run()) {
            Ok(s) => s,
            Err(e) => {
                last_err = Some(e);
                continue;
            }
        };
        let step = match opts.step {
            Some(s) if steps.contains(&s) => s,
            Some(_) => continue,
            None => match steps.last() {
                Some(s) => *s,
                None => continue,
            },
        };
        if best.as_ref().is_some_and(|m| m.step >= step) {
            continue;
        }
        match store.manifest(ckpt.run(), step) {
            Ok(m) => best = Some(m),
            Err(e) => last_err = Some(e),
        }
    }
    match best {
        Some(m) => Ok(Some(
            m.tensors
                .into_iter()
                .filter(|(name, e)| {
                    name.starts_with(MODEL_PREFIX)
                        || name == META_TENSOR
                        || (e.role == TensorRole::Optimizer && name.starts_with(OPTIMIZER_PREFIX))
                })
                .map(|(name, e)| (name, e.dtype, e.shape))
                .collect(),
        )),
        None => match last_err {
            // A store nobody can list is an error, not a fresh start.
            Some(e) => Err(e),
            None => Ok(None),
        },
    }
}

/// ckpt's name for an optimizer state tensor: burn names it
/// `<param id>.<field>`; ckpt uses the parameter's module path instead,
/// which is stable across restarts and readable.
fn optimizer_name(burn_name: &str, param_id: Option<u64>, by_id: &BTreeMap<u64, &str>) -> String {
    if let Some(id) = param_id
        && let Some(path) = by_id.get(&id)
    {
        let field = burn_name
            .strip_prefix(&format!("{id}."))
            .unwrap_or(burn_name);
        return format!("{OPTIMIZER_PREFIX}{path}.{field}");
    }
    format!("{OPTIMIZER_PREFIX}{burn_name}")
}

fn shared(bytes: BurnBytes) -> bytes::Bytes {
    bytes::Bytes::from_owner(Owned(bytes))
}

/// burn's bytes kept alive for as long as ckpt flushes them.
struct Owned(BurnBytes);

impl AsRef<[u8]> for Owned {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

fn to_ckpt_dtype(name: &str, d: BurnDType) -> Result<DType> {
    Ok(match d {
        BurnDType::F64 => DType::F64,
        BurnDType::F32 => DType::F32,
        BurnDType::F16 => DType::F16,
        BurnDType::BF16 => DType::BF16,
        BurnDType::I64 => DType::I64,
        BurnDType::I32 => DType::I32,
        BurnDType::I16 => DType::I16,
        BurnDType::I8 => DType::I8,
        BurnDType::U64 => DType::U64,
        BurnDType::U32 => DType::U32,
        BurnDType::U16 => DType::U16,
        BurnDType::U8 => DType::U8,
        BurnDType::Bool(BoolStore::Native) => DType::Bool,
        other => {
            return Err(Error::tensor(
                name,
                format!("burn dtype {other:?} has no ckpt equivalent (cast it to a plain type)"),
            ));
        }
    })
}

fn to_burn_dtype(d: DType) -> BurnDType {
    match d {
        DType::F64 => BurnDType::F64,
        DType::F32 => BurnDType::F32,
        DType::F16 => BurnDType::F16,
        DType::BF16 => BurnDType::BF16,
        DType::I64 => BurnDType::I64,
        DType::I32 => BurnDType::I32,
        DType::I16 => BurnDType::I16,
        DType::I8 => BurnDType::I8,
        DType::U64 => BurnDType::U64,
        DType::U32 => BurnDType::U32,
        DType::U16 => BurnDType::U16,
        DType::Bool => BurnDType::Bool(BoolStore::Native),
        _ => BurnDType::U8,
    }
}

type Spec = (String, DType, Vec<u64>);

/// Reads each parameter once, in burn's save form, keyed by module path.
#[derive(Default)]
struct Collector {
    path: Vec<String>,
    tensors: Vec<(Spec, bytes::Bytes)>,
    ids: BTreeMap<String, u64>,
    error: Option<Error>,
}

impl Collector {
    fn record(&mut self, id: ParamId, data: impl FnOnce() -> TensorData) {
        if self.error.is_some() {
            return;
        }
        let path = self.path.join(".");
        let name = format!("{MODEL_PREFIX}{path}");
        let data = data();
        let dtype = match to_ckpt_dtype(&name, data.dtype()) {
            Ok(d) => d,
            Err(e) => {
                self.error = Some(e);
                return;
            }
        };
        let shape: Vec<u64> = data.shape().iter().map(|d| *d as u64).collect();
        if self.ids.insert(path, id.val()).is_some() {
            self.error = Some(Error::tensor(&name, "two parameters have this module path"));
            return;
        }
        self.tensors
            .push(((name, dtype, shape), shared(data.into_bytes())));
    }
}

impl ModuleVisitor for Collector {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.record(param.id, || param.transform_for_save().val().into_data());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<D, burn::tensor::Int>>) {
        self.record(param.id, || param.transform_for_save().val().into_data());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<D, burn::tensor::Bool>>) {
        self.record(param.id, || param.transform_for_save().val().into_data());
    }
}

/// Puts the restored bytes back into each parameter, with its saved id.
struct Loader {
    path: Vec<String>,
    tensors: BTreeMap<String, (DType, Vec<u64>, Vec<u8>)>,
    ids: BTreeMap<String, u64>,
    error: Option<Error>,
}

impl Loader {
    fn take(&mut self, shape: &[usize]) -> Option<(TensorData, ParamId)> {
        if self.error.is_some() {
            return None;
        }
        let path = self.path.join(".");
        let name = format!("{MODEL_PREFIX}{path}");
        let Some((dtype, saved_shape, data)) = self.tensors.remove(&path) else {
            self.error = Some(Error::tensor(
                &name,
                "the model has this parameter; the checkpoint does not",
            ));
            return None;
        };
        let want: Vec<u64> = shape.iter().map(|d| *d as u64).collect();
        if want != saved_shape {
            self.error = Some(Error::tensor(
                &name,
                format!("shape {want:?} in the model, {saved_shape:?} in the checkpoint"),
            ));
            return None;
        }
        let Some(id) = self.ids.get(&path) else {
            self.error = Some(Error::tensor(
                &name,
                format!("no parameter id in {META_TENSOR}"),
            ));
            return None;
        };
        let data = TensorData::from_bytes_vec(data, shape.to_vec(), to_burn_dtype(dtype));
        Some((data, ParamId::from(*id)))
    }
}

macro_rules! load_kind {
    ($method:ident, $kind:ty) => {
        fn $method<const D: usize>(
            &mut self,
            param: Param<Tensor<D, $kind>>,
        ) -> Param<Tensor<D, $kind>> {
            let device = param.lazy_device();
            let shape = param.lazy_shape();
            match self.take(&shape) {
                Some((data, id)) => {
                    let tensor = Tensor::<D, $kind>::from_data(data, &device);
                    param.transform_for_load(tensor, id)
                }
                None => param,
            }
        }
    };
}

impl ModuleMapper for Loader {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    load_kind!(map_float, burn::tensor::Float);
    load_kind!(map_int, burn::tensor::Int);
    load_kind!(map_bool, burn::tensor::Bool);
}
