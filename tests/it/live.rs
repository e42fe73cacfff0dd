//! The live binding (`src/api/live.rs`): django-socksync's protocol over a WebSocket, end to end
//! against real nodes. Every dispatch path and error frame; vars pushed on every change of their
//! kv key; list windows kept exact through random inserts, upvotes and schema changes (a
//! proptest against one node, checked against SQL run independently of the binding); a record
//! and a kv write made on another node reaching a subscriber; a client that stops reading; and
//! who may open the socket (owner, anyone, an app's own page, a foreign page).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestRunner};
use quire::api::live;
use quire::node::RunningNode;
use quire::pb;
use quire::projection_api::{AuthorKey, ScribeId, StreamId};
use quire::scribe::{Body, Scribe};
use serde_json::{json, Value as Json};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::common::*;
use crate::replication::{connect, join};
use crate::ws::*;

/// A stream of messages with one list, `latest`, five rows a page.
const BOARD: &str = r#"{"schema": {"message": {"author": "text", "text": "fulltext"}},
    "lists": {"latest": {"query": "SELECT id, author, text, timestamp FROM message ORDER BY timestamp DESC, id", "page_size": 5}}}"#;

// ---------------------------------------------------------------------------------------------
// Connections (the shared client is `tests/it/ws.rs`).

impl Live {
    /// Calls function `name` (already subscribed) and returns the `return` frame's value (exactly
    /// its five keys); frames of other groups that arrive meanwhile are returned too.
    async fn call(&mut self, name: &str, id: &str, args: Json) -> (Json, Vec<Json>) {
        let (frame, others) = self.call_frames(name, id, args).await;
        let frame = frame.unwrap_or_else(|frame| panic!("call {id} of {name} failed: {frame}"));
        assert_eq!(
            keys(&frame),
            ["func", "id", "name", "type", "value"],
            "{frame}"
        );
        assert_eq!(
            (&frame["type"], &frame["name"]),
            (&json!("function"), &json!(name))
        );
        (frame["value"].clone(), others)
    }

    /// Subscribes list `name` and gets page `page` (`page_size` if given): the `set_all`.
    async fn watch_list(&mut self, name: &str, page: u64, page_size: Option<u64>) -> Page {
        self.subscribe("list", name).await;
        let frame = self.ask(get_list(name, page, page_size)).await;
        let mut model = Page::default();
        model.apply(&frame).unwrap_or_else(|e| panic!("{e}"));
        model
    }
}

/// A `get` of a list page.
fn get_list(name: &str, page: u64, page_size: Option<u64>) -> Json {
    match page_size {
        Some(size) => {
            json!({"func": "get", "type": "list", "name": name, "page": page, "page_size": size})
        }
        None => json!({"func": "get", "type": "list", "name": name, "page": page}),
    }
}

/// A frame's keys, sorted.
fn keys(frame: &Json) -> Vec<String> {
    let mut keys: Vec<String> = frame
        .as_object()
        .unwrap_or_else(|| panic!("a frame is an object: {frame}"))
        .keys()
        .cloned()
        .collect();
    keys.sort();
    keys
}

/// Asserts `frame` is error 8 whose message starts with `prefix` and says more after it.
fn assert_failed(frame: &Json, prefix: &str) -> String {
    assert_eq!(keys(frame), ["error_code", "func", "message"], "{frame}");
    assert_eq!(
        (&frame["func"], &frame["error_code"]),
        (&json!("error"), &json!(8)),
        "{frame}"
    );
    let message = frame["message"].as_str().unwrap();
    assert!(
        message.starts_with(prefix) && message.len() > prefix.len(),
        "{message:?} should start with {prefix:?}"
    );
    message.to_string()
}

// ---------------------------------------------------------------------------------------------
// The client's model of a list page, and the truth it must reach.

/// One page of a list as a socksync client holds it.
#[derive(Debug, Clone, PartialEq, Default)]
struct Page {
    page: u64,
    page_size: u64,
    total: u64,
    items: Vec<Json>,
}

impl Page {
    /// Applies one server frame as django-socksync's client does: `set_all` replaces
    /// everything, `set_count` the total, `insert` / `delete` / `set` edit the items only. A
    /// frame with other keys, an index out of range or an error frame is an `Err`.
    fn apply(&mut self, frame: &Json) -> Result<(), String> {
        let func = frame["func"].as_str().unwrap_or_default();
        let expected: &[&str] = match func {
            "set_all" => &[
                "func",
                "items",
                "name",
                "page",
                "page_size",
                "total_item_count",
                "type",
            ],
            "set_count" => &["func", "name", "total_item_count", "type"],
            "insert" | "set" => &["func", "index", "name", "type", "value"],
            "delete" => &["func", "index", "name", "type"],
            _ => return Err(format!("not a list frame: {frame}")),
        };
        if keys(frame) != expected || frame["type"] != "list" {
            return Err(format!("a {func} frame has the keys {expected:?}: {frame}"));
        }
        let index = frame["index"].as_u64().map(|i| i as usize);
        let len = self.items.len();
        match func {
            "set_all" => {
                *self = Page {
                    page: frame["page"].as_u64().ok_or("page")?,
                    page_size: frame["page_size"].as_u64().ok_or("page_size")?,
                    total: frame["total_item_count"].as_u64().ok_or("total")?,
                    items: frame["items"].as_array().ok_or("items")?.clone(),
                }
            }
            "set_count" => self.total = frame["total_item_count"].as_u64().ok_or("total")?,
            "insert" => match index {
                Some(i) if i <= len => self.items.insert(i, frame["value"].clone()),
                _ => return Err(format!("insert out of range of {len} items: {frame}")),
            },
            "delete" => match index {
                Some(i) if i < len => {
                    self.items.remove(i);
                }
                _ => return Err(format!("delete out of range of {len} items: {frame}")),
            },
            _ => match index {
                Some(i) if i < len => self.items[i] = frame["value"].clone(),
                _ => return Err(format!("set out of range of {len} items: {frame}")),
            },
        }
        Ok(())
    }
}

/// A list as `_schema` declares it.
#[derive(Debug, Clone)]
struct ListDef {
    name: &'static str,
    query: String,
    page_size: u64,
}

/// A `_schema` of table `message` and these lists.
fn schema_with(fields: Json, lists: &[ListDef]) -> String {
    let lists: serde_json::Map<String, Json> = lists
        .iter()
        .map(|l| {
            (
                l.name.to_string(),
                json!({"query": l.query, "page_size": l.page_size}),
            )
        })
        .collect();
    json!({"schema": {"message": fields}, "lists": lists}).to_string()
}

/// Runs `query` through the HTTP query action (anyone may), once the tables include the log up
/// to `after_seq`: columns and rows.
async fn sql(
    node: &RunningNode,
    stream: &StreamId,
    query: &str,
    after_seq: u64,
) -> (Vec<String>, Vec<Vec<Json>>) {
    let (status, reply) = post(
        node,
        stream,
        "query",
        false,
        json!({"query": query, "after_seq": after_seq}),
    )
    .await;
    assert_eq!(status, 200, "{query}: {reply}");
    let columns = serde_json::from_value(reply["columns"].clone()).unwrap();
    let rows = serde_json::from_value(reply["results"].clone()).unwrap();
    (columns, rows)
}

