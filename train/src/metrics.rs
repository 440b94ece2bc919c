//! Caption metrics for ShapeWorld: predicted captions are parsed back into objects
//! ([`parse_caption_lenient`]) and compared with the exact ground truth, so understanding is
//! scored per attribute with no learned judge.
//!
//! All rates are micro-averaged over the whole evaluation set (every ground-truth object or
//! scene weighs the same) and lie in `[0, 1]`. A rate whose denominator is zero is reported
//! as 0, never NaN, so JSON output stays valid.

use std::collections::HashMap;
use std::fmt;

use serde::Serialize;

use duet_datasets::shapeworld::{
    objects_caption, parse_caption, parse_caption_lenient, Object, Size,
};

/// Caption-level scores. Definitions:
///
/// * `exact_match`: fraction of scenes whose predicted caption string equals
///   [`objects_caption`] of the truth exactly (same words, same canonical order).
/// * `well_formed`: fraction of predictions that parse with the strict grammar
///   ([`parse_caption`]); the other metrics use the lenient parser, which keeps every valid
///   clause and skips garbage.
/// * `count_acc`: fraction of scenes where the number of parsed objects equals the truth.
/// * `shape_acc`, `colour_acc`, `size_acc`: for each ground-truth object, take the first
///   predicted object at the same grid cell (cells are unique within a scene); the attribute is
///   correct if such an object exists and the attribute matches. Averaged over all GT objects.
/// * `position_acc`: fraction of GT objects whose cell appears among the predicted objects.
/// * `object_precision`, `object_recall`, `object_f1`: an object matches only if all four
///   attributes are equal; matching is multiset matching within each scene (an object
///   predicted twice matches at most once per copy in the truth). Precision = matched /
///   predicted objects, recall = matched / GT objects, F1 = their harmonic mean.
/// * `small_*`: the same as `shape_acc`, `colour_acc` and `object_recall` restricted to GT
///   objects of [`Size::Small`] (the hardest to see at 32×32). Precision is not restricted,
///   since a prediction cannot be attributed to "small truth" without a match; hence recall.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CaptionMetrics {
    /// Number of scenes evaluated.
    pub n: usize,
    /// Number of ground-truth objects over all scenes.
    pub n_objects: usize,
    /// Number of small ground-truth objects.
    pub n_small_objects: usize,
    /// Number of objects the lenient parser found in the predictions.
    pub n_predicted_objects: usize,
    pub exact_match: f64,
    pub well_formed: f64,
    pub count_acc: f64,
    pub shape_acc: f64,
    pub colour_acc: f64,
    pub size_acc: f64,
    pub position_acc: f64,
    pub object_precision: f64,
    pub object_recall: f64,
    pub object_f1: f64,
    pub small_shape_acc: f64,
    pub small_colour_acc: f64,
    pub small_object_recall: f64,
}

fn rate(num: usize, den: usize) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

/// Counters accumulated over scenes, turned into rates at the end.
#[derive(Default)]
struct Counts {
    scenes: usize,
    exact: usize,
    well_formed: usize,
    count_ok: usize,
    gt: usize,
    pred: usize,
    shape: usize,
    colour: usize,
    size: usize,
    position: usize,
    matched: usize,
    small_gt: usize,
    small_shape: usize,
    small_colour: usize,
    small_matched: usize,
}

impl Counts {
    fn add(&mut self, truth: &[Object], predicted_caption: &str) {
        self.scenes += 1;
        if predicted_caption == objects_caption(truth) {
            self.exact += 1;
        }
        if parse_caption(predicted_caption).is_ok() {
            self.well_formed += 1;
        }
        let predicted = parse_caption_lenient(predicted_caption);
        if predicted.len() == truth.len() {
            self.count_ok += 1;
        }
        self.gt += truth.len();
        self.pred += predicted.len();

        for gt in truth {
            let small = gt.size == Size::Small;
            self.small_gt += usize::from(small);
            let Some(p) = predicted.iter().find(|p| p.position == gt.position) else {
                continue;
            };
            self.position += 1;
            self.shape += usize::from(p.shape == gt.shape);
            self.colour += usize::from(p.colour == gt.colour);
            self.size += usize::from(p.size == gt.size);
            if small {
                self.small_shape += usize::from(p.shape == gt.shape);
                self.small_colour += usize::from(p.colour == gt.colour);
            }
        }

        // Multiset matching on whole objects: each predicted copy can satisfy one GT copy.
        let mut available: HashMap<Object, usize> = HashMap::new();
        for p in &predicted {
            *available.entry(*p).or_default() += 1;
        }
        for gt in truth {
            if let Some(n) = available.get_mut(gt).filter(|n| **n > 0) {
                *n -= 1;
                self.matched += 1;
                if gt.size == Size::Small {
                    self.small_matched += 1;
                }
            }
        }
    }

