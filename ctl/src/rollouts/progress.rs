//! What `rollout watch` shows while a rollout runs: a header, one line per
//! stage and the rollout's reason, for each update the server streams.
//!
//! On a terminal the lines are indicatif progress bars redrawn in place
//! (indicatif counts the rows a wrapped line takes, which the hand-drawn
//! bars it replaces did not, so a narrow terminal scrolled stale frames).
//! Anywhere else (a pipe, a log) each update is printed as plain lines, one
//! frame after the other, without bars.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use unicode_width::UnicodeWidthStr;

use super::{short, RolloutView, StageView};
use crate::output::{escape_for_terminal, pad_to_columns, table_cell};

/// The first line of a frame: which rollout, its state, wave and failures,
/// escaped (the image and what the rollout waits for come from others).
fn header_line(view: &RolloutView) -> String {
    let line = format!(
        "rollout {} {}  {}  wave {}/{}  failures {}/{}{}",
        short(&view.id),
        view.image,
        view.state,
        view.wave,
        view.waves,
        view.failures,
        view.max_failures,
        if view.waiting_for.is_empty() {
            String::new()
        } else {
            format!("  waiting for {}", view.waiting_for)
        }
    );
    escape_for_terminal(&line).into_owned()
}

/// What a stage's counter does not say: `  (1 in flight, needs approval)`.
fn stage_notes(stage: &StageView) -> String {
    let mut notes = Vec::new();
    if stage.in_flight > 0 {
        notes.push(format!("{} in flight", stage.in_flight));
    }
    if stage.failed > 0 {
        notes.push(format!("{} failed", stage.failed));
    }
    if stage.rolled_back > 0 {
        notes.push(format!("{} rolled back", stage.rolled_back));
    }
    if stage.approval && !stage.approved {
        notes.push("needs approval".to_owned());
    }
    if notes.is_empty() {
        String::new()
    } else {
        format!("  ({})", notes.join(", "))
    }
}

/// Width of the stage-name column, so that the counters line up.
fn name_width(view: &RolloutView) -> usize {
    view.stages
        .iter()
        .map(|stage| stage_name(stage).width())
        .max()
        .unwrap_or(0)
}

/// A stage's name as shown in its column: escaped and cut like a table cell.
fn stage_name(stage: &StageView) -> String {
    table_cell(&stage.name)
}

/// The rollout's reason line, escaped (it may quote an agent's message).
fn reason_line(view: &RolloutView) -> String {
    format!("  {}", escape_for_terminal(&view.reason))
}

/// One frame as plain lines (for output that is not a terminal).
pub(super) fn frame_lines(view: &RolloutView) -> Vec<String> {
    let width = name_width(view);
    let mut lines = vec![header_line(view)];
    lines.extend(view.stages.iter().map(|stage| {
        format!(
            "  {}  {}/{} committed{}",
            pad_to_columns(&stage_name(stage), width),
            stage.committed,
            stage.machines,
            stage_notes(stage)
        )
    }));
    if !view.reason.is_empty() {
        lines.push(reason_line(view));
    }
    lines
}

/// Cells of a stage's bar: committed machines fill it, the head marks the
/// next ones (in flight).
const BAR_TEMPLATE: &str = "  {prefix}  [{bar:24}] {pos}/{len} committed{msg}";
const BAR_CHARACTERS: &str = "#>-";

/// The live display on a terminal: header, one bar per stage, the reason.
pub(super) struct LiveDisplay {
    lines: MultiProgress,
    header: ProgressBar,
    stages: Vec<ProgressBar>,
    reason: Option<ProgressBar>,
}

const TEXT_TEMPLATE: &str = "{msg}";

/// A style from one of the constant templates above. They parse (the tests
/// draw both); should a future indicatif refuse one, a plain bar stands in
/// rather than failing the watch.
fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar())
}

fn text_line() -> ProgressBar {
    ProgressBar::new(0).with_style(style(TEXT_TEMPLATE))
}

impl LiveDisplay {
    pub(super) fn new(target: ProgressDrawTarget) -> Self {
        let lines = MultiProgress::with_draw_target(target);
        let header = lines.add(text_line());
        LiveDisplay {
            lines,
            header,
            stages: Vec::new(),
            reason: None,
        }
    }

