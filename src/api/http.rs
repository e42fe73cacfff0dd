//! The HTTP API on the client API listener, compatible with the original flock API: apps
//! (streams) are created, joined and fed records, and queried with read-only SQL.
//!
//! | request | response |
//! |---|---|
//! | `POST /create_app {}` | `{"success": true, "tid": "<stream id>"}` |
//! | `POST /<tid>/join_app {}` | `{"success": true}` (`"pending": true` until a peer has it) |
//! | `POST /<tid>/add_peer {"addr": "...", "port": N}` | `{"success": true}` |
//! | `POST /<tid>/add_record {"_table": ..., ...}` | `{"success": true, "id": "<scribe id>"}` |
//! | `POST /<tid>/query {"query": "...", "params": [...] or {...}}` | `{"success": true, "results": [[...], ...]}` |
//! | `POST /<tid>/upvote {"id": "<record id>"}` | `{"success": true, "id": "<upvote id>"}` (quire's own) |
//! | `PUT /<tid>/<path>` (body: the file) | `204`, `ETag` |
//! | `GET` / `HEAD /<tid>/<path>` (`/<tid>/`: `index.html`) | the file, its stored content type, `ETag` = SHA-256; `304` for `If-None-Match` |
//! | `DELETE /<tid>/<path>` | `204` |
//!
//! Every handler calls the same code as the gRPC service that does the same thing, and maps its
//! status to an HTTP code in one place ([`http_code`]). Errors are
//! `{"success": false, "error": "..."}`.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use quire_projection_api::StreamId;
use quire_projection_sql::{to_sql, Params, Value};
use serde_json::{json, Map, Value as Json};
use tonic::{Code, Status};

use crate::api::files::FilesService;
use crate::api::sql::SqlService;
use crate::api::Api;
use crate::pb;
use crate::pb::admin_server::Admin;
use crate::pb::streams_server::Streams;

/// Largest request body (a record is further held to its stream's per-scribe limit).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

#[derive(Clone, Debug)]
struct Http {
    api: Api,
    sql: SqlService,
    files: FilesService,
}

