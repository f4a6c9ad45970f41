//! Helpers shared by the tests of ckpt-core and ckpt-io (included with
//! `#[path]`): a small training state and its save.
#![allow(dead_code)]

use ckpt_core::{Checkpointer, SaveHandle, TensorRef, TrainingState};

/// Saves a state of one model tensor `w` and one optimizer tensor `opt.m`
/// (1-D), with loop state derived from `step`; returns the handle.
pub fn save_w_m(ckpt: &Checkpointer, step: u64, w: &[f32], m: &[f32]) -> SaveHandle {
    let tw = TensorRef::from_slice("w", &[w.len() as u64], w);
    let tm = TensorRef::from_slice("opt.m", &[m.len() as u64], m);
    let state = TrainingState::builder(step)
        .model([&tw])
        .optimizer([&tm])
        .rng(&[step, 7])
        .data_loader(&(step * 32))
        .lr_schedule(&0.01)
        .build()
        .expect("state");
    ckpt.save(&state).expect("save")
}
