//! ckpt CLI.
fn main() {}
