//! `tessera-shard`: the shard process entry point.
fn main() {}
