//! Small line charts as PNG-ready images (metric against missing rate, training curves).
//!
//! Drawn by hand on an `image::RgbImage` with `font8x8`'s bitmap glyphs: the plotting crates
//! either need system fonts (font-kit) or a TTF file at run time for any text, and a chart
//! without labels is not worth a picture. Axes, a few ticks, polylines and a legend are all
//! these charts need.

use font8x8::UnicodeFonts;
use image::{Rgb, RgbImage};

/// One line of a chart.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A chart with y in `[0, 1]` and x in the points' range.
#[derive(Debug, Clone)]
pub struct LineChart {
    pub title: String,
    pub x_label: String,
    pub series: Vec<Series>,
}

/// Distinguishable line colours (Tableau 10).
pub const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
];

const W: u32 = 420;
const H: u32 = 330;
const LEFT: u32 = 44;
const RIGHT: u32 = 12;
const TOP: u32 = 24;
const PLOT_H: u32 = 190;

fn put(img: &mut RgbImage, x: i64, y: i64, c: [u8; 3]) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, Rgb(c));
    }
}

/// Draws `text` with its top-left corner at `(x, y)`.
pub fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: [u8; 3]) {
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS.get(ch).unwrap_or([0; 8]);
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits >> col & 1 == 1 {
                    put(img, x + i as i64 * 8 + col, y + row as i64, c);
                }
            }
        }
    }
}

/// A 2-pixel-wide line (Bresenham, thickened downwards and rightwards).
fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: [u8; 3]) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        for (ox, oy) in [(0, 0), (1, 0), (0, 1)] {
            put(img, x + ox, y + oy, c);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

impl LineChart {
    /// Renders the chart (420 × 330 px): plot area on top, legend below.
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
        let grey = [200, 200, 200];
        let black = [0, 0, 0];
        let plot_w = W - LEFT - RIGHT;
        let (x_min, x_max) = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            });
        let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
            (x_min, x_max)
        } else {
            (0.0, 1.0)
        };
        let px = |x: f64| LEFT as i64 + ((x - x_min) / (x_max - x_min) * plot_w as f64) as i64;
        let py = |y: f64| (TOP + PLOT_H) as i64 - (y.clamp(0.0, 1.0) * PLOT_H as f64) as i64;
        // Horizontal grid with y labels every 0.2.
        for k in 0..=5 {
            let y = k as f64 * 0.2;
            line(&mut img, (px(x_min), py(y)), (px(x_max), py(y)), grey);
            text(&mut img, 4, py(y) - 4, &format!("{y:.1}"), black);
        }
        // x ticks at the data's x values.
        let mut xs: Vec<f64> = self
            .series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.0))
            .collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        for &x in &xs {
            line(&mut img, (px(x), py(0.0)), (px(x), py(0.0) + 3), black);
            let label = format!("{:.0}", x * 100.0);
            text(
                &mut img,
                px(x) - 4 * label.len() as i64,
                py(0.0) + 6,
                &label,
                black,
            );
        }
        line(&mut img, (px(x_min), py(0.0)), (px(x_max), py(0.0)), black);
        line(&mut img, (px(x_min), py(0.0)), (px(x_min), py(1.0)), black);
        text(&mut img, 4, 6, &self.title, black);
        let xl = format!("{} (%)", self.x_label);
        text(
            &mut img,
            LEFT as i64 + plot_w as i64 / 2 - 4 * xl.len() as i64,
            (TOP + PLOT_H + 18) as i64,
            &xl,
            black,
        );
        for (i, s) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            for w in s.points.windows(2) {
                line(
                    &mut img,
                    (px(w[0].0), py(w[0].1)),
                    (px(w[1].0), py(w[1].1)),
                    c,
                );
            }
            for &(x, y) in &s.points {
                for ox in -2..=2 {
                    for oy in -2..=2 {
                        put(&mut img, px(x) + ox, py(y) + oy, c);
                    }
                }
            }
            // Legend: two columns under the x label.
            let lx = 8 + (i % 2) as i64 * 206;
            let ly = (TOP + PLOT_H + 34) as i64 + (i / 2) as i64 * 14;
            line(&mut img, (lx, ly + 4), (lx + 14, ly + 4), c);
            text(&mut img, lx + 20, ly, &s.name, black);
        }
        img
    }
}

/// Charts side by side, `cols` per row.
pub fn grid(charts: &[LineChart], cols: usize) -> RgbImage {
    let cols = cols.max(1);
    let rows = charts.len().div_ceil(cols).max(1);
    let mut out = RgbImage::from_pixel(W * cols as u32, H * rows as u32, Rgb([255, 255, 255]));
    for (i, c) in charts.iter().enumerate() {
        let img = c.render();
        image::imageops::replace(
            &mut out,
            &img,
            (W * (i % cols) as u32) as i64,
            (H * (i / cols) as u32) as i64,
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_land_where_the_data_says() {
        let chart = LineChart {
            title: "t".into(),
            x_label: "x".into(),
            series: vec![Series {
                name: "a".into(),
                points: vec![(0.0, 0.0), (1.0, 1.0)],
            }],
        };
        let img = chart.render();
        assert_eq!(img.dimensions(), (W, H));
        // The first series' colour at both end points of its diagonal.
        let c = Rgb(PALETTE[0]);
        assert_eq!(*img.get_pixel(LEFT, TOP + PLOT_H), c);
        assert_eq!(*img.get_pixel(W - RIGHT, TOP), c);
        // The title's first glyph ('t') sets some pixels black.
        let black = (4..12)
            .flat_map(|x| (6..14).map(move |y| (x, y)))
            .filter(|&(x, y)| *img.get_pixel(x, y) == Rgb([0, 0, 0]))
            .count();
        assert!(black > 5);
        assert_eq!(grid(&[chart.clone(), chart], 2).dimensions(), (2 * W, H));
    }
}
