//! Checkpoint interval scheduling.

mod formulas;
mod rng;

pub use formulas::*;
pub use rng::{Rng, splitmix64};
