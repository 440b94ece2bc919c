//! Engines on tiny hand-built ONNX graphs: provider selection and reports, ort-cpu vs tract
//! agreement, symbolic batch, zero-length KV-cache axes, and honest GPU skip reasons.

use duet_testkit as common;

use common::*;
use duet_runtime::engine::{
    ort_info, Engine, EngineError, EngineOptions, Provider, ProviderChoice, Value, TRACT_PLAN_CACHE,
};
use duet_runtime::engine::{IdleWait, IoInfo};
use duet_runtime::manifest::{DType, DimSpec};
use ndarray::{array, ArrayD, Axis, IxDyn};

fn write(dir: &tempfile::TempDir, name: &str, bytes: Vec<u8>) -> std::path::PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn options() -> EngineOptions {
    EngineOptions {
        strict: false,
        ort_lib: ort_lib(),
        ..EngineOptions::default()
    }
}

fn linear_expected(x: &ndarray::Array2<f32>) -> ndarray::Array2<f32> {
    let w = ndarray::Array2::from_shape_vec((3, 2), LINEAR_W.to_vec()).unwrap();
    x.dot(&w) + &ndarray::arr1(&LINEAR_B)
}

#[test]
fn provider_names_parse_and_print() {
    for p in Provider::ALL {
        assert_eq!(p.to_string().parse::<Provider>().unwrap(), p);
        assert_eq!(
            p.to_string().parse::<ProviderChoice>().unwrap(),
            ProviderChoice::Only(p)
        );
    }
    assert_eq!("ort-cpu".parse::<Provider>().unwrap(), Provider::OrtCpu);
    assert_eq!("tensorrt".parse::<Provider>().unwrap(), Provider::TensorRt);
    assert_eq!(
        "auto".parse::<ProviderChoice>().unwrap(),
        ProviderChoice::Auto
    );
    assert!("auto".parse::<Provider>().is_err());
    let e = "cpu".parse::<ProviderChoice>().unwrap_err();
    assert_eq!(e.name, "cpu");
    let msg = e.to_string();
    for valid in ["auto", "tensorrt", "cuda", "ort-cpu", "tract"] {
        assert!(msg.contains(valid), "{msg}");
    }
}

#[test]
fn linear_model_on_tract_with_symbolic_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let (engine, report) = Engine::load(
        &path,
        "linear",
        ProviderChoice::Only(Provider::Tract),
        &options(),
    )
    .unwrap();
    assert_eq!(engine.provider(), Provider::Tract);
    assert_eq!(report.used, Provider::Tract);
    assert!(report.skipped.is_empty());
    for batch in [1usize, 3] {
        let x = ndarray::Array2::from_shape_fn((batch, 3), |(i, j)| (i * 3 + j) as f32 * 0.5 - 1.0);
        let out = engine
            .run(&[("x", Value::F32(x.clone().into_dyn()))])
            .unwrap();
        let y = out["y"].as_f32().unwrap();
        let want = linear_expected(&x).into_dyn();
        assert!((y - &want).iter().all(|d| d.abs() < 1e-5), "{y} vs {want}");
    }
}

