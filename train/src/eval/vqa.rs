//! `duet-train eval --stage vqa`: the run's greedy answers to a folder's held-out questions,
//! exact match per question kind, beside the majority-answer baseline of each kind (what a
//! model that never looks at the image could score at best by always giving the kind's most
//! common answer in the folder).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use burn::tensor::backend::Backend;
use serde::Serialize;

use crate::stages::caption::{load_question_rows, prepare, QuestionRow};
use duet_datasets::shapeworld::{load_dataset, QuestionKind};
use duet_datasets::tokenizer::{decode_caption, encode_caption};
use duet_models::tokens::{BOS_ID, EOS_ID};
use duet_run::{load_run, LoadedRun};

/// Exact-match accuracy of one question kind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KindScore {
    pub questions: usize,
    pub correct: usize,
    /// The kind's most common answer in the folder and how many questions it answers.
    pub majority_answer: String,
    pub majority_correct: usize,
    /// The answer the model gave most often and how often: a model that gives one answer to
    /// every question of a kind has learnt the prior, not the image.
    pub most_given: String,
    pub most_given_count: usize,
}

impl KindScore {
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.questions.max(1) as f64
    }

    pub fn majority_accuracy(&self) -> f64 {
        self.majority_correct as f64 / self.questions.max(1) as f64
    }
}

/// Per-kind and overall VQA accuracy.
#[derive(Debug, Clone, Default, Serialize)]
pub struct VqaReport {
    pub per_kind: BTreeMap<QuestionKind, KindScore>,
}

impl VqaReport {
    /// Scores `(question, truth, prediction)` triples.
    pub fn score(answers: &[(QuestionRow, String)]) -> Self {
        let mut per_kind: BTreeMap<QuestionKind, KindScore> = BTreeMap::new();
        let mut counts: BTreeMap<QuestionKind, BTreeMap<&str, usize>> = BTreeMap::new();
        let mut given: BTreeMap<QuestionKind, BTreeMap<&str, usize>> = BTreeMap::new();
        for (q, predicted) in answers {
            *given
                .entry(q.kind)
                .or_default()
                .entry(predicted.trim())
                .or_default() += 1;
            let s = per_kind.entry(q.kind).or_default();
            s.questions += 1;
            s.correct += usize::from(predicted.trim() == q.answer);
            *counts
                .entry(q.kind)
                .or_default()
                .entry(q.answer.as_str())
                .or_default() += 1;
        }
        // Most common; ties to the alphabetically first, so the report is stable.
        let most = |answers: &BTreeMap<&str, usize>| {
            answers
                .iter()
                .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
                .map(|(a, n)| (a.to_string(), *n))
        };
        for (kind, answers) in counts {
            if let Some((answer, n)) = most(&answers) {
                let s = per_kind.entry(kind).or_default();
                s.majority_answer = answer;
                s.majority_correct = n;
            }
        }
        for (kind, answers) in given {
            if let Some((answer, n)) = most(&answers) {
                let s = per_kind.entry(kind).or_default();
                s.most_given = answer;
                s.most_given_count = n;
            }
        }
        VqaReport { per_kind }
    }

    pub fn overall(&self) -> f64 {
        let (c, n) = self
            .per_kind
            .values()
            .fold((0, 0), |(c, n), s| (c + s.correct, n + s.questions));
        c as f64 / n.max(1) as f64
    }

    pub fn majority_overall(&self) -> f64 {
        let (c, n) = self.per_kind.values().fold((0, 0), |(c, n), s| {
            (c + s.majority_correct, n + s.questions)
        });
        c as f64 / n.max(1) as f64
    }
}

impl fmt::Display for VqaReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| kind | questions | accuracy | majority answer | its accuracy | most given answer |"
        )?;
        writeln!(f, "|---|---:|---:|---|---:|---|")?;
        for (kind, s) in &self.per_kind {
            writeln!(
                f,
                "| {kind} | {} | {:.1} % | {} | {:.1} % | {} ({:.0} %) |",
                s.questions,
                100.0 * s.accuracy(),
                s.majority_answer,
                100.0 * s.majority_accuracy(),
                s.most_given,
                100.0 * s.most_given_count as f64 / s.questions.max(1) as f64
            )?;
        }
        write!(
            f,
            "| overall | {} | {:.1} % | | {:.1} % | |",
            self.per_kind.values().map(|s| s.questions).sum::<usize>(),
            100.0 * self.overall(),
            100.0 * self.majority_overall()
        )
    }
}

