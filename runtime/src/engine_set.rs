//! Loads each graph of a bundle once and hands out shared handles.
//!
//! Pipelines overlap: captioning and classification both run the vision encoder, generation
//! and classification both run the text encoder. Built from one [`EngineSet`], they share one
//! session per graph: one copy of the weights in memory and, under TensorRT, one engine build,
//! which matters on the small devices this runtime targets.

use std::collections::HashMap;
use std::sync::Arc;

use crate::bundle::{Bundle, BundleError};
use crate::engine::{Engine, EngineError, EngineOptions, ProviderChoice, ProviderReport};
use crate::graph::Graph;
use crate::manifest::Precision;

/// Graphs of one bundle, each loaded on first use with one provider choice and options.
pub struct EngineSet<'b> {
    bundle: &'b Bundle,
    choice: ProviderChoice,
    options: EngineOptions,
    loaded: HashMap<Graph, (Arc<Engine>, ProviderReport)>,
}

impl<'b> EngineSet<'b> {
    pub fn new(bundle: &'b Bundle, choice: ProviderChoice, options: &EngineOptions) -> Self {
        EngineSet {
            bundle,
            choice,
            options: options.clone(),
            loaded: HashMap::new(),
        }
    }

    pub fn bundle(&self) -> &'b Bundle {
        self.bundle
    }

    /// The engine for `graph` and its provider report: loaded now, or the one loaded before.
    pub fn get<E>(&mut self, graph: Graph) -> Result<(Arc<Engine>, ProviderReport), E>
    where
        E: From<BundleError> + From<EngineError>,
    {
        if let Some((engine, report)) = self.loaded.get(&graph) {
            return Ok((Arc::clone(engine), report.clone()));
        }
        let (engine, report) = load(self.bundle, graph, self.choice, &self.options)
            .map_err(LoadError::into_caller::<E>)?;
        let engine = Arc::new(engine);
        self.loaded
            .insert(graph, (Arc::clone(&engine), report.clone()));
        Ok((engine, report))
    }

    /// Loads every graph of `graphs` not loaded yet; on tract only, each on a thread of its
    /// own: building a tract plan is single-threaded work (parsing, type inference,
    /// optimisation), so a pipeline of two graphs starts in about the time of its slower one
    /// on two cores instead of the sum. The first error in `graphs` order is returned (the
    /// one a sequential load meets first); graphs that loaded are kept either way.
    pub fn preload<E>(&mut self, graphs: &[Graph]) -> Result<(), E>
    where
        E: From<BundleError> + From<EngineError>,
    {
        let mut todo: Vec<Graph> = Vec::new();
        for &g in graphs {
            if !self.loaded.contains_key(&g) && !todo.contains(&g) {
                todo.push(g);
            }
        }
        // Only tract gains: onnxruntime sessions built side by side each start their thread
        // pools and slowed each other (shipped caption graphs: 53 ms one after the other,
        // 60–81 ms together, against tract's 157–167 → 110–113 ms).
        let tract_only = self
            .choice
            .candidates()
            .iter()
            .all(|&p| p == crate::engine::Provider::Tract);
        if todo.len() < 2 || !tract_only {
            for g in todo {
                self.get::<E>(g)?;
            }
            return Ok(());
        }
        let (bundle, choice, options) = (self.bundle, self.choice, &self.options);
        let results: Vec<(Graph, Loaded)> = std::thread::scope(|scope| {
            let handles: Vec<_> = todo
                .iter()
                .map(|&graph| {
                    (
                        graph,
                        scope.spawn(move || load(bundle, graph, choice, options)),
                    )
                })
                .collect();
            handles
                .into_iter()
                .map(|(graph, h)| {
                    // Backends catch their panics (`panic_guard`); one that escaped
                    // anyway goes on as it would have from a load on this thread.
                    (
                        graph,
                        h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)),
                    )
                })
                .collect()
        });
        let mut first_error: Option<E> = None;
        for (graph, r) in results {
            match r {
                Ok((engine, report)) => {
                    self.loaded.insert(graph, (Arc::new(engine), report));
                }
                Err(e) if first_error.is_none() => first_error = Some(e.into_caller()),
                Err(_) => {}
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// How many distinct graphs have been loaded.
    pub fn loaded(&self) -> usize {
        self.loaded.len()
    }
}

/// One graph's engine and provider report, or why it did not load.
type Loaded = Result<(Engine, ProviderReport), LoadError>;

/// Why one graph did not load: [`EngineSet::get`]'s two error sources, kept apart until the
/// caller's error type is known.
enum LoadError {
    Bundle(BundleError),
    Engine(EngineError),
}

impl From<BundleError> for LoadError {
    fn from(e: BundleError) -> Self {
        LoadError::Bundle(e)
    }
}

impl From<EngineError> for LoadError {
    fn from(e: EngineError) -> Self {
        LoadError::Engine(e)
    }
}

impl LoadError {
    fn into_caller<E: From<BundleError> + From<EngineError>>(self) -> E {
        match self {
            LoadError::Bundle(e) => e.into(),
            LoadError::Engine(e) => e.into(),
        }
    }
}

/// Loads `graph` of `bundle` and checks its real inputs and outputs against the manifest.
fn load(bundle: &Bundle, graph: Graph, choice: ProviderChoice, options: &EngineOptions) -> Loaded {
    let bytes = bundle.graph_bytes(graph)?;
    // The name reports and errors carry: a variant says its precision.
    let name = match bundle.precision() {
        Precision::Fp32 => graph.name().to_string(),
        p => format!("{graph} ({p})"),
    };
    let (engine, report) = Engine::load_bytes(bytes, &name, choice, options)?;
    if bundle.precision() == Precision::Int8 && engine.provider() == crate::engine::Provider::Tract
    {
        // Measured (docs/BENCHMARKS.md): tract 0.23 expands DynamicQuantizeLinear and
        // MatMulInteger into generic ops (579 → 1852 nodes in the denoiser) and runs the int8
        // bundle about 3x slower than fp32; onnxruntime fuses them and gains 1.6-1.8x.
        tracing::warn!(
            graph = %graph,
            "int8 on tract runs slower than fp32 or fp16 (tract does not fuse dynamic \
             quantisation); its gain is on onnxruntime"
        );
    }
    bundle.check_loaded_graph(graph, engine.inputs(), engine.outputs())?;
    Ok((engine, report))
}
