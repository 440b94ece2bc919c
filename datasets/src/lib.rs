//! duet's data, independent of Burn: the generated ShapeWorld scenes, the Emoji-CLDR pairs,
//! several folders mixed into one sample list, the tokenizer built from their captions, the
//! pair tasks of the fusion and restore stages, and the pixel layout every model reads. The
//! trainer learns from it and the exporter draws its parity inputs from it.

pub mod captioned;
pub mod emoji;
pub mod folders;
pub mod pair_tasks;
pub mod progress;
pub mod shapeworld;
pub mod tokenizer;

/// `x / 255 * 2 - 1` per channel, CHW: the normalisation the manifest declares (mean 0.5,
/// std 0.5), shared by training, evaluation and the exporter's parity inputs.
pub fn image_to_chw(img: &image::RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let (w, h) = (w as usize, h as usize);
    let mut out = vec![0.0f32; 3 * w * h];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            out[c * w * h + y as usize * w + x as usize] = p.0[c] as f32 / 255.0 * 2.0 - 1.0;
        }
    }
    out
}
