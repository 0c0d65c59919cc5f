//! What every Flotte binary's `--help` promises: each command and each
//! argument says what it is for. Binaries check their clap definition with
//! [`assert_every_argument_described`] in a unit test, so a new flag without a description
//! fails the build's tests rather than reaching an operator as a bare name.

/// Every command and argument of `command` (and its subcommands, however
/// deep) that has no description, as paths like `flottectl rollout create
/// <plan>`; empty when all are described. clap's own `--help` and
/// `--version` describe themselves and are not listed.
pub fn undescribed(command: &clap::Command) -> Vec<String> {
    let mut found = Vec::new();
    walk(command, "", &mut found);
    found
}

/// The test every binary runs on its clap definition: panics listing what
/// [`undescribed`] finds, one path per line.
pub fn assert_every_argument_described(command: &clap::Command) {
    let undescribed = undescribed(command);
    assert!(
        undescribed.is_empty(),
        "{} without a description:\n{}",
        undescribed.len(),
        undescribed.join("\n")
    );
}

fn walk(command: &clap::Command, parent: &str, found: &mut Vec<String>) {
    let path = if parent.is_empty() {
        command.get_name().to_owned()
    } else {
        format!("{parent} {}", command.get_name())
    };
    if command.get_about().is_none() && !parent.is_empty() {
        found.push(path.clone());
    }
    for argument in command.get_arguments() {
        if matches!(
            argument.get_action(),
            clap::ArgAction::Help | clap::ArgAction::Version
        ) {
            continue;
        }
        if argument.get_help().is_none() {
            found.push(format!("{path} <{}>", argument.get_id()));
        }
    }
    for subcommand in command.get_subcommands() {
        walk(subcommand, &path, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_what_has_no_description_at_any_depth() {
        let command = clap::Command::new("tool")
            .arg(clap::Arg::new("described").long("described").help("Says."))
            .arg(clap::Arg::new("bare").long("bare"))
            .subcommand(
                clap::Command::new("noun")
                    .about("A noun.")
                    .subcommand(clap::Command::new("verb").arg(clap::Arg::new("target"))),
            );
        assert_eq!(
            undescribed(&command),
            ["tool <bare>", "tool noun verb", "tool noun verb <target>"]
        );
    }
}
