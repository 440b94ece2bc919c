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
        Err(panic) => Err(BackendError::CudaUnavailable(crate::parallel::panic_text(
            &panic,
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::CpuBackend;
    use burn::tensor::{Tensor, TensorData};

    /// Values whose reciprocals are not exact in binary, so an approximation shows.
    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| 3.0 + i as f32 * 0.37).collect()
    }

    /// burn-ndarray's `simd` feature computes `recip` with the CPU's reciprocal *estimate*
    /// (`rcp_ps`, 12 bits) on the vector-aligned middle of a buffer and exactly on its ends, so
    /// the gradient of every division and logarithm was off by up to 4e-4 and depended on where
    /// the allocator put the buffer: the same seed trained different weights in different
    /// processes. The CPU backend is built without it (workspace Cargo.toml); this pins that
    /// reciprocals, forward and in the gradients of `a / b` and `ln x`, are exact at every
    /// alignment.
    #[test]
    fn reciprocals_are_exact_at_every_alignment() {
        let device = Default::default();
        for offset in 0..8 {
            for n in [33, 40, 67] {
                let all = values(offset + n);
                let exact: Vec<f32> = all[offset..].iter().map(|x| 1.0 / x).collect();
                let x = Tensor::<CpuBackend, 1>::from_data(
                    TensorData::new(all.clone(), [offset + n]),
                    &device,
                )
                .slice(burn::tensor::s![offset..offset + n])
                .require_grad();
                let recip: Vec<f32> = x.clone().recip().into_data().to_vec().unwrap();
                assert_eq!(recip, exact, "recip at offset {offset}, n {n}");

                let a = Tensor::<CpuBackend, 1>::ones([n], &device).require_grad();
                let grads = (a.clone() / x.clone()).sum().backward();
                let da: Vec<f32> = a.grad(&grads).unwrap().into_data().to_vec().unwrap();
                assert_eq!(da, exact, "d(a/x)/da at offset {offset}, n {n}");

                let grads = x.clone().log().sum().backward();
                let dx: Vec<f32> = x.grad(&grads).unwrap().into_data().to_vec().unwrap();
                assert_eq!(dx, exact, "d(ln x)/dx at offset {offset}, n {n}");
            }
        }
    }
}
