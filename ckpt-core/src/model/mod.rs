//! What a checkpoint holds: element types, tensor and shard specs, the
//! caller's tensor views, and the training state (tensors plus the loop
//! state a resumed run needs).

pub(crate) mod dtype;
pub(crate) mod spec;
pub(crate) mod state;
pub(crate) mod view;

pub use dtype::DType;
pub use spec::{MAX_DIMS, ShardSpec, TensorSpec, checked_nbytes, checked_numel};
pub use state::{LoopState, StateTensor, TensorRole, TrainingState, TrainingStateBuilder};
pub use view::{
    DeviceSource, IntoView, Pod, SharedTensor, TensorBytes, TensorMut, TensorRef, TensorView,
    TensorViewMut, as_bytes, as_bytes_mut,
};
