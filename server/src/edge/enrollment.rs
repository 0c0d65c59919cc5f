//! `flotte.v1.Enrollment`: open to callers without a client certificate, so
//! every call is rate-limited (globally and per source address) before it
//! costs a store lookup, and the hostname is checked before it is stored.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use flotte_proto::names::validate_hostname;
use flotte_proto::v1::enrollment_server::Enrollment;
use flotte_proto::v1::{EnrollRequest, EnrollResponse, ReenrollRequest};
use tonic::{Request, Response, Status};

use crate::edge::auth::peer_info;
use crate::limits::rate::EnrollmentRateLimiter;
use crate::services::enrollment::{Enrolled, Enroller};
use crate::ServerState;

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    state: Arc<ServerState>,
    rate_limiter: Arc<EnrollmentRateLimiter>,
}

/// A hostname from an agent (enrollment or hello), checked against the
/// shared grammar; the error names the problem and quotes a short prefix.
pub fn require_valid_hostname(hostname: &str) -> Result<(), Status> {
    validate_hostname(hostname).map_err(|error| Status::invalid_argument(error.to_string()))
}

impl EnrollmentApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        let limits = &state.config.limits;
        let rate_limiter = Arc::new(EnrollmentRateLimiter::new(
            limits.enroll_rate,
            limits.enroll_rate_per_source,
            Instant::now(),
        ));
        EnrollmentApi {
            state,
            rate_limiter,
        }
    }

    /// Spends one enrollment token of the caller's address (and of the
    /// server), or refuses with `RESOURCE_EXHAUSTED`. Refusals are logged at
    /// debug level only: a flood must not become a log flood.
    fn admit_by_rate<T>(&self, request: &Request<T>) -> Result<(), Status> {
        // Every connection carries its peer; the fallback only keeps an
        // impossible case inside the global bucket.
        let source = peer_info(request).map_or(IpAddr::V6(Ipv6Addr::UNSPECIFIED), |peer| {
            peer.remote_address.ip()
        });
        self.rate_limiter
            .admit(source, Instant::now())
            .map_err(|refusal| {
                tracing::debug!(%refusal, "enrollment call refused by rate limit");
                Status::resource_exhausted(refusal.to_string())
            })
    }

    fn enroller(&self) -> Enroller<'_> {
        Enroller::of(&self.state)
    }

    fn response(&self, enrolled: Enrolled) -> Response<EnrollResponse> {
        Response::new(EnrollResponse {
            machine_id: enrolled.machine_id.to_string(),
            certificate_pem: enrolled.certificate.certificate_pem,
            ca_certificate_pem: self.state.ca.certificate_pem().to_owned(),
            identity_uri: enrolled.identity.uri(),
        })
    }
}

#[tonic::async_trait]
impl Enrollment for EnrollmentApi {
    async fn enroll(
        &self,
        request: Request<EnrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.admit_by_rate(&request)?;
        let remote = peer_info(&request).map(|peer| peer.remote_address).ok();
        let request = request.into_inner();
        require_valid_hostname(&request.hostname)?;
        match self
            .enroller()
            .enroll(&request.join_token, &request.csr_pem, &request.hostname)
            .await
        {
            Ok(enrolled) => {
                tracing::info!(machine = %enrolled.machine_id, hostname = %request.hostname, ?remote, "machine enrolled");
                // Tracked from now on, so that a machine that never connects
                // still turns unreachable.
                if let Ok(Some(machine)) = self.state.store.machine(enrolled.machine_id).await {
                    self.state
                        .health
                        .upsert(&machine, self.state.clock.now_unix());
                }
                Ok(self.response(enrolled))
            }
            Err(error) => {
                tracing::warn!(%error, hostname = %request.hostname, ?remote, "enrollment refused");
                Err(error.into())
            }
        }
    }

    async fn reenroll(
        &self,
        request: Request<ReenrollRequest>,
    ) -> Result<Response<EnrollResponse>, Status> {
        self.admit_by_rate(&request)?;
        let request = request.into_inner();
        match self
            .enroller()
            .reenroll(&request.expired_certificate_pem, &request.csr_pem)
            .await
        {
            Ok(enrolled) => {
                tracing::info!(machine = %enrolled.machine_id, "machine re-enrolled after certificate expiry");
                Ok(self.response(enrolled))
            }
            Err(error) => {
                tracing::warn!(%error, "re-enrollment refused");
                Err(error.into())
            }
        }
    }
}
