//! What one rank saves at one step: model and optimizer tensors plus the
//! loop state a resumed run needs (step, RNG, data-loader position, LR
//! schedule).
//!
//! The builder makes the complete state the easy path: leaving out the
//! optimizer, the RNG, the data-loader position or the LR schedule is an
//! error unless the caller says so explicitly (`without_*`), because a
//! checkpoint missing any of them silently changes the resumed run. Every
//! setter is infallible; [`TrainingStateBuilder::build`] reports the first
//! problem.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::spec::checked_nbytes;
use crate::model::view::{IntoView, TensorView};

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
    ///     .model([&w])
    ///     .optimizer([&m, &v])
    ///     .rng(&[1u64, 2, 3, 4])
    ///     .data_loader(&(0u32, 640u64))
    ///     .lr_schedule(&3e-4f64)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(state.step(), 10);
    ///
    /// // Forgetting the optimizer is an error, not a silent omission.
    /// let err = TrainingState::builder(10).model([&w]).without_rng()
    ///     .without_data_loader().without_lr_schedule().build().unwrap_err();
    /// assert!(matches!(err, ckpt_core::Error::InvalidInput(m) if m.contains("optimizer")));
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
            extra: Ok(Value::Null),
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
        self.tensors
            .iter()
            .map(|t| t.view.bytes().len() as u64)
            .sum()
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
            let len = v.bytes().len();
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
    Present(Result<Value>),
}

impl Declared {
    fn into_value(self, what: &str, how: &str) -> Result<Value> {
        match self {
            Declared::Missing => Err(Error::InvalidInput(format!(
                "training state has no {what}: call .{how}(..) or, if the run truly has none, .without_{how}()"
            ))),
            Declared::Absent => Ok(Value::Null),
            Declared::Present(v) => v,
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
    extra: Result<Value>,
}

impl<'a> TrainingStateBuilder<'a> {
    fn push<V: IntoView<'a>>(
        mut self,
        role: TensorRole,
        views: impl IntoIterator<Item = V>,
    ) -> Self {
        self.tensors.extend(views.into_iter().map(|v| StateTensor {
            role,
            view: v.into_view(),
        }));
        self
    }

    /// Adds model tensors: references to any [`TensorView`]
    /// (`.model([&w1, &w2])`), or `&dyn TensorView`s for a mix of types.
    pub fn model<V: IntoView<'a>>(mut self, views: impl IntoIterator<Item = V>) -> Self {
        self.has_model = true;
        self.push(TensorRole::Model, views)
    }

    /// Adds optimizer tensors (e.g. Adam's first and second moments).
    pub fn optimizer<V: IntoView<'a>>(mut self, views: impl IntoIterator<Item = V>) -> Self {
        if !matches!(self.optimizer, Declared::Present(_)) {
            self.optimizer = Declared::Present(Ok(Value::Bool(true)));
        }
        self.push(TensorRole::Optimizer, views)
    }

    /// Declares that the run has no optimizer state (plain SGD).
    pub fn without_optimizer(mut self) -> Self {
        self.optimizer = Declared::Absent;
        self
    }

    /// Adds other tensors to restore bit-exact.
    pub fn other<V: IntoView<'a>>(self, views: impl IntoIterator<Item = V>) -> Self {
        self.push(TensorRole::Other, views)
    }

    /// Records the RNG state (any serde type).
    pub fn rng<T: Serialize + ?Sized>(mut self, rng: &T) -> Self {
        self.rng = Declared::Present(encode("rng", rng));
        self
    }

    /// Declares that the run uses no random numbers.
    pub fn without_rng(mut self) -> Self {
        self.rng = Declared::Absent;
        self
    }

    /// Records the data-loader position (any serde type).
    pub fn data_loader<T: Serialize + ?Sized>(mut self, pos: &T) -> Self {
        self.data_loader = Declared::Present(encode("data_loader", pos));
        self
    }

    /// Declares that the run has no data-loader position to keep.
    pub fn without_data_loader(mut self) -> Self {
        self.data_loader = Declared::Absent;
        self
    }

    /// Records the learning-rate schedule state (any serde type).
    pub fn lr_schedule<T: Serialize + ?Sized>(mut self, s: &T) -> Self {
        self.lr_schedule = Declared::Present(encode("lr_schedule", s));
        self
    }

    /// Declares that the learning rate is constant.
    pub fn without_lr_schedule(mut self) -> Self {
        self.lr_schedule = Declared::Absent;
        self
    }

    /// Declares that the run has no loop state to keep: no RNG, no
    /// data-loader position, no LR schedule (benchmarks, tests, inference
    /// caches). A training loop almost always has all three.
    pub fn without_loop_state(self) -> Self {
        self.without_rng()
            .without_data_loader()
            .without_lr_schedule()
    }

    /// Records anything else as JSON.
    pub fn extra<T: Serialize + ?Sized>(mut self, extra: &T) -> Self {
        self.extra = encode("extra", extra);
        self
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
            extra: self.extra?,
        };
        let state = TrainingState {
            tensors: self.tensors,
            loop_state,
        };
        state.validate()?;
        Ok(state)
    }
}