/// A dynamic axis with neither a size nor a name (a `Reshape` reads it through `Shape`): tract
/// cannot type the graph up front, so it plans per input shape — right answers for every
/// batch, one plan per distinct shape reused on repeat, at most `TRACT_PLAN_CACHE` kept — and
/// ort (when present) agrees.
#[test]
fn unnamed_dynamic_axis_runs_on_tract_with_per_shape_plans() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "unnamed.onnx", unnamed_axis_model());
    let load = |p: Provider| Engine::load(&path, "unnamed", ProviderChoice::Only(p), &options());
    let (tract, _) = load(Provider::Tract).expect("tract must load a graph with an unnamed axis");
    assert_eq!(
        tract.specialised_plans(),
        Some(0),
        "planned before any shape was known"
    );
    let ort = if ort_info(&options()).is_ok() {
        let (e, _) = load(Provider::OrtCpu).unwrap();
        assert_eq!(e.specialised_plans(), None);
        Some(e)
    } else {
        None
    };
    let run = |engine: &Engine, batch: usize| {
        let x =
            ndarray::Array2::from_shape_fn((batch, 3), |(i, j)| (i * 3 + j) as f32 * 0.25 - 1.0);
        let out = engine
            .run(&[("x", Value::F32(x.clone().into_dyn()))])
            .unwrap();
        let y = out["y"].as_f32().unwrap().clone();
        assert_eq!(y.shape(), [batch, 2, 1]);
        let want = linear_expected(&x)
            .into_shape_with_order((batch, 2, 1))
            .unwrap()
            .into_dyn();
        assert!((&y - &want).iter().all(|d| d.abs() < 1e-5), "{y} vs {want}");
        y
    };
    for batch in [2, 5, 2] {
        let y = run(&tract, batch);
        if let Some(ort) = &ort {
            assert_eq!(run(ort, batch), y, "ort and tract differ at batch {batch}");
        }
    }
    assert_eq!(
        tract.specialised_plans(),
        Some(2),
        "batch 2 must reuse its plan"
    );
    for batch in 1..=TRACT_PLAN_CACHE + 3 {
        run(&tract, batch);
    }
    assert_eq!(tract.specialised_plans(), Some(TRACT_PLAN_CACHE));

    // A graph tract types with its symbolic axes keeps one plan.
    let linear = write(&dir, "linear.onnx", linear_model());
    let (e, _) = Engine::load(
        &linear,
        "linear",
        ProviderChoice::Only(Provider::Tract),
        &options(),
    )
    .unwrap();
    assert_eq!(e.specialised_plans(), None);
}

/// `EngineOptions::threads` (and `idle_wait`) reach both engines (tract's pool, onnxruntime's
/// intra-op threads) and change no result: a 64×96 · 96×80 product, large enough for tract to
/// split.
#[test]
fn thread_count_option_runs_both_engines_with_the_same_results() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = GraphBuilder::default();
    let x = g.input("x", FLOAT, &[D::S("batch"), D::N(96)]);
    let w = g.f32("W", &[96, 80], Lcg::new(7).vec(96 * 80, 0.5));
    g.node("MatMul", &[&x, &w], vec![], Some("y"));
    g.output("y", FLOAT, &[D::S("batch"), D::N(80)]);
    let path = write(&dir, "mm.onnx", g.finish(17));
    let x = ArrayD::from_shape_vec(IxDyn(&[64, 96]), Lcg::new(3).vec(64 * 96, 1.0)).unwrap();
    let mut providers = vec![Provider::Tract];
    if ort_info(&options()).is_ok() {
        providers.push(Provider::OrtCpu);
    }
    let mut outputs = Vec::new();
    // Two threads also with their idle threads sleeping (onnxruntime's spinning off, no
    // helpers on tract's pool).
    let settings = [
        (1, IdleWait::Spin),
        (2, IdleWait::Spin),
        (2, IdleWait::Sleep),
    ];
    for p in providers {
        for (threads, idle_wait) in settings {
            let opts = EngineOptions {
                threads: std::num::NonZeroUsize::new(threads),
                idle_wait,
                ..options()
            };
            let (e, _) = Engine::load(&path, "mm", ProviderChoice::Only(p), &opts).unwrap();
            let out = e.run(&[("x", Value::F32(x.clone()))]).unwrap();
            #[cfg(target_os = "linux")]
            if p == Provider::Tract && threads == 2 {
                // The option really started tract's pool (its threads are named by the engine).
                assert!(thread_appears("duet-tract-"), "no tract pool thread");
            }
            outputs.push((p, threads, out["y"].as_f32().unwrap().clone()));
        }
    }
    let (_, _, first) = &outputs[0];
    for (p, threads, y) in &outputs {
        let d = (y - first).iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(d < 1e-4, "{p} with {threads} thread(s) differs by {d}");
    }
}

