//! The SQLite projection end to end: the flock HTTP API and gRPC `Sql` on real nodes, a schema
//! change remapping replicated records, full-text search, refused statements and both limits
//! leaving everything as it was, and a Python client over both protocols.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use quire::node::{NodeConfig, RunningNode};
use quire::pb;
use quire::projection_api::files::{FileChange, CONTENT_TYPE};
use quire::projection_api::StreamId;
use serde_json::{json, Value as Json};

use crate::common::*;
use crate::replication::CONVERGE;
use quire::api::access::AuthChannel;

/// POSTs `body` as JSON to `path` on `node`; returns the status and the JSON reply.
async fn post(node: &RunningNode, path: &str, body: Json) -> (u16, Json) {
    post_raw(node, path, "application/json", body.to_string()).await
}

async fn post_raw(node: &RunningNode, path: &str, content_type: &str, body: String) -> (u16, Json) {
    let reply = reqwest::Client::new()
        .post(format!("{}{path}", node.url()))
        .bearer_auth(node.token.as_str())
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("HTTP request");
    let status = reply.status().as_u16();
    assert_eq!(
        reply.headers()["content-type"],
        "application/json",
        "every reply is JSON"
    );
    (status, reply.json().await.expect("a JSON reply"))
}

async fn create_app(node: &RunningNode) -> String {
    let (status, reply) = post(node, "/create_app", json!({})).await;
    assert_eq!((status, &reply["success"]), (200, &json!(true)), "{reply}");
    reply["tid"].as_str().unwrap().to_string()
}

/// Publishes `schema` as the `_schema` file of `tid` through gRPC `Log.Append`.
async fn put_schema(
    node: &RunningNode,
    tid: &str,
    schema: &str,
) -> Result<pb::AppendReply, tonic::Status> {
    let (kind, payload) = FileChange::Put {
        path: "_schema".into(),
        content_type: "application/json".into(),
        data: schema.as_bytes().to_vec(),
    }
    .encode();
    let stream: StreamId = tid.parse().unwrap();
    clients(&node.url())
        .await
        .log
        .append(pb::AppendRequest {
            stream: bytes_of(&stream),
            kind: kind.to_string(),
            content_type: CONTENT_TYPE.into(),
            payload: Bytes::from(payload),
            parents: Vec::new(),
        })
        .await
        .map(|reply| reply.into_inner())
}

async fn query(node: &RunningNode, tid: &str, sql: &str, params: Json) -> (u16, Json) {
    post(
        node,
        &format!("/{tid}/query"),
        json!({"query": sql, "params": params}),
    )
    .await
}

async fn results(node: &RunningNode, tid: &str, sql: &str, params: Json) -> Json {
    let (status, reply) = query(node, tid, sql, params).await;
    assert_eq!(status, 200, "{sql}: {reply}");
    reply["results"].clone()
}

async fn sql_client(node: &RunningNode) -> pb::sql_client::SqlClient<AuthChannel> {
    pb::sql_client::SqlClient::new(owner_channel(&node.url()).await)
}

