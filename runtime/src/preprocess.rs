//! Image loading and normalisation for the vision encoder.
//!
//! [`to_pixels`] is deliberately strict about the size: resizing changes what the model sees,
//! so it is a separate, visible step ([`resize_for`]) that the CLI takes and logs, while library
//! callers and tests get an error instead of a silent resample.

use std::path::{Path, PathBuf};

use duet_fsio::{Cap, Follow, ReadError};
pub use image::RgbImage;
use ndarray::Array4;
use thiserror::Error;

use crate::manifest::ImageSpec;
pub use duet_spec::pixels::{decode_image, flatten_over_white, MAX_DECODE_BYTES, MAX_IMAGE_SIDE};

/// Image loading and preprocessing failures.
#[derive(Debug, Error)]
pub enum ImageError {
    /// Missing, not a regular file (a FIFO or device is refused without blocking), over
    /// [`IMAGE_FILE_CAP`], or unreadable; the error names the path.
    #[error("cannot read image: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: ReadError,
    },
    #[error("cannot decode image {}: {reason}", path.display())]
    Decode { path: PathBuf, reason: String },
    #[error("image is {}x{} but the model expects {expected}x{expected}", got.0, got.1)]
    WrongImageSize { expected: usize, got: (u32, u32) },
    #[error("image spec has {channels} channels; only RGB (3) is supported")]
    Channels { channels: usize },
}

/// The largest image file read.
pub const IMAGE_FILE_CAP: Cap = Cap::new(64 << 20, "an image file");

/// Reads and decodes an image file (format guessed from the content) into RGB8: a regular file
/// under [`IMAGE_FILE_CAP`], decoded within [`MAX_IMAGE_SIDE`] and [`MAX_DECODE_BYTES`], and
/// an alpha channel composited over white as the training data was ([`flatten_over_white`]).
pub fn load_image(path: impl AsRef<Path>) -> Result<RgbImage, ImageError> {
    let path = path.as_ref();
    let bytes = duet_fsio::read_capped(path, IMAGE_FILE_CAP, Follow::Yes).map_err(|source| {
        ImageError::Read {
            path: path.to_path_buf(),
            source,
        }
    })?;
    decode_image(&bytes).map_err(|reason| ImageError::Decode {
        path: path.to_path_buf(),
        reason,
    })
}

/// [`load_image`] then [`resize_for`]: one full-size image in memory at a time, however many
/// files a command is given.
pub fn load_image_for(path: impl AsRef<Path>, spec: &ImageSpec) -> Result<RgbImage, ImageError> {
    let img = load_image(path)?;
    Ok(resize_for(&img, spec))
}

/// Makes `img` the spec's `size × size` by the spec's fit (stretch, pad or crop:
/// [`duet_spec::fit_image`], the transform the training images went through). Returns the image
/// unchanged when it already has the right size; logs when it had to resample.
pub fn resize_for(img: &RgbImage, spec: &ImageSpec) -> RgbImage {
    let side = u32::try_from(spec.size).unwrap_or(u32::MAX);
    if img.width() == side && img.height() == side {
        return img.clone();
    }
    tracing::info!(
        "resizing image from {}x{} to {side}x{side} ({})",
        img.width(),
        img.height(),
        spec.fit
    );
    duet_spec::fit_image(img, side, spec.fit)
}

/// Converts one `size × size` image to a `[1, 3, size, size]` tensor normalised as
/// `(x / 255 - mean) / std` per channel.
pub fn to_pixels(img: &RgbImage, spec: &ImageSpec) -> Result<Array4<f32>, ImageError> {
    to_pixels_batch(std::slice::from_ref(img), spec)
}

/// Like [`to_pixels`] for a batch: `[N, 3, size, size]`.
pub fn to_pixels_batch(imgs: &[RgbImage], spec: &ImageSpec) -> Result<Array4<f32>, ImageError> {
    if spec.channels != 3 {
        return Err(ImageError::Channels {
            channels: spec.channels,
        });
    }
    let s = spec.size;
    for img in imgs {
        if img.width() as usize != s || img.height() as usize != s {
            return Err(ImageError::WrongImageSize {
                expected: s,
                got: (img.width(), img.height()),
            });
        }
    }
    let mut out = Array4::<f32>::zeros((imgs.len(), 3, s, s));
    for (n, img) in imgs.iter().enumerate() {
        for (x, y, px) in img.enumerate_pixels() {
            for c in 0..3 {
                let v = f32::from(px.0[c]) / 255.0;
                out[[n, c, y as usize, x as usize]] = (v - spec.mean[c]) / spec.std[c];
            }
        }
    }
    Ok(out)
}
