//! Atomic file writes: datasets, checkpoints, tokenizers and metrics snapshots are written to a
//! temporary file in the destination directory, fsynced and renamed into place, so a crash
//! never leaves a half-written file under the final name.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `path` through a temporary file beside it: created exclusively (O_EXCL)
/// under an unpredictable name, so a symlink planted in the directory cannot redirect the
/// write; every write and the sync are checked before the rename, so a full disk is an error
/// and the previous file stays whole. On any error the temporary file is removed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Encodes `img` as PNG and writes it atomically (grids, plots).
pub fn write_png(path: &Path, img: &image::RgbImage) -> std::io::Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    write_atomic(path, &png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
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

    /// A failed rename (the target is a directory) is an error that leaves the target as it
    /// was and removes the temporary file; the old predictable name `.NAME.tmp-PID`, planted as
    /// a symlink to another file, is neither followed nor touched.
    #[test]
    fn a_failed_write_keeps_the_target_and_ignores_a_planted_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("keep"), b"x").unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let planted = dir.path().join(format!(".out.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&victim, &planted).unwrap();

        assert!(write_atomic(&target, b"new").is_err());
        assert_eq!(std::fs::read(target.join("keep")).unwrap(), b"x");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(
            entries(dir.path()),
            vec![
                ".out.tmp-".to_string() + &std::process::id().to_string(),
                "out".into(),
                "victim".into()
            ]
        );
    }
}
