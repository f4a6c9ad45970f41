//! What a checkpoint holds: element types, tensor and shard specs, the
//! caller's tensor views, and the training state (tensors plus the loop
//! state a resumed run needs).

pub(crate) mod dtype;
pub(crate) mod spec;
pub(crate) mod state;

pub use dtype::DType;
pub use spec::{MAX_DIMS, ShardSpec, TensorSpec, checked_nbytes, checked_numel};
pub use state::*;
