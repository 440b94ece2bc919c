//! Single-file bundles: a packed bundle opens, verifies and captions exactly like its
//! directory, unpacks back to the same bytes, packs reproducibly; archives that say more than
//! "these plain files" are refused with a typed error (reading never writes: nothing is
//! extracted).

use std::path::{Path, PathBuf};

use duet_runtime::bundle::archive::{pack, unpack};
use duet_runtime::engine::{EngineOptions, Provider, ProviderChoice};
use duet_runtime::{Bundle, BundleError, Captioner, ErrorKind};
use duet_testkit::caption_bundle;

fn packed(dir: &Path) -> (PathBuf, PathBuf) {
    let bundle_dir = dir.join("bundle");
    std::fs::create_dir(&bundle_dir).unwrap();
    caption_bundle(&bundle_dir, -100.0);
    let file = dir.join("model.duet");
    pack(&Bundle::open(&bundle_dir).unwrap(), &file).unwrap();
    (bundle_dir, file)
}

fn captions(bundle: &Bundle) -> Vec<String> {
    let c = Captioner::new(
        bundle,
        ProviderChoice::Only(Provider::Tract),
        &EngineOptions::default(),
    )
    .unwrap();
    let imgs: Vec<image::RgbImage> = (0..3u8)
        .map(|k| {
            image::RgbImage::from_fn(8, 8, |x, y| {
                image::Rgb([k * 80, x as u8 * 30, y as u8 * 30])
            })
        })
        .collect();
    c.caption_images(&imgs).unwrap()
}

#[test]
fn a_packed_bundle_works_like_its_directory_and_unpacks_to_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle_dir, file) = packed(dir.path());
    let from_dir = Bundle::open(&bundle_dir).unwrap();
    let from_file = Bundle::open(&file).unwrap();
    assert_eq!(from_file.manifest(), from_dir.manifest());
    for name in from_dir.manifest().files.keys() {
        assert_eq!(
            from_file.file_bytes(name),
            from_dir.file_bytes(name),
            "{name}"
        );
    }
    assert_eq!(captions(&from_file), captions(&from_dir));

    // The archive lists the manifest first, then the files in the manifest's order.
    let bytes = std::fs::read(&file).unwrap();
    let mut archive = tar::Archive::new(&bytes[..]);
    let names: Vec<String> = archive
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect();
    let mut want = vec!["manifest.json".to_string()];
    want.extend(from_dir.manifest().files.keys().cloned());
    assert_eq!(names, want);

    // Packing again gives the same bytes; unpacking gives the directory's files back.
    let again = dir.path().join("again.duet");
    pack(&from_file, &again).unwrap();
    assert_eq!(std::fs::read(&again).unwrap(), bytes);
    let out = dir.path().join("unpacked");
    unpack(&from_file, &out).unwrap();
    for name in names {
        assert_eq!(
            std::fs::read(out.join(&name)).unwrap(),
            std::fs::read(bundle_dir.join(&name)).unwrap(),
            "{name}"
        );
    }
    // Unpacking never writes into an existing directory.
    let e = unpack(&from_file, &out).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}

/// One tar entry with any name and type: written header by header, so names the `tar`
/// crate's own builder refuses (`..`, absolute paths) can be made.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: tar::EntryType, data: &[u8], link: Option<&str>) {
    let mut h = tar::Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        if let Some(l) = link {
            gnu.linkname[..l.len()].copy_from_slice(l.as_bytes());
        }
    }
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(kind);
    h.set_cksum();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

/// The entries of a good archive, to rebuild variants of it.
fn entries(file: &Path) -> Vec<(String, Vec<u8>)> {
    let bytes = std::fs::read(file).unwrap();
    let mut archive = tar::Archive::new(&bytes[..]);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = e.path().unwrap().display().to_string();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            (name, data)
        })
        .collect()
}

fn archive_of(entries: &[(String, Vec<u8>)], extra: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, data) in entries {
        raw_entry(&mut out, name, tar::EntryType::Regular, data, None);
    }
    extra(&mut out);
    out.extend_from_slice(&[0; 1024]);
    out
}

