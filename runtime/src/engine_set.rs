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
        let bytes = self.bundle.graph_bytes(graph)?;
        let (engine, report) = Engine::load_bytes(bytes, graph.name(), self.choice, &self.options)?;
        self.bundle
            .check_loaded_graph(graph, engine.inputs(), engine.outputs())?;
        let engine = Arc::new(engine);
        self.loaded
            .insert(graph, (Arc::clone(&engine), report.clone()));
        Ok((engine, report))
    }

    /// How many distinct graphs have been loaded.
    pub fn loaded(&self) -> usize {
        self.loaded.len()
    }
}
