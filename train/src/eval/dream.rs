//! Evaluation of a dream run: GenEval-style scores of text-to-image through the dream queries
//! (the blank image and the prompt), and instruction edits scored by the exact detector —
//! the asked change made, every other object kept — against drawing the instruction from the
//! blank image (what the text alone gives).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::Path;

use burn::tensor::backend::Backend;
use duet_datasets::shapeworld::{load_dataset, load_edits, Colour, EditKind, Object, Position};
use image::RgbImage;
use serde::Serialize;

use crate::eval::caption::GenerateEvalOptions;
use crate::eval::geneval::{label, prompt_set, Detector, GenEvalReport};

/// GenEval-style scores of `run`'s dream conditioning (with `opts.untrained`: its queries at
/// their seeded initial weights), on the same prompts and noise as the text path's
/// [`crate::eval::caption::eval_generate`]. Returns the report and the images in prompt order.
pub fn eval_dream_generate<B: Backend>(
    run: &Path,
    opts: &GenerateEvalOptions,
    device: &B::Device,
) -> anyhow::Result<(GenEvalReport, Vec<RgbImage>)> {
    let loaded = duet_run::load_dream::<B>(run, opts.untrained, device)?;
    let prompts = prompt_set(opts.per_category, opts.prompt_seed);
    let detector = Detector::new(loaded.config.run.model.image_size as u32);
    let mut report = GenEvalReport::default();
    let mut images = Vec::with_capacity(prompts.len());
    for (k, chunk) in prompts.chunks(opts.batch.max(1)).enumerate() {
        let texts: Vec<String> = chunk.iter().map(|p| p.text.clone()).collect();
        let x = loaded.generate(
            &texts,
            &vec![None; texts.len()],
            &opts.sampler,
            opts.guidance,
            opts.seed.wrapping_add(k as u64),
            device,
        )?;
        for (p, img) in chunk.iter().zip(duet_diffusion::to_images(&x)?) {
            report.add(p, &detector.detect(&img));
            report.add_colour_pixels(p, &img);
            images.push(img);
        }
    }
    Ok((report, images))
}

/// Tallies of one edit kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct EditTally {
    pub edits: usize,
    /// Edits whose asked change is in the drawn image: the new or changed object detected
    /// exactly, or nothing detected in the removed object's cell.
    pub made: usize,
    /// Objects the edit leaves alone, and how many of them were drawn exactly.
    pub unchanged: usize,
    pub kept: usize,
    /// Objects the edit leaves alone whose cell is still drawn mostly in their colour: a
    /// looser "kept" that a small generator, whose shapes are rough, can already show.
    pub kept_colour: usize,
    /// Drawn scene equal to the target scene.
    pub exact: usize,
}

/// Edit accuracy per kind.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct EditReport {
    pub per_kind: BTreeMap<EditKind, EditTally>,
}

fn rate(n: usize, d: usize) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

impl EditReport {
    /// Scores one drawn edit of `source` towards `target` (`drawn`: the detector's objects of
    /// `image`).
    pub fn add(
        &mut self,
        kind: EditKind,
        source: &[Object],
        target: &[Object],
        drawn: &[Object],
        image: &RgbImage,
    ) {
        let before: BTreeSet<&Object> = source.iter().collect();
        let after: BTreeSet<&Object> = target.iter().collect();
        let drawn_set: BTreeSet<&Object> = drawn.iter().collect();
        let t = self.per_kind.entry(kind).or_default();
        t.edits += 1;
        let made = match kind {
            EditKind::Remove => {
                let cells: Vec<Position> = before.difference(&after).map(|o| o.position).collect();
                cells
                    .iter()
                    .all(|c| !drawn.iter().any(|d| d.position == *c))
            }
            _ => after.difference(&before).all(|o| drawn_set.contains(o)),
        };
        t.made += usize::from(made);
        for o in before.intersection(&after) {
            t.unchanged += 1;
            t.kept += usize::from(drawn_set.contains(o));
            t.kept_colour += usize::from(cell_colour(image, o.position) == Some(o.colour));
        }
        t.exact += usize::from(drawn_set == after);
    }