/// The page a client asking `get {page, page_size: asked}` of `list` must end up holding,
/// computed by plain SQL over HTTP, independently of the live binding.
async fn truth(
    node: &RunningNode,
    stream: &StreamId,
    list: &ListDef,
    page: u64,
    asked: Option<u64>,
    after_seq: u64,
) -> Page {
    let page_size = asked.unwrap_or(list.page_size).clamp(1, list.page_size);
    let (_, count) = sql(
        node,
        stream,
        &format!("SELECT count(*) FROM ({})", list.query),
        after_seq,
    )
    .await;
    let (columns, rows) = sql(
        node,
        stream,
        &format!(
            "SELECT * FROM ({}) LIMIT {page_size} OFFSET {}",
            list.query,
            page * page_size
        ),
        after_seq,
    )
    .await;
    Page {
        page,
        page_size,
        total: count[0][0].as_u64().unwrap(),
        items: rows
            .into_iter()
            .map(|row| Json::Object(columns.iter().cloned().zip(row).collect()))
            .collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// Records.

/// An upvote of `record` signed by client key `seed` (another author than the node): its seq.
async fn signed_upvote(node: &RunningNode, stream: &StreamId, record: &str, seed: u8) -> u64 {
    let key = client_key(seed);
    let scribe = Scribe::sign(
        Body {
            stream: Some(*stream),
            author: AuthorKey(key.verifying_key().to_bytes()),
            hlc: node.log.clock().now(),
            kind: "record.upvote".parse().unwrap(),
            content_type: "application/json".into(),
            payload: Bytes::new(),
            parents: vec![ScribeId::from_slice(&hex::decode(record).unwrap()).unwrap()],
            membership: None,
            nonce: 0,
        },
        &key,
    );
    clients(&node.url())
        .await
        .log
        .append_signed(signed_request(scribe.parts()))
        .await
        .expect("a client's upvote is admitted")
        .into_inner()
        .seq
}

// ---------------------------------------------------------------------------------------------
// 1. Dispatch.

/// Pins django-socksync's dispatch order and every error frame, frame by frame: each reply is
/// exactly `{func: "error", error_code, message}` with the code and message of the step that
/// refused it (7 not JSON, 1 no func / func not valid for the group / no subscription, 2 no or
/// unknown type, 3 no or unknown name, 4 call without id, 8 a failed call or bad get); frames
/// that get no reply (`subscribe`, a client's `error`, `unsubscribe_all`) get none; calls
/// return `{func: "return", type, name, id, value}` matched by id, even when many run at once;
/// a frame over the size limit closes the connection; a connection holds at most
/// `MAX_SUBSCRIPTIONS` subscriptions (error 8 beyond); stopping the node closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dispatch_path_answers_the_exact_frame() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "dispatch", BOARD, None).await;
    let mut anyone = open(&node, &stream, false).await;

    // Not JSON: as text, as binary (garbage and invalid UTF-8 alike).
    assert_eq!(anyone.ask(json!("x")).await, error(1, "func is required."));
    anyone.raw(Message::Text("not json {".into())).await;
    assert_eq!(anyone.next().await, error(7, "Invalid json."));
    anyone
        .raw(Message::Binary(vec![0xff, 0x00, 0x13, 0x37]))
        .await;
    assert_eq!(anyone.next().await, error(7, "Invalid json."));
    // A binary frame that holds JSON is read like text.
    anyone
        .raw(Message::Binary(br#"{"func": "get"}"#.to_vec()))
        .await;
    assert_eq!(anyone.next().await, error(2, "type is required."));
    // JSON, but not an object with a func.
    assert_eq!(
        anyone.ask(json!([1, 2])).await,
        error(1, "func is required.")
    );
    assert_eq!(anyone.ask(json!({})).await, error(1, "func is required."));
    assert_eq!(
        anyone.ask(json!({"type": "var", "name": "motd"})).await,
        error(1, "func is required.")
    );
    // A client's error frame and unsubscribe_all get no answer, whatever else they hold.
    anyone
        .silent(json!({"func": "error", "error_code": 1, "message": "client side"}))
        .await;
    anyone
        .silent(json!({"func": "unsubscribe_all", "type": "bogus"}))
        .await;
    // type before name, name before the type's validity.
    assert_eq!(
        anyone.ask(json!({"func": "get"})).await,
        error(2, "type is required.")
    );
    assert_eq!(
        anyone.ask(json!({"func": "get", "name": "motd"})).await,
        error(2, "type is required.")
    );
    assert_eq!(
        anyone.ask(json!({"func": "get", "type": "var"})).await,
        error(3, "name is required.")
    );
    assert_eq!(
        anyone.ask(json!({"func": "get", "type": "table"})).await,
        error(3, "name is required.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": "table", "name": "x"}))
            .await,
        error(2, "table is not a valid type.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": 5, "name": "x"}))
            .await,
        error(2, "5 is not a valid type.")
    );
    // Unknown names, before the func is checked against the group.
    assert_eq!(
        anyone
            .ask(json!({"func": "subscribe", "type": "list", "name": "nope"}))
            .await,
        error(3, "nope is not registered.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "set", "type": "list", "name": "nope"}))
            .await,
        error(3, "nope is not registered.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "subscribe", "type": "list", "name": 7}))
            .await,
        error(3, "7 is not registered.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "call", "type": "function", "name": "drop_table", "id": "1"}))
            .await,
        error(3, "drop_table is not registered.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "subscribe", "type": "var", "name": ""}))
            .await,
        error(3, " is not registered.")
    );
    let long_key = "k".repeat(1025);
    assert_eq!(
        anyone
            .ask(json!({"func": "subscribe", "type": "var", "name": long_key}))
            .await,
        error(3, &format!("{long_key} is not registered."))
    );
    // Funcs a group does not take.
    assert_eq!(
        anyone
            .ask(json!({"func": "set", "type": "var", "name": "motd"}))
            .await,
        error(1, "set is not valid for this group.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "frobnicate", "type": "var", "name": "motd"}))
            .await,
        error(1, "frobnicate is not valid for this group.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "call", "type": "list", "name": "latest"}))
            .await,
        error(1, "call is not valid for this group.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": "function", "name": "query"}))
            .await,
        error(1, "get is not valid for this group.")
    );
    // Everything but subscribe needs a subscription.
    for frame in [
        get_list("latest", 0, None),
        json!({"func": "unsubscribe", "type": "list", "name": "latest"}),
        json!({"func": "get", "type": "var", "name": "motd"}),
        json!({"func": "unsubscribe", "type": "var", "name": "motd"}),
        json!({"func": "call", "type": "function", "name": "query", "id": "q0"}),
        json!({"func": "unsubscribe", "type": "function", "name": "query"}),
    ] {
        assert_eq!(anyone.ask(frame).await, error(1, "Subscription required."));
    }
    // A call needs an id (checked after the subscription).
    anyone.subscribe("function", "query").await;
    anyone.subscribe("function", "query").await; // twice: still no answer
    assert_eq!(
        anyone
            .ask(json!({"func": "call", "type": "function", "name": "query", "args": {"query": "SELECT 1"}}))
            .await,
        error(4, "id is required.")
    );
    // Anyone may query, not write.
    anyone.subscribe("function", "add_record").await;
    let refused = anyone
        .ask(
            json!({"func": "call", "type": "function", "name": "add_record", "id": "a1",
                    "args": {"_table": "message", "author": "eve", "text": "hi"}}),
        )
        .await;
    let message = assert_failed(&refused, "call a1 of add_record failed: ");
    assert!(message.contains("token"), "{message}");
    // A numeric id comes back as sent, and names the call in a failure.
    let refused = anyone
        .ask(json!({"func": "call", "type": "function", "name": "add_record", "id": 7, "args": {}}))
        .await;
    assert_failed(&refused, "call 7 of add_record failed: ");

    // The owner's call adds a record: its id and seq come back.
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "add_record").await;
    let (value, others) = owner
        .call(
            "add_record",
            "first",
            json!({"_table": "message", "author": "ann", "text": "hello"}),
        )
        .await;
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(keys(&value), ["id", "seq"], "{value}");
    let id = value["id"].as_str().unwrap();
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    // Which a query, by anyone, sees.
    let (value, _) = anyone
        .call(
            "query",
            "q1",
            json!({"query": "SELECT id, author FROM message", "after_seq": value["seq"]}),
        )
        .await;
    assert_eq!(keys(&value), ["columns", "results", "seq"], "{value}");
    assert_eq!(value["columns"], json!(["id", "author"]));
    assert_eq!(value["results"], json!([[id, "ann"]]));
    // A failing query is error 8, naming the call.
    let failed = anyone
        .ask(
            json!({"func": "call", "type": "function", "name": "query", "id": "q2",
                    "args": {"query": "DELETE FROM message"}}),
        )
        .await;
    assert_failed(&failed, "call q2 of query failed: ");
    // Many calls at once: each id answered once.
    for n in 0..20 {
        anyone
            .send(
                json!({"func": "call", "type": "function", "name": "query", "id": format!("m{n}"),
                         "args": {"query": format!("SELECT {n} AS n")}}),
            )
            .await;
    }
    let mut answered = BTreeSet::new();
    for _ in 0..20 {
        let frame = anyone.next().await;
        assert_eq!(frame["func"], "return", "{frame}");
        let n: u64 = frame["id"].as_str().unwrap()[1..].parse().unwrap();
        assert_eq!(frame["value"]["results"], json!([[n]]), "{frame}");
        assert!(answered.insert(n), "{frame} answered twice");
    }

    // Lists: get after subscribe is set_all; bad pages are error 8; a page past the end is empty.
    anyone.subscribe("list", "latest").await;
    let all = anyone.ask(get_list("latest", 0, None)).await;
    assert_eq!(
        keys(&all),
        [
            "func",
            "items",
            "name",
            "page",
            "page_size",
            "total_item_count",
            "type"
        ]
    );
    assert_eq!(
        (&all["func"], &all["type"], &all["name"]),
        (&json!("set_all"), &json!("list"), &json!("latest"))
    );
    assert_eq!(
        (&all["page"], &all["page_size"], &all["total_item_count"]),
        (&json!(0), &json!(5), &json!(1))
    );
    assert_eq!(all["items"][0]["author"], "ann");
    assert_eq!(
        keys(&all["items"][0]),
        ["author", "id", "text", "timestamp"]
    );
    let past = anyone
        .ask(
            json!({"func": "get", "type": "list", "name": "latest", "page": "3", "page_size": "2"}),
        )
        .await;
    assert_eq!(
        (
            &past["page"],
            &past["page_size"],
            &past["total_item_count"],
            &past["items"]
        ),
        (&json!(3), &json!(2), &json!(1), &json!([]))
    );
    // A page size over the list's is clamped to it.
    let clamped = anyone.ask(get_list("latest", 0, Some(1000))).await;
    assert_eq!(clamped["page_size"], 5, "{clamped}");
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": "list", "name": "latest", "page": "x"}))
            .await,
        error(8, "page must be a whole number (from 0)")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": "list", "name": "latest", "page": -1}))
            .await,
        error(8, "page must be a whole number (from 0)")
    );
    assert_eq!(
        anyone.ask(get_list("latest", 0, Some(0))).await,
        error(8, "page_size must be a whole number from 1")
    );
    // unsubscribe ends one subscription; unsubscribe_all every one.
    anyone
        .silent(json!({"func": "unsubscribe", "type": "list", "name": "latest"}))
        .await;
    assert_eq!(
        anyone.ask(get_list("latest", 0, None)).await,
        error(1, "Subscription required.")
    );
    anyone.subscribe("list", "latest").await;
    anyone.subscribe("var", "motd").await;
    anyone.silent(json!({"func": "unsubscribe_all"})).await;
    assert_eq!(
        anyone.ask(get_list("latest", 0, None)).await,
        error(1, "Subscription required.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "get", "type": "var", "name": "motd"}))
            .await,
        error(1, "Subscription required.")
    );
    assert_eq!(
        anyone
            .ask(json!({"func": "call", "type": "function", "name": "query", "id": "q3", "args": {"query": "SELECT 1"}}))
            .await,
        error(1, "Subscription required.")
    );

    // A frame over the limit closes the connection.
    let huge = "x".repeat(live::MAX_FRAME + 1);
    anyone
        .raw(Message::Text(
            json!({"func": "get", "type": "var", "name": huge}).to_string(),
        ))
        .await;
    match anyone.event(WAIT).await {
        Event::Closed(_) => {}
        other => panic!(
            "a frame over {} bytes closes the connection, got {other:?}",
            live::MAX_FRAME
        ),
    }
    // The node still serves others.
    let mut again = open(&node, &stream, false).await;
    again.subscribe("var", "motd").await;
    // At most MAX_SUBSCRIPTIONS on one connection; one already held is no error.
    for n in 1..live::MAX_SUBSCRIPTIONS {
        again
            .send(json!({"func": "subscribe", "type": "var", "name": format!("k{n}")}))
            .await;
    }
    let limit = format!(
        "a connection may hold at most {} subscriptions; unsubscribe from some first",
        live::MAX_SUBSCRIPTIONS
    );
    assert_eq!(
        again
            .ask(json!({"func": "subscribe", "type": "var", "name": "one_more"}))
            .await,
        error(8, &limit)
    );
    again.subscribe("var", "motd").await;
    again
        .silent(json!({"func": "unsubscribe", "type": "var", "name": "k1"}))
        .await;
    again.subscribe("var", "one_more").await;
    // Stopping the node closes the connection.
    node.stop().await.unwrap();
    match again.event(WAIT).await {
        Event::Closed(_) => {}
        other => panic!("the node stopped: the connection closes, got {other:?}"),
    }
}

/// Pins the failure of a call whose `args` is not an object: it is a failed call like any other,
/// error 8 with "call <id> of <name> failed: ...", the form the browser client
/// (`socksync.js`) matches to reject the call's promise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_args_that_are_not_an_object_fails_like_any_call() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "args", BOARD, None).await;
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "add_record").await;
    let failed = owner
        .ask(json!({"func": "call", "type": "function", "name": "add_record", "id": "c1", "args": [1, 2]}))
        .await;
    assert_failed(&failed, "call c1 of add_record failed: ");
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 2. Vars.

/// Pins vars: a var is a kv key; `get` of an unset key is `set` null; every later change of the
/// key, by this connection or any other writer (a `kv_set` call on another connection, gRPC
/// `Kv.Set`), is pushed as `set` with the value parsed as JSON (text that is not JSON as a
/// string); `kv_delete` pushes null; a change of another key pushes nothing; after
/// `unsubscribe` nothing is pushed; anyone may watch but not write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_var_is_pushed_on_every_change_of_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "vars", BOARD, None).await;
    let set = |value: Json| json!({"func": "set", "type": "var", "name": "motd", "value": value});
    let get = json!({"func": "get", "type": "var", "name": "motd"});

    let mut watcher = open(&node, &stream, false).await;
    watcher.subscribe("var", "motd").await;
    assert_eq!(watcher.ask(get.clone()).await, set(Json::Null));
    let mut writer = open(&node, &stream, true).await;
    for function in ["kv_set", "kv_delete"] {
        writer.subscribe("function", function).await;
    }
    writer.subscribe("var", "motd").await;
    assert_eq!(writer.ask(get.clone()).await, set(Json::Null));

    // The writer's own call: both connections are told.
    let value = json!({"text": "hello", "n": [1, 2.5, null]});
    let (reply, others) = writer
        .call("kv_set", "s1", json!({"key": "motd", "value": value}))
        .await;
    assert_eq!(keys(&reply), ["fence", "id", "seq"], "{reply}");
    let mine = match others.as_slice() {
        [pushed] => pushed.clone(),
        [] => writer.next().await,
        more => panic!("one push, not {more:?}"),
    };
    assert_eq!(mine, set(value.clone()));
    assert_eq!(watcher.next().await, set(value.clone()));
    // A get sends the current value again, changed or not.
    assert_eq!(watcher.ask(get.clone()).await, set(value.clone()));

    // Another key's change pushes nothing: the next frame is motd's.
    writer
        .call("kv_set", "s2", json!({"key": "other", "value": 1}))
        .await;
    let (_, others) = writer
        .call(
            "kv_set",
            "s3",
            json!({"key": "motd", "value": "plain string"}),
        )
        .await;
    assert_eq!(watcher.next().await, set(json!("plain string")));
    if others.is_empty() {
        assert_eq!(writer.next().await, set(json!("plain string")));
    }

    // A writer on another API (gRPC), with bytes that are not JSON: pushed as text.
    let mut kv = pb::kv_client::KvClient::new(owner_channel(&node.url()).await);
    kv.set(pb::KvSetRequest {
        stream: bytes_of(&stream),
        key: Bytes::from_static(b"motd"),
        value: Bytes::from_static(b"not json {"),
    })
    .await
    .unwrap();
    assert_eq!(watcher.next().await, set(json!("not json {")));
    assert_eq!(writer.next().await, set(json!("not json {")));
    // JSON bytes are parsed.
    kv.set(pb::KvSetRequest {
        stream: bytes_of(&stream),
        key: Bytes::from_static(b"motd"),
        value: Bytes::from_static(b"[true, 3]"),
    })
    .await
    .unwrap();
    assert_eq!(watcher.next().await, set(json!([true, 3])));
    assert_eq!(writer.next().await, set(json!([true, 3])));

    // A delete: null.
    let (reply, others) = writer.call("kv_delete", "d1", json!({"key": "motd"})).await;
    assert_eq!(keys(&reply), ["fence", "id", "seq"], "{reply}");
    assert_eq!(watcher.next().await, set(Json::Null));
    if others.is_empty() {
        assert_eq!(writer.next().await, set(Json::Null));
    }

    // Anyone may watch, not write; a bad kv call is a failed call.
    watcher.subscribe("function", "kv_set").await;
    let refused = watcher
        .ask(
            json!({"func": "call", "type": "function", "name": "kv_set", "id": "w",
                    "args": {"key": "motd", "value": 1}}),
        )
        .await;
    assert_failed(&refused, "call w of kv_set failed: ");
    let bad = writer
        .ask(json!({"func": "call", "type": "function", "name": "kv_set", "id": "b", "args": {"key": "motd"}}))
        .await;
    assert_failed(&bad, "call b of kv_set failed: ");

    // After unsubscribe, nothing: once the writer has seen a change, the watcher's next frame
    // is the answer to what it sends next.
    watcher
        .silent(json!({"func": "unsubscribe", "type": "var", "name": "motd"}))
        .await;
    let (_, others) = writer
        .call("kv_set", "s4", json!({"key": "motd", "value": "after"}))
        .await;
    if others.is_empty() {
        assert_eq!(writer.next().await, set(json!("after")));
    }
    assert_eq!(
        watcher.ask(get.clone()).await,
        error(1, "Subscription required.")
    );
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 3. List windows, at random.

/// One change the proptest makes to the stream.
#[derive(Debug, Clone)]
enum Step {
    /// A record by author `author` with field `n`, through the live `add_record` call.
    Add { author: u8, n: u8 },
    /// Several records at once (calls in flight together): a feed may see them in one change.
    Burst(Vec<(u8, u8)>),
    /// An upvote of the `pick`-th record (modulo their number): by the node through the live
    /// `upvote` call (None: moves it to the top of `latest`, score 1), or signed by client key
    /// `by` (another author: the score grows).
    Upvote { pick: usize, by: Option<u8> },
    /// The `_schema` with the lists' second variant (true) or first (false).
    Schema(bool),
    /// The `pick`-th subscriber (modulo their number) moves to page `page` with a `get` on
    /// its subscription.
    Move { pick: usize, page: u64 },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0u8..3, 0u8..10).prop_map(|(author, n)| Step::Add { author, n }),
        1 => proptest::collection::vec((0u8..3, 0u8..10), 2..6).prop_map(Step::Burst),
        3 => (any::<usize>(), proptest::option::of(1u8..4)).prop_map(|(pick, by)| Step::Upvote { pick, by }),
        1 => any::<bool>().prop_map(Step::Schema),
        1 => (any::<usize>(), 0u64..4).prop_map(|(pick, page)| Step::Move { pick, page }),
    ]
}

