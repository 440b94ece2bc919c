//! A fresh process (own test binary) in which onnxruntime has never been loaded: a bogus
//! `ORT_DYLIB_PATH` or a file that is not a library must become a skip reason (or a strict
//! error), never a panic, and must not stop the real library from loading afterwards.

#![cfg_attr(not(feature = "ort"), allow(unused_imports))]

use duet_testkit as common;

use common::*;
use duet_runtime::engine::{
    ort_info, Engine, EngineError, EngineOptions, Provider, ProviderChoice,
};

#[test]
#[cfg(feature = "ort")]
fn bogus_ort_library_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("linear.onnx");
    std::fs::write(&model, linear_model()).unwrap();

    // 1. A file that exists but is not a shared library.
    let garbage = dir.path().join("libonnxruntime.so");
    std::fs::write(&garbage, b"not an ELF file").unwrap();
    let opts = EngineOptions {
        strict: false,
        ort_lib: Some(garbage.clone()),
        ..EngineOptions::default()
    };
    let (engine, report) = Engine::load(&model, "linear", ProviderChoice::Auto, &opts).unwrap();
    assert_eq!(engine.provider(), Provider::Tract);
    for (_, reason) in &report.skipped {
        assert!(reason.contains(&garbage.display().to_string()), "{reason}");
    }
    eprintln!("{report}");
    let strict = EngineOptions {
        strict: true,
        ..opts
    };
    assert!(matches!(
        Engine::load(&model, "linear", ProviderChoice::Auto, &strict),
        Err(EngineError::ProviderUnavailable {
            provider: Provider::TensorRt,
            ..
        })
    ));

    // 2. ORT_DYLIB_PATH pointing nowhere (this binary runs only this test, so setting the
    //    variable cannot race with another test).
    std::env::set_var("ORT_DYLIB_PATH", dir.path().join("nowhere.so"));
    let env_opts = EngineOptions::default();
    let err = ort_info(&env_opts).unwrap_err();
    assert!(
        err.contains("libonnxruntime not found") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
    match Engine::load(
        &model,
        "linear",
        ProviderChoice::Only(Provider::OrtCpu),
        &env_opts,
    ) {
        Err(EngineError::ProviderUnavailable { reason, .. }) => {
            assert!(reason.contains("nowhere.so"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    std::env::remove_var("ORT_DYLIB_PATH");

    // 3. The real library still loads after those failures.
    if let Some(lib) = ort_lib() {
        let good = EngineOptions {
            strict: false,
            ort_lib: Some(lib),
            ..EngineOptions::default()
        };
        let (engine, _) = Engine::load(
            &model,
            "linear",
            ProviderChoice::Only(Provider::OrtCpu),
            &good,
        )
        .unwrap();
        assert_eq!(engine.provider(), Provider::OrtCpu);
    }
}
