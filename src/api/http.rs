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
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{DefaultBodyLimit, Extension, Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use quire_projection_api::{Kind, ScribeId, StreamId};
use quire_projection_sql::{to_sql, Params, Value};
use serde_json::{json, Map, Value as Json};
use tonic::{Code, Status};

use crate::api::access::{as_owner, needs_token, Admitted, Caller, Refusal, Target};
use crate::api::files::FilesService;
use crate::api::kv::KvService;
use crate::api::live::{self, Hub};
use crate::api::sql::SqlService;
use crate::api::Api;
use crate::pb;
use crate::pb::admin_server::Admin;
use crate::pb::streams_server::Streams;

/// Largest request body (a record is further held to its stream's per-scribe limit).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// What the HTTP API and the live binding ([`crate::api::live`]) serve from.
#[derive(Clone, Debug)]
struct Http {
    api: Api,
    sql: SqlService,
    files: FilesService,
    kv: KvService,
    hub: Hub,
}

/// The routes of the HTTP API: the node's own host (`127.0.0.1`, `localhost`, `--api-host`
/// names) and each app's host (`<label>.localhost`), told apart by the [`Admitted`] target the
/// access check put in the request.
pub fn router(api: Api, sql: SqlService, files: FilesService, kv: KvService) -> Router {
    let hub = Hub::new(
        api.log.clone(),
        api.projections.clone(),
        sql.clone(),
        kv.clone(),
    );
    let state = Http {
        api,
        sql,
        files,
        kv,
        hub,
    };
    let node_routes = Router::new()
        .route("/create_app", post(create_app))
        .route(CLIENT_PATH, get(live_client).head(live_client))
        .route("/remove_peer", post(remove_peer))
        .route("/:tid", get(app_root).head(app_root))
        .route("/:tid/", get(node_index).head(node_index))
        .route(
            "/:tid/*path",
            get(node_file)
                .head(node_file)
                .put(node_put)
                .delete(node_delete)
                .post(action),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES));
    // The benchmark's "without" (see `NodeConfig::without_access_checks`): no headers, no split.
    let unchecked = node_routes.clone().with_state(state.clone());
    let node = node_routes
        .layer(axum::middleware::map_response(node_headers))
        .with_state(state.clone());
    let access = state.api.access.clone();
    let app = Router::new()
        .route("/", get(app_index).head(app_index))
        .route(CLIENT_PATH, get(live_client).head(live_client))
        .route(
            "/*path",
            get(app_file)
                .head(app_file)
                .put(app_put)
                .delete(app_delete)
                .post(app_action),
        )
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(app_headers))
        .with_state(state);
    Router::new().fallback_service(tower::service_fn(move |request: axum::extract::Request| {
        let on_app = matches!(
            request.extensions().get::<Admitted>().map(|a| &a.target),
            Some(Target::App { .. })
        );
        let router = if access.unchecked() {
            unchecked.clone()
        } else if on_app {
            app.clone()
        } else {
            node.clone()
        };
        async move {
            use tower::ServiceExt;
            router.oneshot(request).await
        }
    }))
}

/// Where the node serves the live binding's browser client, on every host.
pub const CLIENT_PATH: &str = "/_quire/socksync.js";

/// The live binding's browser client: a plain ES module (`import {connect} from
/// "/_quire/socksync.js"`).
async fn live_client() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("socksync.js"),
    )
        .into_response()
}

/// The Content-Security-Policy of every answer from an app's origin: the page may load and call
/// its own origin and nothing else (inline scripts and styles allowed, as flock apps use them).
pub const APP_CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline' 'unsafe-eval'; \
style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; media-src 'self' data: blob:; \
font-src 'self' data:; connect-src 'self'; frame-src 'self'; worker-src 'self' blob:; \
object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'";

async fn app_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(APP_CSP),
    );
    safe_headers(headers);
    response
}

/// Files served on the node's own host run nothing: a sandboxed page has no origin to act as.
async fn node_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static("sandbox; default-src 'none'; frame-ancestors 'none'"),
    );
    safe_headers(headers);
    response
}

fn safe_headers(headers: &mut HeaderMap) {
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "cross-origin-resource-policy",
        header::HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        "cross-origin-opener-policy",
        header::HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
}

