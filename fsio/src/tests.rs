use super::*;

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

const CAP: Cap = Cap::new(1 << 20, "a test file");

#[test]
fn reads_a_regular_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    std::fs::write(&p, b"hello").unwrap();
    assert_eq!(read_capped(&p, CAP, Follow::No).unwrap(), b"hello");
    assert_eq!(read_capped_text(&p, CAP, Follow::Yes).unwrap(), "hello");
}

#[test]
fn a_missing_file_is_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let err = read_capped(&dir.path().join("nope"), CAP, Follow::Yes).unwrap_err();
    assert!(matches!(err, ReadError::NotFound { .. }), "{err}");
}

#[test]
fn a_file_over_the_cap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("big");
    std::fs::write(&p, vec![0u8; 1001]).unwrap();
    let cap = Cap::new(1000, "a small thing");
    let err = read_capped(&p, cap, Follow::Yes).unwrap_err();
    assert!(
        matches!(err, ReadError::TooLarge { cap: 1000, .. }),
        "{err}"
    );
    assert!(err
        .to_string()
        .contains("1000-byte limit for a small thing"));
    std::fs::write(&p, vec![0u8; 1000]).unwrap();
    assert_eq!(read_capped(&p, cap, Follow::Yes).unwrap().len(), 1000);
}

/// A FIFO with no writer would block `open` for ever; it is refused at once.
#[cfg(unix)]
#[test]
fn a_fifo_is_refused_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fifo");
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let err = read_capped(&p, CAP, Follow::Yes).unwrap_err();
    assert!(
        matches!(err, ReadError::NotRegular { kind: "a FIFO", .. }),
        "{err}"
    );
}

/// `/dev/zero` never ends and a directory is not a file: both are typed refusals.
#[cfg(unix)]
#[test]
fn devices_and_directories_are_refused() {
    let err = read_capped(Path::new("/dev/zero"), CAP, Follow::Yes).unwrap_err();
    assert!(
        matches!(
            err,
            ReadError::NotRegular {
                kind: "a character device",
                ..
            }
        ),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = read_capped(dir.path(), CAP, Follow::Yes).unwrap_err();
    assert!(
        matches!(
            err,
            ReadError::NotRegular {
                kind: "a directory",
                ..
            }
        ),
        "{err}"
    );
}

#[cfg(unix)]
#[test]
fn a_symlink_is_refused_unless_followed() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"secret").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let err = read_capped(&link, CAP, Follow::No).unwrap_err();
    assert!(matches!(err, ReadError::Symlink { .. }), "{err}");
    assert_eq!(read_capped(&link, CAP, Follow::Yes).unwrap(), b"secret");
}

#[test]
fn replaces_the_file_and_leaves_no_temporary_behind() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.bin");
    std::fs::write(&out, b"old").unwrap();
    write_atomic(&out, b"new contents").unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"new contents");
    assert_eq!(entries(dir.path()), vec!["a.bin".to_string()]);
}

/// A write that fails half-way (what a full disk does) is an error; the old file stays whole
/// and the temporary file is gone.
#[test]
fn a_failed_write_keeps_the_old_file() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("a.png");
    std::fs::write(&out, b"old picture").unwrap();
    let err = write_atomic_with(&out, |f| {
        f.write_all(b"half")?;
        Err(io::Error::other("No space left on device"))
    })
    .unwrap_err();
    assert!(err.to_string().contains("No space left"));
    assert_eq!(std::fs::read(&out).unwrap(), b"old picture");
    assert_eq!(entries(dir.path()), vec!["a.png".to_string()]);
}

/// A failed rename (the target is a directory) is an error that leaves the target as it was
/// and removes the temporary file; the old predictable name `.NAME.tmp-PID`, planted as a
/// symlink to another file, is neither followed nor touched.
#[cfg(unix)]
#[test]
fn a_failed_rename_keeps_the_target_and_ignores_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(target.join("keep"), b"x").unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let planted_name = format!(".out.tmp-{}", std::process::id());
    std::os::unix::fs::symlink(&victim, dir.path().join(&planted_name)).unwrap();

    assert!(write_atomic(&target, b"new").is_err());
    assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(
        entries(dir.path()),
        vec![planted_name, "out".into(), "victim".into()]
    );
}

#[test]
fn a_missing_parent_directory_is_an_error_not_created() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no-such-dir").join("a.bin");
    assert!(write_atomic(&out, b"x").is_err());
    assert!(!dir.path().join("no-such-dir").exists());
}

#[test]
fn replace_dir_swaps_a_whole_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("data");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old"), b"1").unwrap();
    let built = temp_dir_beside(&out).unwrap();
    std::fs::write(built.path().join("new"), b"2").unwrap();
    replace_dir(built, &out).unwrap();
    assert_eq!(entries(&out), vec!["new".to_string()]);
    assert_eq!(entries(dir.path()), vec!["data".to_string()]);
    // And into a place where nothing was.
    let fresh = dir.path().join("fresh");
    let built = temp_dir_beside(&fresh).unwrap();
    std::fs::write(built.path().join("f"), b"3").unwrap();
    replace_dir(built, &fresh).unwrap();
    assert_eq!(entries(&fresh), vec!["f".to_string()]);
}

/// The folder is made on the way; the write itself is the same atomic one.
#[test]
fn write_atomic_creating_dir_makes_the_folders() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run").join("step-1").join("a.bin");
    assert!(
        write_atomic(&out, b"x").is_err(),
        "plain write_atomic needs the folder"
    );
    write_atomic_creating_dir(&out, b"contents").unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), b"contents");
    assert_eq!(entries(out.parent().unwrap()), ["a.bin"]);
}