#[test]
fn archives_with_more_than_plain_listed_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = packed(dir.path());
    let good_entries = entries(&good);
    let regular = tar::EntryType::Regular;
    type Case = (&'static str, Vec<u8>, &'static str);
    let mut cases: Vec<Case> = vec![
        (
            "parent",
            archive_of(&good_entries, |o| {
                raw_entry(o, "../evil", regular, b"x", None)
            }),
            "entry `../evil` is not a plain file name",
        ),
        (
            "absolute",
            archive_of(&good_entries, |o| {
                raw_entry(o, "/tmp/evil", regular, b"x", None)
            }),
            "entry `/tmp/evil` is not a plain file name",
        ),
        (
            "nested",
            archive_of(&good_entries, |o| {
                raw_entry(o, "sub/evil", regular, b"x", None)
            }),
            "entry `sub/evil` is not a plain file name",
        ),
        (
            "symlink",
            archive_of(&good_entries, |o| {
                raw_entry(o, "link", tar::EntryType::Symlink, b"", Some("/etc/passwd"))
            }),
            "entry `link` is not a regular file",
        ),
        (
            "directory",
            archive_of(&good_entries, |o| {
                raw_entry(o, "sub", tar::EntryType::Directory, b"", None)
            }),
            "entry `sub` is not a regular file",
        ),
        (
            "duplicate",
            archive_of(&good_entries, |o| {
                raw_entry(o, "tokenizer.json", regular, b"{}", None)
            }),
            "entry `tokenizer.json` appears twice",
        ),
        (
            "unlisted",
            archive_of(&good_entries, |o| {
                raw_entry(o, "notes.txt", regular, b"x", None)
            }),
            "entry `notes.txt` is not listed in the manifest",
        ),
        (
            "not tar",
            b"this is not an archive at all".repeat(40),
            "refused",
        ),
    ];
    // A truncated archive: cut inside the last entry's data.
    let full = std::fs::read(&good).unwrap();
    cases.push(("truncated", full[..full.len() - 2048].to_vec(), "refused"));
    for (what, bytes, want) in cases {
        let path = dir.path().join(format!("{what}.duet"));
        std::fs::write(&path, &bytes).unwrap();
        let e = Bundle::open(&path).unwrap_err();
        assert!(matches!(e, BundleError::Archive { .. }), "{what}: {e:?}");
        assert_eq!(e.kind(), ErrorKind::Bundle, "{what}");
        assert!(e.to_string().contains(want), "{what}: {e}");
    }

    // A listed file whose bytes changed, and one left out: the manifest's own checks.
    let mut tampered = good_entries.clone();
    let ix = tampered
        .iter()
        .position(|(n, _)| n == "vision_encoder.onnx")
        .unwrap();
    tampered[ix].1[100] ^= 1;
    let path = dir.path().join("tampered.duet");
    std::fs::write(&path, archive_of(&tampered, |_| {})).unwrap();
    let e = Bundle::open(&path).unwrap_err();
    assert!(
        matches!(e, BundleError::HashMismatch { ref file, .. } if file == "vision_encoder.onnx"),
        "{e:?}"
    );
    let mut missing = good_entries.clone();
    missing.remove(ix);
    let path = dir.path().join("missing.duet");
    std::fs::write(&path, archive_of(&missing, |_| {})).unwrap();
    let e = Bundle::open(&path).unwrap_err();
    assert!(matches!(e, BundleError::MissingFile { .. }), "{e:?}");
    assert!(
        e.to_string().contains("missing.duet/vision_encoder.onnx"),
        "{e}"
    );
}

/// Sizes and bytes the header and the file disagree on: a tiny file claiming gigabytes is
/// refused before anything is reserved, and bytes after the end of the archive are refused.
#[test]
fn claimed_sizes_and_trailing_bytes_are_checked_against_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (_, good) = packed(dir.path());
    let good_entries = entries(&good);

    // A header claiming 1.5 GiB (under the graph cap) in a file of a few KB.
    let mut liar = Vec::new();
    raw_entry(
        &mut liar,
        "manifest.json",
        tar::EntryType::Regular,
        b"{}",
        None,
    );
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..19].copy_from_slice(b"vision_encoder.onnx");
    h.set_size(3 << 29);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_cksum();
    liar.extend_from_slice(h.as_bytes());
    liar.extend_from_slice(&[7; 512]);
    let path = dir.path().join("liar.duet");
    std::fs::write(&path, &liar).unwrap();
    let e = Bundle::open(&path).unwrap_err();
    assert!(
        e.to_string()
            .contains("claims 1610612736 bytes but the archive holds 512"),
        "{e}"
    );

    // Bytes after the end-of-archive blocks.
    let mut trailing = archive_of(&good_entries, |_| {});
    trailing.extend_from_slice(b"appended after the end");
    let path = dir.path().join("trailing.duet");
    std::fs::write(&path, &trailing).unwrap();
    let e = Bundle::open(&path).unwrap_err();
    assert!(
        e.to_string().contains("bytes after the end of the archive"),
        "{e}"
    );
    // Zero padding after the end is what tar writers add, and is accepted.
    let mut padded = archive_of(&good_entries, |_| {});
    padded.extend_from_slice(&[0; 4096]);
    let path = dir.path().join("padded.duet");
    std::fs::write(&path, &padded).unwrap();
    Bundle::open(&path).unwrap();
}