/// The answer to a request the access check refused: 401 (token missing or wrong) or 403.
pub fn refused(refusal: &Refusal) -> Response {
    let (status, message) = match refusal {
        Refusal::Unauthenticated(message) => (StatusCode::UNAUTHORIZED, message),
        Refusal::Forbidden(message) => (StatusCode::FORBIDDEN, message),
    };
    let mut response = HttpError(status, message.clone()).into_response();
    safe_headers(response.headers_mut());
    response
}

/// What a request asks to do with a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Right {
    /// Read files, query: anyone.
    Read,
    /// Add a record or an upvote (node-signed): the owner, or the app itself.
    Record,
    /// Write files, join, peers, create apps: the owner only.
    Manage,
}

/// Refuses `admitted` the `right` on `stream` unless it has it.
fn allow(
    admitted: &Admitted,
    stream: Option<StreamId>,
    right: Right,
    what: &str,
) -> Result<(), HttpError> {
    match admitted.caller {
        Caller::Owner => Ok(()),
        Caller::App(app) if right != Right::Manage && Some(app) == stream => Ok(()),
        Caller::App(_) => Err(HttpError(
            StatusCode::FORBIDDEN,
            format!("an app may only query, add records, upvote and read the files of its own stream, not {what}"),
        )),
        Caller::Anyone if right == Right::Read => Ok(()),
        Caller::Anyone => Err(HttpError(StatusCode::UNAUTHORIZED, needs_token(what))),
    }
}

/// `POST /<tid>/<action>` on the node's host.
async fn action(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path((text, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let action = action.trim_start_matches('/');
    if right_of(action).is_none() {
        return Err(not_found().await);
    }
    run_action(http, admitted, tid(&text)?, action, headers, body).await
}

/// `POST /<action>` (or `/<tid>/<action>`, flock-style, with the app's own id) on an app's host.
async fn app_action(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let stream = app_of(&admitted)?;
    let action = own_path(stream, &path).to_string();
    run_action(http, admitted, stream, &action, headers, body).await
}

async fn run_action(
    http: Http,
    admitted: Admitted,
    stream: StreamId,
    action: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let Some(right) = right_of(action) else {
        return Err(not_found().await);
    };
    allow(&admitted, Some(stream), right, action)?;
    if let Caller::App(_) = admitted.caller {
        app_may_record(&http, stream, action)?;
    }
    if admitted.caller != Caller::Owner {
        // A page can send a form (no preflight) but not JSON to another origin.
        check_json_type(&headers)?;
    }
    match action {
        "join_app" => join_app(http, stream, headers, body).await,
        "cancel_join" => cancel_join(http, stream, headers, body).await,
        "leave" => leave(http, stream, headers, body).await,
        "add_peer" => add_peer(http, headers, body).await,
        "add_record" => {
            let body = body?;
            check_json_type(&headers)?;
            Ok(ok(add_record(&http, admitted.caller, stream, body).await?))
        }
        "query" => Ok(ok(query(
            &http,
            admitted.caller,
            stream,
            json_body(&headers, body)?,
        )
        .await?)),
        "redact" => Ok(ok(redact(
            &http,
            admitted.caller,
            stream,
            json_body(&headers, body)?,
        )
        .await?)),
        _ => Ok(ok(upvote(
            &http,
            admitted.caller,
            stream,
            json_body(&headers, body)?,
        )
        .await?)),
    }
}

impl Http {
    /// A live-binding session ([`live`]) whose calls run [`perform`].
    fn live(self, admitted: Admitted, stream: StreamId, ws: WebSocketUpgrade) -> Response {
        let hub = self.hub.clone();
        let revoked = (admitted.caller == Caller::Owner).then(|| self.api.access.watch_rotations());
        live::upgrade(
            hub,
            std::sync::Arc::new(self),
            admitted,
            stream,
            revoked,
            ws,
        )
    }
}

impl live::Functions for Http {
    fn call<'a>(
        &'a self,
        admitted: &'a Admitted,
        stream: StreamId,
        name: &'a str,
        args: Map<String, Json>,
    ) -> futures::future::BoxFuture<'a, Result<Map<String, Json>, String>> {
        Box::pin(async move {
            perform(self, admitted, stream, name, args)
                .await
                .map_err(|error| error.1)
        })
    }
}

