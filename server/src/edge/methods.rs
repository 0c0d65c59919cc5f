//! The gRPC methods this server serves, read from the descriptor sets of the
//! registered services, and the timeout on unary calls.
//!
//! Anyone can send a request with any path before authentication, so nothing
//! keyed by the raw path may be kept: the metrics layer labels a request with
//! its method only when the catalog knows it (`unknown` otherwise). The
//! catalog also says which methods are unary: only those get the call
//! timeout, since an agent session, a watch or an image push legitimately
//! lasts as long as it lasts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use prost::Message;
use tonic::body::Body;
use tonic::codegen::http;

use crate::metrics::ServerMetrics;

/// The metrics label of a path no registered service serves.
pub const UNKNOWN_METHOD: &str = "unknown";

#[derive(Debug, thiserror::Error)]
pub enum MethodCatalogError {
    #[error("a compiled file descriptor set cannot be decoded: {0}")]
    Descriptor(#[from] prost::DecodeError),
}

/// Whether a method answers one message (unary, or client-streaming: it
/// answers once the client's stream ended) or streams its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallShape {
    /// One request, one response: bounded by the unary call timeout.
    Unary,
    /// The client streams (an image push, a forensics upload, the agent
    /// session) or the server does (watches, image downloads).
    Streaming,
}

/// Every method of the registered services, by request path
/// (`/flotte.v1.Machines/ListMachines`).
#[derive(Debug, Clone)]
pub struct MethodCatalog {
    methods: Arc<HashMap<String, CallShape>>,
}

impl MethodCatalog {
    /// The methods declared in the given encoded `FileDescriptorSet`s.
    pub fn from_descriptor_sets(sets: &[&[u8]]) -> Result<Self, MethodCatalogError> {
        let mut methods = HashMap::new();
        for encoded in sets {
            let set = prost_types::FileDescriptorSet::decode(*encoded)?;
            for file in &set.file {
                let package = file.package();
                for service in &file.service {
                    let service_path = if package.is_empty() {
                        service.name().to_owned()
                    } else {
                        format!("{package}.{}", service.name())
                    };
                    for method in &service.method {
                        let shape = if method.server_streaming() || method.client_streaming() {
                            CallShape::Streaming
                        } else {
                            CallShape::Unary
                        };
                        methods.insert(format!("/{service_path}/{}", method.name()), shape);
                    }
                }
            }
        }
        Ok(MethodCatalog {
            methods: Arc::new(methods),
        })
    }

    /// The services `run` registers: every `flotte.v1` service, gRPC health
    /// and both versions of reflection.
    pub fn of_this_server() -> Result<Self, MethodCatalogError> {
        Self::from_descriptor_sets(&[
            flotte_proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ])
    }

    /// The path as a label if it is a known method, [`UNKNOWN_METHOD`] otherwise.
    pub fn label<'path>(&self, path: &'path str) -> &'path str {
        if self.methods.contains_key(path) {
            path
        } else {
            UNKNOWN_METHOD
        }
    }

    pub fn shape(&self, path: &str) -> Option<CallShape> {
        self.methods.get(path).copied()
    }
}

/// A call's response future, boxed.
pub type CallFuture<Response, Error> =
    Pin<Box<dyn Future<Output = Result<Response, Error>> + Send>>;

/// What a [`CallHookLayer`] does around each call: it gets the request path
/// and the inner service's response future, and returns the future to answer
/// with (timed, bounded, counted…).
pub trait CallHook<Response, Error> {
    fn around(&self, path: &str, call: CallFuture<Response, Error>) -> CallFuture<Response, Error>;
}

/// A tower layer running a [`CallHook`] around every call: the one place the
/// tower plumbing (readiness, boxing) is written for the server's own layers.
#[derive(Debug, Clone)]
pub struct CallHookLayer<Hook> {
    pub hook: Hook,
}

impl<S, Hook: Clone> tower::Layer<S> for CallHookLayer<Hook> {
    type Service = CallHookService<S, Hook>;

    fn layer(&self, inner: S) -> Self::Service {
        CallHookService {
            inner,
            hook: self.hook.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct CallHookService<S, Hook> {
    inner: S,
    hook: Hook,
}

impl<S, Hook, RequestBody> tower::Service<http::Request<RequestBody>> for CallHookService<S, Hook>
where
    S: tower::Service<http::Request<RequestBody>>,
    S::Future: Send + 'static,
    Hook: CallHook<S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = CallFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let uri = request.uri().clone();
        let response = self.inner.call(request);
        self.hook.around(uri.path(), Box::pin(response))
    }
}

/// Answers `DEADLINE_EXCEEDED` when a unary call has not answered within
/// `timeout`. Streaming calls and unknown paths (which the router answers at
/// once with `UNIMPLEMENTED`) are left alone. The answer is an ordinary gRPC
/// response, so the metrics hook counts it with its code.
#[derive(Debug, Clone)]
pub struct UnaryTimeout {
    pub catalog: MethodCatalog,
    pub timeout: Duration,
}

impl<Error: Send + 'static> CallHook<http::Response<Body>, Error> for UnaryTimeout {
    fn around(
        &self,
        path: &str,
        call: CallFuture<http::Response<Body>, Error>,
    ) -> CallFuture<http::Response<Body>, Error> {
        if self.catalog.shape(path) != Some(CallShape::Unary) {
            return call;
        }
        let timeout = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(response) => response,
                Err(_) => Ok(tonic::Status::deadline_exceeded(format!(
                    "the call did not answer within the server's unary call timeout ({})",
                    humantime::format_duration(timeout)
                ))
                .into_http()),
            }
        })
    }
}

