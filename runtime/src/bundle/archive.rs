//! Single-file bundles (`model.duet`): the bundle's files in one uncompressed POSIX tar.
//!
//! Why tar, and uncompressed: it is the most widely readable container (`tar tf model.duet`
//! lists it on any device), its entries are the files' bytes as they are, so the sha256 the
//! manifest records is checked on the very bytes read, and there is no decompression to bomb
//! (the ONNX weights barely compress anyway). Nothing is extracted to disk: [`read_entries`]
//! streams the file once, under a cap, keeping only the entries' bytes (so opening a `.duet`
//! takes the memory a directory's files do), and [`super::Bundle::open`] verifies and serves
//! them from memory like a directory's files.
//!
//! What an archive may hold is narrower than what tar can say: regular-file entries only (no
//! directories, links, devices or global headers), each named by a plain file name (no `/`,
//! `..` or absolute path), each name once, no entry the manifest does not list, each entry
//! under the graph cap and all of them under the bundle cap. [`pack`] writes exactly that, in
//! the manifest's order with fixed metadata, so packing the same bundle twice gives the same
//! bytes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::Path;

use duet_fsio::{Cap, Follow, ReadError};

use super::{file_error, is_plain_file_name, limits, Bundle, BundleError, MANIFEST_FILE};
use crate::engine::MODEL_FILE_CAP;

/// The file extension of single-file bundles.
pub const EXTENSION: &str = "duet";

/// The largest archive read: every listed file at the bundle cap, the manifest, and a tar
/// header plus padding per entry.
const ARCHIVE_CAP: Cap = Cap::new(
    limits::MAX_BUNDLE_BYTES
        + super::MANIFEST_CAP.bytes
        + (limits::MAX_FILES as u64 + 1) * 1024
        + 1024,
    "a single-file bundle",
);

fn refuse(path: &Path, reason: impl Into<String>) -> BundleError {
    BundleError::Archive {
        path: path.to_path_buf(),
        reason: super::escape_controls(&reason.into()),
    }
}

