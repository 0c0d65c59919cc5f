//! The one place that renders what flottectl prints: aligned text tables and
//! `name: value` blocks for people, pretty JSON for scripts (`-o json`), and
//! times as RFC 3339. Handlers build views (serde structs) and hand them
//! here; none of them formats a table or JSON by hand, and none writes to
//! stdout or stderr except through this module.
//!
//! Every value printed here may come from a machine, an agent or a user, so
//! none reaches a terminal raw: control characters, escape sequences, C1
//! controls and bidi overrides are shown as visible escapes (`\x1b`, `\n`,
//! `\u{202e}`), and table cells are cut with `…` past
//! [`TABLE_CELL_MAX_COLUMNS`]. JSON keeps every value whole. A reader that
//! goes away (`flottectl machines list | head -1`) ends flottectl quietly;
//! nothing printed here may panic, whatever the value.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::{Duration, SystemTime};

use std::sync::OnceLock;

use serde::Serialize;
use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

use crate::error::CtlError;

/// How a command's result is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

/// The values `-o` takes, named in one place: `table` (the default),
/// `wide` (a table with more columns where a command has them, the plain
/// table elsewhere), `json` and `yaml` (documents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    /// Columns for people (the default).
    Table,
    /// A table with more columns where a command has them.
    Wide,
    /// A JSON document, for scripts.
    Json,
    /// The same document as YAML.
    Yaml,
}

impl OutputFormat {
    /// Documents for `json` and `yaml`, tables otherwise.
    pub fn output(self) -> Output {
        match self {
            OutputFormat::Table | OutputFormat::Wide => Output::Table,
            OutputFormat::Json | OutputFormat::Yaml => Output::Json,
        }
    }

    /// How documents are encoded: YAML for `yaml`, JSON otherwise.
    pub fn document_format(self) -> DocumentFormat {
        if self == OutputFormat::Yaml {
            DocumentFormat::Yaml
        } else {
            DocumentFormat::Json
        }
    }
}

/// The widest a table cell may be, in display columns: one machine with a
/// huge hostname or label must not push every other column off the screen.
/// `show` blocks and JSON carry the whole value.
pub const TABLE_CELL_MAX_COLUMNS: usize = 60;

/// Whether a character, printed as is, could do more on a terminal than
/// show itself: C0 and C1 controls (ESC starts colour, cursor and title
/// sequences; U+009B is a one-character CSI; a newline forges a row), and
/// the invisible characters that reorder or break what follows (bidi
/// embeddings, overrides and isolates, line and paragraph separators).
fn is_unsafe_on_terminal(character: char) -> bool {
    character.is_control()
        || matches!(
            character,
            '\u{061c}'
                | '\u{200e}'
                | '\u{200f}'
                | '\u{202a}'..='\u{202e}'
                | '\u{2066}'..='\u{2069}'
                | '\u{2028}'
                | '\u{2029}'
        )
}

/// The text with every character that is unsafe on a terminal replaced by a
/// visible escape: `\n`, `\r`, `\t`, `\xNN` for the other ASCII controls,
/// `\u{…}` for the rest. Everything else (any valid UTF-8) is kept. Not
/// meant to be reversible: scripts that need the exact value use `-o json`.
pub fn escape_for_terminal(text: &str) -> Cow<'_, str> {
    if !text.chars().any(is_unsafe_on_terminal) {
        return Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for character in text.chars() {
        // Writing into a String cannot fail, so the results are ignored.
        match character {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            unsafe_character if is_unsafe_on_terminal(unsafe_character) => {
                let code = u32::from(unsafe_character);
                let _ = if code < 0x80 {
                    write!(escaped, "\\x{code:02x}")
                } else {
                    write!(escaped, "\\u{{{code:x}}}")
                };
            }
            safe => escaped.push(safe),
        }
    }
    Cow::Owned(escaped)
}

/// The text cut to at most `max_columns` display columns, its end replaced
/// by `…` when it is cut. Counts columns (a CJK character takes two), never
/// splits a character.
pub fn cut_to_columns(text: &str, max_columns: usize) -> Cow<'_, str> {
    if text.width() <= max_columns {
        return Cow::Borrowed(text);
    }
    // The ellipsis takes one column.
    let budget = max_columns.saturating_sub(1);
    let mut used = 0;
    let mut end = 0;
    for (index, character) in text.char_indices() {
        let columns = character.width().unwrap_or(0);
        if used + columns > budget {
            break;
        }
        used += columns;
        end = index + character.len_utf8();
    }
    Cow::Owned(format!("{}…", &text[..end]))
}

