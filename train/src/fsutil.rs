//! Atomic file writes: datasets, checkpoints, tokenizers and metrics snapshots are written to a
//! temporary file in the destination directory, fsynced and renamed into place, so a crash
//! never leaves a half-written file under the final name (the one helper, `duet-fsio`, with the
//! directory created first).

use std::path::Path;

/// Writes `bytes` to `path` atomically through [`duet_fsio::write_atomic`] (an O_EXCL temporary
/// file beside it, every write and the sync checked, then a rename), creating the directory
/// first: training runs write into run folders they make as they go.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    duet_fsio::write_atomic(path, bytes)
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

    /// The run folder is created on the way (the O_EXCL and full-disk cases are tested in
    /// `duet-fsio`, which does the write).
    #[test]
    fn creates_the_directory_and_writes() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run").join("step-1").join("a.bin");
        write_atomic(&out, b"contents").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"contents");
    }
}
