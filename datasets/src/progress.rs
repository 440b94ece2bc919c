//! The progress bar every long job shows (dataset writing, every training stage), hidden when
//! the caller asks for quiet, as the tests do.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps labelled `what`, with the stage's message and elapsed / remaining time.
pub fn stage_bar(quiet: bool, len: usize, what: &str) -> ProgressBar {
    let pb = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len as u64)
    };
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{bar:30}}] {{pos}}/{{len}} {{msg}} ({{elapsed}} < {{eta}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    pb
}
