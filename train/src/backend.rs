//! Backend selection: training code is generic over the Burn backend; this picks one at run
//! time (`--device cpu|cuda`).

use thiserror::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl std::str::FromStr for DeviceKind {
    type Err = BackendError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "cpu" => Ok(DeviceKind::Cpu),
            "cuda" => Ok(DeviceKind::Cuda),
            other => Err(BackendError::UnknownDevice(other.to_string())),
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

#[derive(Debug, Error)]
pub enum BackendError {
    #[error("unknown device '{0}' (expected cpu or cuda)")]
    UnknownDevice(String),
    #[error("this duet-train was built without the `cuda` feature; rebuild with `cargo build --release -p duet-train --features cuda`")]
    CudaNotCompiled,
    #[error("the CUDA backend could not start: {0}")]
    CudaUnavailable(String),
}

/// The CPU training backend.
#[cfg(not(feature = "flex"))]
pub type CpuBackend = burn::backend::Autodiff<burn::backend::NdArray<f32>>;
/// The CPU training backend of a `--features flex` build (burn-flex: `gemm` with rayon and
/// SIMD), kept to measure it against burn-ndarray on the same steps (`docs/TRAINING.md`).
#[cfg(feature = "flex")]
pub type CpuBackend = burn::backend::Autodiff<burn::backend::Flex>;

#[cfg(feature = "cuda")]
pub type CudaBackend = burn::backend::Autodiff<burn::backend::Cuda<f32, i32>>;

/// Checks that the CUDA backend really works on this machine before training starts: cubecl
/// panics when no driver or device is present, and a panic deep inside a training loop is not
/// an answer a user can act on.
#[cfg(feature = "cuda")]
pub fn probe_cuda() -> Result<burn::backend::cuda::CudaDevice, BackendError> {
    use burn::tensor::Tensor;
    if !std::path::Path::new("/dev/nvidia0").exists()
        && !std::path::Path::new("/dev/nvidiactl").exists()
    {
        return Err(BackendError::CudaUnavailable(
            "no NVIDIA device node (/dev/nvidia0) on this machine".into(),
        ));
    }
    let device = burn::backend::cuda::CudaDevice::default();
    let d = device.clone();
    let probe = std::panic::catch_unwind(move || {
        let t = Tensor::<burn::backend::Cuda<f32, i32>, 1>::ones([4], &d);
        t.sum().into_scalar()
    });
    match probe {
        Ok(v) if (v - 4.0).abs() < 1e-6 => Ok(device),
        Ok(v) => Err(BackendError::CudaUnavailable(format!(
            "probe computed {v}, expected 4"
        ))),
        Err(panic) => Err(BackendError::CudaUnavailable(panic_text(&panic))),
    }
}

#[cfg(feature = "cuda")]
fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}