/// A value as a table cell: escaped, then cut.
pub fn table_cell(value: &str) -> String {
    cut_to_columns(&escape_for_terminal(value), TABLE_CELL_MAX_COLUMNS).into_owned()
}

/// `text` followed by spaces up to `columns` display columns. Pads by hand:
/// `format!("{:<width$}")` panics when `width` exceeds 65 535.
pub fn pad_to_columns(text: &str, columns: usize) -> String {
    let mut padded = text.to_owned();
    padded.extend(std::iter::repeat_n(
        ' ',
        columns.saturating_sub(text.width()),
    ));
    padded
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

/// Renders rows as an aligned text table, every cell escaped and cut.
pub fn render_table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let header_cells: Vec<String> = headers.iter().map(|header| table_cell(header)).collect();
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| table_cell(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header_cells.iter().map(|header| header.width()).collect();
    for row in &body {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.width());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header_cells).chain(&body) {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| pad_to_columns(cell, *width))
            .collect();
        out.push_str(padded.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// Prints rows as an aligned text table.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    write_stdout(&render_table(headers, rows));
}

/// The JSON text with the characters that are unsafe on a terminal but that
/// JSON allows raw (DEL, C1 controls, bidi overrides) written as `\uXXXX`
/// escapes: the same value for a parser, inert on a terminal. They can only
/// occur inside strings, where such an escape is valid; all of them are in
/// the Basic Multilingual Plane, so one escape each suffices.
fn json_for_terminal(json: String) -> String {
    if !json.chars().any(is_unsafe_on_terminal) {
        return json;
    }
    let mut escaped = String::with_capacity(json.len() + 16);
    for character in json.chars() {
        // serde_json already escaped the C0 controls in strings; what is
        // left raw of them is the layout of pretty JSON.
        if is_unsafe_on_terminal(character) && character != '\n' {
            // Writing into a String cannot fail.
            let _ = write!(escaped, "\\u{:04x}", u32::from(character));
        } else {
            escaped.push(character);
        }
    }
    escaped
}

/// How structured documents (`-o json`, `-o yaml`) are encoded: chosen once
/// by `main` before any command runs, so that every command's `-o json`
/// path serves YAML too without knowing about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DocumentFormat {
    #[default]
    Json,
    Yaml,
}

static DOCUMENT_FORMAT: OnceLock<DocumentFormat> = OnceLock::new();

/// Sets how documents are encoded for this process (the first call wins).
pub fn choose_document_format(format: DocumentFormat) {
    let _ = DOCUMENT_FORMAT.set(format);
}

/// `value` as YAML, or — when a string holds characters unsafe on a
/// terminal, which YAML would print raw in plain or single-quoted scalars —
/// as the escaped JSON, which is valid YAML too (JSON is a subset of YAML
/// 1.2 and its `\uXXXX` escapes mean the same there).
fn yaml_for_terminal<T: Serialize + ?Sized>(value: &T) -> Result<String, CtlError> {
    let yaml = serde_norway::to_string(value)?;
    if yaml
        .chars()
        .any(|character| character != '\n' && is_unsafe_on_terminal(character))
    {
        return Ok(format!(
            "{}\n",
            json_for_terminal(serde_json::to_string_pretty(value)?)
        ));
    }
    Ok(yaml)
}

/// Prints a value as a pretty JSON (or YAML) document, every value whole.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> Result<(), CtlError> {
    let document = match DOCUMENT_FORMAT.get().copied().unwrap_or_default() {
        DocumentFormat::Json => format!(
            "{}\n",
            json_for_terminal(serde_json::to_string_pretty(value)?)
        ),
        DocumentFormat::Yaml => yaml_for_terminal(value)?,
    };
    write_stdout(&document);
    Ok(())
}