    fn finish(&self) -> CaptionMetrics {
        let precision = rate(self.matched, self.pred);
        let recall = rate(self.matched, self.gt);
        let f1 = if precision + recall > 0.0 {
            2.0 * precision * recall / (precision + recall)
        } else {
            0.0
        };
        CaptionMetrics {
            n: self.scenes,
            n_objects: self.gt,
            n_small_objects: self.small_gt,
            n_predicted_objects: self.pred,
            exact_match: rate(self.exact, self.scenes),
            well_formed: rate(self.well_formed, self.scenes),
            count_acc: rate(self.count_ok, self.scenes),
            shape_acc: rate(self.shape, self.gt),
            colour_acc: rate(self.colour, self.gt),
            size_acc: rate(self.size, self.gt),
            position_acc: rate(self.position, self.gt),
            object_precision: precision,
            object_recall: recall,
            object_f1: f1,
            small_shape_acc: rate(self.small_shape, self.small_gt),
            small_colour_acc: rate(self.small_colour, self.small_gt),
            small_object_recall: rate(self.small_matched, self.small_gt),
        }
    }
}

/// Scores `(ground-truth objects, predicted caption)` pairs. Never panics on malformed
/// predictions; an empty input gives all zeros with `n = 0`.
pub fn evaluate(pairs: &[(Vec<Object>, String)]) -> CaptionMetrics {
    let mut counts = Counts::default();
    for (truth, predicted) in pairs {
        counts.add(truth, predicted);
    }
    counts.finish()
}