#[test]
fn input_errors_are_typed() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let (engine, _) = Engine::load(
        &path,
        "linear",
        ProviderChoice::Only(Provider::Tract),
        &options(),
    )
    .unwrap();
    let x = Value::F32(ArrayD::zeros(IxDyn(&[1, 3])));
    assert!(matches!(
        engine.run(&[]),
        Err(EngineError::MissingInput { name, .. }) if name == "x"
    ));
    assert!(matches!(
        engine.run(&[("x", x.clone()), ("z", x.clone())]),
        Err(EngineError::UnknownInput { name, .. }) if name == "z"
    ));
    assert!(matches!(
        engine.run(&[("x", x.clone()), ("x", x)]),
        Err(EngineError::DuplicateInput { .. })
    ));
    assert!(matches!(
        engine.run(&[("x", Value::I64(ArrayD::zeros(IxDyn(&[1, 3]))))]),
        Err(EngineError::InputDType { .. })
    ));
    // A wrong shape is the backend's to reject, as an error rather than a panic.
    let bad = engine.run(&[("x", Value::F32(ArrayD::zeros(IxDyn(&[1, 5]))))]);
    assert!(matches!(bad, Err(EngineError::Run { .. })), "{bad:?}");
}

#[test]
fn missing_model_file() {
    let e = Engine::load(
        "/nonexistent/model.onnx",
        "g",
        ProviderChoice::Auto,
        &options(),
    )
    .unwrap_err();
    assert!(matches!(e, EngineError::ModelNotFound { .. }), "{e:?}");
}

