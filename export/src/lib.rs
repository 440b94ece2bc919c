//! duet-export: build ONNX graphs from trained duet weights, verify parity, write bundles.
//!
//! - [`onnx`]: the graph builder and the graphs (vision encoder, caption decoder).
//! - [`parity`]: Burn vs onnxruntime vs tract on the same inputs.
//! - [`bundle`]: a run directory → a verified bundle directory (`duet-export`).
//! - [`quantize`]: fp16 and int8 variants of a bundle's graphs (`duet-export quantize`).
//! - [`import`]: a bundle's captioner → a run to fine-tune (`duet-export import`).

pub mod bundle;
pub mod import;
pub mod onnx;
pub mod parity;
pub mod quantize;

pub use bundle::{export_run, ExportOptions, ExportReport};
pub use onnx::ExportError;