/// A function of the live binding ([`crate::api::live`]): the same rights and the same code as
/// the HTTP action of the same name, plus `kv_set {key, value}` and `kv_delete {key}` (the
/// value is stored as its JSON text). Its answer's fields, without `success`.
async fn perform(
    http: &Http,
    admitted: &Admitted,
    stream: StreamId,
    action: &str,
    args: Map<String, Json>,
) -> Result<Map<String, Json>, HttpError> {
    let right = match action {
        "query" => Right::Read,
        _ => Right::Record,
    };
    allow(admitted, Some(stream), right, action)?;
    if let Caller::App(_) = admitted.caller {
        app_may_record(http, stream, action)?;
    }
    match action {
        "query" => query(http, admitted.caller, stream, args).await,
        "upvote" => upvote(http, admitted.caller, stream, args).await,
        "redact" => redact(http, admitted.caller, stream, args).await,
        "add_record" => {
            let record = Json::Object(args).to_string();
            add_record(http, admitted.caller, stream, Bytes::from(record)).await
        }
        "kv_set" | "kv_delete" => kv_write(http, stream, action == "kv_set", args).await,
        _ => Err(HttpError(
            StatusCode::NOT_FOUND,
            format!("no function {action}"),
        )),
    }
}

async fn kv_write(
    http: &Http,
    stream: StreamId,
    set: bool,
    args: Map<String, Json>,
) -> Result<Map<String, Json>, HttpError> {
    use crate::pb::kv_server::Kv;
    let bad = |message: &str| HttpError(StatusCode::BAD_REQUEST, message.into());
    let key = args
        .get("key")
        .and_then(Json::as_str)
        .ok_or_else(|| bad("give \"key\": the key, a string"))?;
    let stream_bytes = bytes::Bytes::copy_from_slice(stream.as_bytes());
    let key = bytes::Bytes::copy_from_slice(key.as_bytes());
    let entry = if set {
        let value = args
            .get("value")
            .ok_or_else(|| bad("give \"value\": any JSON value"))?;
        let request = pb::KvSetRequest {
            stream: stream_bytes,
            key,
            value: bytes::Bytes::from(value.to_string()),
        };
        http.kv.set(tonic::Request::new(request)).await?
    } else {
        let request = pb::KvDeleteRequest {
            stream: stream_bytes,
            key,
        };
        http.kv.delete(tonic::Request::new(request)).await?
    };
    let entry = entry.into_inner();
    Ok(Map::from_iter([
        ("id".into(), Json::String(hex::encode(&entry.id))),
        ("seq".into(), Json::from(entry.seq)),
        ("fence".into(), Json::from(entry.fence)),
    ]))
}

/// An app's page writes as the node only what anyone may write to its stream (or, for a private
/// stream, what the node may write), and never makes the node do the work a stream asks of each
/// record: anyone can claim a public app's origin, so the node must not sign for it what the
/// policy keeps from strangers.
fn app_may_record(http: &Http, stream: StreamId, action: &str) -> Result<(), HttpError> {
    let Some(state) = http.api.log.stream(&stream) else {
        return Ok(()); // answered "not held" by the action itself
    };
    let kind = match action {
        // An app's page may take back, as the node, only what it may write as the node.
        "add_record" | "redact" => Kind::RecordAdd,
        "upvote" => Kind::RecordUpvote,
        "kv_set" => Kind::KvSet,
        "kv_delete" => Kind::KvDelete,
        _ => return Ok(()),
    };
    let authors = state.policy.authors_for(&kind);
    // A private stream's app is its own: its page (at its own origin, which only the stream's
    // readers are served) writes as the node what the node may write.
    let node = http.api.log.node_key();
    let node_may = state.policy.private
        && (authors.contains(&node, &state.owner)
            || (authors.writers
                && state.membership.roles().get(&node) >= Some(&crate::membership::Role::Writer)));
    if !authors.anyone && !node_may {
        return Err(HttpError(
            StatusCode::FORBIDDEN,
            format!(
                "this stream's policy lets only {} write {}: an app's page may write as the node only what anyone may write (send the owner's token, or sign the scribe yourself)",
                state.policy.authors_for(&kind),
                kind.as_str()
            ),
        ));
    }
    if kind == Kind::RecordAdd && state.policy.work_bits > 0 {
        return Err(HttpError(
            StatusCode::FORBIDDEN,
            format!(
                "this stream asks {} bits of work of every record: the node does not do that work for a page; sign the record yourself (Log.AppendSigned) or send the owner's token",
                state.policy.work_bits
            ),
        ));
    }
    Ok(())
}

