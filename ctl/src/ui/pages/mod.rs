//! The pages, rendered on the server by maud: its `html!` escapes every
//! value, so text from a machine, an agent or a person (a check's output, a
//! quarantine reason, an audit argument) is always shown as text. A page
//! function asks the API, then returns the whole page; a live page's
//! changing part is a separate `live_section` that `live` re-sends.
//! Buttons are drawn only for a role that may use them ([`Operator::may`]),
//! each in a POST form whose `data-confirm` text names its effect.

use maud::{html, Markup, DOCTYPE};

use super::http::UiError;
use super::Operator;

pub mod access;
pub mod audit;
pub mod dr;
pub mod fleet;
pub mod machine;
pub mod rollouts;

/// The top-level sections, in the navigation's order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Fleet,
    Rollouts,
    Access,
    DisasterRecovery,
    Audit,
    None,
}

const NAVIGATION: [(Section, &str, &str); 5] = [
    (Section::Fleet, "/", "Fleet"),
    (Section::Rollouts, "/rollouts", "Rollouts"),
    (Section::Access, "/access", "Access"),
    (Section::DisasterRecovery, "/dr", "Disaster recovery"),
    (Section::Audit, "/audit", "Audit"),
];

/// A whole page: navigation, who the dashboard acts as, and the body.
pub fn layout(operator: &Operator, title: &str, section: Section, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Flotte" }
                link rel="stylesheet" href="/assets/dashboard.css";
                script src="/assets/dashboard.js" defer {}
            }
            body {
                header {
                    nav {
                        span.brand { "Flotte" }
                        @for (item, path, label) in NAVIGATION {
                            a href=(path) class=[(item == section).then_some("current")] { (label) }
                        }
                    }
                    span #operator { (operator.name) " · " (operator.role) }
                    span #live-status {}
                }
                main {
                    h1 { (title) }
                    (body)
                }
            }
        }
    }
}

/// The page of a refused or failed request, naming the cause.
pub fn error_page(operator: &Operator, error: &UiError) -> Markup {
    layout(
        operator,
        "Not done",
        Section::None,
        html! { p #error .error { (error.to_string()) } },
    )
}

/// A POST button with its confirmation (see `assets/dashboard.js`).
pub fn action_button(action: &str, id: &str, label: &str, confirmation: &str) -> Markup {
    html! {
        form.action method="post" action=(action) data-confirm=(confirmation) {
            button type="submit" id=(id) { (label) }
        }
    }
}

/// A Unix time for people ("never" when unset).
pub fn time(unix: i64) -> String {
    crate::output::format_time(unix)
}
