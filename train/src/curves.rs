//! Training curves as pictures: `loss.png` (and `reward.png` where a stage logs a reward and a
//! KL term) drawn from a run's `metrics.jsonl`, rewritten at every checkpoint and at the end
//! of a stage, so a run in progress can be looked at as well as a finished one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::plot::{CurveChart, Series, YScale};

pub const LOSS_PNG: &str = "loss.png";
pub const REWARD_PNG: &str = "reward.png";

/// Which chart a metric belongs on. Losses span decades (log axis); reward and KL do not.
fn chart_of(key: &str) -> Option<&'static str> {
    if key.contains("loss") || matches!(key, "diffusion" | "agreement" | "cycle") {
        Some(LOSS_PNG)
    } else if matches!(key, "reward" | "kl") {
        Some(REWARD_PNG)
    } else {
        None
    }
}

/// Points of each series (by name) of one chart.
type ChartPoints = BTreeMap<String, Vec<(f64, f64)>>;

/// The series of each chart in `metrics.jsonl`'s lines: x is `step`; a line's `variant` or
/// `stage` string (restore logs several variants into one file) prefixes its series' names.
fn series_of(metrics: &str) -> BTreeMap<&'static str, Vec<Series>> {
    let mut charts: BTreeMap<&'static str, ChartPoints> = BTreeMap::new();
    for line in metrics.lines() {
        let Ok(serde_json::Value::Object(row)) = serde_json::from_str(line) else {
            continue;
        };
        let Some(step) = row.get("step").and_then(|v| v.as_f64()) else {
            continue;
        };
        let prefix = ["variant", "stage"]
            .iter()
            .find_map(|k| row.get(*k).and_then(|v| v.as_str()))
            .map(|p| format!("{p} "))
            .unwrap_or_default();
        for (key, value) in &row {
            let (Some(chart), Some(v)) = (chart_of(key), value.as_f64()) else {
                continue;
            };
            charts
                .entry(chart)
                .or_default()
                .entry(format!("{prefix}{key}"))
                .or_default()
                .push((step, v));
        }
    }
    charts
        .into_iter()
        .map(|(chart, series)| {
            let series = series
                .into_iter()
                .map(|(name, points)| Series { name, points })
                .collect();
            (chart, series)
        })
        .collect()
}

/// Draws the charts of `run/metrics.jsonl` into `run` and returns the files written (none when
/// the run has logged nothing yet).
pub fn write_training_curves(run: &Path, title: &str) -> anyhow::Result<Vec<PathBuf>> {
    let path = run.join(duet_run::METRICS_FILE);
    let metrics = match std::fs::read_to_string(&path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(anyhow::anyhow!("{}: {e}", path.display())),
    };
    let mut written = Vec::new();
    for (file, series) in series_of(&metrics) {
        let chart = CurveChart {
            title: format!("{title}: {}", file.trim_end_matches(".png")),
            y_scale: if file == LOSS_PNG {
                YScale::Log
            } else {
                YScale::Linear
            },
            series,
        };
        let out = run.join(file);
        crate::plot::write_png(&out, &chart.render())
            .map_err(|e| anyhow::anyhow!("{}: {e}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}

/// [`write_training_curves`] titled with the run folder's name (what stages call at each
/// checkpoint and at their end).
pub fn write_run_curves(run: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let title = run
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "run".into());
    write_training_curves(run, &title)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_lines_become_the_charts_they_belong_on() {
        let metrics = r#"{"step":10,"loss":1.0,"loss_ema":1.0,"lr":0.001,"elapsed_s":1.0}
{"step":20,"loss":0.5,"loss_ema":0.9,"lr":0.001,"elapsed_s":2.0}
{"step":10,"reward":0.2,"kl":0.01,"mean_len":5}
{"step":5,"variant":"t2i","loss":0.3,"cycle":0.1}
not json
"#;
        let charts = series_of(metrics);
        let names = |f: &str| -> Vec<String> {
            charts[f].iter().map(|s| s.name.clone()).collect::<Vec<_>>()
        };
        assert_eq!(
            names(LOSS_PNG),
            ["loss", "loss_ema", "t2i cycle", "t2i loss"]
        );
        assert_eq!(names(REWARD_PNG), ["kl", "reward"]);
        assert_eq!(charts[LOSS_PNG][0].points, vec![(10.0, 1.0), (20.0, 0.5)]);

        let dir = tempfile::tempdir().unwrap();
        assert!(write_training_curves(dir.path(), "x").unwrap().is_empty());
        std::fs::write(dir.path().join("metrics.jsonl"), metrics).unwrap();
        let written = write_training_curves(dir.path(), "caption").unwrap();
        assert_eq!(written.len(), 2);
        let img = image::open(dir.path().join(LOSS_PNG)).unwrap();
        assert_eq!(img.width(), 420);
    }
}