    /// Redraws the display for the latest update.
    pub(super) fn show(&mut self, view: &RolloutView) {
        self.header.set_message(header_line(view));
        let width = name_width(view);
        while self.stages.len() < view.stages.len() {
            let bar =
                ProgressBar::new(0).with_style(style(BAR_TEMPLATE).progress_chars(BAR_CHARACTERS));
            // Stage bars go above the reason line, in stage order.
            let bar = match &self.reason {
                Some(reason) => self.lines.insert_before(reason, bar),
                None => self.lines.add(bar),
            };
            self.stages.push(bar);
        }
        for (bar, stage) in self.stages.iter().zip(&view.stages) {
            bar.set_prefix(pad_to_columns(&stage_name(stage), width));
            bar.set_length(u64::from(stage.machines));
            bar.set_position(u64::from(stage.committed));
            bar.set_message(stage_notes(stage));
        }
        if !view.reason.is_empty() {
            let reason = self
                .reason
                .get_or_insert_with(|| self.lines.add(text_line()));
            reason.set_message(reason_line(view));
        }
    }

    /// Leaves the last frame on the screen as it is (`abandon`: indicatif's
    /// `finish` would fill every bar, and a failed stage is not complete).
    pub(super) fn finish(self) {
        self.header.abandon();
        for bar in &self.stages {
            bar.abandon();
        }
        if let Some(reason) = &self.reason {
            reason.abandon();
        }
    }
}

#[cfg(test)]
mod tests {
    use indicatif::InMemoryTerm;

    use super::super::{RolloutView, StageView};
    use super::*;

    fn stage(name: &str, machines: u32, committed: u32, in_flight: u32) -> StageView {
        StageView {
            name: name.into(),
            selector: "env=prod".into(),
            batch: "1".into(),
            bake_seconds: 0,
            approval: false,
            approved: false,
            max_unavailable_per_zone: None,
            machines,
            waves: 1,
            committed,
            failed: 0,
            rolled_back: 0,
            in_flight,
        }
    }

    fn view(image: &str, stages: Vec<StageView>, reason: &str) -> RolloutView {
        RolloutView {
            id: "0123456789abcdef".into(),
            image: image.into(),
            digest: String::new(),
            state: "running".into(),
            reason: reason.into(),
            created_at: String::new(),
            created_by: String::new(),
            updated_at: String::new(),
            wave: 1,
            waves: 2,
            waiting_for: String::new(),
            machines: 4,
            failures: 0,
            max_failures: 1,
            on_failure: "halt".into(),
            machine_deadline_seconds: 60,
            stages,
            machine_states: Vec::new(),
            plan: String::new(),
        }
    }

    #[test]
    fn plain_frames_name_every_stage_with_its_counts_and_notes() {
        let frame = frame_lines(&view(
            "app@2.0.0",
            vec![stage("canary", 1, 1, 0), stage("waves", 3, 1, 2)],
            "stage waves, wave 1",
        ));
        assert_eq!(
            frame,
            [
                "rollout 01234567 app@2.0.0  running  wave 1/2  failures 0/1",
                "  canary  1/1 committed",
                "  waves   1/3 committed  (2 in flight)",
                "  stage waves, wave 1",
            ]
        );
    }

    #[test]
    fn the_terminal_display_is_redrawn_in_place_even_when_lines_wrap() {
        let terminal = InMemoryTerm::new(20, 80);
        let mut display =
            LiveDisplay::new(ProgressDrawTarget::term_like(Box::new(terminal.clone())));
        // A header of 120 characters takes two rows of this 80-column
        // terminal: a redraw that counted it as one row would leave a stale
        // copy of the first frame behind.
        let long_image = format!("app@2.0.0-{}", "x".repeat(60));
        display.show(&view(&long_image, vec![stage("canary", 4, 0, 0)], ""));
        display.show(&view(
            &long_image,
            vec![stage("canary", 4, 2, 1)],
            "waiting",
        ));
        display.finish();
        let screen = terminal.contents();
        assert_eq!(
            screen.matches("rollout 01234567").count(),
            1,
            "one frame on screen:\n{screen}"
        );
        assert!(
            screen.contains("canary  [############>-----------] 2/4 committed  (1 in flight)"),
            "{screen}"
        );
        assert!(
            !screen.contains("0/4"),
            "the first frame is gone:\n{screen}"
        );
        assert!(screen.ends_with("  waiting"), "{screen}");
    }
}