/// Prints a value as JSON on one line (streams read line by line), or as
/// one YAML document of a stream (each after a `---` line).
pub fn print_json_line<T: Serialize + ?Sized>(value: &T) -> Result<(), CtlError> {
    let document = match DOCUMENT_FORMAT.get().copied().unwrap_or_default() {
        DocumentFormat::Json => format!("{}\n", json_for_terminal(serde_json::to_string(value)?)),
        DocumentFormat::Yaml => format!("---\n{}", yaml_for_terminal(value)?),
    };
    write_stdout(&document);
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

/// Renders `name:` / value lines, the values escaped (not cut: this is
/// where a whole value is read) and aligned in a column after `width`
/// characters.
pub fn render_fields<Value: std::fmt::Display>(width: usize, fields: &[(&str, Value)]) -> String {
    let mut out = String::new();
    for (name, value) in fields {
        out.push_str(&pad_to_columns(&format!("{name}:"), width));
        out.push(' ');
        out.push_str(&escape_for_terminal(&value.to_string()));
        out.push('\n');
    }
    out
}

/// Prints `name:` / value lines (see [`render_fields`]).
pub fn print_fields<Value: std::fmt::Display>(width: usize, fields: &[(&str, Value)]) {
    write_stdout(&render_fields(width, fields));
}

/// Prints one line on stdout, escaped whole: whatever values it holds, it
/// stays one line on the terminal. Used through [`print_line!`].
pub fn print_escaped_line(line: &str) {
    write_stdout(&format!("{}\n", escape_for_terminal(line)));
}

/// Prints one line on stderr, escaped whole. Used through [`note_line!`].
pub fn note_escaped_line(line: &str) {
    // A closed stderr leaves no one to tell: the note is dropped, never a
    // panic (`eprintln!` would panic).
    let _ = std::io::stderr().write_all(format!("{}\n", escape_for_terminal(line)).as_bytes());
}

/// A message that may span lines (an error listing every problem of a plan
/// or a settings file) for a terminal: each line escaped, so that no line
/// carries an escape sequence, while the list stays readable.
fn message_for_terminal(message: &str) -> String {
    let lines: Vec<Cow<'_, str>> = message.split('\n').map(escape_for_terminal).collect();
    lines.join("\n")
}

/// Prints a message that may span lines on stderr (see
/// [`message_for_terminal`]).
pub fn note_message(message: &str) {
    // A closed stderr leaves no one to tell (see `note_escaped_line`).
    let _ = std::io::stderr().write_all(format!("{}\n", message_for_terminal(message)).as_bytes());
}

/// Writes text on stdout as is (callers escape).
fn write_stdout(text: &str) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        end_because_stdout_failed(&error);
    }
}

/// Ends flottectl when its output cannot be written. A reader that went away
/// (`| head -1`) is the normal end of a pipeline: nothing more would be
/// read, so flottectl stops with success and says nothing, as `ls | head`
/// does. Any other failure (a full disk) is reported and fails. `println!`
/// would panic in both cases.
fn end_because_stdout_failed(error: &std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    note_escaped_line(&format!("flottectl: cannot write the output: {error}"));
    std::process::exit(1);
}

/// `println!` for flottectl: one line on stdout, escaped whole (see
/// [`print_escaped_line`]); `print_line!()` prints an empty line.
macro_rules! print_line {
    () => {
        $crate::output::print_escaped_line("")
    };
    ($($argument:tt)*) => {
        $crate::output::print_escaped_line(&format!($($argument)*))
    };
}
pub(crate) use print_line;

