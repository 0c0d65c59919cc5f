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
    Revoke { id: String },
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
}

impl From<&TokenInfo> for TokenView {
    fn from(info: &TokenInfo) -> Self {
        TokenView {
            id: info.id.clone(),
            labels: info.labels.clone().into_iter().collect(),
            zone: info.zone.clone(),
            created_at: format_time(info.created_at),
            expires_at: format_time(info.expires_at),
            uses_allowed: info.uses_allowed,
            uses_done: info.uses_done,
            revoked: info.revoked,
        }
    }
}

fn print_tokens(output: Output, tokens: &[TokenInfo]) -> Result<(), CtlError> {
    let views: Vec<TokenView> = tokens.iter().map(TokenView::from).collect();
    print_list(
        output,
        &views,
        &["ID", "ZONE", "LABELS", "USES", "EXPIRES", "STATE"],
        |token| {
            vec![
                token.id.clone(),
                token.zone.clone(),
                format_labels(&token.labels),
                format!("{}/{}", token.uses_done, token.uses_allowed),
                token.expires_at.clone(),
                if token.revoked { "revoked" } else { "" }.to_owned(),
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
                    info: TokenView::from(&info),
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