/// The lists of the proptest's schema: two variants with the same names and page sizes but
/// other orders, filters and columns.
fn prop_lists(second: bool) -> Vec<ListDef> {
    let list = |name, query: &str, page_size| ListDef {
        name,
        query: query.to_string(),
        page_size,
    };
    if !second {
        vec![
            list(
                "latest",
                "SELECT id, author, n, timestamp, score FROM message ORDER BY timestamp DESC, id",
                5,
            ),
            list(
                "by_n",
                "SELECT id, author, n, score FROM message ORDER BY n, id",
                4,
            ),
            list(
                "unvoted",
                "SELECT id, n FROM message WHERE score = 0 ORDER BY n DESC, id",
                3,
            ),
            list(
                "top",
                "SELECT id, score, n FROM message ORDER BY score DESC, id",
                3,
            ),
            // No id column: a row is known by its values, and equal rows are still two rows.
            list(
                "pairs",
                "SELECT author, n % 3 AS m FROM message ORDER BY m, author",
                4,
            ),
        ]
    } else {
        vec![
            list(
                "latest",
                "SELECT id, author, n, timestamp, score FROM message ORDER BY timestamp, id",
                5,
            ),
            list(
                "by_n",
                "SELECT id, author, n, score FROM message ORDER BY n DESC, id",
                4,
            ),
            list(
                "unvoted",
                "SELECT id, n FROM message WHERE score = 0 AND n % 2 = 0 ORDER BY n DESC, id",
                3,
            ),
            list(
                "top",
                "SELECT id, score + n AS weight, n FROM message ORDER BY weight DESC, id",
                3,
            ),
            list(
                "pairs",
                "SELECT author, n % 3 AS m FROM message ORDER BY author DESC, m",
                4,
            ),
        ]
    }
}

