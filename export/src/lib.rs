//! duet-export: build ONNX graphs from trained duet weights, verify parity, write bundles.
//!
//! - [`onnx`]: the graph builder and the graphs (vision encoder, caption decoder).
//! - [`parity`]: Burn vs onnxruntime vs tract on the same inputs.
//! - [`bundle`]: a run directory → a verified bundle directory (`duet-export`).
//! - [`import`]: a bundle's captioner → a run to fine-tune (`duet-export import`).

pub mod bundle;
pub mod import;
pub mod onnx;
pub mod parity;

pub use bundle::{export_run, ExportOptions, ExportReport};
pub use onnx::ExportError;