    fn total(&self) -> EditTally {
        let mut all = EditTally::default();
        for t in self.per_kind.values() {
            all.edits += t.edits;
            all.made += t.made;
            all.unchanged += t.unchanged;
            all.kept += t.kept;
            all.kept_colour += t.kept_colour;
            all.exact += t.exact;
        }
        all
    }

    /// Share of edits with the asked change made.
    pub fn made(&self) -> f64 {
        let t = self.total();
        rate(t.made, t.edits)
    }

    /// Share of the objects an edit leaves alone that were drawn exactly.
    pub fn kept(&self) -> f64 {
        let t = self.total();
        rate(t.kept, t.unchanged)
    }

    /// Share of the objects an edit leaves alone whose cell keeps their colour.
    pub fn kept_colour(&self) -> f64 {
        let t = self.total();
        rate(t.kept_colour, t.unchanged)
    }

    /// Share of edits drawn as exactly the target scene.
    pub fn exact(&self) -> f64 {
        let t = self.total();
        rate(t.exact, t.edits)
    }
}

impl fmt::Display for EditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<10} {:>6} {:>8} {:>8} {:>12} {:>8}",
            "edit", "n", "made", "kept", "kept colour", "exact"
        )?;
        let row = |f: &mut fmt::Formatter<'_>, name: &str, t: &EditTally| {
            writeln!(
                f,
                "{:<10} {:>6} {:>7.1}% {:>7.1}% {:>11.1}% {:>7.1}%",
                name,
                t.edits,
                100.0 * rate(t.made, t.edits),
                100.0 * rate(t.kept, t.unchanged),
                100.0 * rate(t.kept_colour, t.unchanged),
                100.0 * rate(t.exact, t.edits)
            )
        };
        for (kind, t) in &self.per_kind {
            row(f, kind.name(), t)?;
        }
        row(f, "all", &self.total())
    }
}

/// The colour most of a cell's coloured pixels have, when at least 4 pixels there are
/// coloured (a speck is no object).
pub fn cell_colour(img: &RgbImage, cell: Position) -> Option<Colour> {
    let (x0, y0, x1, y1) = cell.cell_rect(img.width());
    let mut counts: BTreeMap<Colour, usize> = BTreeMap::new();
    for y in y0..y1.min(img.height()) {
        for x in x0..x1.min(img.width()) {
            if let Some(c) = label(img.get_pixel(x, y).0) {
                *counts.entry(c).or_default() += 1;
            }
        }
    }
    let total: usize = counts.values().sum();
    let (colour, n) = counts.into_iter().max_by_key(|(_, n)| *n)?;
    (total >= 4 && 2 * n > total).then_some(colour)
}

/// One scored edit, for pictures and examples.
pub struct DrawnEdit {
    pub instruction: String,
    pub source: RgbImage,
    pub drawn: RgbImage,
}

