//! The CUDA backend's pieces that stand without a GPU model path yet: device discovery, the CUDA C
//! kernels and their NVRTC compilation with an on-disk cache, launch geometry, and the packing of a
//! step's ragged-batch metadata. cudarc loads the driver and NVRTC at run time, so none of this
//! needs CUDA to build. What is verified without a GPU, and what is not, is in docs/cuda.md.

pub mod device;
pub mod kernels;
pub mod launch;
pub mod metadata;
pub mod nvrtc;

pub use device::{probe, GpuInfo, Probe};
