//! Text that reaches a terminal or a line-oriented output: what the `duet` CLI, `duet-edge` and
//! the C ABI print about untrusted input goes through here, so a hostile file name or manifest
//! string can neither drive the terminal nor split a line.

/// `s` with control characters (ANSI escapes, carriage returns, NULs) written as escapes, so a
/// hostile manifest's strings cannot drive the terminal that prints an error about them.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A file name as one TSV field: unchanged unless it holds a tab, newline or other control
/// character, which would split the line; then quoted with those escaped.
pub fn tsv_field(s: &str) -> String {
    if s.chars().any(char::is_control) {
        format!("{s:?}")
    } else {
        s.to_string()
    }
}

/// An error and its causes on one line, each cause said once (a cause whose text its parent
/// already includes, as `thiserror` messages often do, is not repeated), control characters
/// escaped.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    escape_controls(&line)
}
