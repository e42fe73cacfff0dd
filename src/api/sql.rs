//! The `Sql` gRPC service, and the record and query operations the HTTP API shares with it:
//! read-only SQL over each stream's tables (the built-in `sql` projector, `projections/sql`),
//! and node-signed `record.add` appends answered once this node's tables include them.
//!
//! Queries run on pooled read-only connections to the live copy, off the async executor, under
//! the node's time and row limits ([`Limits`], `quire serve --sql-time-limit-ms / --sql-max-rows`).

// Service code returns tonic's `Status`, as every client API service does.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;

use bytes::Bytes;
use quire_projection_api::{Kind, ScribeId, StreamId};
pub use quire_projection_sql::Limits;
use quire_projection_sql::{
    List, Params, QueryError, Reader, Rows, Value, Window, NAME, RECORD_CONTENT_TYPE,
};
use tonic::{Request, Response, Status};

use crate::api::access::{self, Caller};
use crate::api::served::Served;
use crate::log::{Appended, Log};
use crate::pb;
use crate::projection::Projections;

/// The SQL operations of one node.
#[derive(Clone, Debug)]
pub struct SqlService {
    served: Served<Reader>,
    limits: Limits,
}

/// The status for a refused or failed query.
pub fn query_status(error: &QueryError) -> Status {
    let message = error.to_string();
    match error {
        QueryError::Refused(_) => Status::permission_denied(message),
        QueryError::Invalid(_) => Status::invalid_argument(message),
        QueryError::TimeLimit(_) => Status::deadline_exceeded(message),
        QueryError::RowLimit(_) | QueryError::TooLarge(_) => Status::resource_exhausted(message),
        _ => Status::internal(message),
    }
}

impl SqlService {
    /// The service over `log`'s streams and their `sql` projections.
    pub fn new(log: Log, projections: Projections, limits: Limits) -> SqlService {
        SqlService {
            served: Served::new(log, projections, NAME, Reader::open),
            limits,
        }
    }

    /// `stream`, if this node holds it and serves it to `caller`.
    pub fn held(&self, stream: StreamId, caller: Caller) -> Result<StreamId, Status> {
        self.served.held(stream, caller)
    }

    /// Runs one read-only statement on `stream`'s tables, once they include the log up to
    /// `after_seq`.
    pub async fn query(
        &self,
        stream: StreamId,
        sql: String,
        params: Params,
        after_seq: u64,
    ) -> Result<Rows, Status> {
        if after_seq > 0 {
            self.served.wait(&stream, after_seq).await?;
        }
        let limits = self.limits;
        self.served
            .read(
                stream,
                move |reader: &mut Reader| reader.query(&sql, &params, limits),
                query_status,
            )
            .await
    }

    /// One page of list `name` of `stream` (see [`quire_projection_sql::Reader::window`]);
    /// `Ok(None)` when the schema in force declares no such list.
    pub async fn window(
        &self,
        stream: StreamId,
        name: String,
        page: u64,
        page_size: Option<u64>,
    ) -> Result<Option<Window>, Status> {
        let limits = self.limits;
        self.served
            .read(
                stream,
                move |reader: &mut Reader| reader.window(&name, page, page_size, limits),
                query_status,
            )
            .await
    }

    /// The lists `stream`'s schema in force declares.
    pub async fn lists(&self, stream: StreamId) -> Result<BTreeMap<String, List>, Status> {
        self.served
            .read(stream, |reader: &mut Reader| reader.lists(), query_status)
            .await
    }

    /// Appends a node-signed `record.add` of `record` (a JSON object with a string `_table`) to
    /// `stream`, computing the work token its policy asks for, and waits until this node's
    /// tables include it.
    pub async fn add_record(&self, stream: StreamId, record: Bytes) -> Result<Appended, Status> {
        match serde_json::from_slice::<serde_json::Value>(&record) {
            Err(error) => {
                return Err(Status::invalid_argument(format!(
                    "the record is not valid JSON: {error}"
                )))
            }
            Ok(serde_json::Value::Object(fields))
                if fields
                    .get("_table")
                    .is_some_and(serde_json::Value::is_string) => {}
            Ok(_) => {
                return Err(Status::invalid_argument(
                    "a record must be a JSON object with a string \"_table\" naming its table",
                ))
            }
        }
        self.served
            .append_applied(
                stream,
                Kind::RecordAdd,
                RECORD_CONTENT_TYPE,
                record,
                Vec::new(),
            )
            .await
    }

    /// Appends a node-signed `record.upvote` of `record` and waits until this node's tables
    /// include it. An author's repeated upvotes of one record count once in its score.
    pub async fn upvote(&self, stream: StreamId, record: ScribeId) -> Result<Appended, Status> {
        self.served
            .append_applied(
                stream,
                Kind::RecordUpvote,
                RECORD_CONTENT_TYPE,
                Bytes::new(),
                vec![record],
            )
            .await
    }
}

/// A SQL value from protobuf.
pub fn value_from_proto(value: pb::SqlValue) -> Value {
    use pb::sql_value::Value as V;
    match value.value {
        None | Some(V::Null(_)) => Value::Null,
        Some(V::Integer(i)) => Value::Integer(i),
        Some(V::Real(r)) => Value::Real(r),
        Some(V::Text(t)) => Value::Text(t),
        Some(V::Blob(b)) => Value::Blob(b.to_vec()),
    }
}

/// A SQL value as protobuf.
pub fn value_to_proto(value: Value) -> pb::SqlValue {
    use pb::sql_value::Value as V;
    pb::SqlValue {
        value: Some(match value {
            Value::Null => V::Null(true),
            Value::Integer(i) => V::Integer(i),
            Value::Real(r) => V::Real(r),
            Value::Text(t) => V::Text(t),
            Value::Blob(b) => V::Blob(Bytes::from(b)),
        }),
    }
}

/// A SQL value as JSON (the HTTP API's results): numbers, strings, null; blobs as hex.
pub fn value_to_json(value: Value) -> serde_json::Value {
    use serde_json::Value as Json;
    match value {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(i),
        Value::Real(r) => serde_json::Number::from_f64(r).map_or(Json::Null, Json::Number),
        Value::Text(t) => Json::String(t),
        Value::Blob(b) => Json::String(hex::encode(b)),
    }
}

#[tonic::async_trait]
impl pb::sql_server::Sql for SqlService {
    async fn query(
        &self,
        request: Request<pb::SqlQueryRequest>,
    ) -> Result<Response<pb::SqlQueryReply>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let stream = self.served.stream(&request.stream, caller)?;
        let params = match (request.params.is_empty(), request.named.is_empty()) {
            (_, true) => {
                Params::Positional(request.params.into_iter().map(value_from_proto).collect())
            }
            (true, false) => Params::Named(
                request
                    .named
                    .into_iter()
                    .map(|(name, value)| (name, value_from_proto(value)))
                    .collect(),
            ),
            (false, false) => {
                return Err(Status::invalid_argument(
                    "give positional `params` or `named` parameters, not both",
                ))
            }
        };
        let rows = SqlService::query(self, stream, request.sql, params, request.after_seq).await?;
        Ok(Response::new(pb::SqlQueryReply {
            columns: rows.columns,
            rows: rows
                .rows
                .into_iter()
                .map(|row| pb::SqlRow {
                    values: row.into_iter().map(value_to_proto).collect(),
                })
                .collect(),
            seq: rows.checkpoint,
        }))
    }
}