/// Every entry of the archive at `path`, by name, read in one pass over the file.
pub(super) fn read_entries(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, BundleError> {
    let io_err = |source| BundleError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = duet_fsio::open_regular(path, Follow::Yes).map_err(file_error)?;
    let len = file.metadata().map_err(io_err)?.len();
    if len > ARCHIVE_CAP.bytes {
        return Err(BundleError::File(ReadError::TooLarge {
            path: path.to_path_buf(),
            what: ARCHIVE_CAP.what,
            cap: ARCHIVE_CAP.bytes,
        }));
    }
    // Only the length seen at open is read: a file that grows meanwhile is not read without end.
    let mut archive = tar::Archive::new(std::io::BufReader::new(file.take(len)));
    let mut entries = BTreeMap::new();
    let mut total = 0u64;
    let iter = archive
        .entries()
        .map_err(|e| refuse(path, format!("not a tar archive: {e}")))?;
    for entry in iter {
        let mut entry = entry.map_err(|e| refuse(path, format!("damaged tar archive: {e}")))?;
        let name = match std::str::from_utf8(&entry.path_bytes()) {
            Ok(n) => n.to_owned(),
            Err(_) => {
                let shown = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                return Err(refuse(path, format!("entry `{shown}`: name is not UTF-8")));
            }
        };
        let kind = entry.header().entry_type();
        if !kind.is_file() {
            return Err(refuse(
                path,
                format!(
                    "entry `{name}` is not a regular file ({kind:?}); a bundle holds files only"
                ),
            ));
        }
        if !is_plain_file_name(&name) {
            return Err(refuse(
                path,
                format!(
                    "entry `{name}` is not a plain file name (no `/`, `..` or absolute paths; \
                     make single-file bundles with `duet-export pack`)"
                ),
            ));
        }
        let size = entry.size();
        let cap = if name == MANIFEST_FILE {
            super::MANIFEST_CAP
        } else {
            MODEL_FILE_CAP
        };
        if size > cap.bytes {
            return Err(refuse(
                path,
                format!(
                    "entry `{name}` is {size} bytes, over the cap for {} ({} bytes)",
                    cap.what, cap.bytes
                ),
            ));
        }
        total = total.saturating_add(size);
        if total > limits::MAX_BUNDLE_BYTES {
            return Err(refuse(
                path,
                format!(
                    "the entries are larger than {} bytes together",
                    limits::MAX_BUNDLE_BYTES
                ),
            ));
        }
        // The size a header claims is only believed as far as the file goes: a tiny file
        // claiming gigabytes must not get them reserved.
        let available = len.saturating_sub(entry.raw_file_position());
        if size > available {
            return Err(refuse(
                path,
                format!(
                    "entry `{name}` claims {size} bytes but the archive holds {available} after \
                     its header (truncated?)"
                ),
            ));
        }
        let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
        entry
            .read_to_end(&mut data)
            .map_err(|e| refuse(path, format!("entry `{name}` could not be read: {e}")))?;
        if data.len() as u64 != size {
            return Err(refuse(
                path,
                format!(
                    "entry `{name}` holds {} bytes, its header says {size}",
                    data.len()
                ),
            ));
        }
        if entries.insert(name.clone(), data).is_some() {
            return Err(refuse(path, format!("entry `{name}` appears twice")));
        }
    }
    // The reader stops at the end-of-archive blocks; anything after them is not part of the
    // bundle and is refused rather than silently carried along (zero padding is what tar
    // writers add, and is fine).
    let mut rest = archive.into_inner();
    let mut buf = [0u8; 8192];
    loop {
        let n = rest.read(&mut buf).map_err(io_err)?;
        if n == 0 {
            break;
        }
        if buf[..n].iter().any(|&b| b != 0) {
            return Err(refuse(path, "bytes after the end of the archive"));
        }
    }
    Ok(entries)
}

/// Writes the verified bundle `bundle` as one archive at `out` (atomically: a temporary file
/// beside it, renamed into place only when complete and synced).
pub fn pack(bundle: &Bundle, out: &Path) -> Result<(), BundleError> {
    let io_err = |source| BundleError::Io {
        path: out.to_path_buf(),
        source,
    };
    duet_fsio::write_atomic_with(out, |f| {
        let mut tar = tar::Builder::new(std::io::BufWriter::new(f));
        append(&mut tar, MANIFEST_FILE, bundle.manifest_text.as_bytes())?;
        for name in bundle.manifest().files.keys() {
            let bytes = bundle
                .file_bytes(name)
                .ok_or_else(|| std::io::Error::other(format!("{name}: listed but not read")))?;
            append(&mut tar, name, &bytes)?;
        }
        tar.into_inner()?.flush()
    })
    .map_err(io_err)
}

fn append<W: Write>(tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    // Fixed metadata: the archive's bytes depend on the bundle only.
    let mut header = tar::Header::new_ustar();
    header.set_size(bytes.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    header.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut header, name, bytes)
}

/// Writes the verified bundle `bundle` as a directory at `out`, which must not exist yet: built
/// in a private directory beside it and renamed into place when complete.
pub fn unpack(bundle: &Bundle, out: &Path) -> Result<(), BundleError> {
    let io_err = |source| BundleError::Io {
        path: out.to_path_buf(),
        source,
    };
    if std::fs::symlink_metadata(out).is_ok() {
        return Err(io_err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "already exists; unpack into a new directory",
        )));
    }
    let staging = duet_fsio::temp_dir_beside(out).map_err(io_err)?;
    let write = |name: &str, bytes: &[u8]| {
        duet_fsio::write_atomic(&staging.path().join(name), bytes).map_err(io_err)
    };
    write(MANIFEST_FILE, bundle.manifest_text.as_bytes())?;
    for name in bundle.manifest().files.keys() {
        let bytes = bundle.file_bytes(name).ok_or_else(|| {
            io_err(std::io::Error::other(format!(
                "{name}: listed but not read"
            )))
        })?;
        write(name, &bytes)?;
    }
    // What was written opens as the same bundle (a case-insensitive file system could fold two
    // names into one), before it takes the name.
    let check = Bundle::open(staging.path())?;
    if check.manifest() != bundle.manifest() {
        return Err(io_err(std::io::Error::other(
            "the unpacked files do not read back as the same bundle",
        )));
    }
    let built = staging.keep();
    std::fs::rename(&built, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&built);
        io_err(e)
    })
}