#[test]
fn corrupt_model_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "bad.onnx", b"definitely not protobuf".to_vec());
    let e = Engine::load(
        &path,
        "bad",
        ProviderChoice::Only(Provider::Tract),
        &options(),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            EngineError::ProviderUnavailable {
                provider: Provider::Tract,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Engine::load(&path, "bad", ProviderChoice::Auto, &options()).unwrap_err();
    let skipped = match e {
        EngineError::NoProvider { skipped, .. } => skipped,
        other => panic!("{other:?}"),
    };
    assert_eq!(skipped.len(), 4);
    assert!(
        skipped.iter().all(|(_, why)| !why.is_empty()),
        "{skipped:?}"
    );
    if ort_lib().is_none() {
        return;
    }
    // onnxruntime's own words for the corrupt file are the ort-cpu skip reason …
    let (_, ort_reason) = skipped
        .iter()
        .find(|(p, _)| *p == Provider::OrtCpu)
        .unwrap();
    eprintln!("ort-cpu: {ort_reason}");
    assert!(
        ort_reason.contains("could not load the graph")
            && ort_reason
                .to_lowercase()
                .contains("protobuf parsing failed"),
        "{ort_reason}"
    );
    // … and strict mode turns that skip into an error naming the graph, ort-cpu and the reason.
    let strict = EngineOptions {
        strict: true,
        ..options()
    };
    match Engine::load(
        &path,
        "bad",
        ProviderChoice::Only(Provider::OrtCpu),
        &strict,
    ) {
        Err(e @ EngineError::ProviderUnavailable { .. }) => {
            let text = e.to_string();
            assert!(text.contains("bad") && text.contains("ort-cpu"), "{text}");
            assert!(text.contains(ort_reason.as_str()), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

/// Zero-length `past` (the first decode step), then a non-empty one, on both backends.
#[test]
fn zero_length_cache_axis_on_tract_and_ort() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "cache.onnx", cache_model());
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    }
    let mut results = Vec::new();
    for p in providers {
        let (engine, report) =
            Engine::load(&path, "cache", ProviderChoice::Only(p), &options()).unwrap();
        assert_eq!(report.used, p);
        let mut outs = Vec::new();
        let mut rng = Lcg::new(5);
        let mut past = ArrayD::<f32>::zeros(IxDyn(&[2, 0, 4]));
        for step in 0..3 {
            let x = ArrayD::from_shape_vec(IxDyn(&[2, 1, 4]), rng.vec(8, 1.0)).unwrap();
            let bias = ArrayD::<f32>::zeros(IxDyn(&[2, 1, step + 1]));
            let mut o = engine
                .run(&[
                    ("x", Value::F32(x)),
                    ("past", Value::F32(past.clone())),
                    ("bias", Value::F32(bias)),
                ])
                .unwrap_or_else(|e| panic!("{p} step {step}: {e}"));
            let present = o.remove("present").unwrap().into_f32().unwrap();
            assert_eq!(present.shape(), &[2, step + 1, 4], "{p}");
            outs.push(o.remove("out").unwrap().into_f32().unwrap());
            past = present;
        }
        results.push(outs);
    }
    if results.len() == 2 {
        for (a, b) in results[0].iter().zip(&results[1]) {
            let diff = (a - b).iter().fold(0f32, |m, d| m.max(d.abs()));
            assert!(diff < 1e-5, "tract vs ort-cpu differ by {diff}");
        }
    }
}

#[test]
fn ort_cpu_and_tract_agree() {
    if ort_lib().is_none() {
        eprintln!("skipping: onnxruntime not installed (scripts/setup-ort.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let opts = options();
    let (ort_e, ort_r) = Engine::load(
        &path,
        "linear",
        ProviderChoice::Only(Provider::OrtCpu),
        &opts,
    )
    .unwrap();
    let (tract_e, tract_r) = Engine::load(
        &path,
        "linear",
        ProviderChoice::Only(Provider::Tract),
        &opts,
    )
    .unwrap();
    assert_eq!(ort_r.used, Provider::OrtCpu);
    assert_eq!(tract_r.used, Provider::Tract);
    assert_eq!(ort_e.inputs(), tract_e.inputs());
    assert_eq!(ort_e.outputs(), tract_e.outputs());
    let x = array![[1.0f32, 2.0, 3.0], [-1.0, 0.5, 0.25], [0.0, 0.0, 1.0]];
    let a = ort_e
        .run(&[("x", Value::F32(x.clone().into_dyn()))])
        .unwrap();
    let b = tract_e
        .run(&[("x", Value::F32(x.clone().into_dyn()))])
        .unwrap();
    let (a, b) = (a["y"].as_f32().unwrap(), b["y"].as_f32().unwrap());
    assert_eq!(a.shape(), &[3, 2]);
    let want = linear_expected(&x).into_dyn();
    for row in 0..3 {
        for (u, v) in a
            .index_axis(Axis(0), row)
            .iter()
            .zip(b.index_axis(Axis(0), row))
        {
            assert!((u - v).abs() < 1e-5);
        }
    }
    assert!((a - &want).iter().all(|d| d.abs() < 1e-5));
    // A non-contiguous input view is copied, not rejected.
    let xt = x.t().as_standard_layout().into_owned();
    let xt_view = xt.t();
    assert!(!xt_view.is_standard_layout());
    let c = ort_e
        .run_views(&[("x", duet_runtime::ValueView::F32(xt_view.into_dyn()))])
        .unwrap();
    assert_eq!(c["y"].as_f32().unwrap(), a);
}

/// The PyPI onnxruntime is a CPU build: CUDA/TensorRT must be refused with onnxruntime's own
/// reason, never silently run on CPU.
#[test]
fn gpu_providers_report_real_reasons_on_cpu_onnxruntime() {
    if ort_lib().is_none() {
        eprintln!("skipping: onnxruntime not installed (scripts/setup-ort.sh)");
        return;
    }
    let opts = options();
    let info = ort_info(&opts).unwrap();
    assert!(
        info.providers.iter().any(|p| p == "CPUExecutionProvider"),
        "{info:?}"
    );
    if info.providers.iter().any(|p| p == "CUDAExecutionProvider") {
        eprintln!("skipping: this onnxruntime has CUDA compiled in");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());

    // Explicit provider: always an error, with the reason (TensorRT with its options set too).
    let trt_cache = tempfile::tempdir().unwrap();
    let with_trt_options = EngineOptions {
        tensorrt: duet_runtime::engine::TensorRtOptions {
            fp16: true,
            engine_cache: Some(trt_cache.path().to_path_buf()),
        },
        ..opts.clone()
    };
    for (p, o) in [
        (Provider::Cuda, &opts),
        (Provider::TensorRt, &opts),
        (Provider::TensorRt, &with_trt_options),
    ] {
        match Engine::load(&path, "linear", ProviderChoice::Only(p), o) {
            Err(EngineError::ProviderUnavailable {
                provider, reason, ..
            }) => {
                assert_eq!(provider, p);
                assert!(!reason.is_empty());
                eprintln!("{p}: {reason}");
            }
            other => panic!("{p}: {other:?}"),
        }
    }

    // auto: GPU providers skipped with reasons, the graph lands on ort-cpu.
    let (engine, report) = Engine::load(&path, "linear", ProviderChoice::Auto, &opts).unwrap();
    assert_eq!(engine.provider(), Provider::OrtCpu);
    assert_eq!(report.used, Provider::OrtCpu);
    let skipped: Vec<Provider> = report.skipped.iter().map(|(p, _)| *p).collect();
    assert_eq!(skipped, vec![Provider::TensorRt, Provider::Cuda]);
    assert!(report.to_string().contains("skipped cuda: "), "{report}");

    // strict auto: the first skip is an error.
    let strict = EngineOptions {
        strict: true,
        ..opts
    };
    match Engine::load(&path, "linear", ProviderChoice::Auto, &strict) {
        Err(EngineError::ProviderUnavailable { provider, .. }) => {
            assert_eq!(provider, Provider::TensorRt)
        }
        other => panic!("{other:?}"),
    }
}

#[test]
#[cfg(feature = "ort")]
fn missing_ort_library_is_a_skip_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let bogus = dir.path().join("no-such-libonnxruntime.so");
    let opts = EngineOptions {
        strict: false,
        ort_lib: Some(bogus.clone()),
        ..EngineOptions::default()
    };
    let (engine, report) = Engine::load(&path, "linear", ProviderChoice::Auto, &opts).unwrap();
    assert_eq!(engine.provider(), Provider::Tract);
    assert_eq!(report.skipped.len(), 3);
    for (_, reason) in &report.skipped {
        assert!(reason.contains("libonnxruntime not found"), "{reason}");
        assert!(reason.contains(&bogus.display().to_string()), "{reason}");
    }
    let strict = EngineOptions {
        strict: true,
        ..opts.clone()
    };
    assert!(matches!(
        Engine::load(&path, "linear", ProviderChoice::Auto, &strict),
        Err(EngineError::ProviderUnavailable {
            provider: Provider::TensorRt,
            ..
        })
    ));
    assert!(matches!(
        Engine::load(
            &path,
            "linear",
            ProviderChoice::Only(Provider::OrtCpu),
            &opts
        ),
        Err(EngineError::ProviderUnavailable {
            provider: Provider::OrtCpu,
            ..
        })
    ));
    assert!(ort_info(&opts).is_err());
}

/// Engines and the captioner are shared across threads (`run` takes `&self`).
#[test]
fn engines_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Engine>();
    assert_send_sync::<duet_runtime::Captioner>();
}

/// The provider report is checked against onnxruntime's own profiler: the nodes of a graph
/// reported on `ort-cpu` ran on `CPUExecutionProvider`, and that placement does not pass for a
/// GPU provider. tract reports its own plan.
#[test]
fn reported_provider_is_where_ort_profiling_says_the_nodes_ran() {
    if ort_lib().is_none() {
        eprintln!("skipping: onnxruntime not installed (scripts/setup-ort.sh)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let opts = options();
    let x = array![[1.0f32, 2.0, 3.0]].into_dyn();
    let (engine, report) = Engine::load(&path, "linear", ProviderChoice::Auto, &opts).unwrap();
    let placement = engine
        .placement(&[("x", duet_runtime::ValueView::F32(x.view()))])
        .unwrap();
    eprintln!("{report}\n  profiled: {placement}");
    assert!(
        placement.matches(report.used),
        "reported {} but ran: {placement}",
        report.used
    );
    if report.used == Provider::OrtCpu {
        // Every node of the linear model (MatMul + Add, fused or not) on the CPU EP.
        assert_eq!(
            placement.nodes.get("CPUExecutionProvider").copied(),
            Some(placement.nodes.values().sum::<usize>())
        );
        assert!(placement.nodes["CPUExecutionProvider"] >= 1);
        assert!(!placement.matches(Provider::Cuda));
        assert!(!placement.matches(Provider::TensorRt));
    }
    // The profile file is removed after reading.
    let leftovers = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!("duet-profile-{}-", std::process::id()))
        })
        .count();
    assert_eq!(leftovers, 0);

    let (tract, _) = Engine::load(
        &path,
        "linear",
        ProviderChoice::Only(Provider::Tract),
        &opts,
    )
    .unwrap();
    let placement = tract
        .placement(&[("x", duet_runtime::ValueView::F32(x.view()))])
        .unwrap();
    assert!(placement.matches(Provider::Tract), "{placement}");
    assert!(!placement.matches(Provider::OrtCpu));
}

/// Inputs of every element type the engines feed, with the values as f32 (what `Cast` gives).
fn dtype_inputs(dtype: DType) -> (Value, Vec<f32>) {
    let f = [1.5f32, -2.0, 0.25, 1024.0, -0.0625, 3.0];
    let i = [-3i64, 0, 7, 100, -128, 127];
    let shape = IxDyn(&[2, 3]);
    let v = match dtype {
        DType::F32 => Value::F32(ArrayD::from_shape_vec(shape, f.to_vec()).unwrap()),
        DType::F16 => Value::F16(
            ArrayD::from_shape_vec(shape, f.iter().map(|&v| half::f16::from_f32(v)).collect())
                .unwrap(),
        ),
        DType::I64 => Value::I64(ArrayD::from_shape_vec(shape, i.to_vec()).unwrap()),
        DType::I32 => Value::I32(
            ArrayD::from_shape_vec(shape, i.iter().map(|&v| v as i32).collect()).unwrap(),
        ),
        DType::I8 => {
            Value::I8(ArrayD::from_shape_vec(shape, i.iter().map(|&v| v as i8).collect()).unwrap())
        }
        DType::U8 => {
            Value::U8(ArrayD::from_shape_vec(shape, vec![0u8, 1, 7, 100, 200, 255]).unwrap())
        }
        DType::Bool => Value::Bool(
            ArrayD::from_shape_vec(shape, vec![true, false, false, true, true, false]).unwrap(),
        ),
    };
    let as_f32 = match &v {
        Value::F32(a) => a.iter().copied().collect(),
        Value::F16(a) => a.iter().map(|v| v.to_f32()).collect(),
        Value::I64(a) => a.iter().map(|&v| v as f32).collect(),
        Value::I32(a) => a.iter().map(|&v| v as f32).collect(),
        Value::I8(a) => a.iter().map(|&v| v as f32).collect(),
        Value::U8(a) => a.iter().map(|&v| v as f32).collect(),
        Value::Bool(a) => a.iter().map(|&v| if v { 1.0 } else { 0.0 }).collect(),
    };
    (v, as_f32)
}

/// Every element type the engines feed goes in and comes back out unchanged on tract and on
/// ort's CPU provider, and the graph sees the same values (its own `Cast` to f32); the I/O
/// metadata names each type and keeps the symbolic axis's name.
#[test]
fn every_supported_element_type_runs_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    } else {
        eprintln!("onnxruntime not installed: tract only (scripts/setup-ort.sh)");
    }
    let axes = Some(vec![
        Some(DimSpec::Symbolic("batch".into())),
        Some(DimSpec::Fixed(3)),
    ]);
    for dtype in DType::ALL {
        let path = write(
            &dir,
            &format!("{dtype}.onnx"),
            dtype_model(dtype.onnx_code()),
        );
        let (x, want) = dtype_inputs(dtype);
        for &provider in &providers {
            let (engine, _) =
                Engine::load(&path, "dtype", ProviderChoice::Only(provider), &options())
                    .unwrap_or_else(|e| panic!("{dtype} on {provider}: {e}"));
            assert_eq!(
                engine.inputs(),
                [IoInfo {
                    name: "x".into(),
                    dtype: Some(dtype),
                    dims: axes.clone()
                }],
                "{dtype} on {provider}"
            );
            let out: Vec<(&str, Option<DType>)> = engine
                .outputs()
                .iter()
                .map(|o| (o.name.as_str(), o.dtype))
                .collect();
            assert_eq!(
                out,
                [("same", Some(dtype)), ("as_f32", Some(DType::F32))],
                "{dtype} on {provider}"
            );
            assert_eq!(engine.outputs()[0].dims, axes, "{dtype} on {provider}");
            let got = engine
                .run(&[("x", x.clone())])
                .unwrap_or_else(|e| panic!("{dtype} on {provider}: {e}"));
            assert_eq!(got["same"], x, "{dtype} on {provider}");
            let seen: Vec<f32> = got["as_f32"].as_f32().unwrap().iter().copied().collect();
            assert_eq!(seen, want, "{dtype} on {provider}");
        }
    }
}

