//! `flottectl image trust add | remove | list`: the release public keys
//! (ed25519) the server trusts to sign images.

use std::path::PathBuf;

use clap::Subcommand;
use flotte_proto::v1::release_keys_client::ReleaseKeysClient;
use flotte_proto::v1::{
    AddReleaseKeyRequest, ListReleaseKeysRequest, ReleaseKey, RemoveReleaseKeyRequest,
};
use serde::Serialize;

use crate::cli::{read_file, rpc_error, Cli};
use crate::error::CtlError;
use crate::output::{optional_time, print_list, Output};

#[derive(Debug, Subcommand)]
pub enum TrustCommand {
    /// Trust a release key: an `ssh-ed25519 AAAA…` line (a .pub file), or
    /// the raw 32-byte public key in base64 or hex.
    Add {
        /// The public key file (e.g. release.pub from `image keygen`).
        key_file: PathBuf,
        /// Name shown in listings (default: the key's comment).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// Stop trusting a release key (by id, id prefix or name).
    Remove {
        /// The key's id, id prefix or name.
        key: String,
    },
    /// List trusted release keys.
    List,
}

#[derive(Debug, Serialize)]
struct ReleaseKeyView {
    id: String,
    name: String,
    public_key_base64: String,
    openssh: String,
    added_at: Option<String>,
    added_by: String,
}

impl From<&ReleaseKey> for ReleaseKeyView {
    fn from(key: &ReleaseKey) -> Self {
        ReleaseKeyView {
            id: key.id.clone(),
            name: key.name.clone(),
            public_key_base64: key.public_key_base64.clone(),
            openssh: key.openssh.clone(),
            added_at: optional_time(key.added_at),
            added_by: key.added_by.clone(),
        }
    }
}

/// Characters of a key id shown in tables (enough to name it uniquely).
const SHORT_KEY_ID: usize = 16;

fn print_release_keys(output: Output, keys: &[ReleaseKey]) -> Result<(), CtlError> {
    let views: Vec<ReleaseKeyView> = keys.iter().map(ReleaseKeyView::from).collect();
    print_list(
        output,
        &views,
        &["ID", "NAME", "PUBLIC KEY", "ADDED BY", "ADDED"],
        |key| {
            vec![
                key.id.chars().take(SHORT_KEY_ID).collect(),
                key.name.clone(),
                key.public_key_base64.clone(),
                key.added_by.clone(),
                key.added_at.clone().unwrap_or_default(),
            ]
        },
    )
}

pub async fn run(cli: &Cli, command: &TrustCommand) -> Result<(), CtlError> {
    // Read the file before dialing, so that a wrong path needs no round trip.
    let key_text = match command {
        TrustCommand::Add { key_file, .. } => Some(read_file(key_file)?),
        _ => None,
    };
    let (channel, diagnostics) = cli.connect().await?;
    let rpc = rpc_error(&diagnostics);
    let mut client = ReleaseKeysClient::new(channel);
    let keys = match command {
        TrustCommand::Add { name, .. } => vec![client
            .add_release_key(AddReleaseKeyRequest {
                key_text: key_text.unwrap_or_default(),
                name: name.clone(),
            })
            .await
            .map_err(&rpc)?
            .into_inner()],
        TrustCommand::Remove { key } => vec![client
            .remove_release_key(RemoveReleaseKeyRequest { key: key.clone() })
            .await
            .map_err(&rpc)?
            .into_inner()],
        TrustCommand::List => {
            client
                .list_release_keys(ListReleaseKeysRequest {})
                .await
                .map_err(&rpc)?
                .into_inner()
                .keys
        }
    };
    print_release_keys(cli.output(), &keys)
}
