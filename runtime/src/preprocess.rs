//! Image loading and normalisation for the vision encoder.
//!
//! [`to_pixels`] is deliberately strict about the size: resizing changes what the model sees,
//! so it is a separate, visible step ([`resize_for`]) that the CLI takes and logs, while library
//! callers and tests get an error instead of a silent resample.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use duet_fsio::{Cap, Follow, ReadError};
use image::imageops::{self, FilterType};
pub use image::RgbImage;
use image::{DynamicImage, ImageReader, Limits, Rgb};
use ndarray::Array4;
use thiserror::Error;

use crate::manifest::ImageSpec;

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
/// The largest side of an image the decoder accepts, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// The most memory one decode may allocate: a 10,000² RGBA photo (400 MB) fits, and commands
/// hold one full-size image at a time.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

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

/// Decodes image bytes as [`load_image`] does; the error is the decoder's reason.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| e.to_string())?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| e.to_string())?;
    Ok(flatten_over_white(img))
}

/// RGB8 of `img`, with any alpha composited over white: `c·a + 255·(1 − a)` per channel,
/// rounded, the transform the Emoji-CLDR training images went through (`duet-train`'s
/// `render_art`), so a transparent PNG is seen at inference as it was in training rather than
/// with the hidden colours of its transparent pixels.
pub fn flatten_over_white(img: DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.into_rgb8();
    }
    let rgba = img.into_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let p = rgba.get_pixel(x, y).0;
        let a = f32::from(p[3]) / 255.0;
        let over = |c: u8| {
            (f32::from(c) * a + 255.0 * (1.0 - a))
                .round()
                .clamp(0.0, 255.0) as u8
        };
        Rgb([over(p[0]), over(p[1]), over(p[2])])
    })
}

/// [`load_image`] then [`resize_for`]: one full-size image in memory at a time, however many
/// files a command is given.
pub fn load_image_for(path: impl AsRef<Path>, spec: &ImageSpec) -> Result<RgbImage, ImageError> {
    let img = load_image(path)?;
    Ok(resize_for(&img, spec))
}

/// Resizes `img` to the spec's `size × size` (Triangle filter, aspect ratio not kept: the
/// training images were square crops). Returns the image unchanged, without copying the
/// pixels twice, when it already has the right size; logs when it had to resample.
pub fn resize_for(img: &RgbImage, spec: &ImageSpec) -> RgbImage {
    let side = u32::try_from(spec.size).unwrap_or(u32::MAX);
    if img.width() == side && img.height() == side {
        return img.clone();
    }
    tracing::info!(
        "resizing image from {}x{} to {side}x{side}",
        img.width(),
        img.height()
    );
    imageops::resize(img, side, side, FilterType::Triangle)
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
