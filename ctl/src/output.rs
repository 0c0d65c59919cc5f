//! The one place that renders what flottectl prints: aligned text tables and
//! `name: value` blocks for people, pretty JSON for scripts (`-o json`), and
//! times as RFC 3339. Handlers build views (serde structs) and hand them
//! here; none of them formats a table or JSON by hand.

use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::CtlError;

/// How a command's result is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// A Unix time as RFC 3339, or `never` for zero (the proto's "unset").
pub fn format_time(unix: i64) -> String {
    if unix <= 0 {
        return "never".to_owned();
    }
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unsigned_abs());
    humantime::format_rfc3339_seconds(time).to_string()
}

/// A Unix time as RFC 3339, `None` when unset (JSON `null`).
pub fn optional_time(unix: i64) -> Option<String> {
    (unix > 0).then(|| format_time(unix))
}

/// The state of something that can be revoked (users, operators).
pub fn active_or_revoked(revoked_at: Option<&str>) -> String {
    revoked_at.map_or_else(|| "active".to_owned(), |at| format!("revoked {at}"))
}

/// Renders rows as an aligned text table.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.len()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
    out
}

/// Prints rows as an aligned text table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    print!("{}", render_table(headers, rows));
}

/// Prints a value as pretty JSON.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CtlError> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints views as one JSON array, or as a table with one row per view.
pub fn print_list<View: Serialize>(
    output: Output,
    views: &[View],
    headers: &[&str],
    row: impl Fn(&View) -> Vec<String>,
) -> Result<(), CtlError> {
    if output == Output::Json {
        return print_json(views);
    }
    print_table(headers, &views.iter().map(row).collect::<Vec<_>>());
    Ok(())
}

/// Prints `name:` / value lines, the values aligned in a column after
/// `width` characters.
pub fn print_fields<Value: std::fmt::Display>(width: usize, fields: &[(&str, Value)]) {
    for (name, value) in fields {
        println!("{:<width$} {value}", format!("{name}:"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let table = render_table(
            &["ID", "NAME"],
            &[
                vec!["1".into(), "alpha".into()],
                vec!["22".into(), "b".into()],
            ],
        );
        assert_eq!(table, "ID  NAME\n1   alpha\n22  b\n");
    }

    #[test]
    fn times_render_as_rfc3339_or_never() {
        assert_eq!(format_time(0), "never");
        assert_eq!(format_time(86_400), "1970-01-02T00:00:00Z");
        assert_eq!(optional_time(0), None);
    }
}
