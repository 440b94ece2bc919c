//! `duet-export quantize`: a bundle gains fp16 / int8 variants of all its graphs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use duet_runtime::bundle::archive;
use duet_runtime::bundle::sha256_hex;
use duet_runtime::manifest::{Graph, VariantSpec, MANIFEST_FILE};
use duet_runtime::Bundle;

use super::*;
use crate::bundle::{is_single_file, refuse_non_bundle_file};

/// What [`add_variants`] does.
#[derive(Debug, Clone)]
pub struct VariantOptions {
    /// The bundle to read (directory or `.duet`).
    pub bundle: PathBuf,
    /// Where the bundle with variants goes; `None` updates `bundle` itself (a directory:
    /// the variant files first, then the manifest, the one write that makes them part of
    /// it; a `.duet` file: replaced whole).
    pub out: Option<PathBuf>,
    /// The variants to make (fp32 is the bundle's own graphs and is refused).
    pub precisions: Vec<Precision>,
    /// Engines for the agreement check.
    pub engine: EngineOptions,
}

/// One variant made: per graph its report and agreement.
#[derive(Debug, Clone)]
pub struct VariantReport {
    pub precision: Precision,
    pub graphs: Vec<(Graph, QuantizeReport, VariantAgreement)>,
}

impl VariantReport {
    /// All graph files of the variant, in bytes, and of the fp32 graphs.
    pub fn bytes(&self) -> (usize, usize) {
        self.graphs.iter().fold((0, 0), |(a, b), (_, r, _)| {
            (a + r.bytes_after, b + r.bytes_before)
        })
    }
}

/// The file name of `graph`'s variant: `denoiser.onnx` → `denoiser.int8.onnx`.
pub fn variant_file(fp32_file: &str, precision: Precision) -> String {
    match fp32_file.strip_suffix(".onnx") {
        Some(stem) => format!("{stem}.{precision}.onnx"),
        None => format!("{fp32_file}.{precision}"),
    }
}

/// How each precision's files are made, as the manifest says it.
pub fn method(precision: Precision) -> &'static str {
    match precision {
        Precision::Fp32 => "the exported graphs",
        Precision::Fp16 => {
            "f32 initializers of >= 64 values stored as IEEE half and widened by a Cast at \
             load; arithmetic stays f32"
        }
        Precision::Int8 => {
            "MatMul weights int8 (symmetric, per output channel) multiplied in integers \
             against activations quantised to u8 at run time (DynamicQuantizeLinear + \
             MatMulInteger); Gather tables int8 per row; LayerNorm, biases, convolutions and \
             activation-activation products f32"
        }
    }
}

/// Makes the variants of `opts.precisions` for every graph of the bundle, checks each on both
/// engines against its fp32 graph, and writes the bundle with them (see [`VariantOptions`]).
/// An existing variant of the same precision is replaced (and its metrics dropped: they were
/// measured on the old files; [`record_metrics`] writes new ones).
pub fn add_variants(opts: &VariantOptions) -> Result<Vec<VariantReport>, ExportError> {
    let bundle_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Bundle { path, source }
    };
    let bundle = Bundle::open(&opts.bundle).map_err(bundle_err(&opts.bundle))?;
    let mut manifest = bundle.manifest().clone();
    let mut new_files: BTreeMap<String, Arc<[u8]>> = BTreeMap::new();
    let mut reports = Vec::new();
    for &precision in &opts.precisions {
        if precision == Precision::Fp32 {
            return Err(ExportError::Quantize {
                graph: "bundle".into(),
                reason: "fp32 is the bundle's own graphs, not a variant".into(),
            });
        }
        let mut files = BTreeMap::new();
        let mut agreement = BTreeMap::new();
        let mut graphs = Vec::new();
        for spec in &manifest.graphs {
            let graph = spec.name;
            let fp32 = bundle
                .graph_bytes(graph)
                .map_err(bundle_err(&opts.bundle))?;
            let (bytes, report) = quantize_graph(&fp32, precision, graph.name())?;
            let bytes: Arc<[u8]> = Arc::from(bytes);
            let a = variant_agreement(graph.name(), &fp32, &bytes, &opts.engine)?;
            tracing::info!(
                %graph, %precision,
                bytes = report.bytes_after,
                fp32_bytes = report.bytes_before,
                ort = a.ort_max_abs_diff,
                tract = a.tract_max_abs_diff,
                "variant made"
            );
            let file = variant_file(&spec.file, precision);
            files.insert(graph, file.clone());
            agreement.insert(graph, a.clone());
            new_files.insert(file, bytes);
            graphs.push((graph, report, a));
        }
        // A variant replaced drops its old files from the listing.
        let old: Vec<String> = manifest
            .variant(precision)
            .map(|v| v.files.values().cloned().collect())
            .unwrap_or_default();
        for f in &old {
            manifest.files.remove(f);
        }
        manifest.variants.retain(|v| v.precision != precision);
        manifest.variants.push(VariantSpec {
            precision,
            method: method(precision).to_owned(),
            files,
            agreement,
            metrics: BTreeMap::new(),
        });
        reports.push(VariantReport { precision, graphs });
    }
    manifest.variants.sort_by_key(|v| v.precision);
    for (name, bytes) in &new_files {
        manifest.files.insert(name.clone(), sha256_hex(bytes));
    }
    let text = manifest
        .to_json_pretty()
        .map_err(|e| ExportError::InvalidDims(format!("manifest serialisation: {e}")))?;
    write_bundle(
        &bundle,
        &opts.bundle,
        opts.out.as_deref(),
        &new_files,
        &text,
    )?;
    Ok(reports)
}