async fn digest(node: &RunningNode, tid: &str) -> Bytes {
    let channel = owner_channel(&node.url()).await;
    let reply = pb::projections_client::ProjectionsClient::new(channel)
        .digest(pb::DigestRequest {
            name: "sql".into(),
            stream: bytes_of(&tid.parse::<StreamId>().unwrap()),
        })
        .await
        .expect("digest")
        .into_inner();
    reply.digest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_an_app_and_a_new_schema_remaps_replicated_records() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let tid = create_app(&a).await;
    put_schema(&a, &tid, r#"{"schema": {"t": {"foo": "int"}}}"#)
        .await
        .unwrap();
    let (status, added) = post_raw(
        &a,
        &format!("/{tid}/add_record"),
        "application/json; charset=UTF-8",
        json!({"_table": "t", "foo": 10, "bar": "hello"}).to_string(),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let id = added["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 64, "ids are hex everywhere");
    // A's own write is in A's table when add_record answers.
    assert_eq!(
        results(&a, &tid, "SELECT id, foo FROM t", json!([])).await,
        json!([[id, 10]])
    );

    // B joins before it knows any peer that has the app (the flock order), then adds A.
    let (status, joined) = post(&b, &format!("/{tid}/join_app"), json!({})).await;
    assert_eq!(
        (status, &joined["success"]),
        (200, &json!(true)),
        "{joined}"
    );
    let port = a.peer_addr.unwrap().port();
    let (status, peered) = post(
        &b,
        &format!("/{tid}/add_peer"),
        json!({"addr": "127.0.0.1", "port": port}),
    )
    .await;
    assert_eq!(
        (status, &peered["success"]),
        (200, &json!(true)),
        "{peered}"
    );
    wait_until(CONVERGE, "B's table holds A's record", || async {
        let (status, reply) = query(&b, &tid, "SELECT id, foo FROM t", json!([])).await;
        status == 200 && reply["results"] == json!([[id, 10]])
    })
    .await;

    // A new schema adds `bar` and an index: B remaps the record it already holds.
    put_schema(
        &a,
        &tid,
        r#"{"schema": {"t": {"foo": "int", "bar": "text"}}, "indexes": [["t", "bar"], ["t", "foo", "bar"]]}"#,
    )
    .await
    .unwrap();
    wait_until(
        CONVERGE,
        "B remaps the record under the new schema",
        || async {
            let (status, reply) =
                query(&b, &tid, "SELECT bar FROM t WHERE foo = ?", json!([10])).await;
            status == 200 && reply["results"] == json!([["hello"]])
        },
    )
    .await;
    let plan = results(
        &b,
        &tid,
        "EXPLAIN QUERY PLAN SELECT bar FROM t WHERE bar = ?",
        json!(["x"]),
    )
    .await;
    assert!(
        plan.to_string().contains("INDEX"),
        "the schema's index is used: {plan}"
    );
    // Named parameters work too, with or without the prefix.
    assert_eq!(
        results(
            &b,
            &tid,
            "SELECT foo FROM t WHERE bar = :bar",
            json!({"bar": "hello"})
        )
        .await,
        json!([[10]])
    );
    wait_until(CONVERGE, "equal digests", || async {
        digest(&a, &tid).await == digest(&b, &tid).await
    })
    .await;
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fulltext_search_finds_the_right_rows_ranked_over_http_and_grpc() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let tid = create_app(&node).await;
    put_schema(
        &node,
        &tid,
        r#"{"schema": {"posts": {"title": "fulltext", "body": "fulltext", "author": "text"}}, "indexes": [["posts", "author"]]}"#,
    )
    .await
    .unwrap();
    let mut ids = Vec::new();
    for (title, body) in [
        (
            "a haystack",
            "nothing to see in this long body of text about hay and more hay",
        ),
        ("needle needle", "the needle is here"),
        (
            "straw",
            "one needle hidden among a great deal of straw and hay and words",
        ),
    ] {
        let (status, added) = post(
            &node,
            &format!("/{tid}/add_record"),
            json!({"_table": "posts", "title": title, "body": body, "author": "ann"}),
        )
        .await;
        assert_eq!(status, 200, "{added}");
        ids.push(added["id"].as_str().unwrap().to_string());
    }
    let sql = "SELECT id FROM posts_fts WHERE posts_fts MATCH 'needle' ORDER BY rank";
    assert_eq!(
        results(&node, &tid, sql, json!([])).await,
        json!([[ids[1]], [ids[2]]])
    );
    let reply = sql_client(&node)
        .await
        .query(pb::SqlQueryRequest {
            stream: bytes_of(&tid.parse().unwrap()),
            sql: "SELECT p.author, count(*) FROM posts p JOIN posts_fts f ON f.rowid = p.rowid WHERE posts_fts MATCH ? GROUP BY p.author".into(),
            params: vec![pb::SqlValue { value: Some(pb::sql_value::Value::Text("hay".into())) }],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.columns, vec!["author", "count(*)"]);
    assert_eq!(
        reply.rows[0].values,
        vec![
            pb::SqlValue {
                value: Some(pb::sql_value::Value::Text("ann".into()))
            },
            pb::SqlValue {
                value: Some(pb::sql_value::Value::Integer(2))
            },
        ]
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_statements_limits_and_bad_requests_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = NodeConfig::new(dir.path());
    config.sql_limits = quire::api::sql::Limits {
        time: Duration::from_millis(300),
        rows: 5,
    };
    let node = start_config(config, false).await;
    let tid = create_app(&node).await;
    put_schema(&node, &tid, r#"{"schema": {"t": {"foo": "int"}}}"#)
        .await
        .unwrap();
    for n in 0..3 {
        let (status, _) = post(
            &node,
            &format!("/{tid}/add_record"),
            json!({"_table": "t", "foo": n}),
        )
        .await;
        assert_eq!(status, 200);
    }
    let mut admin = clients(&node.url()).await;
    let held = head(&mut admin).await;
    let before = digest(&node, &tid).await;
    let mut grpc = sql_client(&node).await;
    let stream = bytes_of(&tid.parse().unwrap());
    let endless =
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n";
    let six = "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 6) SELECT i FROM n";
    for (sql, http, code, says) in [
        (
            "INSERT INTO t (id, timestamp, score, foo) VALUES ('x', 1, 0, 1)",
            403,
            tonic::Code::PermissionDenied,
            "INSERT into t is refused",
        ),
        (
            "UPDATE t SET foo = 1",
            403,
            tonic::Code::PermissionDenied,
            "UPDATE of t is refused",
        ),
        (
            "DELETE FROM t",
            403,
            tonic::Code::PermissionDenied,
            "DELETE from t is refused",
        ),
        (
            "DROP TABLE t",
            403,
            tonic::Code::PermissionDenied,
            "changing the database schema",
        ),
        (
            "CREATE TABLE u (a)",
            403,
            tonic::Code::PermissionDenied,
            "changing the database schema",
        ),
        (
            "ATTACH DATABASE '/tmp/other.db' AS other",
            403,
            tonic::Code::PermissionDenied,
            "ATTACH is refused",
        ),
        (
            "PRAGMA journal_mode = DELETE",
            403,
            tonic::Code::PermissionDenied,
            "PRAGMA journal_mode is refused",
        ),
        (
            "SELECT load_extension('/tmp/x.so')",
            403,
            tonic::Code::PermissionDenied,
            "load_extension is refused",
        ),
        (
            "SELECT 1; DELETE FROM t",
            403,
            tonic::Code::PermissionDenied,
            "more than one statement",
        ),
        (
            "SELEKT 1",
            400,
            tonic::Code::InvalidArgument,
            "syntax error",
        ),
        (
            "SELECT * FROM nope",
            400,
            tonic::Code::InvalidArgument,
            "no such table: nope (this stream's tables: [\"t\"])",
        ),
        (
            endless,
            504,
            tonic::Code::DeadlineExceeded,
            "time limit of 300 ms",
        ),
        (six, 413, tonic::Code::ResourceExhausted, "more than 5 rows"),
    ] {
        let (status, reply) = query(&node, &tid, sql, json!([])).await;
        assert_eq!(status, http, "{sql}: {reply}");
        assert_eq!(reply["success"], json!(false));
        assert!(
            reply["error"].as_str().unwrap().contains(says),
            "{sql}: {reply}"
        );
        let error = grpc
            .query(pb::SqlQueryRequest {
                stream: stream.clone(),
                sql: sql.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(error.code(), code, "{sql}: {error:?}");
        assert!(error.message().contains(says), "{sql}: {error:?}");
    }
    // Bad requests: wrong content type, bad JSON, not a record, unknown app, unknown endpoint.
    let unknown = "ab".repeat(32);
    for (path, content_type, body, http, says) in [
        (
            format!("/{tid}/query"),
            "text/plain",
            r#"{"query": "SELECT 1"}"#.to_string(),
            415,
            "Content-Type: application/json",
        ),
        (
            format!("/{tid}/query"),
            "application/json",
            "{".to_string(),
            400,
            "not valid JSON",
        ),
        (
            format!("/{tid}/query"),
            "application/json",
            r#"{"query": 1}"#.to_string(),
            400,
            "give \"query\"",
        ),
        (
            format!("/{tid}/query"),
            "application/json",
            r#"{"query": "SELECT ?", "params": 3}"#.to_string(),
            400,
            "\"params\" must be",
        ),
        (
            format!("/{tid}/add_record"),
            "application/json",
            "[1, 2]".to_string(),
            400,
            "JSON object with a string \"_table\"",
        ),
        (
            format!("/{tid}/add_record"),
            "application/json",
            "{".to_string(),
            400,
            "the record is not valid JSON",
        ),
        (
            format!("/{tid}/add_record"),
            "application/json",
            r#"{"foo": 1}"#.to_string(),
            400,
            "JSON object with a string \"_table\"",
        ),
        (
            format!("/{tid}/add_record"),
            "text/plain",
            r#"{"_table": "t"}"#.to_string(),
            415,
            "Content-Type",
        ),
        (
            format!("/{unknown}/add_record"),
            "application/json",
            r#"{"_table": "t"}"#.to_string(),
            404,
            "not held by this node",
        ),
        (
            format!("/{unknown}/query"),
            "application/json",
            r#"{"query": "SELECT 1"}"#.to_string(),
            404,
            "not held by this node",
        ),
        (
            "/nope/query".to_string(),
            "application/json",
            r#"{"query": "SELECT 1"}"#.to_string(),
            404,
            "unknown app",
        ),
        (
            "/nothing/here/at/all".to_string(),
            "application/json",
            "{}".to_string(),
            404,
            "no such endpoint",
        ),
        (
            format!("/{tid}/add_peer"),
            "application/json",
            r#"{"port": 7000}"#.to_string(),
            400,
            "give \"addr\"",
        ),
    ] {
        let (status, reply) = post_raw(&node, &path, content_type, body.clone()).await;
        assert_eq!(status, http, "{path} {body}: {reply}");
        assert!(
            reply["error"].as_str().unwrap().contains(says),
            "{path} {body}: {reply}"
        );
    }
    // An upvote must name exactly one record.
    let orphan = admin
        .log
        .append(pb::AppendRequest {
            stream: stream.clone(),
            kind: "record.upvote".into(),
            content_type: "application/json".into(),
            payload: Bytes::new(),
            parents: Vec::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(orphan.code(), tonic::Code::InvalidArgument);
    assert!(orphan.message().contains("one parent"), "{orphan:?}");
    // An answer over the size limit is refused.
    let (status, reply) = query(&node, &tid, "SELECT zeroblob(40000000)", json!([])).await;
    assert_eq!(status, 413, "{reply}");
    // An invalid schema is refused when it is put, naming the problem.
    let refused = put_schema(&node, &tid, r#"{"schema": {"t": {"foo": "blob"}}}"#)
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused.message().contains("has type \"blob\""),
        "{refused:?}"
    );
    // Nothing above wrote a scribe or changed a table.
    assert_eq!(head(&mut admin).await, held);
    assert_eq!(digest(&node, &tid).await, before);
    assert_eq!(
        results(&node, &tid, "SELECT count(*) FROM t", json!([])).await,
        json!([[3]])
    );
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_and_work_tokens_of_the_policy_hold_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut admin = clients(&node.url()).await;
    // A small per-scribe limit: a record over it is 413 and stores nothing.
    let small = create_stream(
        &mut admin,
        "small",
        Some(pb::Policy {
            max_file_bytes: 100,
            ..Default::default()
        }),
    )
    .await
    .to_hex();
    let before = head(&mut admin).await;
    let (status, reply) = post(
        &node,
        &format!("/{small}/add_record"),
        json!({"_table": "t", "text": "x".repeat(200)}),
    )
    .await;
    assert_eq!(status, 413, "{reply}");
    assert!(
        reply["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 100 bytes"),
        "{reply}"
    );
    assert_eq!(head(&mut admin).await, before);
    // A stream asking for a work token: the node computes it when it signs for the client.
    let (status, created) = post(
        &node,
        "/create_app",
        json!({"name": "spam-proof", "work_bits": 12}),
    )
    .await;
    assert_eq!(status, 200, "{created}");
    let tid = created["tid"].as_str().unwrap();
    let (status, added) = post(
        &node,
        &format!("/{tid}/add_record"),
        json!({"_table": "t", "n": 1}),
    )
    .await;
    assert_eq!(status, 200, "{added}");
    let id: StreamId = added["id"].as_str().unwrap().parse().unwrap();
    let entry = admin
        .log
        .get(pb::GetScribeRequest { id: bytes_of(&id) })
        .await
        .unwrap()
        .into_inner();
    let scribe = quire::scribe::Scribe::decode(entry_parts(&entry)).unwrap();
    let zero_bits = quire::scribe::leading_zero_bits(scribe.id.as_bytes());
    assert!(
        zero_bits >= 12,
        "the node computed a 12-bit work token: {zero_bits} bits"
    );
    let (status, reply) = post(&node, "/create_app", json!({"work_bits": "lots"})).await;
    assert_eq!(status, 400, "{reply}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_client_queries_over_grpc_and_http() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let stubs = crate::python::python_stubs(root);
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stdout = crate::python::run_script(root, &stubs, "tests/python/sql_client.py", &node).await;
    assert!(stdout.contains("python sql ok"), "{stdout}");
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_over_64_kib_is_refused_when_it_is_put() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let tid = create_app(&node).await;
    let head = node.log.head();
    // Valid JSON and a valid schema, padded past the limit.
    let big = format!(
        r#"{{"schema": {{"t": {{"a": "text"}}}}, "lists": {{}}}}{}"#,
        " ".repeat(64 * 1024)
    );
    let refused = put_schema(&node, &tid, &big).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("at most 65536"), "{refused:?}");
    assert_eq!(node.log.head(), head);
    put_schema(&node, &tid, big.trim_end()).await.unwrap();
    node.stop().await.unwrap();
}