/// The routes of the HTTP API.
pub fn router(api: Api, sql: SqlService, files: FilesService) -> Router {
    Router::new()
        .route("/create_app", post(create_app))
        .route("/:tid", get(app_root))
        .route("/:tid/", get(index).head(index))
        .route(
            "/:tid/*path",
            get(file_get)
                .head(file_get)
                .put(file_put)
                .delete(file_delete)
                .post(action),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(Http { api, sql, files })
}

/// `POST /<tid>/<action>`.
async fn action(
    State(http): State<Http>,
    Path((tid, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    match action.trim_start_matches('/') {
        "join_app" => join_app(http, tid, headers, body).await,
        "add_peer" => add_peer(http, tid, headers, body).await,
        "add_record" => add_record(http, tid, headers, body).await,
        "query" => query(http, tid, headers, body).await,
        "upvote" => upvote(http, tid, headers, body).await,
        _ => Err(not_found().await),
    }
}

/// `GET /<tid>`: on to `/<tid>/`, so the app's relative links resolve under its id.
async fn app_root(Path(text): Path<String>) -> Result<Response, HttpError> {
    // Only ever to an app id: never an open redirect (`/%2F%2Fevil.example`).
    let stream = tid(&text)?;
    Ok((
        StatusCode::MOVED_PERMANENTLY,
        [(header::LOCATION, format!("/{stream}/"))],
    )
        .into_response())
}

/// `GET /<tid>/`: the app's `index.html`.
async fn index(
    State(http): State<Http>,
    Path(tid): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    serve_file(&http, &tid, "index.html", &headers).await
}

async fn file_get(
    State(http): State<Http>,
    Path((tid, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    let path = path.trim_start_matches('/');
    let path = if path.is_empty() || path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.to_string()
    };
    serve_file(&http, &tid, &path, &headers).await
}

/// A file with its stored content type and `ETag` (its SHA-256); `304` when `If-None-Match` names
/// it. HEAD gets the same headers without the body.
async fn serve_file(
    http: &Http,
    tid_text: &str,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let stream = http.files.held(tid(tid_text)?)?;
    if let Err(reason) = quire_projection_api::files::check_path(path) {
        return Err(HttpError(StatusCode::BAD_REQUEST, reason));
    }
    let Some((entry, data)) = http.files.get(stream, path.to_string(), true).await? else {
        return Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no file {path:?} in app {stream}"),
        ));
    };
    let etag = format!("\"{}\"", hex::encode(entry.sha256));
    let matches = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|tag| {
            let tag = tag.trim();
            tag == "*" || tag.trim_start_matches("W/") == etag
        });
    let mut response = if matches {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (StatusCode::OK, data).into_response()
    };
    let out = response.headers_mut();
    out.insert(header::ETAG, header_value(&etag));
    out.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    if !matches {
        out.insert(header::CONTENT_TYPE, header_value(&entry.content_type));
    }
    Ok(response)
}

fn header_value(text: &str) -> header::HeaderValue {
    header::HeaderValue::from_str(text)
        .unwrap_or_else(|_| header::HeaderValue::from_static("application/octet-stream"))
}

/// `PUT /<tid>/<path>`: the body is the file, the request's content type is stored (guessed from
/// the extension if absent). 204 with the new `ETag`.
async fn file_put(
    State(http): State<Http>,
    Path((tid_text, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body?;
    let stream = http.files.held(tid(&tid_text)?)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let entry = http
        .files
        .put(
            stream,
            path.trim_start_matches('/').to_string(),
            content_type,
            body.to_vec(),
        )
        .await?;
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::ETAG,
        header_value(&format!("\"{}\"", hex::encode(entry.sha256))),
    );
    Ok(response)
}

/// `DELETE /<tid>/<path>`: 204, or 404 if there is no such file.
async fn file_delete(
    State(http): State<Http>,
    Path((tid_text, path)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    let stream = http.files.held(tid(&tid_text)?)?;
    http.files
        .delete(stream, path.trim_start_matches('/').to_string())
        .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// An error reply: a status and a message.
#[derive(Debug)]
pub struct HttpError(pub StatusCode, pub String);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        reply(self.0, json!({"success": false, "error": self.1}))
    }
}

impl From<BytesRejection> for HttpError {
    fn from(rejection: BytesRejection) -> Self {
        HttpError(rejection.status(), rejection.body_text())
    }
}

impl From<Status> for HttpError {
    fn from(status: Status) -> Self {
        HttpError(http_code(status.code()), status.message().to_string())
    }
}

/// The HTTP status for a gRPC status code.
pub fn http_code(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::PermissionDenied | Code::Unauthenticated => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => StatusCode::CONFLICT,
        Code::ResourceExhausted => StatusCode::PAYLOAD_TOO_LARGE,
        Code::FailedPrecondition => StatusCode::PRECONDITION_FAILED,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn reply(status: StatusCode, body: Json) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn ok(mut fields: Map<String, Json>) -> Response {
    fields.insert("success".into(), Json::Bool(true));
    reply(StatusCode::OK, Json::Object(fields))
}

async fn not_found() -> HttpError {
    HttpError(
        StatusCode::NOT_FOUND,
        "no such endpoint: POST /create_app; POST /<tid>/join_app, add_peer, add_record, query, upvote; GET, HEAD, PUT, DELETE /<tid>/<path>"
            .into(),
    )
}

/// The JSON object of a request: `Content-Type: application/json` (parameters allowed); an
/// empty body is `{}`.
fn json_body(
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Map<String, Json>, HttpError> {
    let body = body?;
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    check_json_type(headers)?;
    match serde_json::from_slice::<Json>(&body) {
        Ok(Json::Object(object)) => Ok(object),
        Ok(_) => Err(HttpError(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object".into(),
        )),
        Err(error) => Err(HttpError(
            StatusCode::BAD_REQUEST,
            format!("the body is not valid JSON: {error}"),
        )),
    }
}

fn check_json_type(headers: &HeaderMap) -> Result<(), HttpError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let essence = content_type.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(HttpError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("send Content-Type: application/json (got {content_type:?})"),
        ))
    }
}

/// A `<tid>` from the path.
fn tid(text: &str) -> Result<StreamId, HttpError> {
    text.parse().map_err(|_| {
        HttpError(
            StatusCode::NOT_FOUND,
            format!("unknown app {text:?}: an app id is 64 hex characters"),
        )
    })
}

async fn create_app(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = json_body(&headers, body)?;
    let name = match body.get("name") {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(name)) => name.clone(),
        Some(_) => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                "\"name\" must be a string".into(),
            ))
        }
    };
    let policy = match body.get("work_bits") {
        None | Some(Json::Null) => None,
        Some(bits) => {
            let bits = bits
                .as_u64()
                .filter(|b| *b <= u32::MAX as u64)
                .ok_or_else(|| {
                    HttpError(
                        StatusCode::BAD_REQUEST,
                        "\"work_bits\" must be a small non-negative integer".into(),
                    )
                })?;
            Some(pb::Policy {
                work_bits: bits as u32,
                ..Default::default()
            })
        }
    };
    let info = http
        .api
        .create(tonic::Request::new(pb::CreateStreamRequest {
            name,
            policy,
            owner: Default::default(),
        }))
        .await?
        .into_inner();
    Ok(ok(Map::from_iter([(
        "tid".into(),
        Json::String(hex::encode(&info.stream)),
    )])))
}

