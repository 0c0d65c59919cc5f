//! The load generator's access-revocation phase: one user with one key,
//! granted on every simulated machine (`fleet=loadgen`), then off-boarded
//! with `Users.RevokeUser`. Measured per agent: from the revoke call
//! returning to that agent acknowledging the new policy version (its ack
//! is sent the moment the version arrives; simulated agents write nothing).
//! Also measured: when the server's `AccessStatus` counts every ack.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotte_common::profile::Profile;
use flotte_proto::transport::{channel, client_config};
use flotte_proto::v1::access_client::AccessClient;
use flotte_proto::v1::users_client::UsersClient;
use flotte_proto::v1::{AccessStatusRequest, AddUserRequest, GrantRequest, RevokeUserRequest};

use super::simulated::SimulatedAckLog;
use super::{LoadgenError, TOKEN_LABEL_KEY, TOKEN_LABEL_VALUE};

const ACK_TIMEOUT: Duration = Duration::from_secs(120);
const ACK_POLL: Duration = Duration::from_millis(5);

fn failure(what: &str, status: &tonic::Status) -> LoadgenError {
    LoadgenError::Access(format!(
        "{what}: {}",
        flotte_proto::transport::explain_status(status)
    ))
}

/// Waits until every log has an ack of at least `version`; their times.
async fn wait_for_acks(
    logs: &[Arc<SimulatedAckLog>],
    version: u64,
) -> Result<Vec<Instant>, LoadgenError> {
    let deadline = Instant::now() + ACK_TIMEOUT;
    loop {
        let acks: Vec<Option<Instant>> = logs
            .iter()
            .map(|log| log.first_ack_of_at_least(version))
            .collect();
        let missing = acks.iter().filter(|ack| ack.is_none()).count();
        if missing == 0 {
            return Ok(acks.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            return Err(LoadgenError::Access(format!(
                "{missing} of {} agents did not acknowledge version {version} within {ACK_TIMEOUT:?}",
                logs.len()
            )));
        }
        tokio::time::sleep(ACK_POLL).await;
    }
}

/// The value at quantile `q` (0..=1) of sorted `values`, nearest rank.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn milliseconds(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub async fn measure(
    profile: &Profile,
    address: &str,
    logs: &[Arc<SimulatedAckLog>],
) -> Result<(), LoadgenError> {
    let tls = Arc::new(client_config(
        &profile.ca_pem,
        Some((&profile.certificate_pem, &profile.key_pem)),
    )?);
    let mut users = UsersClient::new(channel(address, Arc::clone(&tls))?);
    let mut access = AccessClient::new(channel(address, tls)?);
    let (_, key) = flotte_proto::release_keys::generate_signing_key()
        .map_err(|error| LoadgenError::Access(error.to_string()))?;
    let user = format!("loadgen-{}", uuid::Uuid::new_v4().simple());
    users
        .add_user(AddUserRequest {
            name: user.clone(),
            ssh_keys: vec![key.openssh_line()],
        })
        .await
        .map_err(|status| failure("add user", &status))?;
    access
        .grant(GrantRequest {
            user: user.clone(),
            selector: format!("{TOKEN_LABEL_KEY}={TOKEN_LABEL_VALUE}"),
            login: "loadgen".into(),
            expires: String::new(),
        })
        .await
        .map_err(|status| failure("grant", &status))?;
    let granted_version = access
        .access_status(AccessStatusRequest { version: 0 })
        .await
        .map_err(|status| failure("access status", &status))?
        .into_inner()
        .current_version;
    wait_for_acks(logs, granted_version).await?;
    println!(
        "access: user {user} granted on {} agents (policy version {granted_version}, all acknowledged)",
        logs.len()
    );

    let called = Instant::now();
    let revoked = users
        .revoke_user(RevokeUserRequest { name: user.clone() })
        .await
        .map_err(|status| failure("revoke user", &status))?
        .into_inner();
    let returned = Instant::now();
    let acks = wait_for_acks(logs, revoked.policy_version).await?;
    let mut server_counted_all = None;
    let server_deadline = Instant::now() + ACK_TIMEOUT;
    while Instant::now() < server_deadline {
        let status = access
            .access_status(AccessStatusRequest {
                version: revoked.policy_version,
            })
            .await
            .map_err(|status| failure("access status", &status))?
            .into_inner();
        if status.applied as usize >= logs.len() {
            server_counted_all = Some(returned.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before_return = acks.iter().filter(|ack| **ack < returned).count();
    let distribution = |since: Instant| {
        let mut latencies: Vec<Duration> = acks
            .iter()
            .map(|ack| ack.saturating_duration_since(since))
            .collect();
        latencies.sort();
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            milliseconds(quantile(&latencies, 0.50)),
            milliseconds(quantile(&latencies, 0.99)),
            milliseconds(quantile(&latencies, 1.0))
        )
    };
    println!(
        "access revocation: revoke call took {:.1} ms; policy version {} acknowledged by {} agents",
        milliseconds(returned.duration_since(called)),
        revoked.policy_version,
        acks.len()
    );
    println!(
        "access revocation: from the revoke call being made to each ack: {}",
        distribution(called)
    );
    println!(
        "access revocation: from the revoke call returning to each ack: {} ({before_return} acks arrived before the answer did, counted as 0)",
        distribution(returned)
    );
    match server_counted_all {
        Some(elapsed) => println!(
            "access revocation: `access status --version {}` listed all {} machines applied {:.1} ms after the call returned",
            revoked.policy_version,
            logs.len(),
            milliseconds(elapsed)
        ),
        None => println!("access revocation: the server did not count every ack within {ACK_TIMEOUT:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&values, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