impl CaptionMetrics {
    /// `(label, value)` rows in display order.
    pub fn rows(&self) -> [(&'static str, f64); 13] {
        [
            ("exact match", self.exact_match),
            ("well formed", self.well_formed),
            ("object count", self.count_acc),
            ("shape", self.shape_acc),
            ("colour", self.colour_acc),
            ("size", self.size_acc),
            ("position", self.position_acc),
            ("object precision", self.object_precision),
            ("object recall", self.object_recall),
            ("object F1", self.object_f1),
            ("small: shape", self.small_shape_acc),
            ("small: colour", self.small_colour_acc),
            ("small: object recall", self.small_object_recall),
        ]
    }
}

impl fmt::Display for CaptionMetrics {
    /// An aligned two-column table of percentages, headed by the sample counts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "caption metrics: {} scenes, {} objects ({} small), {} predicted objects",
            self.n, self.n_objects, self.n_small_objects, self.n_predicted_objects
        )?;
        let rows = self.rows();
        let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
        for (label, value) in rows {
            writeln!(f, "  {label:<width$}  {:>7.2}%", value * 100.0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use duet_datasets::shapeworld::{
        caption, generate_scene, Colour, Position, SceneConfig, Shape,
    };
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn obj(shape: Shape, colour: Colour, size: Size, position: Position) -> Object {
        Object {
            shape,
            colour,
            size,
            position,
        }
    }

    fn scenes(n: usize) -> Vec<Vec<Object>> {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        (0..n)
            .map(|_| generate_scene(&mut rng, &SceneConfig::default()).objects)
            .collect()
    }

    #[test]
    fn perfect_prediction_scores_one() {
        let pairs: Vec<_> = scenes(200)
            .into_iter()
            .map(|objs| {
                let c = objects_caption(&objs);
                (objs, c)
            })
            .collect();
        let m = evaluate(&pairs);
        assert_eq!(m.n, 200);
        for (label, v) in m.rows() {
            assert_eq!(v, 1.0, "{label}");
        }
        assert_eq!(m.n_predicted_objects, m.n_objects);
        assert!(m.n_small_objects > 0);
    }

    #[test]
    fn wrong_colour_costs_exactly_one_object() {
        let truth = vec![
            obj(Shape::Circle, Colour::Red, Size::Small, Position::TopLeft),
            obj(Shape::Square, Colour::Blue, Size::Large, Position::Centre),
        ];
        let mut wrong = truth.clone();
        wrong[0].colour = Colour::Green;
        let m = evaluate(&[(truth.clone(), objects_caption(&wrong))]);
        assert_eq!(m.exact_match, 0.0);
        assert_eq!(m.well_formed, 1.0);
        assert_eq!(m.count_acc, 1.0);
        assert_eq!(m.colour_acc, 0.5);
        assert_eq!(m.shape_acc, 1.0);
        assert_eq!(m.size_acc, 1.0);
        assert_eq!(m.position_acc, 1.0);
        assert_eq!(m.object_precision, 0.5);
        assert_eq!(m.object_recall, 0.5);
        assert_eq!(m.object_f1, 0.5);
        // The wrong object is the small one.
        assert_eq!(m.small_colour_acc, 0.0);
        assert_eq!(m.small_shape_acc, 1.0);
        assert_eq!(m.small_object_recall, 0.0);

        // Pooled with a perfect scene: 1 wrong colour out of 4 GT objects.
        let m = evaluate(&[
            (truth.clone(), objects_caption(&wrong)),
            (
                truth.clone(),
                caption(&duet_datasets::shapeworld::Scene::new(truth)),
            ),
        ]);
        assert_eq!(m.colour_acc, 0.75);
        assert_eq!(m.exact_match, 0.5);
        assert_eq!(m.small_colour_acc, 0.5);
    }

    #[test]
    fn empty_and_garbage_predictions() {
        let truth = vec![obj(
            Shape::Cross,
            Colour::White,
            Size::Small,
            Position::Bottom,
        )];
        for pred in ["", "[UNK] [UNK]", "a a a small", "\u{0}\u{ffff} and and"] {
            let m = evaluate(&[(truth.clone(), pred.to_string())]);
            assert_eq!(m.object_recall, 0.0, "{pred:?}");
            assert_eq!(m.object_precision, 0.0);
            assert_eq!(m.object_f1, 0.0);
            assert_eq!(m.position_acc, 0.0);
            assert_eq!(m.well_formed, 0.0);
            assert_eq!(m.count_acc, 0.0);
            assert!(m.rows().iter().all(|(_, v)| v.is_finite()));
        }
        let m = evaluate(&[]);
        assert_eq!(m, CaptionMetrics::default());
    }

    #[test]
    fn extra_and_duplicate_objects_hurt_precision_only() {
        let truth = vec![obj(
            Shape::Diamond,
            Colour::Cyan,
            Size::Large,
            Position::Right,
        )];
        let t = objects_caption(&truth);
        let extra = obj(Shape::Triangle, Colour::Orange, Size::Small, Position::Left);
        let pred = format!("{t} and {t} and {extra}");
        let m = evaluate(&[(truth, pred)]);
        assert_eq!(m.object_recall, 1.0);
        assert!((m.object_precision - 1.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.shape_acc, 1.0);
        assert_eq!(m.count_acc, 0.0);
        assert_eq!(m.well_formed, 1.0);
    }

    #[test]
    fn serialises_and_displays() {
        let truth = vec![obj(
            Shape::Circle,
            Colour::Red,
            Size::Small,
            Position::TopLeft,
        )];
        let m = evaluate(&[(truth.clone(), objects_caption(&truth))]);
        let json = serde_json::to_value(&m).unwrap();
        assert_eq!(json["exact_match"], 1.0);
        assert_eq!(json["n"], 1);
        let table = m.to_string();
        assert!(table.contains("exact match"));
        assert!(table.contains("100.00%"));
        // Values are aligned in one column.
        let cols: Vec<usize> = table
            .lines()
            .skip(1)
            .map(|l| l.find('%').unwrap())
            .collect();
        assert!(cols.windows(2).all(|w| w[0] == w[1]), "{table}");
    }
}
