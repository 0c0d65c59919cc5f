//! `flottectl ui`: a local web dashboard of the fleet, its rollouts, who has
//! access, disaster-recovery impact and the audit log, live in a browser.
//!
//! It is a client like every other flottectl command: it dials the server
//! with the operator's own profile, so every page is one or more admin RPCs
//! and every button is one admin RPC, checked against the operator's role
//! and audited under their name by the server. The dashboard holds no rule
//! of its own; it only hides buttons the operator's role may not use.
//!
//! Layout: `guard` the pure checks of each request (secret, host, origin);
//! `http` the hyper service (routing, bounds, headers, responses); `pages`
//! one module per page, rendered server-side by maud (which escapes every
//! value); `live` the server-sent event streams fed by the API's watch
//! streams; `assets` the one script and style sheet, embedded in the binary.
//! What must never live here: a second authentication system, an inline
//! script, or an unescaped value from a machine, an agent or a person.

use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use flotte_common::roles::{AdminRpc, Role};
use flotte_proto::transport::{explain_status_with, TlsDiagnostics};
use flotte_proto::v1::operators_client::OperatorsClient;
use flotte_proto::v1::ListOperatorsRequest;
use tonic::transport::Channel;

use crate::cli::{rpc_error, Cli};
use crate::error::CtlError;
use crate::output::note_line;

mod guard;
mod http;
mod live;
mod pages;

use guard::{Secret, SECRET_BYTES, SECRET_PARAMETER};

// The arguments of `ui` (its help text is the subcommand's, in `cli`).
#[derive(Debug, Args)]
pub struct UiArguments {
    /// Address to serve the dashboard on. Keep it on the loopback interface:
    /// the dashboard acts with your certificate.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Open the URL in the default browser (xdg-open / open).
    #[arg(long)]
    open: bool,
}

/// Who the dashboard acts as, shown on every page and deciding which
/// buttons it draws (the server decides what they may do).
#[derive(Debug, Clone)]
pub struct Operator {
    pub name: String,
    pub role: Role,
}

impl Operator {
    /// Whether the operator's role is enough for this RPC, by the same
    /// table the server checks (`flotte_common::roles`).
    pub fn may(&self, rpc: AdminRpc) -> bool {
        self.role >= rpc.policy().required_role
    }
}

/// Everything a request handler needs: the API channel and who it acts as.
#[derive(Debug)]
pub struct Dashboard {
    pub channel: Channel,
    pub diagnostics: TlsDiagnostics,
    pub operator: Operator,
    pub secret: Secret,
    pub listen: SocketAddr,
    /// Live pages open at once (each holds a watch stream on the server).
    pub event_streams: Arc<tokio::sync::Semaphore>,
}

impl Dashboard {
    /// A failed RPC as an error naming its cause, keeping its code.
    pub fn rpc_failure(&self, status: tonic::Status) -> http::UiError {
        http::UiError::Rpc {
            code: status.code(),
            message: explain_status_with(&status, &self.diagnostics),
        }
    }
}

/// The operator the profile names and its role, as the server stores it.
/// An identity missing from the list (it cannot be, for a working profile)
/// is shown as a viewer: the dashboard then draws no buttons.
async fn whoami(
    channel: Channel,
    diagnostics: &TlsDiagnostics,
    identity: &str,
) -> Result<Operator, CtlError> {
    let operators = OperatorsClient::new(channel)
        .list_operators(ListOperatorsRequest {})
        .await
        .map_err(rpc_error(diagnostics))?
        .into_inner()
        .operators;
    Ok(operators
        .into_iter()
        .find(|operator| operator.identity_uri == identity && operator.revoked_at == 0)
        .map_or_else(
            || Operator {
                name: identity.to_owned(),
                role: Role::Viewer,
            },
            |operator| Operator {
                role: operator.role.parse().unwrap_or(Role::Viewer),
                name: operator.name,
            },
        ))
}

fn random_secret(port: u16) -> Result<Secret, CtlError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; SECRET_BYTES];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CtlError::Io {
            what: "cannot make the dashboard secret".into(),
            source: std::io::Error::other("the system random source failed"),
        })?;
    Ok(Secret::from_random_bytes(&bytes, port))
}

/// Asks the desktop to open the URL; a failure only prints a note (the URL
/// is printed anyway).
fn open_in_browser(url: &str) {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else {
        "xdg-open"
    };
    match std::process::Command::new(opener)
        .arg(url)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        // Reaped off the runtime, so that it leaves no zombie behind.
        Ok(mut child) => {
            std::thread::spawn(move || child.wait());
        }
        Err(error) => note_line!("cannot run {opener}: {error}; open the URL above by hand"),
    }
}

pub async fn run(cli: &Cli, arguments: &UiArguments) -> Result<(), CtlError> {
    let profile = cli.load_profile()?;
    let (channel, diagnostics) = cli.connect()?;
    let operator = whoami(channel.clone(), &diagnostics, &profile.settings.identity).await?;
    let listener = tokio::net::TcpListener::bind(arguments.listen)
        .await
        .map_err(|source| CtlError::Io {
            what: format!("cannot listen on {}", arguments.listen),
            source,
        })?;
    let listen = listener.local_addr().map_err(|source| CtlError::Io {
        what: "cannot read the listening address".into(),
        source,
    })?;
    let secret = random_secret(listen.port())?;
    let url = format!("http://{listen}/?{SECRET_PARAMETER}={}", secret.as_str());
    // The URL is the key to the dashboard: printed on stdout only, for the
    // operator (and the tests) to use, and never logged elsewhere.
    crate::output::print_line!("{url}");
    note_line!(
        "dashboard for {} ({}) on {listen}; stop it with Ctrl-C",
        operator.name,
        operator.role
    );
    if !listen.ip().is_loopback() {
        note_line!(
            "warning: {listen} is not a loopback address; anyone who gets the URL can act as {} — and browsers must use exactly this address (other host names are refused)",
            operator.name
        );
    }
    if arguments.open {
        open_in_browser(&url);
    }
    let dashboard = Arc::new(Dashboard {
        channel,
        diagnostics,
        operator,
        secret,
        listen,
        event_streams: Arc::new(tokio::sync::Semaphore::new(live::MAX_EVENT_STREAMS)),
    });
    tokio::select! {
        () = http::serve(listener, dashboard) => Ok(()),
        signal = tokio::signal::ctrl_c() => signal.map_err(|source| CtlError::Io {
            what: "cannot wait for Ctrl-C".into(),
            source,
        }),
    }
}