fn prop_schema(second: bool) -> String {
    schema_with(json!({"author": "text", "n": "int"}), &prop_lists(second))
}

/// The windows watched: (list, page, page_size asked). Pages 1 and 2 become the last, short
/// page as the list grows; a size over the list's is clamped.
const WINDOWS: [(&str, u64, Option<u64>); 13] = [
    ("latest", 0, None),
    ("latest", 1, Some(5)),
    ("latest", 2, Some(3)),
    ("latest", 0, Some(2)),
    ("by_n", 0, None),
    ("by_n", 1, None),
    ("by_n", 0, Some(100)),
    ("unvoted", 0, None),
    ("unvoted", 1, Some(2)),
    ("top", 0, None),
    ("top", 1, None),
    ("pairs", 0, None),
    ("pairs", 1, Some(3)),
];

/// A subscriber of one window and what it holds.
struct Watcher {
    list: &'static str,
    page: u64,
    asked: Option<u64>,
    live: Live,
    model: Page,
    set_alls: usize,
    /// Frames since the model last matched, for the failure message.
    recent: Vec<Json>,
    /// Frames received, by func.
    tally: BTreeMap<String, usize>,
    /// Gets sent: each is answered by one set_all.
    gets: usize,
}

impl Watcher {
    /// Reads frames until the model is `truth`.
    async fn settle(&mut self, truth: &Page, what: &str) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.model != *truth {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.live.event(left).await {
                Event::Frame(frame) => {
                    if frame["func"] == "set_all" {
                        self.set_alls += 1;
                    }
                    if let Err(error) = self.model.apply(&frame) {
                        panic!("{what}: {} page {} ({:?}): {error}; recent frames {:#?}", self.list, self.page, self.asked, self.recent);
                    }
                    *self
                        .tally
                        .entry(frame["func"].as_str().unwrap_or_default().to_string())
                        .or_default() += 1;
                    self.recent.push(frame);
                }
                other => panic!(
                    "{what}: {} page {} ({:?}) never reached\n{truth:#?}\nit holds\n{:#?}\n({other:?}); recent frames {:#?}",
                    self.list, self.page, self.asked, self.model, self.recent
                ),
            }
        }
        self.recent.clear();
    }
}

