//! Each graph's I/O contract, derived from the model spec (exhaustive over [`Graph`]), and the
//! check of a manifest entry or a loaded graph against it.

use crate::manifest::{DType, DimSpec, Graph, GraphSpec, Manifest, TensorSpec};

use super::*;

/// One expected axis: a fixed size derived from the model config, or "any symbolic name".
#[derive(Debug, Clone, Copy)]
pub(super) enum Want {
    Fixed(usize),
    /// Dynamic in the contract (`batch`, `seq`, `past`, `total`); the exporter may name it as
    /// it likes, but it must not be frozen to a number or the runtime could not vary it.
    Sym,
}

pub(super) struct Contract {
    inputs: Vec<(String, DType, Vec<Want>)>,
    outputs: Vec<(String, DType, Vec<Want>)>,
}

/// The input/output contract of `graph` under the manifest's dimensions: exhaustive over
/// [`Graph`], so a new graph cannot be added without one. The exporter's staged bundle passes
/// through the same check before it is published.
pub(super) fn contract(graph: Graph, m: &Manifest) -> Contract {
    let e = m.model.embed_dim;
    match graph {
        Graph::VisionEncoder => vision_encoder_contract(m),
        Graph::CaptionDecoder => caption_decoder_contract(m),
        Graph::TextEncoder => text_encoder_contract(m),
        Graph::Denoiser => denoiser_contract(m),
        Graph::DreamEncoder => dream_encoder_contract(m),
        Graph::RestorerT2i | Graph::RestorerI2t => restorer_contract(e),
        Graph::FusionHead => {
            fusion_head_contract(e, m.restore.as_ref().map_or(0, |r| r.classes.len()))
        }
    }
}

pub(super) fn vision_encoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let p = s.num_patches();
    Contract {
        inputs: vec![(
            "pixels".into(),
            DType::F32,
            vec![
                Want::Sym,
                Want::Fixed(s.channels),
                Want::Fixed(s.image_size),
                Want::Fixed(s.image_size),
            ],
        )],
        outputs: vec![
            (
                "patch_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(p), Want::Fixed(s.d_model)],
            ),
            (
                "embedding".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(s.embed_dim)],
            ),
        ],
    }
}

pub(super) fn caption_decoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let (h, dh) = (s.n_heads, s.head_dim());
    let kv = || vec![Want::Sym, Want::Fixed(h), Want::Sym, Want::Fixed(dh)];
    let mut inputs = vec![
        ("input_ids".into(), DType::I64, vec![Want::Sym, Want::Sym]),
        (
            "position_ids".into(),
            DType::I64,
            vec![Want::Sym, Want::Sym],
        ),
        (
            "attn_bias".into(),
            DType::F32,
            vec![Want::Sym, Want::Fixed(1), Want::Sym, Want::Sym],
        ),
        (
            "image_tokens".into(),
            DType::F32,
            vec![
                Want::Sym,
                Want::Fixed(s.num_patches()),
                Want::Fixed(s.d_model),
            ],
        ),
    ];
    let mut outputs = vec![(
        "logits".into(),
        DType::F32,
        vec![Want::Sym, Want::Sym, Want::Fixed(s.vocab_size)],
    )];
    for l in 0..s.decoder_layers {
        inputs.push((format!("past_key_{l}"), DType::F32, kv()));
        inputs.push((format!("past_value_{l}"), DType::F32, kv()));
        outputs.push((format!("present_key_{l}"), DType::F32, kv()));
        outputs.push((format!("present_value_{l}"), DType::F32, kv()));
    }
    Contract { inputs, outputs }
}

pub(super) fn text_encoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let l = m.tokenizer.max_len;
    Contract {
        inputs: vec![
            (
                "input_ids".into(),
                DType::I64,
                vec![Want::Sym, Want::Fixed(l)],
            ),
            (
                "attn_mask".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(l)],
            ),
        ],
        outputs: vec![
            (
                "text_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(l), Want::Fixed(s.d_model)],
            ),
            (
                "text_embedding".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(s.embed_dim)],
            ),
        ],
    }
}

pub(super) fn dream_encoder_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let l = m.tokenizer.max_len;
    Contract {
        inputs: vec![
            (
                "input_ids".into(),
                DType::I64,
                vec![Want::Sym, Want::Fixed(l)],
            ),
            (
                "attn_mask".into(),
                DType::F32,
                vec![Want::Sym, Want::Fixed(l)],
            ),
            (
                "image_tokens".into(),
                DType::F32,
                vec![
                    Want::Sym,
                    Want::Fixed(s.num_patches()),
                    Want::Fixed(s.d_model),
                ],
            ),
        ],
        outputs: vec![(
            "dream_tokens".into(),
            DType::F32,
            vec![
                Want::Sym,
                Want::Fixed(l + s.dream_queries),
                Want::Fixed(s.d_model),
            ],
        )],
    }
}