/// The right each `POST` action needs (None: no such action).
fn right_of(action: &str) -> Option<Right> {
    match action {
        "query" => Some(Right::Read),
        "add_record" | "upvote" | "redact" => Some(Right::Record),
        "join_app" | "add_peer" | "cancel_join" | "leave" => Some(Right::Manage),
        _ => None,
    }
}

/// The app whose host a request came to.
fn app_of(admitted: &Admitted) -> Result<StreamId, HttpError> {
    match &admitted.target {
        Target::App { stream, .. } => Ok(*stream),
        Target::Node { .. } => Err(HttpError(StatusCode::NOT_FOUND, "not an app's host".into())),
    }
}

/// `GET /<tid>` on the node's host: a browser goes on to the app's own origin
/// (`http://<label>.localhost:<port>/`); another client to `/<tid>/`.
async fn app_root(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(text): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    if admitted.browser {
        return node_serve(&http, &admitted, &text, "", &headers).await;
    }
    // Elsewhere on to `/<tid>/`, so relative links resolve under the app's id.
    let stream = tid(&text)?;
    Ok((
        StatusCode::MOVED_PERMANENTLY,
        [(header::LOCATION, format!("/{stream}/"))],
    )
        .into_response())
}

/// `GET /<tid>/` on the node's host: a browser goes on to the app's own origin; another client
/// gets `index.html` here (sandboxed: nothing on the node's host runs).
async fn node_index(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(text): Path<String>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    node_serve(&http, &admitted, &text, "", &headers).await
}

async fn node_file(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path((text, path)): Path<(String, String)>,
    headers: HeaderMap,
    ws: Option<WebSocketUpgrade>,
) -> Result<Response, HttpError> {
    if let (Some(ws), live::PATH) = (ws, path.trim_start_matches('/')) {
        let stream = http.sql.held(tid(&text)?, admitted.caller)?;
        return Ok(http.live(admitted, stream, ws));
    }
    node_serve(
        &http,
        &admitted,
        &text,
        path.trim_start_matches('/'),
        &headers,
    )
    .await
}

/// A file of app `text` asked for on the node's host: browsers are sent to the app's origin
/// (only ever to an app id: never an open redirect); other clients get the file, sandboxed.
async fn node_serve(
    http: &Http,
    admitted: &Admitted,
    text: &str,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let stream = tid(text)?;
    if admitted.browser {
        if let Some(origin) = http.api.access.app_origin(&stream, admitted) {
            return Ok((
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("{origin}/{path}"))],
            )
                .into_response());
        }
    }
    serve_file(http, admitted.caller, stream, &index_path(path), headers).await
}

async fn app_index(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    headers: HeaderMap,
) -> Result<Response, HttpError> {
    serve_file(
        &http,
        admitted.caller,
        app_of(&admitted)?,
        "index.html",
        &headers,
    )
    .await
}

async fn app_file(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(path): Path<String>,
    headers: HeaderMap,
    ws: Option<WebSocketUpgrade>,
) -> Result<Response, HttpError> {
    let stream = app_of(&admitted)?;
    if let (Some(ws), live::PATH) = (ws, own_path(stream, &path)) {
        let stream = http.sql.held(stream, admitted.caller)?;
        return Ok(http.live(admitted, stream, ws));
    }
    serve_file(
        &http,
        admitted.caller,
        stream,
        &index_path(own_path(stream, &path)),
        &headers,
    )
    .await
}

/// A path on an app's host, without a leading `<tid>/` of the app itself (flock's absolute
/// links).
fn own_path(stream: StreamId, path: &str) -> &str {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((first, rest)) if tid(first).ok() == Some(stream) => rest,
        _ if tid(path).ok() == Some(stream) => "",
        _ => path,
    }
}

/// `dir/` and the empty path name the `index.html` under them.
fn index_path(path: &str) -> String {
    if path.is_empty() || path.ends_with('/') {
        format!("{path}index.html")
    } else {
        path.to_string()
    }
}