/// `eprintln!` for flottectl: one line on stderr, escaped whole.
macro_rules! note_line {
    ($($argument:tt)*) => {
        $crate::output::note_escaped_line(&format!($($argument)*))
    };
}
pub(crate) use note_line;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_is_yaml_and_unsafe_text_falls_back_to_escaped_json_which_parses_as_yaml_alike() {
        #[derive(Serialize)]
        struct Machine {
            hostname: String,
            labels: Vec<String>,
        }
        let plain = Machine {
            hostname: "web-1".into(),
            labels: vec!["role=web".into()],
        };
        assert_eq!(
            yaml_for_terminal(&plain).unwrap(),
            "hostname: web-1\nlabels:\n- role=web\n"
        );
        let hostile = Machine {
            hostname: "web\u{202e}1\u{9b}".into(),
            labels: Vec::new(),
        };
        let document = yaml_for_terminal(&hostile).unwrap();
        assert!(
            !document.contains('\u{202e}') && !document.contains('\u{9b}'),
            "{document:?}"
        );
        let parsed: serde_json::Value = serde_norway::from_str(&document).unwrap();
        assert_eq!(parsed["hostname"], "web\u{202e}1\u{9b}", "the same value");
    }

    #[test]
    fn output_formats_are_named_in_one_place() {
        use clap::ValueEnum;
        let cases = [
            ("table", Some((Output::Table, DocumentFormat::Json))),
            ("wide", Some((Output::Table, DocumentFormat::Json))),
            ("json", Some((Output::Json, DocumentFormat::Json))),
            ("yaml", Some((Output::Json, DocumentFormat::Yaml))),
            ("xml", None),
            ("app-1.2.0.flotte", None),
        ];
        for (text, expected) in cases {
            let format = OutputFormat::from_str(text, false).ok();
            assert_eq!(
                format.map(|format| (format.output(), format.document_format())),
                expected,
                "{text}"
            );
        }
    }

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

    #[test]
    fn escape_sequences_are_shown_not_sent() {
        assert_eq!(
            escape_for_terminal("web\x1b[31mred\x1b]0;title\x07"),
            "web\\x1b[31mred\\x1b]0;title\\x07"
        );
        assert_eq!(
            escape_for_terminal("a\u{9b}2Jb\u{85}"),
            "a\\u{9b}2Jb\\u{85}"
        );
        assert_eq!(escape_for_terminal("del\x7f\0"), "del\\x7f\\x00");
    }

    #[test]
    fn newlines_and_tabs_cannot_forge_lines_or_columns() {
        assert_eq!(
            escape_for_terminal("web-1\nweb-2  online\r\tx"),
            "web-1\\nweb-2  online\\r\\tx"
        );
        assert_eq!(
            escape_for_terminal("a\u{2028}b\u{2029}"),
            "a\\u{2028}b\\u{2029}"
        );
        let table = render_table(
            &["HOST", "STATE"],
            &[vec!["evil\nforged".into(), "online".into()]],
        );
        assert_eq!(table.lines().count(), 2, "{table}");
    }

    #[test]
    fn bidi_overrides_are_escaped() {
        assert_eq!(
            escape_for_terminal("user\u{202e}gpj.exe\u{2066}x\u{2069}\u{200f}"),
            "user\\u{202e}gpj.exe\\u{2066}x\\u{2069}\\u{200f}"
        );
    }

    #[test]
    fn valid_utf8_is_kept_as_is() {
        let text = "café 東京 ñ — ✓ 🚀 \\x1b";
        assert!(matches!(escape_for_terminal(text), Cow::Borrowed(kept) if kept == text));
    }

    #[test]
    fn long_cells_are_cut_to_the_width_with_an_ellipsis() {
        let cut = cut_to_columns(&"x".repeat(100), 60).into_owned();
        assert_eq!(cut, format!("{}…", "x".repeat(59)));
        assert_eq!(cut.width(), 60);
        assert_eq!(cut_to_columns("short", 60), "short");
        assert_eq!(cut_to_columns(&"y".repeat(60), 60), "y".repeat(60));
        // Wide characters count two columns and are never split.
        let wide = cut_to_columns(&"東".repeat(40), 60).into_owned();
        assert_eq!(wide, format!("{}…", "東".repeat(29)));
        assert!(wide.width() <= 60);
    }

    #[test]
    fn a_value_of_70_000_characters_renders_cut_without_panicking() {
        let huge = "h".repeat(70_000);
        let table = render_table(&["HOST", "ZONE"], &[vec![huge.clone(), "z".into()]]);
        let row = table.lines().nth(1).unwrap_or_default();
        assert_eq!(row, format!("{}…  z", "h".repeat(59)));
        // A `show` block keeps the whole value, still without panicking.
        let fields = render_fields(70_001, &[("hostname", huge.as_str())]);
        assert!(fields.ends_with(&format!(" {huge}\n")));
    }

    #[test]
    fn escaping_comes_before_cutting() {
        let cell = table_cell(&format!("\x1b[2J{}", "a".repeat(100)));
        assert!(cell.starts_with("\\x1b[2J"), "{cell}");
        assert!(!cell.contains('\x1b'));
        assert_eq!(cell.width(), TABLE_CELL_MAX_COLUMNS);
    }

    #[test]
    fn messages_keep_their_lines_but_no_escape_sequence() {
        assert_eq!(
            message_for_terminal("invalid plan:\n  - stage \x1b[2J\r\n  - \u{202e}"),
            "invalid plan:\n  - stage \\x1b[2J\\r\n  - \\u{202e}"
        );
    }

    #[test]
    fn json_keeps_values_whole_and_inert() {
        let value = format!("a\x1b[31m\u{9b}\u{202e}\x7f{}", "z".repeat(70_000));
        let json = json_for_terminal(serde_json::to_string_pretty(&[&value]).unwrap_or_default());
        assert!(
            !json.chars().any(|c| is_unsafe_on_terminal(c) && c != '\n'),
            "raw unsafe character"
        );
        let parsed: Vec<String> = serde_json::from_str(&json).unwrap_or_default();
        assert_eq!(parsed, vec![value]);
    }
}
