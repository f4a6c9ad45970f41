//! What the examples share: the model (a two-layer network and an
//! embedding table, with Adam, sharded over any number of ranks), the
//! synthetic data set and its loader, the learning-rate schedule, and
//! logging. The quickstart is the one-rank case of the multi-rank job.

#![allow(dead_code)]

pub mod data;
pub mod model;

/// Logs to stderr, filtered by `CKPT_LOG` (default `warn`).
pub fn init_logging() {
    ckpt::log_to_stderr();
}

/// Milliseconds, for reports.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
