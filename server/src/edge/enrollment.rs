//! `flotte.v1.Enrollment`: open to callers without a client certificate.

use std::sync::Arc;

use flotte_proto::v1::enrollment_server::Enrollment;
use flotte_proto::v1::{EnrollRequest, EnrollResponse, ReenrollRequest};
use tonic::{Request, Response, Status};

use crate::edge::auth::peer_info;
use crate::services::enrollment::{Enrolled, Enroller};
use crate::ServerState;

#[derive(Debug, Clone)]
pub struct EnrollmentApi {
    state: Arc<ServerState>,
}

impl EnrollmentApi {
    pub fn new(state: Arc<ServerState>) -> Self {
        EnrollmentApi { state }
    }

    fn enroller(&self) -> Enroller<'_> {
        let state = &self.state;
        Enroller {
            ca: &state.ca,
            store: state.store.as_ref(),
            clock: state.clock.as_ref(),
            trust_domain: &state.config.trust_domain,
            certificate_ttl: state.config.machine_certificate_ttl,
            reenroll_expired_within: state.config.reenroll_expired_within,
        }
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
        let remote = peer_info(&request).map(|peer| peer.remote_address).ok();
        let request = request.into_inner();
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