async fn join_app(
    http: Http,
    text: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    json_body(&headers, body)?;
    let stream = tid(&text)?;
    let joined = http
        .api
        .join(tonic::Request::new(pb::JoinStreamRequest {
            stream: stream.0.to_vec().into(),
            // Do not wait: a flock client joins first and adds the peer that has the app next.
            timeout_ms: 1,
        }))
        .await;
    match joined {
        Ok(_) => Ok(ok(Map::new())),
        Err(status) if status.code() == Code::DeadlineExceeded => {
            Ok(ok(Map::from_iter([("pending".into(), Json::Bool(true))])))
        }
        Err(status) => Err(status.into()),
    }
}

async fn add_peer(
    http: Http,
    text: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = json_body(&headers, body)?;
    tid(&text)?;
    let host = body.get("addr").and_then(Json::as_str).ok_or_else(|| {
        HttpError(
            StatusCode::BAD_REQUEST,
            "give \"addr\": the peer's host, and \"port\": its peer port".into(),
        )
    })?;
    let addr = match body.get("port") {
        None | Some(Json::Null) => host.to_string(),
        Some(port) => {
            let port = port
                .as_u64()
                .filter(|p| (1..=65535).contains(p))
                .ok_or_else(|| {
                    HttpError(
                        StatusCode::BAD_REQUEST,
                        "\"port\" must be a number from 1 to 65535".into(),
                    )
                })?;
            format!("{host}:{port}")
        }
    };
    let added = http
        .api
        .add_peer(tonic::Request::new(pb::AddPeerRequest { addr }))
        .await?
        .into_inner();
    Ok(ok(Map::from_iter([(
        "addr".into(),
        Json::String(added.addr),
    )])))
}

async fn add_record(
    http: Http,
    text: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = body?;
    check_json_type(&headers)?;
    let stream = http.sql.held(tid(&text)?)?;
    let appended = http.sql.add_record(stream, body).await?;
    Ok(appended_reply(&appended))
}

async fn upvote(
    http: Http,
    text: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = json_body(&headers, body)?;
    let stream = http.sql.held(tid(&text)?)?;
    let record = body
        .get("id")
        .and_then(Json::as_str)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            HttpError(
                StatusCode::BAD_REQUEST,
                "give \"id\": the record's id, 64 hex characters".into(),
            )
        })?;
    let appended = http.sql.upvote(stream, record).await?;
    Ok(appended_reply(&appended))
}

/// `{"success": true, "id": "<scribe id>", "seq": N}`.
fn appended_reply(appended: &crate::log::Appended) -> Response {
    ok(Map::from_iter([
        ("id".into(), Json::String(appended.id.to_hex())),
        ("seq".into(), Json::from(appended.seq)),
    ]))
}

fn param(value: &Json) -> Value {
    to_sql(Some(value))
}

async fn query(
    http: Http,
    text: String,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let body = json_body(&headers, body)?;
    let stream = http.sql.held(tid(&text)?)?;
    let sql = body.get("query").and_then(Json::as_str).ok_or_else(|| {
        HttpError(
            StatusCode::BAD_REQUEST,
            "give \"query\": one read-only SQL statement".into(),
        )
    })?;
    let params = match body.get("params") {
        None | Some(Json::Null) => Params::default(),
        Some(Json::Array(values)) => Params::Positional(values.iter().map(param).collect()),
        Some(Json::Object(values)) => {
            Params::Named(values.iter().map(|(k, v)| (k.clone(), param(v))).collect())
        }
        Some(_) => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                "\"params\" must be a list (for ?) or an object (for :name)".into(),
            ))
        }
    };
    let after_seq = match body.get("after_seq") {
        None | Some(Json::Null) => 0,
        Some(seq) => seq.as_u64().ok_or_else(|| {
            HttpError(
                StatusCode::BAD_REQUEST,
                "\"after_seq\" must be a non-negative integer".into(),
            )
        })?,
    };
    let rows = http
        .sql
        .query(stream, sql.to_string(), params, after_seq)
        .await?;
    Ok(ok(Map::from_iter([
        ("columns".into(), Json::from(rows.columns)),
        (
            "results".into(),
            Json::Array(
                rows.rows
                    .into_iter()
                    .map(|row| {
                        Json::Array(
                            row.into_iter()
                                .map(crate::api::sql::value_to_json)
                                .collect(),
                        )
                    })
                    .collect(),
            ),
        ),
        ("seq".into(), Json::from(rows.checkpoint)),
    ])))
}
