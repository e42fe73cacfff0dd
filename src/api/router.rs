//! Where a request on the client API listener becomes a service call: every gRPC service (plus
//! health and reflection) and the HTTP router on one set of routes. Each request first passes
//! [`super::access::Access::admit`] (host, origin, token; for gRPC, the method's rule) and
//! carries the admitted caller in its extensions; then it is split by content type — a request
//! whose content type is `application/grpc…` goes to tonic, any other to
//! [`super::http::router`]. Nothing else: no service logic lives here.

use super::access::{grpc_rule, needs_token, Caller, Refusal, Rule};
use super::files::FilesService;
use super::kv::KvService;
use super::sql::SqlService;
use super::{Api, MAX_MESSAGE_BYTES};
use crate::pb;

impl Api {
    /// Every service of the client API over gRPC, and the HTTP API, on one set of routes: a
    /// request whose content type is `application/grpc…` goes to gRPC, any other to HTTP.
    pub async fn routes(self, sql: SqlService, files: FilesService) -> tonic::service::Routes {
        let access = self.access.clone();
        let (mut reporter, health_service) = tonic_health::server::health_reporter();
        reporter
            .set_serving::<pb::log_server::LogServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::streams_server::StreamsServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::admin_server::AdminServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::projections_server::ProjectionsServer<Api>>()
            .await;
        reporter
            .set_serving::<pb::kv_server::KvServer<KvService>>()
            .await;
        reporter
            .set_serving::<pb::sql_server::SqlServer<SqlService>>()
            .await;
        reporter
            .set_serving::<pb::files_server::FilesServer<FilesService>>()
            .await;
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .expect("quire's descriptor set is valid");
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .expect("quire's descriptor set is valid");
        let kv = KvService::new(self.log.clone(), self.projections.clone());
        let http = super::http::router(self.clone(), sql.clone(), files.clone(), kv.clone());
        let mut grpc = tonic::service::Routes::builder();
        grpc.add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                pb::streams_server::StreamsServer::new(self.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::log_server::LogServer::new(self.clone())
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(pb::projections_server::ProjectionsServer::new(self.clone()))
            .add_service(
                pb::kv_server::KvServer::new(kv)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(pb::sql_server::SqlServer::new(sql))
            .add_service(
                pb::files_server::FilesServer::new(files)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            )
            .add_service(
                pb::admin_server::AdminServer::new(self)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES),
            );
        let grpc = grpc.routes().into_axum_router();
        let dispatch = tower::service_fn(move |mut request: axum::extract::Request| {
            let grpc = grpc.clone();
            let http = http.clone();
            let access = access.clone();
            async move {
                use tower::ServiceExt;
                if access.unchecked() {
                    // The benchmark's "without": no check, no split by host.
                    let admitted = super::access::Admitted {
                        caller: Caller::Owner,
                        target: super::access::Target::Node { name: None },
                        browser: false,
                        port: None,
                    };
                    request.extensions_mut().insert(admitted.caller);
                    request.extensions_mut().insert(admitted);
                    let is_grpc = request
                        .headers()
                        .get(axum::http::header::CONTENT_TYPE)
                        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"));
                    return if is_grpc {
                        grpc.oneshot(request).await
                    } else {
                        http.oneshot(request).await
                    };
                }
                let is_grpc = request
                    .headers()
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|value| value.to_str().ok())
                    .is_some_and(|value| value.starts_with("application/grpc"));
                let local = request
                    .extensions()
                    .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                    // An IPv4 client of a dual-stack (`[::]`) listener shows as `::ffff:127.0.0.1`.
                    .is_some_and(|info| info.0.ip().to_canonical().is_loopback());
                let admitted = access
                    .admit(
                        request.method(),
                        request.uri(),
                        request.headers(),
                        is_grpc,
                        local,
                    )
                    .and_then(|admitted| {
                        let owner_only = grpc_rule(request.uri().path()) == Rule::Owner;
                        if is_grpc && owner_only && admitted.caller != Caller::Owner {
                            return Err(Refusal::Unauthenticated(needs_token(
                                request.uri().path(),
                            )));
                        }
                        Ok(admitted)
                    });
                // A page sees only the HTTP status (a gRPC status rides in an HTTP 200): it gets
                // 401/403 like any HTTP refusal; a gRPC client gets its status.
                let from_page = request.headers().contains_key(axum::http::header::ORIGIN)
                    || request.headers().contains_key("sec-fetch-site");
                let admitted = match admitted {
                    Ok(admitted) => admitted,
                    Err(refusal) if is_grpc && !from_page => {
                        return Ok(refusal.status().into_http().map(axum::body::Body::new))
                    }
                    Err(refusal) => return Ok(super::http::refused(&refusal)),
                };
                request.extensions_mut().insert(admitted.caller);
                request.extensions_mut().insert(admitted);
                if is_grpc {
                    grpc.oneshot(request).await
                } else {
                    http.oneshot(request).await
                }
            }
        });
        tonic::service::Routes::from(axum::Router::new().fallback_service(dispatch))
    }
}
