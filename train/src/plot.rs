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

/// How a [`CurveChart`]'s y axis maps values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum YScale {
    /// Linear between the data's minimum and maximum.
    Linear,
    /// log10 between the decades around the data (losses span orders of magnitude); values
    /// ≤ 0 are left out.
    Log,
}

/// A training curve: y against step, the axes fitted to the data, many points per series
/// drawn as lines without markers.
#[derive(Debug, Clone)]
pub struct CurveChart {
    pub title: String,
    pub y_scale: YScale,
    pub series: Vec<Series>,
}

/// Five round tick values covering `[lo, hi]`.
fn linear_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 4.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..)
        .map(|k| first + k as f64 * step)
        .take_while(|v| *v <= hi + step * 1e-9)
        .collect()
}

/// A tick label short enough for the left margin.
fn short_number(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if a >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if a >= 10.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.0e}")
    }
}

impl CurveChart {
    /// Renders the chart (420 × 330 px): plot area on top, legend below.
    pub fn render(&self) -> RgbImage {
        let mut img = RgbImage::from_pixel(W, H, Rgb([255, 255, 255]));
        let (grey, black) = ([200, 200, 200], [0, 0, 0]);
        let plot_w = W - LEFT - RIGHT;
        let ty = |y: f64| match self.y_scale {
            YScale::Linear => Some(y),
            YScale::Log => (y > 0.0).then(|| y.log10()),
        };
        let points = || {
            self.series.iter().flat_map(|s| {
                s.points
                    .iter()
                    .filter(|p| p.0.is_finite() && p.1.is_finite())
            })
        };
        let range = |it: &mut dyn Iterator<Item = f64>| {
            it.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
                (a.min(v), b.max(v))
            })
        };
        let (x_min, x_max) = range(&mut points().map(|p| p.0));
        let (x_min, x_max) = if x_min.is_finite() && x_max > x_min {
            (x_min, x_max)
        } else {
            (0.0, 1.0)
        };
        let (y_lo, y_hi) = range(&mut points().filter_map(|p| ty(p.1)));
        let (y_lo, y_hi) = match (y_lo.is_finite(), self.y_scale) {
            (false, _) => (0.0, 1.0),
            (true, YScale::Log) => (y_lo.floor(), y_hi.ceil().max(y_lo.floor() + 1.0)),
            (true, YScale::Linear) if y_hi > y_lo => {
                let pad = (y_hi - y_lo) * 0.05;
                (y_lo - pad, y_hi + pad)
            }
            (true, YScale::Linear) => (y_lo - 0.5, y_lo + 0.5),
        };
        let px = |x: f64| LEFT as i64 + ((x - x_min) / (x_max - x_min) * plot_w as f64) as i64;
        let py = |v: f64| {
            let f = ((v - y_lo) / (y_hi - y_lo)).clamp(0.0, 1.0);
            (TOP + PLOT_H) as i64 - (f * PLOT_H as f64) as i64
        };
        let y_ticks: Vec<(f64, String)> = match self.y_scale {
            YScale::Log => (y_lo as i64..=y_hi as i64)
                .map(|e| (e as f64, short_number(10f64.powi(e as i32))))
                .collect(),
            YScale::Linear => linear_ticks(y_lo, y_hi)
                .into_iter()
                .map(|v| (v, short_number(v)))
                .collect(),
        };
        for (v, label) in &y_ticks {
            line(&mut img, (px(x_min), py(*v)), (px(x_max), py(*v)), grey);
            text(&mut img, 2, py(*v) - 4, label, black);
        }
        for x in linear_ticks(x_min, x_max) {
            line(&mut img, (px(x), py(y_lo)), (px(x), py(y_lo) + 3), black);
            let label = short_number(x);
            let lx = (px(x) - 4 * label.len() as i64).min((W - 8 * label.len() as u32) as i64);
            text(&mut img, lx, py(y_lo) + 6, &label, black);
        }
        line(
            &mut img,
            (px(x_min), py(y_lo)),
            (px(x_max), py(y_lo)),
            black,
        );
        line(
            &mut img,
            (px(x_min), py(y_lo)),
            (px(x_min), py(y_hi)),
            black,
        );
        text(&mut img, 4, 6, &self.title, black);
        text(
            &mut img,
            LEFT as i64 + plot_w as i64 / 2 - 16,
            (TOP + PLOT_H + 18) as i64,
            "step",
            black,
        );
        for (i, s) in self.series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let pts: Vec<(i64, i64)> = s
                .points
                .iter()
                .filter(|p| p.0.is_finite())
                .filter_map(|p| ty(p.1).filter(|v| v.is_finite()).map(|v| (px(p.0), py(v))))
                .collect();
            for w in pts.windows(2) {
                line(&mut img, w[0], w[1], c);
            }
            if let [only] = pts[..] {
                put(&mut img, only.0, only.1, c);
            }
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

/// Encodes `img` as PNG and writes it atomically (grids, plots).
pub fn write_png(path: &std::path::Path, img: &image::RgbImage) -> std::io::Result<()> {
    let mut png = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(std::io::Error::other)?;
    duet_fsio::write_atomic_creating_dir(path, &png)
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

    #[test]
    fn curves_fit_their_data_on_a_log_axis() {
        // A loss falling from 1 to 0.01 over 1,000 steps: the first point sits at the top-left
        // corner of the plot (the 10^0 decade) and the last at the bottom-right (10^-2).
        let chart = CurveChart {
            title: "loss".into(),
            y_scale: YScale::Log,
            series: vec![Series {
                name: "loss".into(),
                points: vec![(0.0, 1.0), (500.0, 0.1), (1000.0, 0.01)],
            }],
        };
        let img = chart.render();
        let c = Rgb(PALETTE[0]);
        assert_eq!(*img.get_pixel(LEFT, TOP), c);
        assert_eq!(*img.get_pixel(W - RIGHT, TOP + PLOT_H), c);
        // 0.1 is one decade down of two: the middle of the plot's height.
        assert_eq!(
            *img.get_pixel(LEFT + (W - LEFT - RIGHT) / 2, TOP + PLOT_H / 2),
            c
        );
        // Non-positive and non-finite values are skipped, not drawn at an edge.
        let odd = CurveChart {
            title: "x".into(),
            y_scale: YScale::Log,
            series: vec![Series {
                name: "x".into(),
                points: vec![(0.0, 0.0), (1.0, f64::NAN), (2.0, 1.0), (3.0, 10.0)],
            }],
        };
        assert_eq!(odd.render().dimensions(), (W, H));
        assert_eq!(
            linear_ticks(0.0, 1000.0),
            vec![0.0, 250.0, 500.0, 750.0, 1000.0]
        );
    }
}