/// A fresh connection's `set_all` of a window must come to equal `truth` (the feed it shares
/// may be a change behind when it subscribes; a later get is current).
async fn fresh_get(
    node: &RunningNode,
    stream: &StreamId,
    window: (&str, u64, Option<u64>),
    truth: &Page,
    what: &str,
) {
    let (list, page, asked) = window;
    let mut fresh = open(node, stream, false).await;
    let mut got = fresh.watch_list(list, page, asked).await;
    let deadline = Instant::now() + WAIT;
    while got != *truth {
        assert!(
            Instant::now() < deadline,
            "{what}: a fresh get of {window:?} gives\n{got:#?}\nnot\n{truth:#?}"
        );
        let frame = fresh.ask(get_list(list, page, asked)).await;
        got = Page::default();
        got.apply(&frame).unwrap_or_else(|e| panic!("{e}"));
    }
}

/// One proptest case on its own stream of `node`.
/// Returns the frames its subscribers received, by func.
async fn window_case(node: &RunningNode, case: usize, steps: Vec<Step>) -> BTreeMap<String, usize> {
    let stream = stream_with(node, &format!("windows-{case}"), &prop_schema(false), None).await;
    let mut lists = prop_lists(false);
    let mut watchers = Vec::new();
    for (list, page, asked) in WINDOWS {
        let mut live = open(node, &stream, false).await;
        let model = live.watch_list(list, page, asked).await;
        watchers.push(Watcher {
            list,
            page,
            asked,
            live,
            model,
            set_alls: 1,
            recent: Vec::new(),
            tally: BTreeMap::new(),
            gets: 1,
        });
    }
    let mut writer = open(node, &stream, true).await;
    writer.subscribe("function", "add_record").await;
    writer.subscribe("function", "upvote").await;
    let mut records: Vec<String> = Vec::new();
    let mut seq = 0;
    let mut calls = 0;
    for (n, step) in steps.iter().enumerate() {
        let what = format!("case {case} step {n} {step:?} of {steps:?}");
        let adds = match step {
            Step::Add { author, n } => vec![(*author, *n)],
            Step::Burst(adds) => adds.clone(),
            _ => Vec::new(),
        };
        // Every call of a burst is sent before any answer is read.
        let mut ids = Vec::new();
        for (author, n) in adds {
            calls += 1;
            let id = format!("c{calls}");
            writer
                .send(json!({"func": "call", "type": "function", "name": "add_record", "id": id,
                             "args": {"_table": "message", "author": format!("author{author}"), "n": n}}))
                .await;
            ids.push(id);
        }
        for _ in &ids {
            let frame = writer.next().await;
            assert_eq!(frame["func"], "return", "{what}: {frame}");
            records.push(frame["value"]["id"].as_str().unwrap().to_string());
            seq = seq.max(frame["value"]["seq"].as_u64().unwrap());
        }
        match step {
            Step::Upvote { pick, by } if !records.is_empty() => {
                let record = records[pick % records.len()].clone();
                match by {
                    None => {
                        calls += 1;
                        let (value, _) = writer
                            .call("upvote", &format!("c{calls}"), json!({"id": record}))
                            .await;
                        seq = seq.max(value["seq"].as_u64().unwrap());
                    }
                    Some(key) => seq = seq.max(signed_upvote(node, &stream, &record, *key).await),
                }
            }
            Step::Schema(second) => {
                put_schema(node, &stream, &prop_schema(*second)).await;
                lists = prop_lists(*second);
            }
            Step::Move { pick, page } => {
                let watcher = &mut watchers[pick % WINDOWS.len()];
                watcher.page = *page;
                watcher.gets += 1;
                let get = get_list(watcher.list, *page, watcher.asked);
                watcher.live.send(get).await;
                // Edits of the old page may come first; the set_all of the new one then
                // replaces everything.
                loop {
                    let frame = watcher.live.next().await;
                    watcher
                        .model
                        .apply(&frame)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    if frame["func"] == "set_all" {
                        watcher.set_alls += 1;
                        break;
                    }
                }
            }
            _ => {}
        }
        for (w, watcher) in watchers.iter_mut().enumerate() {
            let list = lists.iter().find(|l| l.name == watcher.list).unwrap();
            let truth = truth(node, &stream, list, watcher.page, watcher.asked, seq).await;
            watcher.settle(&truth, &what).await;
            // A fresh connection's get agrees, two windows a step.
            if w % 7 == n % 7 {
                let window = (watcher.list, watcher.page, watcher.asked);
                fresh_get(node, &stream, window, &truth, &what).await;
            }
        }
    }
    for watcher in &watchers {
        assert_eq!(
            watcher.set_alls, watcher.gets,
            "{} page {}: one set_all for each get, then only edits",
            watcher.list, watcher.page
        );
    }
    let mut tally = BTreeMap::new();
    for watcher in watchers {
        for (func, count) in watcher.tally {
            *tally.entry(func).or_default() += count;
        }
    }
    tally
}