/// A graph input of a type the engines do not feed (f64 here) is described as such and
/// refused by name at run time on both engines, before anything runs.
#[test]
fn an_input_type_the_engines_do_not_feed_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let double = tract_onnx::pb::tensor_proto::DataType::Double as i32;
    let path = write(&dir, "f64.onnx", dtype_model(double));
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    }
    for provider in providers {
        let (engine, _) =
            Engine::load(&path, "f64", ProviderChoice::Only(provider), &options()).unwrap();
        assert_eq!(engine.inputs()[0].dtype, None, "{provider}");
        assert_eq!(
            engine.inputs()[0].to_string(),
            "x: unsupported type [batch, 3]"
        );
        let x = Value::F32(ArrayD::zeros(IxDyn(&[1, 3])));
        let e = engine.run(&[("x", x)]).unwrap_err();
        assert!(
            matches!(&e, EngineError::UnsupportedInputType { name, .. } if name == "x"),
            "{provider}: {e}"
        );
        assert_eq!(e.kind(), duet_runtime::ErrorKind::Unsupported);
    }
}

/// `Engine::op_profile` on each engine: the graph's product is in it, every node onnxruntime
/// ran is in exactly one op row (tract's plan also holds constants it never evaluates), the
/// runs are the ones asked for, and each row's time is a real, non-negative duration.
#[test]
fn op_profiles_cover_every_node_the_engine_ran() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "linear.onnx", linear_model());
    let mut providers = vec![Provider::Tract];
    if ort_lib().is_some() {
        providers.push(Provider::OrtCpu);
    }
    let x = Value::F32(ndarray::Array2::<f32>::ones((4, 3)).into_dyn());
    for p in providers {
        let (engine, _) =
            Engine::load(&path, "linear", ProviderChoice::Only(p), &options()).unwrap();
        let inputs = [("x", x.view())];
        let profile = engine.op_profile(&inputs, 3).unwrap();
        assert_eq!(profile.runs, 3, "{p}");
        assert!(!profile.ops.is_empty(), "{p}: {profile:?}");
        let placed: usize = engine.placement(&inputs).unwrap().nodes.values().sum();
        let profiled: usize = profile.ops.iter().map(|o| o.nodes).sum();
        match p {
            Provider::Tract => assert!(profiled <= placed, "{p}: {placed}: {profile:?}"),
            _ => assert_eq!(profiled, placed, "{p}: {profile:?}"),
        }
        assert!(
            profile
                .ops
                .iter()
                // onnxruntime's kernels; on tract, duet's own product op.
                .any(|o| o.op.contains("MatMul") || o.op == "Gemm" || o.op == "StridedProduct"),
            "{p}: {profile:?}"
        );
        assert!(
            profile
                .ops
                .iter()
                .all(|o| o.ms_per_run.is_finite() && o.ms_per_run >= 0.0),
            "{p}: {profile:?}"
        );
        assert!(
            profile
                .ops
                .windows(2)
                .all(|w| w[0].ms_per_run >= w[1].ms_per_run),
            "{p}: slowest first: {profile:?}"
        );
        // A wrong input is the same typed error as for `run`.
        let bad = Value::F32(ndarray::Array2::<f32>::ones((4, 5)).into_dyn());
        assert!(engine.op_profile(&[("x", bad.view())], 3).is_err(), "{p}");
    }
}