/// Records task metrics (per precision, fp32 included) in the manifest of the bundle at
/// `path`, rewriting only the manifest (a `.duet` file is re-packed whole). A precision the
/// bundle lacks is an error.
pub fn record_metrics(
    path: &Path,
    metrics: &BTreeMap<Precision, BTreeMap<String, f64>>,
) -> Result<(), ExportError> {
    let bundle = Bundle::open(path).map_err(|source| ExportError::Bundle {
        path: path.to_path_buf(),
        source,
    })?;
    let mut manifest = bundle.manifest().clone();
    for (precision, m) in metrics {
        match precision {
            Precision::Fp32 => manifest.metrics = m.clone(),
            p => {
                let v = manifest
                    .variants
                    .iter_mut()
                    .find(|v| v.precision == *p)
                    .ok_or_else(|| ExportError::Evaluate {
                        reason: format!("the bundle has no {p} variant to record metrics for"),
                    })?;
                v.metrics = m.clone();
            }
        }
    }
    let text = manifest
        .to_json_pretty()
        .map_err(|e| ExportError::InvalidDims(format!("manifest serialisation: {e}")))?;
    write_bundle(&bundle, path, None, &BTreeMap::new(), &text)
}

/// Writes `bundle` (read from `source`) with `new_files` and `manifest_text` to `out`, or
/// back over `source` when `out` is `None`: every file it keeps, the new files, then the
/// manifest.
fn write_bundle(
    bundle: &Bundle,
    source: &Path,
    out: Option<&Path>,
    new_files: &BTreeMap<String, Arc<[u8]>>,
    manifest_text: &str,
) -> Result<(), ExportError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ExportError::Io { path, source }
    };
    let in_place = out.is_none();
    let out = out.unwrap_or(source);
    // What is on disk decides (a single-file bundle may have any extension).
    let source_is_file = std::fs::metadata(source).is_ok_and(|m| m.is_file());
    let in_place_dir = in_place && !source_is_file;
    // The manifest must read back as one before anything is written (a value JSON cannot
    // hold, such as an infinite difference, would otherwise make the bundle unopenable).
    let parsed: duet_runtime::Manifest = serde_json::from_str(manifest_text).map_err(|e| {
        ExportError::InvalidDims(format!("the new manifest does not read back: {e}"))
    })?;
    if in_place_dir {
        // The variant files first (each written atomically under its final name), the manifest
        // last: until it is replaced, the bundle is the old one, whole. So no write may touch
        // a file the old manifest lists with other bytes (a re-quantisation that changed), nor
        // a file that is not the bundle's; both are refused before anything is written.
        let old = &bundle.manifest().files;
        let mut to_write = Vec::new();
        for (name, bytes) in new_files {
            let path = out.join(name);
            match old.get(name) {
                Some(hash) if *hash == sha256_hex(bytes) => continue,
                Some(_) => {
                    return Err(ExportError::Quantize {
                        graph: "bundle".into(),
                        reason: format!(
                            "`{name}` is already in the bundle with other bytes; replacing it in \
                             place would break the bundle until the manifest is rewritten: \
                             write the new bundle with --out instead"
                        ),
                    })
                }
                None if std::fs::symlink_metadata(&path).is_ok() => {
                    return Err(ExportError::OutputHasOtherFiles {
                        path: out.to_path_buf(),
                        others: vec![name.clone()],
                    })
                }
                None => to_write.push((path, bytes)),
            }
        }
        for (path, bytes) in to_write {
            duet_fsio::write_atomic(&path, bytes).map_err(io(&path))?;
        }
        let mpath = out.join(MANIFEST_FILE);
        duet_fsio::write_atomic(&mpath, manifest_text.as_bytes()).map_err(io(&mpath))?;
        Bundle::open(out).map_err(|source| ExportError::Bundle {
            path: out.to_path_buf(),
            source,
        })?;
        return Ok(());
    }
    // Anything else is staged whole beside the destination, verified, then moved or packed.
    let out_is_file = is_single_file(out) || (in_place && source_is_file);
    if out_is_file {
        refuse_non_bundle_file(out)?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    let staging = duet_fsio::temp_dir_beside(out).map_err(io(out))?;
    let dir = staging.path().to_path_buf();
    for name in parsed.files.keys() {
        let bytes = match new_files.get(name) {
            Some(b) => Arc::clone(b),
            None => bundle
                .file_bytes(name)
                .ok_or_else(|| ExportError::Quantize {
                    graph: "bundle".into(),
                    reason: format!("`{name}` is listed but was not read"),
                })?,
        };
        let path = dir.join(name);
        duet_fsio::write_atomic(&path, &bytes).map_err(io(&path))?;
    }
    let mpath = dir.join(MANIFEST_FILE);
    duet_fsio::write_atomic(&mpath, manifest_text.as_bytes()).map_err(io(&mpath))?;
    let staged = Bundle::open(&dir).map_err(|source| ExportError::Bundle {
        path: dir.clone(),
        source,
    })?;
    if out_is_file {
        archive::pack(&staged, out).map_err(|source| ExportError::Bundle {
            path: out.to_path_buf(),
            source,
        })
    } else {
        crate::bundle::publish(staging, out)
    }
}