/// Pins that a list window stays exact: against one real node, random sequences of record
/// inserts (one at a time and in bursts), upvotes by the node and by other authors (rows move
/// to the top, change their score, leave a filtered list) and schema changes (other orders,
/// filters and columns) and subscribers moving to another page with a `get` — after every
/// step, each of 13 subscribers (pages 0–3, sizes asked or not, clamped, the last short page,
/// a list without an id column) comes to hold, by applying set_count / insert / delete / set
/// to the set_all of its last get, exactly the page plain SQL gives, and a fresh connection's
/// get agrees. Each get is answered by one set_all; nothing else sends one.
#[test]
fn list_windows_stay_exact_through_random_changes() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let node = runtime.block_on(start_node(dir.path()));
    let cases = AtomicUsize::new(0);
    let mut runner = TestRunner::new(ProptestConfig {
        // 8 by default; PROPTEST_CASES=n for a longer run.
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|cases| cases.parse().ok())
            .unwrap_or(8),
        max_shrink_iters: 8,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let started = Instant::now();
    let tally = std::sync::Mutex::new(BTreeMap::<String, usize>::new());
    let result = runner.run(&proptest::collection::vec(step(), 4..20), |steps| {
        let case = cases.fetch_add(1, Ordering::SeqCst);
        for (func, count) in runtime.block_on(window_case(&node, case, steps)) {
            *tally.lock().unwrap().entry(func).or_default() += count;
        }
        Ok(())
    });
    eprintln!(
        "list windows: {} cases in {:?}; edit frames applied: {:?}",
        cases.load(Ordering::SeqCst),
        started.elapsed(),
        tally.lock().unwrap()
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
    runtime.block_on(node.stop()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Schema changes a subscriber must hear about.

/// Pins what a subscriber hears when the schema drops its list (error 3 "<name> is not
/// registered.") and when the list comes back (a whole `set_all`, as after a get), and that
/// a new subscription to a dropped list is refused with error 3.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_dropped_from_the_schema_says_so_and_comes_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "dropped", BOARD, None).await;
    add(
        &node,
        &stream,
        json!({"_table": "message", "author": "ann", "text": "one"}),
    )
    .await;
    let mut watcher = open(&node, &stream, false).await;
    let model = watcher.watch_list("latest", 0, None).await;
    assert_eq!(model.total, 1);
    put_schema(
        &node,
        &stream,
        r#"{"schema": {"message": {"author": "text", "text": "fulltext"}}}"#,
    )
    .await;
    assert_eq!(watcher.next().await, error(3, "latest is not registered."));
    let mut late = open(&node, &stream, false).await;
    wait_until(WAIT, "the list to be gone for new subscribers", || async {
        // A subscribe answered with nothing means the list is still registered.
        let mut probe = open(&node, &stream, false).await;
        probe
            .send(json!({"func": "subscribe", "type": "list", "name": "latest"}))
            .await;
        probe
            .send(json!({"func": "get", "type": "list", "name": "latest"}))
            .await;
        probe.next().await == error(3, "latest is not registered.")
    })
    .await;
    assert_eq!(
        late.ask(json!({"func": "subscribe", "type": "list", "name": "latest"}))
            .await,
        error(3, "latest is not registered.")
    );
    put_schema(&node, &stream, BOARD).await;
    let back = watcher.next().await;
    let mut model = Page::default();
    model
        .apply(&back)
        .unwrap_or_else(|e| panic!("{e}: the list comes back as a set_all"));
    assert_eq!(back["func"], "set_all");
    let list = ListDef {
        name: "latest",
        query: "SELECT id, author, text, timestamp FROM message ORDER BY timestamp DESC, id".into(),
        page_size: 5,
    };
    assert_eq!(model, truth(&node, &stream, &list, 0, None, 0).await);
    node.stop().await.unwrap();
}

/// Pins that a subscriber's page size follows the schema: when `_schema` lowers a list's
/// `page_size` under what the client holds, the client's `page_size` (which only `set_all`
/// carries) must become the new one, not just its items shrink.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_smaller_page_size_in_the_schema_reaches_a_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let fields = json!({"author": "text", "text": "text"});
    let query = "SELECT id, text FROM message ORDER BY text";
    let before = ListDef {
        name: "sorted",
        query: query.into(),
        page_size: 5,
    };
    let after = ListDef {
        name: "sorted",
        query: query.into(),
        page_size: 3,
    };
    let stream = stream_with(
        &node,
        "sizes",
        &schema_with(fields.clone(), &[before]),
        None,
    )
    .await;
    let mut seq = 0;
    for n in 0..12 {
        seq = add(
            &node,
            &stream,
            json!({"_table": "message", "text": format!("t{n:02}")}),
        )
        .await
        .1;
    }
    let mut live = open(&node, &stream, false).await;
    let mut model = live.watch_list("sorted", 1, None).await;
    assert_eq!((model.page_size, model.items.len()), (5, 5));
    put_schema(
        &node,
        &stream,
        &schema_with(fields, std::slice::from_ref(&after)),
    )
    .await;
    let truth = truth(&node, &stream, &after, 1, None, seq).await;
    assert_eq!(
        (truth.page_size, truth.items[0]["text"].as_str()),
        (3, Some("t03"))
    );
    // The rows follow (deletes and inserts)...
    let deadline = Instant::now() + WAIT;
    while (model.total, &model.items) != (truth.total, &truth.items) {
        assert!(
            Instant::now() < deadline,
            "the rows never followed: {model:#?}"
        );
        let frame = live.next().await;
        model.apply(&frame).unwrap_or_else(|e| panic!("{e}"));
    }
    // ...and so must the page size the client holds (only set_all carries it).
    assert_eq!(
        model.page_size, truth.page_size,
        "the client holds page 1 as rows 3..6 of size-3 pages, but was never told the size is 3"
    );
    node.stop().await.unwrap();
}

/// Pins a list whose query fails when it runs (SQLite's `json_extract` of text that is not
/// JSON; the schema check only prepares it): the subscriber is told once, error 8
/// "list <name>: ...", every get answers the same error, and a schema that mends the query
/// brings the page back as a whole `set_all`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_list_whose_query_fails_says_so_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let fields = json!({"author": "text", "text": "text"});
    let failing = ListDef {
        name: "parsed",
        query: "SELECT id, json_extract(text, '$.a') AS a FROM message ORDER BY id".into(),
        page_size: 5,
    };
    let mended = ListDef {
        name: "parsed",
        query: "SELECT id, CASE WHEN json_valid(text) THEN json_extract(text, '$.a') END AS a \
                FROM message ORDER BY id"
            .into(),
        page_size: 5,
    };
    let stream = stream_with(
        &node,
        "failing",
        &schema_with(fields.clone(), std::slice::from_ref(&failing)),
        None,
    )
    .await;
    add(
        &node,
        &stream,
        json!({"_table": "message", "text": "{\"a\": 1}"}),
    )
    .await;
    let mut watcher = open(&node, &stream, false).await;
    let model = watcher.watch_list("parsed", 0, None).await;
    assert_eq!((model.total, &model.items[0]["a"]), (1, &json!(1)));

    let (_, seq) = add(
        &node,
        &stream,
        json!({"_table": "message", "text": "not json"}),
    )
    .await;
    let failed = watcher.next().await;
    let message = assert_failed(&failed, "list parsed: ");
    assert_eq!(watcher.ask(get_list("parsed", 0, None)).await, failed);
    assert_eq!(watcher.ask(get_list("parsed", 0, None)).await, failed);
    eprintln!("a failing list says: {message}");

    put_schema(
        &node,
        &stream,
        &schema_with(fields, std::slice::from_ref(&mended)),
    )
    .await;
    let back = watcher.next().await;
    assert_eq!(back["func"], "set_all", "{back}");
    let mut model = Page::default();
    model.apply(&back).unwrap();
    assert_eq!(model, truth(&node, &stream, &mended, 0, None, seq).await);
    assert_eq!(model.total, 2);
    node.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 4. Two nodes.

/// Pins that the binding follows replication: with A and B joined to one stream, a record
/// added on B reaches a list subscriber on A as exactly `set_count 1` then `insert 0` (the
/// row as A's tables hold it), and a `kv_set` called on B's binding reaches a var subscriber
/// on A. Prints the latencies (no assertion on them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_on_another_node_reaches_a_subscriber() {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = start_node(dir_a.path()).await;
    let b = start_node(dir_b.path()).await;
    let stream = stream_with(&a, "two", BOARD, None).await;
    connect(&b, &a).await;
    join(&b, &stream).await;
    wait_for_table(&b, &stream).await;

    let mut on_a = open(&a, &stream, false).await;
    let model = on_a.watch_list("latest", 0, None).await;
    assert_eq!((model.total, model.items.len()), (0, 0));
    on_a.subscribe("var", "presence").await;
    assert_eq!(
        on_a.ask(json!({"func": "get", "type": "var", "name": "presence"}))
            .await,
        json!({"func": "set", "type": "var", "name": "presence", "value": null})
    );

    let sent = Instant::now();
    let (id, _) = add(
        &b,
        &stream,
        json!({"_table": "message", "author": "bea", "text": "from B"}),
    )
    .await;
    let added = sent.elapsed();
    assert_eq!(
        on_a.next().await,
        json!({"func": "set_count", "type": "list", "name": "latest", "total_item_count": 1})
    );
    let insert = on_a.next().await;
    let arrived = sent.elapsed();
    assert_eq!(keys(&insert), ["func", "index", "name", "type", "value"]);
    assert_eq!(
        (&insert["func"], &insert["index"]),
        (&json!("insert"), &json!(0)),
        "{insert}"
    );
    assert_eq!(
        (
            &insert["value"]["id"],
            &insert["value"]["author"],
            &insert["value"]["text"]
        ),
        (&json!(id), &json!("bea"), &json!("from B")),
    );
    eprintln!(
        "latency, record on B -> insert frame on A: {arrived:?} from the add ({:?} after B answered it)",
        arrived - added
    );

    let mut on_b = open(&b, &stream, true).await;
    on_b.subscribe("function", "kv_set").await;
    let sent = Instant::now();
    on_b.call(
        "kv_set",
        "p",
        json!({"key": "presence", "value": {"node": "B"}}),
    )
    .await;
    let answered = sent.elapsed();
    assert_eq!(
        on_a.next().await,
        json!({"func": "set", "type": "var", "name": "presence", "value": {"node": "B"}})
    );
    let arrived = sent.elapsed();
    eprintln!(
        "latency, kv_set on B -> set frame on A: {arrived:?} from the call ({:?} after B answered it)",
        arrived - answered
    );
    a.stop().await.unwrap();
    b.stop().await.unwrap();
}

