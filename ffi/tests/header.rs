//! The committed `include/duet.h` is exactly what cbindgen generates from `src/lib.rs`.
//! `DUET_BLESS=1 cargo test -p duet-ffi --test header` rewrites it after an API change.

use std::path::Path;

#[test]
fn committed_header_is_up_to_date() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config =
        cbindgen::Config::from_file(crate_dir.join("cbindgen.toml")).expect("cbindgen.toml");
    let mut generated = Vec::new();
    cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .expect("cbindgen generates the header")
        .write(&mut generated);
    let path = crate_dir.join("include/duet.h");
    if std::env::var_os("DUET_BLESS").is_some() {
        std::fs::write(&path, &generated).expect("write header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with `DUET_BLESS=1 cargo test -p duet-ffi --test header`",
        path.display()
    );
}
