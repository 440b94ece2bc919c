//! Drawing a scene: each object as a filled shape in its grid cell on a black background.

use image::{Rgb, RgbImage};

use super::*;

/// Integer bounding box `(x0, y0, n)` of an object: an `n×n` pixel square centred on its cell.
///
/// Snapping the box to whole pixels makes every shape of a given size render to the same pixel
/// pattern in every cell, which keeps tiny (5 px) shapes symmetric and recognisable.
pub fn object_box(object: &Object, image_size: u32) -> (u32, u32, u32) {
    let c = f64::from(image_size) / 3.0;
    let n = (c * object.size.cell_fraction()).round().max(1.0);
    let cx = (object.position.col() as f64 + 0.5) * c;
    let cy = (object.position.row() as f64 + 0.5) * c;
    let x0 = (cx - n / 2.0).round().max(0.0);
    let y0 = (cy - n / 2.0).round().max(0.0);
    (x0 as u32, y0 as u32, n as u32)
}

/// Whether pixel `(i, j)` (column, row) of an `n×n` box belongs to `shape`.
///
/// Geometry works on pixel centres mapped to `u, v ∈ [-1, 1]`:
/// circle `u² + v² ≤ 1` (a square minus its corners at 5 px); square = the whole box;
/// triangle pointing up with its apex at the top centre and its base on the bottom row;
/// diamond = square rotated 45° (`|u| + |v| ≤ 1`); cross = plus sign whose arms are about a
/// third of the box thick (odd/even matched to `n` so it stays centred; 1 px at 5 px so it
/// cannot collide with the circle's pattern).
fn shape_contains(shape: Shape, i: u32, j: u32, n: u32) -> bool {
    let nf = f64::from(n);
    let u = (f64::from(i) + 0.5) / nf * 2.0 - 1.0;
    let v = (f64::from(j) + 0.5) / nf * 2.0 - 1.0;
    const EPS: f64 = 1e-9;
    match shape {
        Shape::Square => true,
        Shape::Circle => u * u + v * v <= 1.0 + EPS,
        Shape::Diamond => u.abs() + v.abs() <= 1.0 + EPS,
        Shape::Triangle => u.abs() <= (v + 1.0) / 2.0 + EPS,
        Shape::Cross => {
            let t = cross_thickness(n);
            let a = (n - t) / 2;
            (a..a + t).contains(&i) || (a..a + t).contains(&j)
        }
    }
}

/// Arm thickness of the cross: the integer nearest to `n / 3` with the same parity as `n`, so
/// the arms stay centred in the box (1 px at `n = 5`, where 3 px would turn the cross into the
/// circle's pattern; 3 at 9, 4 at 10, 6 at 18).
fn cross_thickness(n: u32) -> u32 {
    let parity = n % 2;
    let x = f64::from(n) / 3.0;
    let t = 2 * ((x - f64::from(parity)) / 2.0).round().max(0.0) as u32 + parity;
    t.max(if parity == 0 { 2 } else { 1 }).min(n)
}

/// Renders a scene with crisp fills (no anti-aliasing) on a black background.
pub fn render(scene: &Scene, image_size: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(image_size, image_size, Rgb(BACKGROUND));
    for object in &scene.objects {
        let (x0, y0, n) = object_box(object, image_size);
        let colour = Rgb(object.colour.rgb());
        for j in 0..n {
            for i in 0..n {
                let (x, y) = (x0 + i, y0 + j);
                if x < image_size && y < image_size && shape_contains(object.shape, i, j, n) {
                    img.put_pixel(x, y, colour);
                }
            }
        }
    }
    img
}