// ---------------------------------------------------------------------------------------------
// 5. A client that stops reading.

/// Pins what a client that stops reading costs and gets: a subscriber of a 50-row page of
/// `latest` stops reading while 4,000 records of 8 KiB each are added by calls in flight
/// together, then reads again. A client that keeps reading gets up to two frames per record
/// (its insert at the top, and the delete of the row pushed off the page; a change of several
/// records at once shares one set_count, and one of over 50 is at most the whole page): some
/// 5,000 to 8,000 frames, 8 KiB inserts among them. The server
/// holds at most [`live::OUTBOX`] frames for the slow one, plus what the server's socket
/// buffers (a few MB: a few hundred inserts); once those are full its subscription skips to the
/// newest page, so after it resumes it gets far fewer frames than the reading client, and
/// ends up holding exactly the current page (which a fresh get confirms). Either outcome is
/// accepted: this one (coalescing), or — if writing took longer than [`live::SEND_TIMEOUT`],
/// as on a slow machine — the server closing the connection of a client that took no frame
/// for that long; the test says which happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_gets_the_newest_page_not_a_backlog() {
    const RECORDS: usize = 4_000;
    let dir = tempfile::tempdir().unwrap();
    let node = std::sync::Arc::new(start_node(dir.path()).await);
    let fields = json!({"author": "text", "text": "text"});
    let list = ListDef {
        name: "latest",
        query: "SELECT id, author, text, timestamp FROM message ORDER BY timestamp DESC, id".into(),
        page_size: 50,
    };
    let stream = stream_with(
        &node,
        "slow",
        &schema_with(fields, std::slice::from_ref(&list)),
        None,
    )
    .await;
    // A small receive buffer: what waits for the slow client is the server's to hold.
    let path = format!("/{}/socksync", stream.to_hex());
    let mut slow = open_with(&node, None, &path, &[], Some(16 * 1024))
        .await
        .unwrap();
    let mut slow_model = slow.watch_list("latest", 0, None).await;
    let mut fast = open(&node, &stream, false).await;
    let mut fast_model = fast.watch_list("latest", 0, None).await;
    let (slow_before, fast_before) = (slow.received, fast.received);

    // The owner's binding adds them all, calls in flight together (the node runs
    // `live::MAX_CALLS` at once); the fast client is read all along.
    let mut owner = open(&node, &stream, true).await;
    owner.subscribe("function", "add_record").await;
    let stopped = Instant::now();
    let writer = tokio::spawn(async move {
        let (mut sink, mut source) = owner.ws.split();
        let send = async move {
            for n in 0..RECORDS {
                let text = format!("{n:06}{}", "x".repeat(8 * 1024 - 6));
                let call = json!({"func": "call", "type": "function", "name": "add_record",
                    "id": n, "args": {"_table": "message", "author": "w", "text": text}});
                sink.send(Message::Text(call.to_string())).await.unwrap();
            }
            sink
        };
        let receive = async move {
            let (mut seq, mut returned) = (0, 0);
            while returned < RECORDS {
                match source.next().await {
                    Some(Ok(Message::Text(text))) => {
                        let frame: Json = serde_json::from_str(&text).unwrap();
                        assert_eq!(frame["func"], "return", "{frame}");
                        seq = frame["value"]["seq"].as_u64().unwrap().max(seq);
                        returned += 1;
                    }
                    Some(Ok(_)) => {}
                    other => panic!("the owner's connection: {other:?}"),
                }
            }
            seq
        };
        tokio::join!(send, receive).1
    });
    tokio::pin!(writer);
    let seq = loop {
        tokio::select! {
            seq = &mut writer => break seq.unwrap(),
            event = fast.event(WAIT) => match event {
                Event::Frame(frame) => fast_model.apply(&frame).unwrap_or_else(|e| panic!("{e}")),
                other => panic!("the reading client: {other:?}"),
            },
        }
    };
    let writing = stopped.elapsed();
    let truth = truth(&node, &stream, &list, 0, None, seq).await;
    assert_eq!(truth.total, RECORDS as u64);
    let deadline = Instant::now() + WAIT;
    while fast_model != truth {
        assert!(
            Instant::now() < deadline,
            "the reading client holds {fast_model:?}"
        );
        match fast.event(WAIT).await {
            Event::Frame(frame) => fast_model.apply(&frame).unwrap_or_else(|e| panic!("{e}")),
            other => panic!("the reading client: {other:?}"),
        }
    }
    let fast_frames = fast.received - fast_before;

    // The slow client reads again.
    let paused = stopped.elapsed();
    let mut closed = None;
    let deadline = Instant::now() + WAIT;
    while slow_model != truth {
        assert!(
            Instant::now() < deadline,
            "the slow client holds {slow_model:?}"
        );
        match slow.event(WAIT).await {
            Event::Frame(frame) => slow_model.apply(&frame).unwrap_or_else(|e| panic!("{e}")),
            Event::Closed(why) => {
                closed = Some(why);
                break;
            }
            Event::Timeout => panic!("the slow client got nothing more and holds {slow_model:?}"),
        }
    }
    let slow_frames = slow.received - slow_before;
    eprintln!(
        "slow client: {RECORDS} records of 8 KiB written in {writing:?}, reading paused {paused:?}; \
         the reading client got {fast_frames} frames, the slow one {slow_frames}{}",
        match &closed {
            Some(why) => format!(", then was closed ({why})"),
            None => String::new(),
        }
    );
    match closed {
        // Disconnected for not reading for SEND_TIMEOUT: it got at most what was queued.
        Some(_) => {
            assert!(
                paused >= live::SEND_TIMEOUT,
                "closed after only {paused:?} without reading"
            );
            assert!(slow_frames <= fast_frames, "{slow_frames} > {fast_frames}");
        }
        // Coalesced: far fewer frames, and the page is the current one.
        None => {
            assert_eq!(slow_model, truth);
            // Bounded by what waits for it (OUTBOX frames and the socket's bytes), not by how
            // much changed.
            assert!(
                fast_frames > RECORDS,
                "the reading client got only {fast_frames} frames: the test measures nothing"
            );
            assert!(
                slow_frames * 2 < fast_frames,
                "the slow client got {slow_frames} frames, the reading one {fast_frames}: no coalescing"
            );
            let mut fresh = open(&node, &stream, false).await;
            assert_eq!(fresh.watch_list("latest", 0, None).await, slow_model);
        }
    }
    std::sync::Arc::into_inner(node)
        .unwrap()
        .stop()
        .await
        .unwrap();
}