/// Counts gRPC requests and times them to their response headers (for
/// streams, the time to open), as a [`CallHook`]. The status code is the
/// `grpc-status` header when the call failed before any message (a
/// "trailers-only" answer), otherwise `0`. It wraps every request, before
/// authentication, so the method label is the path only when `catalog`
/// knows it and `unknown` otherwise: a label per raw path would let anyone
/// grow the registry without bound.
#[derive(Clone, Debug)]
pub struct RpcMetrics {
    pub metrics: ServerMetrics,
    pub catalog: MethodCatalog,
}

impl<ResponseBody: 'static, Error: 'static> CallHook<http::Response<ResponseBody>, Error>
    for RpcMetrics
{
    fn around(
        &self,
        path: &str,
        call: CallFuture<http::Response<ResponseBody>, Error>,
    ) -> CallFuture<http::Response<ResponseBody>, Error> {
        let method = self.catalog.label(path).to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        Box::pin(async move {
            let response = call.await;
            let code = match &response {
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("0")
                    .to_owned(),
                Err(_) => "transport".to_owned(),
            };
            metrics.record_rpc(&method, &code, started.elapsed().as_secs_f64());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    #[test]
    fn the_catalog_knows_every_registered_method_and_its_shape() {
        let catalog = MethodCatalog::of_this_server().unwrap();
        assert_eq!(
            catalog.shape("/flotte.v1.Machines/ListMachines"),
            Some(CallShape::Unary)
        );
        assert_eq!(
            catalog.shape("/flotte.v1.Enrollment/Enroll"),
            Some(CallShape::Unary)
        );
        for streaming in [
            "/flotte.v1.AgentSession/Session",
            "/flotte.v1.Images/PushImage",
            "/flotte.v1.Rollouts/WatchRollout",
            "/grpc.health.v1.Health/Watch",
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        ] {
            assert_eq!(
                catalog.shape(streaming),
                Some(CallShape::Streaming),
                "{streaming}"
            );
        }
        assert_eq!(
            catalog.label("/grpc.health.v1.Health/Check"),
            "/grpc.health.v1.Health/Check"
        );
        for unknown in [
            "/flotte.v1.Machines/NoSuchMethod",
            "/x",
            "",
            "/flotte.v1.Machines/ListMachines/extra",
        ] {
            assert_eq!(catalog.label(unknown), UNKNOWN_METHOD, "{unknown}");
            assert_eq!(catalog.shape(unknown), None);
        }
    }

    fn request(path: &str) -> http::Request<()> {
        http::Request::builder()
            .uri(format!("http://server{path}"))
            .body(())
            .unwrap()
    }

    fn grpc_status(response: &http::Response<Body>) -> Option<&str> {
        response
            .headers()
            .get("grpc-status")
            .and_then(|value| value.to_str().ok())
    }

    #[tokio::test]
    async fn only_unary_calls_time_out() {
        use tower::{Layer, ServiceExt};
        let never_answers = tower::service_fn(|_request: http::Request<()>| async {
            std::future::pending::<Result<http::Response<Body>, Infallible>>().await
        });
        let layer = CallHookLayer {
            hook: UnaryTimeout {
                catalog: MethodCatalog::of_this_server().unwrap(),
                timeout: Duration::from_millis(50),
            },
        };
        let unary = layer
            .layer(never_answers)
            .oneshot(request("/flotte.v1.Machines/ListMachines"))
            .await
            .unwrap();
        assert_eq!(grpc_status(&unary), Some("4"), "DEADLINE_EXCEEDED");

        let streaming = layer
            .layer(never_answers)
            .oneshot(request("/flotte.v1.AgentSession/Session"));
        // Twenty times the unary timeout: a stream cut by it would have answered.
        let waited = tokio::time::timeout(Duration::from_secs(1), streaming).await;
        assert!(
            waited.is_err(),
            "a stream must not be cut by the unary timeout"
        );
    }
    #[tokio::test]
    async fn unknown_paths_share_one_label() {
        use tower::{Layer, ServiceExt};
        let metrics = ServerMetrics::new();
        let layer = CallHookLayer {
            hook: RpcMetrics {
                metrics: metrics.clone(),
                catalog: MethodCatalog::of_this_server().unwrap(),
            },
        };
        let answer = tower::service_fn(|_request: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(()))
        });
        let paths = (0..2000)
            .map(|index| format!("/random.{index}/{}", "x".repeat(index % 97)))
            .chain(["/flotte.v1.Machines/ListMachines".to_owned()]);
        for path in paths {
            let request = http::Request::builder()
                .uri(format!("http://server{path}"))
                .body(())
                .unwrap();
            layer.layer(answer).oneshot(request).await.unwrap();
        }
        let text = metrics.encode(&crate::metrics::LiveGauges::default());
        let mut request_series: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("flotte_rpc_requests_total{"))
            .collect();
        request_series.sort_unstable();
        assert_eq!(
            request_series,
            [
                "flotte_rpc_requests_total{method=\"/flotte.v1.Machines/ListMachines\",code=\"0\"} 1",
                "flotte_rpc_requests_total{method=\"unknown\",code=\"0\"} 2000",
            ]
        );
        let duration_series = text
            .lines()
            .filter(|line| line.starts_with("flotte_rpc_duration_seconds_count{"))
            .count();
        assert_eq!(duration_series, 2, "{text}");
    }
}