/// Draws the first `limit` edits of `data`'s `edits.jsonl` with `run`'s dream queries and
/// scores them; with `from_scratch`, each instruction is drawn over the blank image instead
/// of its source (the baseline: what the instruction alone gives).
pub fn eval_edits<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    opts: &GenerateEvalOptions,
    from_scratch: bool,
    device: &B::Device,
) -> anyhow::Result<(EditReport, Vec<DrawnEdit>)> {
    let loaded = duet_run::load_dream::<B>(run, opts.untrained, device)?;
    let samples = load_dataset(data)?;
    let by_path: BTreeMap<&Path, usize> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| (s.image_path.as_path(), i))
        .collect();
    let mut edits = load_edits(data)?;
    if let Some(n) = limit {
        edits.truncate(n);
    }
    if edits.is_empty() {
        anyhow::bail!(
            "{}: no edits to evaluate (write the folder with --edits)",
            data.display()
        );
    }
    let detector = Detector::new(loaded.config.run.model.image_size as u32);
    let mut report = EditReport::default();
    let mut drawn_edits = Vec::with_capacity(edits.len());
    for (k, chunk) in edits.chunks(opts.batch.max(1)).enumerate() {
        let mut sources = Vec::with_capacity(chunk.len());
        for e in chunk {
            let i = *by_path.get(data.join(&e.image).as_path()).ok_or_else(|| {
                anyhow::anyhow!("{}: edit of an unknown image {}", data.display(), e.image)
            })?;
            sources.push(&samples[i]);
        }
        let texts: Vec<String> = chunk.iter().map(|e| e.instruction.clone()).collect();
        let images: Vec<Option<&RgbImage>> = sources
            .iter()
            .map(|s| (!from_scratch).then_some(&s.image))
            .collect();
        let x = loaded.generate(
            &texts,
            &images,
            &opts.sampler,
            opts.guidance,
            opts.seed.wrapping_add(k as u64),
            device,
        )?;
        for ((e, s), img) in chunk
            .iter()
            .zip(&sources)
            .zip(duet_diffusion::to_images(&x)?)
        {
            report.add(e.kind, &s.objects, &e.target, &detector.detect(&img), &img);
            drawn_edits.push(DrawnEdit {
                instruction: e.instruction.clone(),
                source: s.image.clone(),
                drawn: img,
            });
        }
    }
    Ok((report, drawn_edits))
}

#[cfg(test)]
mod tests {
    use super::*;
    use duet_datasets::shapeworld::{Shape, Size};

    fn obj(shape: Shape, colour: Colour, position: Position) -> Object {
        Object {
            shape,
            colour,
            size: Size::Large,
            position,
        }
    }

    #[test]
    fn edits_score_the_change_and_the_kept_objects_apart() {
        let draw = |objects: &[Object]| {
            duet_datasets::shapeworld::render(
                &duet_datasets::shapeworld::Scene::new(objects.to_vec()),
                32,
            )
        };
        let square = obj(Shape::Square, Colour::Red, Position::TopLeft);
        let circle = obj(Shape::Circle, Colour::Blue, Position::Centre);
        let green = Object {
            colour: Colour::Green,
            ..square
        };
        let source = [square, circle];
        let target = [green, circle];
        let mut r = EditReport::default();
        r.add(
            EditKind::Recolour,
            &source,
            &target,
            &target,
            &draw(&target),
        );
        // Drawing the source again keeps the circle but makes no change.
        r.add(
            EditKind::Recolour,
            &source,
            &target,
            &source,
            &draw(&source),
        );
        // Drawing only the instruction's object makes the change and drops the rest.
        r.add(
            EditKind::Recolour,
            &source,
            &target,
            &[green],
            &draw(&[green]),
        );
        let t = r.per_kind[&EditKind::Recolour];
        assert_eq!(
            (t.edits, t.made, t.unchanged, t.kept, t.exact),
            (3, 2, 3, 2, 1)
        );
        // Renders keep the colour of every object they keep exactly.
        assert_eq!(t.kept_colour, 2);
        // A blue blob in the circle's cell keeps its colour, not its shape.
        let blob = obj(Shape::Square, Colour::Blue, Position::Centre);
        let mut r2 = EditReport::default();
        r2.add(
            EditKind::Recolour,
            &source,
            &target,
            &[green],
            &draw(&[green, blob]),
        );
        let t = r2.per_kind[&EditKind::Recolour];
        assert_eq!((t.kept, t.kept_colour), (0, 1));

        let mut r = EditReport::default();
        // Removing the square: any object left in its cell is no removal.
        r.add(
            EditKind::Remove,
            &source,
            &[circle],
            &[circle],
            &draw(&[circle]),
        );
        r.add(
            EditKind::Remove,
            &source,
            &[circle],
            &[green, circle],
            &draw(&[green, circle]),
        );
        let t = r.per_kind[&EditKind::Remove];
        assert_eq!((t.made, t.kept, t.exact), (1, 2, 1));
        assert!((r.made() - 0.5).abs() < 1e-12);
        assert!((r.kept() - 1.0).abs() < 1e-12);
        assert!(r.to_string().contains("remove"));
    }
}