// ---------------------------------------------------------------------------------------------
// 6. Who may open the socket.

/// Pins access at the upgrade and per call: an app's own page (Host and Origin
/// `<label>.localhost:<port>`, over loopback) opens `/socksync` (and `/<tid>/socksync`) at its
/// origin, binds its lists and adds records when the policy lets anyone add them, but not when
/// it keeps `record.add` to the owner (error 8 naming the policy); a foreign Origin, the app's
/// Origin on the node's host, and a wrong token are refused at the upgrade (403, 403, 401).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_page_binds_its_own_stream_and_foreign_pages_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let stream = stream_with(&node, "open", BOARD, None).await;
    let port = node.api_addr.port();

    let mut page = open_app(&node, &stream, "/socksync")
        .await
        .expect("the app's page opens it");
    let model = page.watch_list("latest", 0, None).await;
    assert_eq!(model.total, 0);
    page.subscribe("function", "add_record").await;
    page.send(
        json!({"func": "call", "type": "function", "name": "add_record", "id": "p1",
                     "args": {"_table": "message", "author": "page", "text": "from the page"}}),
    )
    .await;
    // The return and the list's frames, in any order between groups.
    let mut model = model;
    let mut returned = None;
    while returned.is_none() || model.total != 1 || model.items.len() != 1 {
        let frame = page.next().await;
        if frame["type"] == "function" {
            assert_eq!(
                (&frame["func"], &frame["id"]),
                (&json!("return"), &json!("p1")),
                "{frame}"
            );
            returned = Some(frame["value"]["id"].clone());
        } else {
            model.apply(&frame).unwrap_or_else(|e| panic!("{e}"));
        }
    }
    assert_eq!(model.items[0]["id"], returned.unwrap());
    assert_eq!(model.items[0]["text"], "from the page");
    page.subscribe("function", "kv_set").await;
    page.call("kv_set", "k", json!({"key": "seen", "value": true}))
        .await;
    // The flock-style path with the app's own id is the same endpoint.
    let mut flock = open_app(&node, &stream, &format!("/{}/socksync", stream.to_hex()))
        .await
        .expect("/<tid>/socksync at the app's origin");
    assert_eq!(flock.watch_list("latest", 0, None).await.total, 1);

    // A stream whose policy keeps record.add to its owner: the page may read, not add.
    let owner_only = pb::Policy {
        rules: vec![pb::KindRule {
            kind: "record.add".into(),
            authors: Some(pb::Authors {
                owner: true,
                keys: vec![],
                anyone: false,
                writers: false,
            }),
        }],
        ..Default::default()
    };
    let closed = stream_with(&node, "closed", BOARD, Some(owner_only)).await;
    let mut page = open_app(&node, &closed, "/socksync")
        .await
        .expect("the app's page opens it");
    page.watch_list("latest", 0, None).await;
    page.subscribe("function", "add_record").await;
    let refused = page
        .ask(
            json!({"func": "call", "type": "function", "name": "add_record", "id": "p2",
                    "args": {"_table": "message", "author": "page", "text": "no"}}),
        )
        .await;
    let message = assert_failed(&refused, "call p2 of add_record failed: ");
    assert!(message.contains("policy"), "{message}");
    let mut owner = open(&node, &closed, true).await;
    owner.subscribe("function", "add_record").await;
    owner
        .call(
            "add_record",
            "o",
            json!({"_table": "message", "author": "owner", "text": "yes"}),
        )
        .await;

    // Refused at the upgrade.
    let status = |result: Result<Live, WsError>| match result {
        Ok(_) => panic!("the upgrade must be refused"),
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("refused with an HTTP status, not {other}"),
    };
    let app = app_host(&stream);
    let evil = [("origin", "http://evil.example".to_string())];
    assert_eq!(
        status(open_as(&node, Some(&app), "/socksync", &evil).await),
        403
    );
    let tid_path = format!("/{}/socksync", stream.to_hex());
    assert_eq!(status(open_as(&node, None, &tid_path, &evil).await), 403);
    let app_origin = [("origin", format!("http://{app}:{port}"))];
    assert_eq!(
        status(open_as(&node, None, &tid_path, &app_origin).await),
        403
    );
    let other_app = [("origin", format!("http://{}:{port}", app_host(&closed)))];
    assert_eq!(
        status(open_as(&node, Some(&app), "/socksync", &other_app).await),
        403
    );
    let wrong = [("authorization", "Bearer not-the-token-at-all".to_string())];
    assert_eq!(status(open_as(&node, None, &tid_path, &wrong).await), 401);
    node.stop().await.unwrap();
}
