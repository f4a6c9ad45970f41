//! ckpt-bench.
fn main() {}