/// A file with its stored content type and `ETag` (its SHA-256); `304` when `If-None-Match` names
/// it. HEAD gets the same headers without the body.
async fn serve_file(
    http: &Http,
    caller: Caller,
    stream: StreamId,
    path: &str,
    headers: &HeaderMap,
) -> Result<Response, HttpError> {
    let stream = http.files.held(stream, caller)?;
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

/// `PUT /<tid>/<path>` (owner): the body is the file, the request's content type is stored
/// (guessed from the extension if absent). 204 with the new `ETag`.
async fn node_put(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path((text, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    file_put(http, &admitted, tid(&text)?, &path, headers, body).await
}

/// `PUT /<path>` on an app's host (owner).
async fn app_put(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let stream = app_of(&admitted)?;
    let path = own_path(stream, &path).to_string();
    file_put(http, &admitted, stream, &path, headers, body).await
}

async fn file_put(
    http: Http,
    admitted: &Admitted,
    stream: StreamId,
    path: &str,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    allow(admitted, Some(stream), Right::Manage, "writing files")?;
    let body = body?;
    let stream = http.files.held(stream, admitted.caller)?;
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

/// `DELETE /<tid>/<path>` (owner): 204, or 404 if there is no such file.
async fn node_delete(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path((text, path)): Path<(String, String)>,
) -> Result<Response, HttpError> {
    file_delete(http, &admitted, tid(&text)?, &path).await
}

/// `DELETE /<path>` on an app's host (owner).
async fn app_delete(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    Path(path): Path<String>,
) -> Result<Response, HttpError> {
    let stream = app_of(&admitted)?;
    let path = own_path(stream, &path).to_string();
    file_delete(http, &admitted, stream, &path).await
}

async fn file_delete(
    http: Http,
    admitted: &Admitted,
    stream: StreamId,
    path: &str,
) -> Result<Response, HttpError> {
    allow(admitted, Some(stream), Right::Manage, "deleting files")?;
    let stream = http.files.held(stream, admitted.caller)?;
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
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
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
    Extension(admitted): Extension<Admitted>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    allow(&admitted, None, Right::Manage, "create_app")?;
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
        .create(as_owner(tonic::Request::new(pb::CreateStreamRequest {
            name,
            policy,
            owner: Default::default(),
            access: None,
            retention: None,
        })))
        .await?
        .into_inner();
    Ok(ok(Map::from_iter([(
        "tid".into(),
        Json::String(hex::encode(&info.stream)),
    )])))
}

async fn join_app(
    http: Http,
    stream: StreamId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    json_body(&headers, body)?;
    let joined = http
        .api
        .join(as_owner(tonic::Request::new(pb::JoinStreamRequest {
            stream: stream.0.to_vec().into(),
            // Do not wait: a flock client joins first and adds the peer that has the app next.
            timeout_ms: 1,
        })))
        .await;
    match joined {
        Ok(_) => Ok(ok(Map::new())),
        Err(status) if status.code() == Code::DeadlineExceeded => {
            Ok(ok(Map::from_iter([("pending".into(), Json::Bool(true))])))
        }
        Err(status) => Err(status.into()),
    }
}

/// `POST /<tid>/cancel_join` (owner): stops waiting for a pending join.
async fn cancel_join(
    http: Http,
    stream: StreamId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    json_body(&headers, body)?;
    http.api
        .cancel_join(as_owner(tonic::Request::new(pb::CancelJoinRequest {
            stream: stream.0.to_vec().into(),
        })))
        .await?;
    Ok(ok(Map::new()))
}

/// `POST /<tid>/leave` (owner): stops holding the stream and deletes this node's copies of it
/// (`Streams.Leave`); answers what was deleted.
async fn leave(
    http: Http,
    stream: StreamId,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    json_body(&headers, body)?;
    let left = http
        .api
        .leave(as_owner(tonic::Request::new(pb::LeaveStreamRequest {
            stream: stream.0.to_vec().into(),
        })))
        .await?
        .into_inner();
    let mut answer = Map::new();
    answer.insert("scribes".into(), left.scribes.into());
    answer.insert("payloads".into(), left.payloads.into());
    answer.insert("payload_bytes".into(), left.payload_bytes.into());
    answer.insert("seals".into(), left.seals.into());
    answer.insert("projections".into(), left.projections.into());
    answer.insert("rebuilding".into(), left.rebuilding.into());
    Ok(ok(answer))
}

/// `POST /remove_peer {"addr": "...", "port": N}` (owner).
async fn remove_peer(
    State(http): State<Http>,
    Extension(admitted): Extension<Admitted>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    allow(&admitted, None, Right::Manage, "remove_peer")?;
    let addr = peer_addr(&json_body(&headers, body)?)?;
    let removed = http
        .api
        .remove_peer(as_owner(tonic::Request::new(pb::RemovePeerRequest {
            addr,
        })))
        .await?
        .into_inner();
    Ok(ok(Map::from_iter([(
        "addr".into(),
        Json::String(removed.addr),
    )])))
}

async fn add_peer(
    http: Http,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HttpError> {
    let addr = peer_addr(&json_body(&headers, body)?)?;
    let added = http
        .api
        .add_peer(as_owner(tonic::Request::new(pb::AddPeerRequest { addr })))
        .await?
        .into_inner();
    Ok(ok(Map::from_iter([(
        "addr".into(),
        Json::String(added.addr),
    )])))
}

/// `host:port` from `{"addr": host, "port": N}` (flock's add_peer body).
fn peer_addr(body: &Map<String, Json>) -> Result<String, HttpError> {
    let host = body.get("addr").and_then(Json::as_str).ok_or_else(|| {
        HttpError(
            StatusCode::BAD_REQUEST,
            "give \"addr\": the peer's host, and \"port\": its peer port".into(),
        )
    })?;
    match body.get("port") {
        None | Some(Json::Null) => Ok(host.to_string()),
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
            Ok(format!("{host}:{port}"))
        }
    }
}

async fn add_record(
    http: &Http,
    caller: Caller,
    stream: StreamId,
    record: Bytes,
) -> Result<Map<String, Json>, HttpError> {
    let stream = http.sql.held(stream, caller)?;
    let appended = http.sql.add_record(stream, record).await?;
    Ok(appended_fields(&appended))
}

async fn upvote(
    http: &Http,
    caller: Caller,
    stream: StreamId,
    body: Map<String, Json>,
) -> Result<Map<String, Json>, HttpError> {
    let stream = http.sql.held(stream, caller)?;
    let record = id_arg(&body, "the record's id")?;
    let appended = http.sql.upvote(stream, record).await?;
    Ok(appended_fields(&appended))
}

/// The scribe id in `body`'s `"id"` (`what` says which, in the error).
fn id_arg(body: &Map<String, Json>, what: &str) -> Result<ScribeId, HttpError> {
    body.get("id")
        .and_then(Json::as_str)
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| {
            HttpError(
                StatusCode::BAD_REQUEST,
                format!("give \"id\": {what}, 64 hex characters"),
            )
        })
}

/// `redact {"id": "<scribe id>", "reason": "..."}`: deletes a scribe's payload on every node
/// (`Streams.Redact`); an app may redact only records its node wrote. Answers the `redact`
/// scribe's id and seq once the payload has left this node's disk.
async fn redact(
    http: &Http,
    caller: Caller,
    stream: StreamId,
    body: Map<String, Json>,
) -> Result<Map<String, Json>, HttpError> {
    let stream = http.sql.held(stream, caller)?;
    let target = id_arg(&body, "the id of the scribe to redact")?;
    let reason = match body.get("reason") {
        None | Some(Json::Null) => String::new(),
        Some(Json::String(reason)) => reason.clone(),
        Some(_) => {
            return Err(HttpError(
                StatusCode::BAD_REQUEST,
                "\"reason\" is a string".into(),
            ))
        }
    };
    let reply = http
        .api
        .redact_as_node(stream, target, reason, caller != Caller::Owner)
        .await?;
    Ok(Map::from_iter([
        ("id".into(), Json::String(hex::encode(&reply.id))),
        ("seq".into(), Json::from(reply.seq)),
    ]))
}

/// `{"success": true, "id": "<scribe id>", "seq": N}`.
fn appended_fields(appended: &crate::log::Appended) -> Map<String, Json> {
    Map::from_iter([
        ("id".into(), Json::String(appended.id.to_hex())),
        ("seq".into(), Json::from(appended.seq)),
    ])
}

fn param(value: &Json) -> Value {
    to_sql(Some(value))
}

async fn query(
    http: &Http,
    caller: Caller,
    stream: StreamId,
    body: Map<String, Json>,
) -> Result<Map<String, Json>, HttpError> {
    let stream = http.sql.held(stream, caller)?;
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
    Ok(Map::from_iter([
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
    ]))
}