pub(super) fn denoiser_contract(m: &Manifest) -> Contract {
    let s = &m.model;
    let img = || {
        vec![
            Want::Sym,
            Want::Fixed(s.channels),
            Want::Fixed(s.image_size),
            Want::Fixed(s.image_size),
        ]
    };
    Contract {
        inputs: vec![
            ("x".into(), DType::F32, img()),
            ("timestep".into(), DType::F32, vec![Want::Sym]),
            (
                "text_tokens".into(),
                DType::F32,
                vec![Want::Sym, Want::Sym, Want::Fixed(s.d_model)],
            ),
            ("text_mask".into(), DType::F32, vec![Want::Sym, Want::Sym]),
        ],
        outputs: vec![("prediction".into(), DType::F32, img())],
    }
}

pub(super) fn restorer_contract(e: usize) -> Contract {
    let row = || vec![Want::Sym, Want::Fixed(e)];
    Contract {
        inputs: vec![
            ("x".into(), DType::F32, row()),
            ("timestep".into(), DType::F32, vec![Want::Sym]),
            ("condition".into(), DType::F32, row()),
        ],
        outputs: vec![
            ("prediction".into(), DType::F32, row()),
            ("trust".into(), DType::F32, vec![Want::Sym, Want::Fixed(1)]),
            ("restored".into(), DType::F32, row()),
        ],
    }
}

pub(super) fn fusion_head_contract(e: usize, classes: usize) -> Contract {
    let row = || vec![Want::Sym, Want::Fixed(e)];
    Contract {
        inputs: vec![
            ("image_embedding".into(), DType::F32, row()),
            ("text_embedding".into(), DType::F32, row()),
        ],
        outputs: vec![(
            "logits".into(),
            DType::F32,
            vec![Want::Sym, Want::Fixed(classes)],
        )],
    }
}

pub(super) fn check_io(g: &GraphSpec, c: &Contract) -> Result<(), BundleError> {
    // Inputs must match exactly: an extra input would never be fed and fail at run time.
    for t in &g.inputs {
        if !c.inputs.iter().any(|(n, _, _)| *n == t.name) {
            return Err(bad(
                format!("graphs[{}].inputs[{}]", g.name, t.name),
                "not an input of the contract",
            ));
        }
    }
    for (name, dtype, shape) in &c.inputs {
        let t = g.input(name).ok_or_else(|| {
            bad(
                format!("graphs[{}].inputs", g.name),
                format!("missing input `{name}`"),
            )
        })?;
        check_tensor(g.name.name(), "inputs", t, *dtype, shape)?;
    }
    // Extra outputs are harmless (the runtime ignores them); the contract's must all be there.
    for (name, dtype, shape) in &c.outputs {
        let t = g.output(name).ok_or_else(|| {
            bad(
                format!("graphs[{}].outputs", g.name),
                format!("missing output `{name}`"),
            )
        })?;
        check_tensor(g.name.name(), "outputs", t, *dtype, shape)?;
    }
    Ok(())
}

pub(super) fn check_tensor(
    graph: &str,
    side: &str,
    t: &TensorSpec,
    dtype: DType,
    shape: &[Want],
) -> Result<(), BundleError> {
    let field = |f: &str| format!("graphs[{graph}].{side}[{}].{f}", t.name);
    if t.dtype != dtype {
        return Err(bad(
            field("dtype"),
            format!("{} but the contract says {dtype}", t.dtype),
        ));
    }
    if t.shape.len() != shape.len() {
        return Err(bad(
            field("shape"),
            format!(
                "rank {} but the contract says rank {}",
                t.shape.len(),
                shape.len()
            ),
        ));
    }
    for (i, (have, want)) in t.shape.iter().zip(shape).enumerate() {
        let ok = match (have, want) {
            (DimSpec::Fixed(a), Want::Fixed(b)) => a == b,
            (DimSpec::Symbolic(s), Want::Sym) => !s.is_empty(),
            _ => false,
        };
        if !ok {
            let want = match want {
                Want::Fixed(n) => n.to_string(),
                Want::Sym => "a symbolic (dynamic) axis".to_string(),
            };
            return Err(bad(
                field(&format!("shape[{i}]")),
                format!("`{have}` but the contract says {want}"),
            ));
        }
    }
    Ok(())
}
