//! What the examples share: the model (a two-layer network and an
//! embedding table, with Adam, sharded over any number of ranks), the
//! synthetic data set and its loader, the learning-rate schedule, and
//! logging. The quickstart is the one-rank case of the multi-rank job.

#![allow(dead_code)]

pub mod data;
pub mod model;

/// Logs to stderr, filtered by `CKPT_LOG` (default `warn`), in colour only
/// on a terminal.
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CKPT_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

/// Milliseconds, for reports.
pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