/// The run's greedy answer to each question (after its prompt), in batches.
pub fn answer_questions<B: Backend>(
    run: &LoadedRun<B>,
    samples: &[duet_datasets::shapeworld::Sample],
    questions: &[QuestionRow],
    device: &B::Device,
) -> anyhow::Result<Vec<String>> {
    let data = prepare(
        samples,
        &run.tokenizer,
        run.config.model.image_size,
        run.config.model.max_len,
    )?;
    let mut out = Vec::with_capacity(questions.len());
    for chunk in questions.chunks(64) {
        let images: Vec<usize> = chunk.iter().map(|q| q.image).collect();
        let prompts = chunk
            .iter()
            .map(|q| {
                // `[BOS] words [EOS]` → the words.
                let ids = encode_caption(&run.tokenizer, &q.question, run.config.model.max_len)?;
                Ok(ids[1..ids.len() - 1].to_vec())
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let px = data.pixels_batch::<B>(&images, device);
        for ids in run
            .model
            .greedy_after(px, &prompts, BOS_ID, EOS_ID, run.config.model.max_len)
        {
            out.push(decode_caption(&run.tokenizer, &ids));
        }
    }
    Ok(out)
}

/// A question with its true answer and the model's, for display.
#[derive(Debug, Clone, Serialize)]
pub struct Answered {
    pub question: String,
    pub truth: String,
    pub answer: String,
}

/// Answers every question of the ShapeWorld folder `data` (its `questions.jsonl`) with the
/// run's captioner; returns the report and every answer, in the folder's order.
pub fn eval_vqa<B: Backend>(
    run: &Path,
    data: &Path,
    limit: Option<usize>,
    device: &B::Device,
) -> anyhow::Result<(VqaReport, Vec<Answered>)> {
    let loaded = load_run::<B>(run, device)?;
    let samples = load_dataset(data)?;
    let mut questions = load_question_rows(&[data.to_path_buf()], &samples)?;
    if let Some(n) = limit {
        questions.truncate(n);
    }
    if questions.is_empty() {
        anyhow::bail!(
            "{}: no questions to evaluate (write some with `duet-train shapeworld --questions N`)",
            data.display()
        );
    }
    let predictions = answer_questions(&loaded, &samples, &questions, device)?;
    let answered = questions
        .iter()
        .zip(&predictions)
        .map(|(q, p)| Answered {
            question: q.question.clone(),
            truth: q.answer.clone(),
            answer: p.clone(),
        })
        .collect();
    let scored: Vec<(QuestionRow, String)> = questions.into_iter().zip(predictions).collect();
    Ok((VqaReport::score(&scored), answered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_per_kind_with_the_majority_baseline() {
        let q = |kind, answer: &str| QuestionRow {
            image: 0,
            kind,
            question: "q ?".into(),
            answer: answer.into(),
        };
        let answers = vec![
            (q(QuestionKind::Exists, "yes"), "yes".to_string()),
            (q(QuestionKind::Exists, "yes"), "no".to_string()),
            (q(QuestionKind::Exists, "no"), "no".to_string()),
            (q(QuestionKind::Colour, "red"), "red".to_string()),
        ];
        let r = VqaReport::score(&answers);
        let e = &r.per_kind[&QuestionKind::Exists];
        assert_eq!((e.questions, e.correct), (3, 2));
        assert_eq!((e.majority_answer.as_str(), e.majority_correct), ("yes", 2));
        assert!((r.overall() - 0.75).abs() < 1e-12);
        assert!((r.majority_overall() - 0.75).abs() < 1e-12);
        assert_eq!((e.most_given.as_str(), e.most_given_count), ("no", 2));
        assert!(r
            .to_string()
            .contains("| exists | 3 | 66.7 % | yes | 66.7 % | no (67 %) |"));
    }
}
