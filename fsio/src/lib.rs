//! File reads and writes that an untrusted path cannot abuse — the one place in the workspace
//! that opens a file given by a user or named inside a bundle, and the one place that replaces a
//! file.
//!
//! - [`read_capped`] reads a **regular file** (never a FIFO, device, socket or directory, which
//!   could block or never end) of at most `cap` bytes, in one pass, so that whoever hashes the
//!   bytes also loads those bytes; [`Follow::No`] refuses a symbolic link as the last component.
//! - [`write_atomic`] replaces a file through a temporary file created exclusively (O_EXCL)
//!   under an unpredictable name beside it, checks every write and the final `sync_all`, then
//!   renames; on any error the old file stays whole and the temporary file is removed.
//!
//! Written on top of `std` and `tempfile` rather than a bigger crate because the checks are the
//! point: open without blocking, then `fstat` the open descriptor (not the path, which could be
//! swapped in between), then read no more than the cap.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

pub use tempfile::TempDir;
use thiserror::Error;

/// Why a file could not be read.
#[derive(Debug, Error)]
pub enum ReadError {
    #[error("{} does not exist", path.display())]
    NotFound { path: PathBuf },
    #[error("{} is {kind}, not a regular file", path.display())]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("{} is a symbolic link, which is not followed here", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is larger than the {cap}-byte limit for {what}", path.display())]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        cap: u64,
    },
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ReadError {
    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            ReadError::NotFound { path }
            | ReadError::NotRegular { path, .. }
            | ReadError::Symlink { path }
            | ReadError::TooLarge { path, .. }
            | ReadError::Io { path, .. } => path,
        }
    }
}

/// Whether a symbolic link as the path's last component is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    Yes,
    No,
}

/// A size limit with the name of what it limits, for the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap {
    pub bytes: u64,
    pub what: &'static str,
}

impl Cap {
    pub const fn new(bytes: u64, what: &'static str) -> Cap {
        Cap { bytes, what }
    }
}

/// Reads the regular file at `path`, at most `cap.bytes` long, in one pass.
///
/// The file is opened non-blocking (a FIFO would otherwise block in `open` until a writer
/// came), its type and size are taken from the open descriptor, and reading stops one byte past
/// the cap, so a file that grows while being read is refused rather than read without end.
pub fn read_capped(path: &Path, cap: Cap, follow: Follow) -> Result<Vec<u8>, ReadError> {
    let mut file = open_regular(path, follow)?;
    let too_large = || ReadError::TooLarge {
        path: path.to_path_buf(),
        what: cap.what,
        cap: cap.bytes,
    };
    let io_err = |source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(io_err)?.len();
    if len > cap.bytes {
        return Err(too_large());
    }
    let mut bytes = Vec::new();
    // The reservation is the size `fstat` reported (bounded by the cap above); the read itself
    // is bounded by `take`, whatever the file does meanwhile.
    bytes
        .try_reserve_exact(usize::try_from(len).unwrap_or(usize::MAX))
        .map_err(|_| too_large())?;
    (&mut file)
        .take(cap.bytes.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err)?;
    if bytes.len() as u64 > cap.bytes {
        return Err(too_large());
    }
    Ok(bytes)
}

/// Like [`read_capped`] for UTF-8 text.
pub fn read_capped_text(path: &Path, cap: Cap, follow: Follow) -> Result<String, ReadError> {
    let bytes = read_capped(path, cap, follow)?;
    String::from_utf8(bytes).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e.utf8_error()),
    })
}

/// Opens `path` for reading and checks, on the open descriptor, that it is a regular file.
pub fn open_regular(path: &Path, follow: Follow) -> Result<File, ReadError> {
    let file = open_nonblocking(path, follow).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            return ReadError::NotFound {
                path: path.to_path_buf(),
            };
        }
        if follow == Follow::No && is_symlink_refusal(&source, path) {
            return ReadError::Symlink {
                path: path.to_path_buf(),
            };
        }
        ReadError::Io {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let meta = file.metadata().map_err(|source| ReadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(ReadError::NotRegular {
            path: path.to_path_buf(),
            kind: kind_of(&meta.file_type()),
        });
    }
    Ok(file)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path, follow: Follow) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut flags = libc::O_NONBLOCK | libc::O_CLOEXEC;
    if follow == Follow::No {
        flags |= libc::O_NOFOLLOW;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(flags)
        .open(path)?;
    // Back to blocking reads: O_NONBLOCK was only for `open` (a regular file ignores it, but
    // the descriptor should not surprise a later reader).
    // SAFETY: `fcntl` on a descriptor this function owns, with flags read from it first.
    unsafe {
        use std::os::fd::AsRawFd;
        let fd = file.as_raw_fd();
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
    Ok(file)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path, follow: Follow) -> io::Result<File> {
    if follow == Follow::No && std::fs::symlink_metadata(path)?.file_type().is_symlink() {
        return Err(io::Error::other("symbolic link"));
    }
    File::open(path)
}

fn is_symlink_refusal(e: &io::Error, path: &Path) -> bool {
    #[cfg(unix)]
    {
        // O_NOFOLLOW on a symlink fails with ELOOP; confirm on the path so that a real loop
        // further up is not reported as this.
        e.raw_os_error() == Some(libc::ELOOP)
            && std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }
    #[cfg(not(unix))]
    {
        let _ = e;
        std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
    }
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file"
    }
}

/// Writes `bytes` to `path` atomically; see [`write_atomic_with`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// [`write_atomic`] into a directory made on the way (and its parents): for writers that fill
/// folders they own as they go (training runs, generated datasets), not for user-named outputs,
/// whose missing parent is the user's typo to see.
pub fn write_atomic_creating_dir(path: &Path, bytes: &[u8]) -> io::Result<()> {
    if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    write_atomic(path, bytes)
}

/// Replaces `path` with what `write` puts in a temporary file beside it: created exclusively
/// (O_EXCL) under an unpredictable name, so a symlink planted in the directory cannot redirect
/// the write; `write`'s result and the final `sync_all` are checked before the rename, so a full
/// disk is an error and the previous file stays whole. On any error the temporary file is
/// removed. The parent directory must exist (a typo in it is the user's to see, not to have
/// created).
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut File) -> io::Result<()>,
) -> io::Result<()> {
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempfile_in(parent_dir(path))?;
    write(tmp.as_file_mut())?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// A fresh, empty directory beside `path` (exclusive, unpredictable name) for building a
/// directory that [`replace_dir`] then moves into place; removed on drop unless kept.
pub fn temp_dir_beside(path: &Path) -> io::Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&temp_prefix(path))
        .tempdir_in(parent_dir(path))
}

/// Moves the finished `built` directory to `path`, replacing a directory there. The old one is
/// removed only after the new one is complete; between the two renames neither name is
/// half-written.
pub fn replace_dir(built: TempDir, path: &Path) -> io::Result<()> {
    if path.exists() {
        let old = temp_dir_beside(path)?;
        // Rename the old directory onto the fresh empty one (rename(2) replaces an empty
        // directory), then the new one into place; the old one goes with `old`'s drop.
        std::fs::rename(path, old.path())?;
        if let Err(e) = std::fs::rename(built.path(), path) {
            let _ = std::fs::rename(old.path(), path);
            return Err(e);
        }
        let _ = built.keep();
        drop(old);
        return Ok(());
    }
    std::fs::rename(built.path(), path)?;
    let _ = built.keep();
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn temp_prefix(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    format!(".{name}.tmp-")
}

#[cfg(test)]
mod tests;
