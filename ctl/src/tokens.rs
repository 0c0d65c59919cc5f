//! `flottectl token create | list | revoke`: join tokens for enrolling
//! machines. The secret is printed once, at creation; listings never show it.

use std::collections::BTreeMap;

use clap::{Args, Subcommand};
use flotte_proto::labels::{format_labels, parse_labels};
use flotte_proto::v1::tokens_client::TokensClient;
use flotte_proto::v1::{CreateTokenRequest, ListTokensRequest, RevokeTokenRequest, TokenInfo};
use serde::Serialize;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{format_time, note_line, print_json, print_line, print_list, Output};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a join token; prints the secret token once.
    Create(TokenCreate),
    /// List join tokens (never their secrets).
    List,
    /// Revoke a join token by id.
    Revoke {
        /// The token's id, as `token list` shows it.
        id: String,
    },
}

#[derive(Debug, Args)]
pub struct TokenCreate {
    /// Labels given to machines enrolling with this token: k=v,k2=v2.
    #[arg(long, default_value = "")]
    labels: String,
    /// Zone (datacenter) of machines enrolling with this token.
    #[arg(long)]
    zone: String,
    /// Lifetime, e.g. 1h, 30m.
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Number of enrollments allowed.
    #[arg(long, default_value_t = 1)]
    uses: u32,
}

impl TokenCreate {
    /// The labels and lifetime, checked here so that a typo never needs a
    /// round trip.
    fn parse(&self) -> Result<(BTreeMap<String, String>, std::time::Duration), CtlError> {
        let labels = parse_labels(&self.labels)
            .map_err(|error| CtlError::Usage(format!("--labels: {error}")))?;
        let ttl = humantime::parse_duration(&self.ttl)
            .map_err(|error| CtlError::Usage(format!("--ttl {:?}: {error}", self.ttl)))?;
        Ok((labels, ttl))
    }
}

/// Whether a token can still enroll a machine, and if not why: said by
/// flottectl from what the server lists (revoked, uses, expiry) and this
/// machine's clock, so that no one reads an `expires_at` against the time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum TokenState {
    /// Can enroll machines now.
    Active,
    /// Past its expiry.
    Expired,
    /// Every allowed enrollment done (a single-use token that was used).
    Spent,
    /// Revoked by an operator.
    Revoked,
}

impl TokenState {
    /// The first reason a token is unusable, in the order an operator acts
    /// on: revoked (on purpose), spent (did its job), expired (ran out).
    fn of(info: &TokenInfo, now_unix: i64) -> Self {
        if info.revoked {
            TokenState::Revoked
        } else if info.uses_done >= info.uses_allowed {
            TokenState::Spent
        } else if info.expires_at <= now_unix {
            TokenState::Expired
        } else {
            TokenState::Active
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            TokenState::Active => "active",
            TokenState::Expired => "expired",
            TokenState::Spent => "spent",
            TokenState::Revoked => "revoked",
        }
    }
}

/// Now as Unix seconds (0 for a clock before 1970, which makes nothing expired).
fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            i64::try_from(since.as_secs()).unwrap_or(i64::MAX)
        })
}

#[derive(Debug, Serialize)]
struct TokenView {
    id: String,
    labels: BTreeMap<String, String>,
    zone: String,
    created_at: String,
    expires_at: String,
    uses_allowed: u32,
    uses_done: u32,
    revoked: bool,
    state: TokenState,
}

impl TokenView {
    fn new(info: &TokenInfo, now_unix: i64) -> Self {
        TokenView {
            id: info.id.clone(),
            labels: info.labels.clone().into_iter().collect(),
            zone: info.zone.clone(),
            created_at: format_time(info.created_at),
            expires_at: format_time(info.expires_at),
            uses_allowed: info.uses_allowed,
            uses_done: info.uses_done,
            revoked: info.revoked,
            state: TokenState::of(info, now_unix),
        }
    }
}

fn print_tokens(output: Output, tokens: &[TokenInfo]) -> Result<(), CtlError> {
    let now = now_unix();
    let views: Vec<TokenView> = tokens
        .iter()
        .map(|info| TokenView::new(info, now))
        .collect();
    print_list(
        output,
        &views,
        &[
            "ID", "ZONE", "LABELS", "USES", "CREATED", "EXPIRES", "STATE",
        ],
        |token| {
            vec![
                token.id.clone(),
                token.zone.clone(),
                format_labels(&token.labels),
                format!("{}/{}", token.uses_done, token.uses_allowed),
                token.created_at.clone(),
                token.expires_at.clone(),
                token.state.as_str().to_owned(),
            ]
        },
    )
}

pub async fn run(cli: &Cli, command: &TokenCommand) -> Result<(), CtlError> {
    let parsed = match command {
        TokenCommand::Create(create) => Some(create.parse()?),
        _ => None,
    };
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = TokensClient::new(channel);
    match command {
        TokenCommand::Create(create) => {
            let (labels, ttl) = parsed.unwrap_or_default();
            let response = client
                .create_token(CreateTokenRequest {
                    labels: labels.into_iter().collect(),
                    zone: create.zone.clone(),
                    ttl_seconds: ttl.as_secs(),
                    uses: create.uses,
                })
                .await
                .map_err(&rpc)?
                .into_inner();
            let info = response.info.unwrap_or_default();
            if cli.output() == Output::Json {
                #[derive(Serialize)]
                struct Created {
                    token: String,
                    #[serde(flatten)]
                    info: TokenView,
                }
                print_json(&Created {
                    token: response.token,
                    info: TokenView::new(&info, now_unix()),
                })?;
            } else {
                print_line!("{}", response.token);
                note_line!(
                    "token {} for zone {} expires {} ({} use(s))",
                    info.id,
                    info.zone,
                    format_time(info.expires_at),
                    info.uses_allowed
                );
            }
        }
        TokenCommand::List => {
            let tokens = client
                .list_tokens(ListTokensRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .tokens;
            print_tokens(cli.output(), &tokens)?;
        }
        TokenCommand::Revoke { id } => {
            let response = client
                .revoke_token(RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(&rpc)?
                .into_inner();
            print_tokens(cli.output(), &[response.info.unwrap_or_default()])?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_state_names_the_first_reason_it_cannot_enroll() {
        let now = 1_000;
        let token = |revoked, uses_done, expires_at| TokenInfo {
            revoked,
            uses_allowed: 1,
            uses_done,
            expires_at,
            ..TokenInfo::default()
        };
        let cases = [
            (token(false, 0, 1_001), TokenState::Active),
            (token(false, 0, 1_000), TokenState::Expired),
            (token(false, 1, 1_001), TokenState::Spent),
            (token(false, 1, 999), TokenState::Spent),
            (token(true, 0, 1_001), TokenState::Revoked),
            (token(true, 1, 999), TokenState::Revoked),
        ];
        for (info, expected) in cases {
            assert_eq!(TokenState::of(&info, now), expected, "{info:?}");
        }
        assert_eq!(
            serde_json::to_value(TokenState::Spent).unwrap(),
            serde_json::json!(TokenState::Spent.as_str())
        );
    }
}
