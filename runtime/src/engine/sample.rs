//! Inputs for a graph nobody described to us: each input of its declared shape and element
//! type, filled with a fixed pattern. What `duet bench --model` times and `duet-onnx-run` feeds,
//! so the two measure and run the same thing.

use ndarray::{ArrayD, IxDyn};

use super::{Engine, EngineError, IoInfo, Value};
use crate::manifest::{DType, DimSpec};

/// Largest total input made, in elements (1 GiB of f32): a typo in a `--dim` must not allocate
/// the machine away.
pub const MAX_SAMPLE_ELEMENTS: usize = 1 << 28;

impl Engine {
    /// One input per graph input: its declared shape, where a symbolic axis takes its size
    /// from `dims` (`(name, size)`) or else one, and so does an axis with neither size nor
    /// name; values cycle through -3..=3 (shifted for u8, scaled by 1/3 for floats), offset per
    /// input so two inputs differ. Refused with the input named: no declared rank, an element
    /// type the engines do not feed, or a total over [`MAX_SAMPLE_ELEMENTS`].
    pub fn sample_inputs(
        &self,
        dims: &[(String, usize)],
    ) -> Result<Vec<(String, Value)>, EngineError> {
        let mut total = 0usize;
        let mut feed = Vec::with_capacity(self.inputs().len());
        for (ix, info) in self.inputs().iter().enumerate() {
            let refuse = |reason: String| EngineError::SampleInput {
                graph: self.graph().to_string(),
                name: info.name.clone(),
                reason,
            };
            let shape = sample_shape(info, dims)
                .ok_or_else(|| refuse("the graph declares no rank for it".into()))?;
            let n = shape
                .iter()
                .try_fold(1usize, |acc, &d| acc.checked_mul(d))
                .and_then(|n| total.checked_add(n).map(|t| (n, t)))
                .filter(|&(_, t)| t <= MAX_SAMPLE_ELEMENTS)
                .map(|(n, t)| {
                    total = t;
                    n
                })
                .ok_or_else(|| {
                    refuse(format!(
                        "shape {shape:?} takes the inputs over {MAX_SAMPLE_ELEMENTS} elements"
                    ))
                })?;
            let dtype = info
                .dtype
                .ok_or_else(|| EngineError::UnsupportedInputType {
                    graph: self.graph().to_string(),
                    name: info.name.clone(),
                })?;
            feed.push((info.name.clone(), pattern(dtype, &shape, n, ix)));
        }
        Ok(feed)
    }
}

/// Parses a `--dim NAME=N`: the size of the symbolic axis `NAME`.
pub fn parse_dim(s: &str) -> Result<(String, usize), String> {
    let (name, n) = s
        .split_once('=')
        .ok_or_else(|| format!("`{s}`: expected NAME=N"))?;
    let n = n
        .parse()
        .map_err(|e| format!("`{s}`: {n} is not a size: {e}"))?;
    Ok((name.to_string(), n))
}

/// The shape made for `info`: fixed axes as declared, symbolic ones from `dims` (or 1); `None`
/// when the rank is unknown.
pub fn sample_shape(info: &IoInfo, dims: &[(String, usize)]) -> Option<Vec<usize>> {
    Some(
        info.dims
            .as_ref()?
            .iter()
            .map(|a| match a {
                Some(DimSpec::Fixed(n)) => *n,
                Some(DimSpec::Symbolic(s)) => dims.iter().find(|(d, _)| d == s).map_or(1, |d| d.1),
                None => 1,
            })
            .collect(),
    )
}

/// `n` elements of `shape` (their product, already checked) in the fixed pattern.
fn pattern(dtype: DType, shape: &[usize], n: usize, input: usize) -> Value {
    let k = (0..n).map(|i| ((i + 3 * input) % 7) as i64 - 3);
    match dtype {
        DType::F32 => Value::F32(array_of(shape, k.map(|v| v as f32 / 3.0).collect())),
        DType::F16 => Value::F16(array_of(
            shape,
            k.map(|v| half::f16::from_f32(v as f32 / 3.0)).collect(),
        )),
        DType::I64 => Value::I64(array_of(shape, k.collect())),
        DType::I32 => Value::I32(array_of(shape, k.map(|v| v as i32).collect())),
        DType::I8 => Value::I8(array_of(shape, k.map(|v| v as i8).collect())),
        DType::U8 => Value::U8(array_of(shape, k.map(|v| (v + 3) as u8).collect())),
        DType::Bool => Value::Bool(array_of(shape, k.map(|v| v > 0).collect())),
    }
}

/// `values` as an array of `shape`: `pattern` makes exactly the shape's product of them.
fn array_of<T>(shape: &[usize], values: Vec<T>) -> ArrayD<T> {
    ArrayD::from_shape_vec(IxDyn(shape), values).expect("n is the shape's product")
}
