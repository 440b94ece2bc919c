//! How an image file becomes the model's square RGB input: decoding within limits, alpha over
//! white, and fitting any size and shape to the model's side. The trainer applies these to a
//! folder's images and the runtime to a user's, so a model sees at inference what it saw in
//! training.

use std::io::Cursor;

use image::imageops::{self, FilterType};
use image::{DynamicImage, ImageReader, Limits, Rgb, RgbImage};
use serde::{Deserialize, Serialize};

/// The largest side of an image the decoder accepts, in pixels.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// The most memory one decode may allocate: a 10,000² RGBA photo (400 MB) fits, and callers
/// hold one full-size image at a time.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;

/// Decodes image bytes (format guessed from the content) into RGB8 within [`MAX_IMAGE_SIDE`]
/// and [`MAX_DECODE_BYTES`], an alpha channel composited over white ([`flatten_over_white`]);
/// the error is the decoder's reason.
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
/// rounded, the transform the Emoji-CLDR training images went through, so a transparent PNG is
/// seen at inference as it was in training rather than with the hidden colours of its
/// transparent pixels.
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

/// The grey of [`ImageFit::Pad`]'s borders: 128, the value the `(x / 255 − 0.5) / 0.5`
/// normalisation maps to (about) zero, so padding carries no colour the model could read.
pub const PAD_GREY: u8 = 128;

/// How a non-square image, or one of another size, becomes `side × side`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFit {
    /// Resize to `side × side`, aspect ratio not kept (what square datasets need: nothing).
    #[default]
    Stretch,
    /// Resize so the longer side is `side`, aspect kept, and centre it on [`PAD_GREY`]
    /// (letterbox): nothing of the image is lost.
    Pad,
    /// Cut the largest centred square, then resize it: the borders of the longer side are lost.
    Crop,
}

impl ImageFit {
    pub const ALL: [ImageFit; 3] = [ImageFit::Stretch, ImageFit::Pad, ImageFit::Crop];

    pub fn name(self) -> &'static str {
        match self {
            ImageFit::Stretch => "stretch",
            ImageFit::Pad => "pad",
            ImageFit::Crop => "crop",
        }
    }
}

impl std::fmt::Display for ImageFit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageFit::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| format!("unknown image fit '{s}' (expected stretch, pad or crop)"))
    }
}

/// `img` as `side × side` by `fit` (Triangle filter). An image that already is `side × side`
/// comes back unchanged, whatever the fit.
pub fn fit_image(img: &RgbImage, side: u32, fit: ImageFit) -> RgbImage {
    let (w, h) = img.dimensions();
    if (w, h) == (side, side) || w == 0 || h == 0 || side == 0 {
        return if (w, h) == (side, side) {
            img.clone()
        } else {
            RgbImage::from_pixel(side, side, Rgb([PAD_GREY; 3]))
        };
    }
    match fit {
        ImageFit::Stretch => imageops::resize(img, side, side, FilterType::Triangle),
        ImageFit::Crop => {
            let short = w.min(h);
            let square = imageops::crop_imm(img, (w - short) / 2, (h - short) / 2, short, short);
            imageops::resize(&square.to_image(), side, side, FilterType::Triangle)
        }
        ImageFit::Pad => {
            // The longer side becomes `side`; the shorter one scales with it (at least 1 px).
            let scale = |short: u32, long: u32| {
                ((u64::from(short) * u64::from(side) + u64::from(long) / 2) / u64::from(long))
                    .clamp(1, u64::from(side)) as u32
            };
            let (nw, nh) = if w >= h {
                (side, scale(h, w))
            } else {
                (scale(w, h), side)
            };
            let inner = imageops::resize(img, nw, nh, FilterType::Triangle);
            let mut out = RgbImage::from_pixel(side, side, Rgb([PAD_GREY; 3]));
            imageops::replace(
                &mut out,
                &inner,
                i64::from((side - nw) / 2),
                i64::from((side - nh) / 2),
            );
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w × h` image, red on its left half and blue on its right.
    fn halves(w: u32, h: u32) -> RgbImage {
        RgbImage::from_fn(w, h, |x, _| {
            if x < w / 2 {
                Rgb([255, 0, 0])
            } else {
                Rgb([0, 0, 255])
            }
        })
    }

    #[test]
    fn each_fit_keeps_what_it_promises() {
        let wide = halves(64, 16);
        for fit in ImageFit::ALL {
            let out = fit_image(&wide, 16, fit);
            assert_eq!(out.dimensions(), (16, 16), "{fit}");
            assert_eq!(fit.name().parse::<ImageFit>().unwrap(), fit);
        }
        // Pad: the 64×16 strip becomes 16×4 centred, grey above and below.
        let pad = fit_image(&wide, 16, ImageFit::Pad);
        assert_eq!(pad.get_pixel(8, 0).0, [PAD_GREY; 3]);
        assert_eq!(pad.get_pixel(8, 15).0, [PAD_GREY; 3]);
        assert_eq!(pad.get_pixel(1, 7).0, [255, 0, 0]);
        assert_eq!(pad.get_pixel(14, 8).0, [0, 0, 255]);
        // Crop: the centre 16×16 of the strip straddles the two halves.
        let crop = fit_image(&wide, 16, ImageFit::Crop);
        assert_eq!(crop.get_pixel(1, 0).0, [255, 0, 0]);
        assert_eq!(crop.get_pixel(14, 15).0, [0, 0, 255]);
        // Stretch: no grey anywhere, both halves kept.
        let stretch = fit_image(&wide, 16, ImageFit::Stretch);
        assert_eq!(stretch.get_pixel(0, 0).0, [255, 0, 0]);
        assert_eq!(stretch.get_pixel(15, 0).0, [0, 0, 255]);
        // The right size already: untouched.
        let square = halves(16, 16);
        for fit in ImageFit::ALL {
            assert_eq!(fit_image(&square, 16, fit), square);
        }
        // A tall one-pixel line still gives a full-size image.
        assert_eq!(
            fit_image(&halves(1, 300), 8, ImageFit::Pad).dimensions(),
            (8, 8)
        );
        assert!("fill".parse::<ImageFit>().is_err());
    }
}
