//! Named access to a module's float parameters, by Burn module path
//! (`vision.blocks.0.attn.q.weight`): the names used in safetensors checkpoints and by the
//! ONNX exporter.
//!
//! Written on Burn's `ModuleVisitor` / `ModuleMapper` rather than a `Recorder` because both the
//! checkpoint format (plain safetensors, readable by any tool) and the exporter want a flat
//! `name → (shape, f32 data)` map, not Burn's record structure.

use std::collections::BTreeMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};

/// One parameter as plain data.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// All float parameters of a module keyed by path.
pub type NamedTensors = BTreeMap<String, NamedTensor>;

/// A module visitor or mapper that knows each parameter's path (`vision.blocks.0.attn.q.weight`):
/// Burn tells it which module it enters and leaves; `inner` sees the parameters by name.
struct Named<V> {
    path: Vec<String>,
    inner: V,
}

impl<V> Named<V> {
    fn new(inner: V) -> Self {
        Self {
            path: Vec::new(),
            inner,
        }
    }
}

/// Sees every float parameter with its path ([`Named`] as a `ModuleVisitor`).
trait NamedVisitor<B: Backend> {
    fn visit_named<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>);
}

/// Replaces every float parameter, knowing its path ([`Named`] as a `ModuleMapper`).
trait NamedMapper<B: Backend> {
    fn map_named<const D: usize>(
        &mut self,
        name: String,
        param: Param<Tensor<B, D>>,
    ) -> Param<Tensor<B, D>>;
}

impl<B: Backend, V: NamedVisitor<B>> ModuleVisitor<B> for Named<V> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.inner.visit_named(self.path.join("."), param);
    }
}

impl<B: Backend, V: NamedMapper<B>> ModuleMapper<B> for Named<V> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        self.inner.map_named(self.path.join("."), param)
    }
}

struct Collector(NamedTensors);

impl<B: Backend> NamedVisitor<B> for Collector {
    fn visit_named<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
        let t = param.val();
        let shape = t.dims().to_vec();
        let data = t
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .unwrap_or_default();
        self.0.insert(name, NamedTensor { shape, data });
    }
}

/// Copies every float parameter out of `module`.
pub fn named_tensors<B: Backend, M: Module<B>>(module: &M) -> NamedTensors {
    let mut c = Named::new(Collector(BTreeMap::new()));
    module.visit(&mut c);
    c.inner.0
}

struct Shapes(BTreeMap<String, Vec<usize>>);

impl<B: Backend> NamedVisitor<B> for Shapes {
    fn visit_named<const D: usize>(&mut self, name: String, param: &Param<Tensor<B, D>>) {
        self.0.insert(name, param.lazy_shape().as_slice().to_vec());
    }
}

/// Every float parameter's shape by path, without drawing a lazily initialised parameter's
/// values (see [`crate::init`]).
pub fn param_shapes<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Vec<usize>> {
    let mut s = Named::new(Shapes(BTreeMap::new()));
    module.visit(&mut s);
    s.inner.0
}

/// Why a set of named tensors could not be loaded into a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadError {
    Missing(String),
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    Unused(Vec<String>),
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoadError::Missing(n) => write!(f, "parameter '{n}' is missing from the checkpoint"),
            LoadError::Shape {
                name,
                expected,
                found,
            } => write!(
                f,
                "parameter '{name}' has shape {found:?} in the checkpoint, the model expects {expected:?}"
            ),
            LoadError::Unused(names) => {
                write!(f, "checkpoint has parameters the model does not: {names:?}")
            }
        }
    }
}

impl std::error::Error for LoadError {}

struct Loader<'a> {
    source: &'a NamedTensors,
    used: Vec<String>,
    error: Option<LoadError>,
}

impl<B: Backend> NamedMapper<B> for Loader<'_> {
    fn map_named<const D: usize>(
        &mut self,
        name: String,
        param: Param<Tensor<B, D>>,
    ) -> Param<Tensor<B, D>> {
        if self.error.is_some() {
            return param;
        }
        let Some(src) = self.source.get(&name) else {
            self.error = Some(LoadError::Missing(name));
            return param;
        };
        // `lazy_shape` and `transform_for_load` leave a lazily initialised parameter undrawn:
        // loading must not consume the backend's random generator (see `crate::init`).
        let expected = param.lazy_shape().as_slice().to_vec();
        if src.shape != expected {
            self.error = Some(LoadError::Shape {
                name,
                expected,
                found: src.shape.clone(),
            });
            return param;
        }
        self.used.push(name);
        let data = TensorData::new(src.data.clone(), src.shape.clone());
        let fresh = Tensor::<B, D>::from_data(data, &param.lazy_device());
        let id = param.id;
        param.transform_for_load(fresh, id)
    }
}

/// Replaces every float parameter of `module` with the tensor of the same name.
/// Fails on a missing name, a shape mismatch, or a leftover tensor the module does not have.
pub fn load_named_tensors<B: Backend, M: Module<B>>(
    module: M,
    source: &NamedTensors,
) -> Result<M, LoadError> {
    let mut named = Named::new(Loader {
        source,
        used: Vec::new(),
        error: None,
    });
    let module = module.map(&mut named);
    let loader = named.inner;
    if let Some(e) = loader.error {
        return Err(e);
    }
    if loader.used.len() != source.len() {
        let used: std::collections::BTreeSet<_> = loader.used.iter().collect();
        let unused = source
            .keys()
            .filter(|k| !used.contains(k))
            .cloned()
            .collect();
        return Err(LoadError::Unused(unused));
    }
    Ok(module)
}