/// The element-wise ops tract leaves on its slow generic path in duet's graphs — a per-sample
/// vector broadcast over the middle axes (`[B, T, D] ⊙ [B, 1, D]`, the denoiser's adaLN
/// modulation) and same-shape ops with a symbolic batch — run as the engine's own
/// `Broadcast*` ops on tract, and both engines give the values of the same f32 operations in
/// ndarray. An op with the small operand first (`s - x`) is not
/// taken over and stays right.
#[test]
fn broadcasting_ops_are_rewritten_on_tract_and_exact() {
    let (t, d) = (5usize, 16usize);
    let mut g = GraphBuilder::default();
    let batch = || D::S("batch");
    let x = g.input("x", FLOAT, &[batch(), D::N(t as i64), D::N(d as i64)]);
    let s = g.input("s", FLOAT, &[batch(), D::N(1), D::N(d as i64)]);
    let y = g.input("y", FLOAT, &[batch(), D::N(t as i64), D::N(d as i64)]);
    let a = g.op("Add", &[&x, &s]);
    let a = g.op("Mul", &[&a, &s]);
    let a = g.op("Sub", &[&a, &s]);
    let a = g.op("Div", &[&a, &s]);
    let a = g.op("Add", &[&a, &y]);
    let per_token: Vec<f32> = (0..t).map(|j| j as f32 * 0.25 - 0.5).collect();
    let c = g.f32("c", &[1, t, 1], per_token.clone());
    let a = g.op("Add", &[&a, &c]);
    let a = g.op("Mul", &[&s, &a]);
    g.node("Sub", &[&s, &a], vec![], Some("out"));
    g.output("out", FLOAT, &[batch(), D::N(t as i64), D::N(d as i64)]);
    let dir = tempfile::tempdir().unwrap();
    let path = write(&dir, "mid.onnx", g.finish(18));

    let mut rng = Lcg::new(3);
    for b in [1usize, 3] {
        let arr = |shape: &[usize], rng: &mut Lcg| {
            ArrayD::from_shape_vec(IxDyn(shape), rng.vec(shape.iter().product(), 2.0)).unwrap()
        };
        let xs = arr(&[b, t, d], &mut rng);
        // Away from zero: it divides.
        let ss = arr(&[b, 1, d], &mut rng).mapv(|v| v.signum() * (v.abs() + 0.5));
        let ys = arr(&[b, t, d], &mut rng);
        let mut want = ArrayD::<f32>::zeros(IxDyn(&[b, t, d]));
        for i in 0..b {
            for j in 0..t {
                for k in 0..d {
                    let (xv, sv, yv) = (xs[[i, j, k]], ss[[i, 0, k]], ys[[i, j, k]]);
                    let v = ((((xv + sv) * sv - sv) / sv) + yv) + per_token[j];
                    want[[i, j, k]] = sv - sv * v;
                }
            }
        }
        let inputs = [
            ("x", Value::F32(xs.clone())),
            ("s", Value::F32(ss.clone())),
            ("y", Value::F32(ys.clone())),
        ];
        let mut providers = vec![Provider::Tract];
        if ort_lib().is_some() {
            providers.push(Provider::OrtCpu);
        }
        for p in providers {
            let (engine, _) =
                Engine::load(&path, "mid", ProviderChoice::Only(p), &options()).unwrap();
            let out = engine.run(&inputs).unwrap();
            let got = out["out"].as_f32().unwrap();
            // Within rounding of the reference: an engine may divide by multiplying with the
            // reciprocal (bit-exactness to tract's own ops is the unit test's job).
            let worst = (got - &want)
                .iter()
                .zip(&want)
                .fold(0f32, |m, (e, w)| m.max(e.abs() / w.abs().max(1.0)));
            assert!(worst < 1e-5, "{p}, batch {b}: {worst}");
            if p == Provider::Tract {
                let views: Vec<_> = inputs.iter().map(|(n, v)| (*n, v.view())).collect();
                let profile = engine.op_profile(&views, 1).unwrap();
                let rewritten: usize = profile
                    .ops
                    .iter()
                    .filter(|o| o.op.starts_with("Broadcast"))
                    .map(|o| o.nodes)
                    .sum();
                // x + s, · s, - s, · (1 / s) (tract's division), + y, + c (per token), and
                // s · (…) (operands swapped); s - (…) stays tract's.
                assert_eq!(rewritten, 7, "batch {b}: {profile:?}");
            }
        }
    }
}
