//! GPU discovery through the CUDA driver API, without creating a context: is `libcuda` loadable,
//! does `cuInit` succeed, and what are the devices (name, compute capability, memory, SMs).
//! Never panics: cudarc's dynamic loader panics on a missing library, so presence is checked first.

use std::fmt;

use cudarc::driver::{result, sys};

use super::nvrtc::Arch;

/// One visible GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub ordinal: usize,
    pub name: String,
    pub arch: Arch,
    pub total_mem: usize,
    pub sm_count: usize,
}

impl fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GPU {} ({}, compute capability {}.{}, {:.1} GiB, {} SMs)",
            self.ordinal,
            self.name,
            self.arch.major,
            self.arch.minor,
            self.total_mem as f64 / (1u64 << 30) as f64,
            self.sm_count
        )
    }
}

/// What the driver reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `libcuda.so` could not be loaded.
    NoDriver,
    /// The driver loaded but offers no usable GPU; the reason is the driver's error.
    NoGpu(String),
    Gpus(Vec<GpuInfo>),
}

/// Asks the driver for its GPUs.
pub fn probe() -> Probe {
    // SAFETY: dlopen of the driver library; dropped at once if found.
    if !unsafe { sys::is_culib_present() } {
        return Probe::NoDriver;
    }
    match list_gpus() {
        Ok(gpus) if gpus.is_empty() => Probe::NoGpu("no CUDA devices".into()),
        Ok(gpus) => Probe::Gpus(gpus),
        Err(e) => Probe::NoGpu(format!("{e:?}")),
    }
}

fn list_gpus() -> Result<Vec<GpuInfo>, result::DriverError> {
    result::init()?;
    let count = result::device::get_count()?;
    (0..count).map(gpu_info).collect()
}

fn gpu_info(ordinal: i32) -> Result<GpuInfo, result::DriverError> {
    use sys::CUdevice_attribute::*;
    let dev = result::device::get(ordinal)?;
    // SAFETY: `dev` is a device handle the driver just returned.
    let attr = |a| unsafe { result::device::get_attribute(dev, a) }.map(|v| v.max(0) as u32);
    Ok(GpuInfo {
        ordinal: ordinal as usize,
        name: result::device::get_name(dev)?,
        arch: Arch {
            major: attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            minor: attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        },
        // SAFETY: as above.
        total_mem: unsafe { result::device::total_mem(dev) }?,
        sm_count: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_info_reads_as_one_line() {
        let gpu = GpuInfo {
            ordinal: 0,
            name: "NVIDIA H200".into(),
            arch: Arch::SM90,
            total_mem: 150_000_000_000,
            sm_count: 132,
        };
        assert_eq!(
            gpu.to_string(),
            "GPU 0 (NVIDIA H200, compute capability 9.0, 139.7 GiB, 132 SMs)"
        );
    }

    #[test]
    fn probing_never_panics() {
        // On a CPU machine: NoDriver (or NoGpu in a container with a stub driver).
        match probe() {
            Probe::NoDriver | Probe::NoGpu(_) => {}
            Probe::Gpus(gpus) => assert!(!gpus.is_empty()),
        }
    }
}
