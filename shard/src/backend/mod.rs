//! Compute backends. The CPU backend is the default and the test target; the CUDA backend sits
//! beside it behind the same `PackedMatrix`/`matmul` surface as it grows (see docs/cuda.md).

pub mod cpu;
pub mod cuda;
