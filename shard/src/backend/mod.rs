//! Compute backends. The CPU backend is the default and the test target; a CUDA backend will sit
//! beside it behind the same `PackedMatrix`/`matmul` surface.

pub mod cpu;
