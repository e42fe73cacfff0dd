//! The live binding: django-socksync's protocol over one WebSocket per client, on the client API
//! port (`/socksync` at an app's origin, `/<tid>/socksync` on the node's host). A client binds to
//! a stream's kv keys (`var`), to the lists its `_schema` declares (`list`: one page, kept exact
//! by `set_count` / `insert` / `delete` / `set` frames), and calls functions (`function`:
//! `add_record`, `upvote`, `query`, `kv_set`, `kv_delete`, with the rights of the app's HTTP
//! actions). The rules, frame by frame, are in `docs/live.md`.
//!
//! How it is built:
//! - **Feeds** ([`Hub`]): one task per watched value — a kv key, or one page of one list — shared
//!   by every client watching it. It recomputes the value when the stream's copy moves past the
//!   stream's newest scribe it has seen, and publishes it in a `watch` channel only if it
//!   changed. 1,000 clients on the same page cost one query per change.
//! - **Subscriptions**: one task per subscribed var or list of a connection. It is the only
//!   sender of that group's frames (a `get` is a command to it), so frames are in order, and it
//!   diffs what it last sent against the newest value ([`diff`]): a client that falls behind
//!   gets the frames from what it holds to what is current, never a backlog.
//! - **The outbox**: at most [`OUTBOX`] frames wait for one client; a client that takes no frame
//!   for [`SEND_TIMEOUT`] is disconnected. So a client that stops reading costs a bounded queue,
//!   then nothing.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use futures::{SinkExt, StreamExt};
use quire_projection_api::StreamId;
use quire_projection_sql::Window;
use serde_json::{json, Map, Value as Json};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::api::access::Admitted;
use crate::api::kv::KvService;
use crate::api::sql::{value_to_json, SqlService};
use crate::log::Log;
use crate::projection::Projections;

/// The endpoint's path: `/socksync` at an app's origin, `/<tid>/socksync` on the node's host.
pub const PATH: &str = "socksync";

/// Frames that may wait for one client.
pub const OUTBOX: usize = 1024;

/// A client that takes no frame for this long is disconnected.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest frame a client may send.
pub const MAX_FRAME: usize = 1 << 20;

/// Calls of one connection that may run at once; more wait their turn.
pub const MAX_CALLS: usize = 16;

/// Frames written to a client in one write, at most.
const WRITE_BATCH: usize = 64;

/// How often the node pings a live client; one that answered nothing since the last ping is
/// dropped (so a vanished client is let go within two intervals).
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

/// Frames read from a client and not yet dispatched.
const INBOX: usize = 8;

/// Subscriptions one connection may hold.
pub const MAX_SUBSCRIPTIONS: usize = 1024;

/// How long a feed waits before trying again to find a copy that is not there yet.
const RETRY: Duration = Duration::from_secs(1);

/// The functions a client may call.
pub const FUNCTIONS: [&str; 5] = ["add_record", "upvote", "query", "kv_set", "kv_delete"];

/// django-socksync's error codes.
pub mod code {
    /// The func does not exist or is not valid for the group.
    pub const INVALID_FUNC: u8 = 1;
    /// The type does not exist.
    pub const INVALID_TYPE: u8 = 2;
    /// The name is not registered.
    pub const INVALID_NAME: u8 = 3;
    /// A field the func needs is missing.
    pub const MISSING_FIELD: u8 = 4;
    /// The frame is not JSON.
    pub const INVALID_JSON: u8 = 7;
    /// Anything else (a call that failed, a list that cannot be read).
    pub const OTHER: u8 = 8;
}

/// An error frame: exactly `func`, `error_code` and `message`.
pub fn error_frame(code: u8, message: impl Into<String>) -> Json {
    json!({"func": "error", "error_code": code, "message": message.into()})
}

/// The groups a name lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Group {
    Var,
    List,
    Function,
}

impl Group {
    fn parse(text: &str) -> Option<Group> {
        Some(match text {
            "var" => Group::Var,
            "list" => Group::List,
            "function" => Group::Function,
            _ => return None,
        })
    }

    /// The funcs a client may send for this group.
    fn accepts(self, func: &str) -> bool {
        match self {
            Group::Var | Group::List => matches!(func, "subscribe" | "unsubscribe" | "get"),
            Group::Function => matches!(func, "subscribe" | "unsubscribe" | "call"),
        }
    }
}

/// One row of a list page: its identity (the `id` column when the query has one, else the whole
/// row) and the row as a JSON object.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// What the row is, across changes: rows with the same key are the same row.
    pub key: String,
    /// The row: column name → value.
    pub value: Json,
}

/// One page of a list as a client holds it.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// The page (from 0).
    pub page: u64,
    /// Rows per page.
    pub page_size: u64,
    /// Rows of the whole list.
    pub total: u64,
    /// The page's rows.
    pub items: Vec<Item>,
}

impl Snapshot {
    /// The snapshot of a page read from SQL.
    pub fn of(window: Window) -> Snapshot {
        let id_column = window.columns.iter().position(|c| c == "id");
        let mut seen: HashMap<String, usize> = HashMap::new();
        let items = window
            .rows
            .into_iter()
            .map(|row| {
                let values: Vec<Json> = row.into_iter().map(value_to_json).collect();
                let mut key = match id_column.map(|n| &values[n]) {
                    Some(Json::String(id)) => id.clone(),
                    Some(other) => other.to_string(),
                    None => Json::Array(values.clone()).to_string(),
                };
                // Two equal rows are still two rows.
                let count = seen.entry(key.clone()).or_insert(0);
                if *count > 0 {
                    key = format!("{key}\u{0}{count}");
                }
                *count += 1;
                let value = Json::Object(window.columns.iter().cloned().zip(values).collect());
                Item { key, value }
            })
            .collect();
        Snapshot {
            page: window.page,
            page_size: window.page_size,
            total: window.total,
            items,
        }
    }

    /// The `set_all` frame of list `name`.
    pub fn set_all(&self, name: &str) -> Json {
        json!({
            "func": "set_all", "type": "list", "name": name,
            "page": self.page, "page_size": self.page_size,
            "total_item_count": self.total,
            "items": self.items.iter().map(|item| item.value.clone()).collect::<Vec<_>>(),
        })
    }
}

/// One change to a list page a client holds.
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// The list's row count.
    SetCount(u64),
    /// A row goes in at this index of the page.
    Insert(usize, Json),
    /// The row at this index leaves the page.
    Delete(usize),
    /// The row at this index changed.
    Set(usize, Json),
}

impl Op {
    /// The frame of this change to list `name`.
    pub fn frame(&self, name: &str) -> Json {
        match self {
            Op::SetCount(total) => {
                json!({"func": "set_count", "type": "list", "name": name, "total_item_count": total})
            }
            Op::Insert(index, value) => {
                json!({"func": "insert", "type": "list", "name": name, "index": index, "value": value})
            }
            Op::Delete(index) => {
                json!({"func": "delete", "type": "list", "name": name, "index": index})
            }
            Op::Set(index, value) => {
                json!({"func": "set", "type": "list", "name": name, "index": index, "value": value})
            }
        }
    }
}

/// The changes that turn page `old` into page `new` (the same page of the same list): a
/// `set_count` first if the count changed, then deletes and inserts in index order — a row that
/// leaves is deleted where it is and the next one pulled in at the end; a row that arrives is
/// inserted where it belongs and the last one pushed out — then a `set` for every row whose
/// value changed. Rows are matched by [`Item::key`]; the rows kept in place are a longest run
/// in the same order in both pages.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Op> {
    let mut ops = Vec::new();
    if old.total != new.total {
        ops.push(Op::SetCount(new.total));
    }
    let position: HashMap<&str, usize> = new
        .items
        .iter()
        .enumerate()
        .map(|(n, item)| (item.key.as_str(), n))
        .collect();
    let kept = kept_in_order(&old.items, &position);
    let mut held: Vec<&Item> = old.items.iter().collect();
    let mut i = 0;
    loop {
        if i < held.len() && i < new.items.len() && held[i].key == new.items[i].key {
            i += 1;
            continue;
        }
        if i < held.len() && !kept.contains(held[i].key.as_str()) {
            ops.push(Op::Delete(i));
            held.remove(i);
        } else if i < new.items.len() {
            ops.push(Op::Insert(i, new.items[i].value.clone()));
            held.insert(i, &new.items[i]);
            i += 1;
        } else {
            break;
        }
    }
    for (n, item) in new.items.iter().enumerate() {
        if held[n].value != item.value {
            ops.push(Op::Set(n, item.value.clone()));
        }
    }
    ops
}

/// The keys of `old` that stay: a longest subsequence of `old` whose positions in the new page
/// increase (patience sorting, O(n log n)).
fn kept_in_order<'a>(old: &'a [Item], position: &HashMap<&str, usize>) -> HashSet<&'a str> {
    let present: Vec<(usize, &str)> = old
        .iter()
        .filter_map(|item| {
            position
                .get(item.key.as_str())
                .map(|p| (*p, item.key.as_str()))
        })
        .collect();
    // tails[k]: index into `present` of the smallest tail of an increasing run of length k+1.
    let mut tails: Vec<usize> = Vec::new();
    let mut before: Vec<Option<usize>> = vec![None; present.len()];
    for (n, (p, _)) in present.iter().enumerate() {
        let at = tails.partition_point(|&t| present[t].0 < *p);
        before[n] = at.checked_sub(1).map(|k| tails[k]);
        if at == tails.len() {
            tails.push(n);
        } else {
            tails[at] = n;
        }
    }
    let mut kept = HashSet::new();
    let mut next = tails.last().copied();
    while let Some(n) = next {
        kept.insert(present[n].1);
        next = before[n];
    }
    kept
}

/// The frames from one page to the next, made once per change for every client that held the
/// first (most clients of a busy page hold the same one).
#[derive(Debug)]
struct Delta {
    from: Arc<Snapshot>,
    frames: Vec<String>,
}

/// What a feed last computed.
#[derive(Debug, Clone)]
enum Value {
    /// Not computed yet.
    Pending,
    /// A kv key's value (null when unset).
    Var(Json),
    /// A page of a list, and the frames from the page published before it.
    Page(Arc<Snapshot>, Option<Arc<Delta>>),
    /// The schema in force declares no such list (any more).
    Unregistered,
    /// It could not be read; why.
    Failed(String),
}

impl PartialEq for Value {
    /// Equal values: a page equal to the last one is no change (its delta does not matter).
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Pending, Value::Pending) | (Value::Unregistered, Value::Unregistered) => true,
            (Value::Var(a), Value::Var(b)) => a == b,
            (Value::Page(a, _), Value::Page(b, _)) => a == b,
            (Value::Failed(a), Value::Failed(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FeedKey {
    Var {
        stream: StreamId,
        key: String,
    },
    Page {
        stream: StreamId,
        list: String,
        page: u64,
        page_size: Option<u64>,
    },
}

impl FeedKey {
    fn stream(&self) -> &StreamId {
        match self {
            FeedKey::Var { stream, .. } | FeedKey::Page { stream, .. } => stream,
        }
    }
}

type Feed = watch::Sender<Arc<Value>>;

/// The node's live feeds, shared by every connection.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    log: Log,
    projections: Projections,
    sql: SqlService,
    kv: KvService,
    feeds: Mutex<HashMap<FeedKey, Weak<Feed>>>,
    /// The kv keys each watched stream's newest scribes wrote: a var feed re-reads its key only
    /// when a write touched it, not on every write to the stream.
    touched: Mutex<HashMap<StreamId, Touched>>,
}

/// Kv keys written by one stream's scribes, by local seq: the newest [`TOUCHED_MAX`].
#[derive(Debug, Default)]
struct Touched {
    /// Every kv write of the stream in `from..=through` is in `keys`; `None`: a redaction, which
    /// may have taken away a write of any key (its payload, and so its key, is gone).
    from: u64,
    through: u64,
    keys: std::collections::VecDeque<(u64, Option<Vec<u8>>)>,
}

/// Kv writes remembered per stream; a var feed further behind just re-reads its key.
const TOUCHED_MAX: usize = 4_096;

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl Hub {
    /// The feeds of `log`'s streams, read through `sql` and `kv`.
    pub fn new(log: Log, projections: Projections, sql: SqlService, kv: KvService) -> Hub {
        Hub {
            inner: Arc::new(HubInner {
                log,
                projections,
                sql,
                kv,
                feeds: Mutex::default(),
                touched: Mutex::default(),
            }),
        }
    }

    fn feeds(&self) -> std::sync::MutexGuard<'_, HashMap<FeedKey, Weak<Feed>>> {
        self.inner.feeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Feeds being computed now (one per watched key or page).
    pub fn feed_count(&self) -> usize {
        self.feeds().len()
    }

    /// A receiver of the feed of `key`, started if no one watches it yet.
    fn watch(&self, key: FeedKey) -> watch::Receiver<Arc<Value>> {
        let mut feeds = self.feeds();
        if let Some(feed) = feeds.get(&key).and_then(Weak::upgrade) {
            return feed.subscribe();
        }
        let feed = Arc::new(watch::Sender::new(Arc::new(Value::Pending)));
        let receiver = feed.subscribe();
        feeds.insert(key.clone(), Arc::downgrade(&feed));
        tokio::spawn(self.clone().run(key, feed));
        receiver
    }

    async fn run(self, key: FeedKey, feed: Arc<Feed>) {
        loop {
            self.follow(&key, &feed).await;
            let mut feeds = self.feeds();
            // A client may have subscribed while the last one left: keep going for it.
            if feed.receiver_count() == 0 {
                if feeds
                    .get(&key)
                    .is_some_and(|weak| std::ptr::eq(weak.as_ptr(), Arc::as_ptr(&feed)))
                {
                    feeds.remove(&key);
                }
                if let FeedKey::Var { stream, .. } = &key {
                    let watched = feeds
                        .keys()
                        .any(|k| matches!(k, FeedKey::Var { stream: s, .. } if s == stream));
                    if !watched {
                        self.inner
                            .touched
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(stream);
                    }
                }
                return;
            }
        }
    }

    /// Publishes `key`'s value whenever it changes, until no one watches.
    async fn follow(&self, key: &FeedKey, feed: &Feed) {
        let stream = *key.stream();
        let projection = match key {
            FeedKey::Var { .. } => quire_projection_kv::NAME,
            FeedKey::Page { .. } => quire_projection_sql::NAME,
        };
        let publish = |value: Value| {
            feed.send_if_modified(|current| {
                if **current == value {
                    return false;
                }
                let value = match (&**current, value, key) {
                    (Value::Page(from, _), Value::Page(to, None), FeedKey::Page { list, .. })
                        if (from.page, from.page_size) == (to.page, to.page_size) =>
                    {
                        let frames = diff(from, &to)
                            .iter()
                            .map(|op| op.frame(list).to_string())
                            .collect();
                        let delta = Delta {
                            from: from.clone(),
                            frames,
                        };
                        Value::Page(to, Some(Arc::new(delta)))
                    }
                    (_, value, _) => value,
                };
                *current = Arc::new(value);
                true
            });
        };
        loop {
            let mut applied = match self.inner.projections.live(projection, &stream) {
                Ok((_, applied)) => applied,
                Err(error) => {
                    publish(Value::Failed(error.to_string()));
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => continue,
                        () = feed.closed() => return,
                    }
                }
            };
            // The stream's newest scribe the published value includes.
            let mut covered: Option<u64> = None;
            loop {
                let head = self.inner.log.stream(&stream).map(|s| s.record.head_seq);
                let Some(head) = head else {
                    publish(Value::Failed(format!(
                        "stream {stream} is no longer held by this node"
                    )));
                    feed.closed().await;
                    return;
                };
                if covered.is_none_or(|covered| head > covered) {
                    let seen = *applied.borrow_and_update();
                    let through = head.min(seen);
                    // A var whose key no write in between touched keeps its value.
                    let unchanged = match (covered, key) {
                        (Some(after), FeedKey::Var { stream, key }) => {
                            self.touched(stream, key.as_bytes(), after, through) == Some(false)
                        }
                        _ => false,
                    };
                    if unchanged {
                        covered = Some(through);
                    } else {
                        let value = self.compute(key).await;
                        covered = match value {
                            Value::Failed(_) => None,
                            _ => Some(through),
                        };
                        publish(value);
                    }
                }
                tokio::select! {
                    changed = applied.changed() => if changed.is_err() {
                        // The copy was closed (shutdown, the stream left): find it again.
                        break;
                    },
                    () = feed.closed() => return,
                }
            }
            tokio::select! {
                () = tokio::time::sleep(RETRY) => {}
                () = feed.closed() => return,
            }
        }
    }

    /// Whether a kv write of `stream` with a local seq in `after + 1 ..= through` wrote `key`;
    /// `None` when that is not known (too far back, or the log could not be read).
    fn touched(&self, stream: &StreamId, key: &[u8], after: u64, through: u64) -> Option<bool> {
        let mut all = self.inner.touched.lock().unwrap_or_else(|p| p.into_inner());
        let touched = all.entry(*stream).or_default();
        if touched.through == 0 {
            touched.from = after + 1;
            touched.through = after;
        }
        while touched.through < through {
            let entries = self
                .inner
                .log
                .read(Some(stream), touched.through + 1, 32)
                .ok()?
                .entries;
            let Some(last) = entries.last().map(|e| e.seq) else {
                break;
            };
            for entry in &entries {
                let Ok(view) = crate::projection::to_view(entry) else {
                    continue;
                };
                if view.kind.erases() {
                    touched.keys.push_back((entry.seq, None));
                    continue;
                }
                if entry.parts.redacted_by.is_some() {
                    continue;
                }
                let written = quire_projection_kv::decode(&view.kind, &view.payload)
                    .ok()
                    .flatten();
                if let Some((key, _)) = written {
                    touched.keys.push_back((entry.seq, Some(key)));
                }
            }
            touched.through = last;
        }
        while touched.keys.len() > TOUCHED_MAX {
            if let Some((seq, _)) = touched.keys.pop_front() {
                touched.from = seq + 1;
            }
        }
        if after + 1 < touched.from || through > touched.through {
            return None;
        }
        let start = touched.keys.partition_point(|(seq, _)| *seq <= after);
        Some(
            touched
                .keys
                .range(start..)
                .take_while(|(seq, _)| *seq <= through)
                .any(|(_, written)| written.as_deref().is_none_or(|written| written == key)),
        )
    }

    async fn compute(&self, key: &FeedKey) -> Value {
        match key {
            FeedKey::Var { stream, key } => {
                let kv = self.inner.kv.clone();
                let (stream, key) = (*stream, key.clone());
                let read =
                    tokio::task::spawn_blocking(move || match kv.value(&stream, key.as_bytes()) {
                        Ok(value) => Value::Var(var_value(value)),
                        Err(status) => Value::Failed(status.message().to_string()),
                    });
                read.await
                    .unwrap_or_else(|error| Value::Failed(error.to_string()))
            }
            FeedKey::Page {
                stream,
                list,
                page,
                page_size,
            } => {
                let window = self
                    .inner
                    .sql
                    .window(*stream, list.clone(), *page, *page_size)
                    .await;
                match window {
                    Ok(Some(window)) => Value::Page(Arc::new(Snapshot::of(window)), None),
                    Ok(None) => Value::Unregistered,
                    Err(status) => Value::Failed(status.message().to_string()),
                }
            }
        }
    }
}

/// A kv value as a var's value: its JSON when it parses as JSON, else its text; null when unset.
pub fn var_value(value: Option<Vec<u8>>) -> Json {
    match value {
        None => Json::Null,
        Some(bytes) => serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Json::String(String::from_utf8_lossy(&bytes).into_owned())),
    }
}

/// What a `call` runs: the code of the HTTP action of the same name, with its rights (the HTTP
/// API implements it, so the two cannot drift apart). The error is the message of error 8.
pub trait Functions: Send + Sync + 'static {
    /// Runs function `name` of `stream` with `args` for `admitted`; its answer's fields.
    fn call<'a>(
        &'a self,
        admitted: &'a Admitted,
        stream: StreamId,
        name: &'a str,
        args: Map<String, Json>,
    ) -> futures::future::BoxFuture<'a, Result<Map<String, Json>, String>>;
}

/// Answers a WebSocket upgrade on `stream`'s endpoint with a live session for `admitted`, its
/// calls run by `functions`.
///
/// `revoked` changes when what admitted the caller stops holding (the owner's token rotated):
/// the session then ends, so an open socket never outlives its token.
pub fn upgrade(
    hub: Hub,
    functions: Arc<dyn Functions>,
    admitted: Admitted,
    stream: StreamId,
    revoked: Option<watch::Receiver<u64>>,
    ws: WebSocketUpgrade,
) -> Response {
    ws.max_message_size(MAX_FRAME)
        .max_frame_size(MAX_FRAME)
        .on_upgrade(move |socket| session(hub, functions, admitted, stream, revoked, socket))
}

/// Why a session ended.
enum Ended {
    /// The client left, stopped answering, or sent a close.
    Client,
    /// The node is shutting down.
    Shutdown,
    /// The owner's token was rotated.
    Rotated,
}

/// The error a session opened with a rotated token ends with.
const ROTATED: &str =
    "the owner's token was rotated: this connection is closed; connect again with the new token";

/// Completes with why a session must end now: the client left (or its writer gave up on it),
/// the node is shutting down, or the owner's token was rotated.
async fn ending(
    left: &mut watch::Receiver<bool>,
    closing: &mut watch::Receiver<bool>,
    revoked: &mut Option<watch::Receiver<u64>>,
    gone: &mpsc::Sender<Message>,
) -> Ended {
    tokio::select! {
        biased;
        _ = left.wait_for(|left| *left) => Ended::Client,
        _ = closing.wait_for(|closing| *closing) => Ended::Shutdown,
        () = changed(revoked) => Ended::Rotated,
        () = gone.closed() => Ended::Client,
    }
}

/// Completes when `revoked` changes (never, for `None`).
async fn changed(revoked: &mut Option<watch::Receiver<u64>>) {
    match revoked {
        Some(revoked) => {
            if revoked.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// What a subscription's task is asked to do.
enum Command {
    /// Send the value (a var), or this page (a list).
    Get { page: u64, page_size: Option<u64> },
}

/// One subscription of a connection.
enum Subscription {
    /// A var or list: its task, which sends every frame of the group.
    Watch {
        commands: mpsc::Sender<Command>,
        task: tokio::task::JoinHandle<()>,
    },
    /// A function: calls are allowed.
    Function,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Subscription::Watch { task, .. } = self {
            task.abort();
        }
    }
}

struct Session {
    hub: Hub,
    functions: Arc<dyn Functions>,
    admitted: Admitted,
    stream: StreamId,
    /// Changes when the token that admitted the owner is rotated: calls after it are refused.
    revoked: Option<watch::Receiver<u64>>,
    out: mpsc::Sender<Message>,
    subscriptions: HashMap<(Group, String), Subscription>,
    calls: Arc<Semaphore>,
}

async fn session(
    hub: Hub,
    functions: Arc<dyn Functions>,
    admitted: Admitted,
    stream: StreamId,
    mut revoked: Option<watch::Receiver<u64>>,
    socket: WebSocket,
) {
    let (mut sink, mut source) = socket.split();
    let (out, mut outbox) = mpsc::channel::<Message>(OUTBOX);
    let mut closing = hub.inner.log.watch_closing();
    let writer = tokio::spawn(async move {
        // Every frame waiting (up to a batch) goes out in one write; a client that does not take
        // a batch within SEND_TIMEOUT is gone.
        while let Some(first) = outbox.recv().await {
            let batch = async {
                sink.feed(first).await?;
                for _ in 1..WRITE_BATCH {
                    match outbox.try_recv() {
                        Ok(frame) => sink.feed(frame).await?,
                        Err(_) => break,
                    }
                }
                sink.flush().await
            };
            match tokio::time::timeout(SEND_TIMEOUT, batch).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return,
                Err(_) => {
                    tracing::debug!("a live client took no frame for {SEND_TIMEOUT:?}: dropped");
                    return;
                }
            }
        }
        let _ = tokio::time::timeout(SEND_TIMEOUT, sink.close()).await;
    });
    let mut session = Session {
        hub,
        functions,
        admitted,
        stream,
        revoked: revoked.clone(),
        out,
        subscriptions: HashMap::new(),
        calls: Arc::new(Semaphore::new(MAX_CALLS)),
    };
    // The socket is read by its own task, so the client leaving is seen even while a frame
    // waits (for room in the outbox, for a call slot): what it sent before leaving is dropped.
    let (inbox_tx, mut inbox) = mpsc::channel::<String>(INBOX);
    let (left_tx, mut left) = watch::channel(false);
    let started = tokio::time::Instant::now();
    let heard = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let reader = {
        let heard = heard.clone();
        tokio::spawn(async move {
            while let Some(message) = source.next().await {
                let at = started.elapsed().as_millis() as u64;
                heard.store(at, std::sync::atomic::Ordering::Relaxed);
                let text = match message {
                    Ok(Message::Text(text)) => text,
                    Ok(Message::Binary(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
                    Ok(Message::Ping(_) | Message::Pong(_)) => continue,
                    Ok(Message::Close(_)) | Err(_) => break,
                };
                if inbox_tx.send(text).await.is_err() {
                    break;
                }
            }
            let _ = left_tx.send(true);
        })
    };
    let gone = session.out.clone();
    let mut pings = tokio::time::interval(PING_INTERVAL);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    pings.tick().await;
    let mut pinged: Option<u64> = None;
    let mut ended = Ended::Client;
    loop {
        let text = tokio::select! {
            biased;
            why = ending(&mut left, &mut closing, &mut revoked, &gone) => {
                ended = why;
                break;
            }
            text = inbox.recv() => match text {
                Some(text) => text,
                None => break,
            },
            _ = pings.tick() => {
                // A client that answered nothing since the last ping is gone (a half-open
                // connection would otherwise hold its feeds forever).
                let last = heard.load(std::sync::atomic::Ordering::Relaxed);
                if pinged.is_some_and(|pinged| last < pinged) {
                    tracing::debug!("a live client answered no ping: dropped");
                    break;
                }
                pinged = Some(started.elapsed().as_millis() as u64);
                let _ = session.out.try_send(Message::Ping(Vec::new()));
                continue;
            }
        };
        tokio::select! {
            biased;
            why = ending(&mut left, &mut closing, &mut revoked, &gone) => {
                ended = why;
                break;
            }
            () = session.receive(&text) => {}
        }
    }
    reader.abort();
    session.subscriptions.clear();
    match ended {
        Ended::Shutdown => writer.abort(),
        Ended::Rotated => {
            let _ = session
                .out
                .try_send(Message::Text(error_frame(code::OTHER, ROTATED).to_string()));
        }
        Ended::Client => {}
    }
}

impl Session {
    async fn send(&self, frame: Json) {
        let _ = self.out.send(Message::Text(frame.to_string())).await;
    }

    async fn fail(&self, code: u8, message: impl Into<String>) {
        self.send(error_frame(code, message)).await;
    }

    /// One frame from the client, dispatched in django-socksync's order.
    async fn receive(&mut self, text: &str) {
        let Ok(request) = serde_json::from_str::<Json>(text) else {
            return self.fail(code::INVALID_JSON, "Invalid json.").await;
        };
        let Some(request) = request.as_object().filter(|r| r.contains_key("func")) else {
            return self.fail(code::INVALID_FUNC, "func is required.").await;
        };
        let func = text_of(&request["func"]);
        if func == "error" {
            return;
        }
        if func == "unsubscribe_all" {
            self.subscriptions.clear();
            return;
        }
        let Some(kind) = request.get("type") else {
            return self.fail(code::INVALID_TYPE, "type is required.").await;
        };
        let Some(name) = request.get("name") else {
            return self.fail(code::INVALID_NAME, "name is required.").await;
        };
        let Some(group) = kind.as_str().and_then(Group::parse) else {
            let message = format!("{} is not a valid type.", text_of(kind));
            return self.fail(code::INVALID_TYPE, message).await;
        };
        let name = text_of(name);
        if let Err(reason) = self.registered(group, name.as_str(), request).await {
            return self.fail(code::INVALID_NAME, reason).await;
        }
        if !group.accepts(&func) {
            let message = format!("{func} is not valid for this group.");
            return self.fail(code::INVALID_FUNC, message).await;
        }
        let subscribed = self.subscriptions.contains_key(&(group, name.clone()));
        if func != "subscribe" && !subscribed {
            return self
                .fail(code::INVALID_FUNC, "Subscription required.")
                .await;
        }
        if func == "call" && !request.contains_key("id") {
            return self.fail(code::MISSING_FIELD, "id is required.").await;
        }
        if let Err(message) = self.handle(group, &func, name, request).await {
            self.fail(code::OTHER, message).await;
        }
    }

    /// Whether `name` exists in `group`: a valid kv key, a list the schema in force declares, a
    /// built-in function. The error is the message of error 3.
    async fn registered(
        &self,
        group: Group,
        name: &str,
        request: &Map<String, Json>,
    ) -> Result<(), String> {
        let not_registered = || format!("{name} is not registered.");
        let valid = match group {
            Group::Var => {
                quire_projection_kv::check_key(name.as_bytes()).is_ok()
                    && request["name"].is_string()
            }
            Group::Function => FUNCTIONS.contains(&name),
            Group::List => {
                if !request["name"].is_string() {
                    false
                } else {
                    let sql = &self.hub.inner.sql;
                    let stream = sql
                        .held(self.stream, self.admitted.caller)
                        .map_err(|s| s.message().to_string())?;
                    match sql.lists(stream).await {
                        Ok(lists) => lists.contains_key(name),
                        Err(status) => {
                            return Err(format!("{} ({})", not_registered(), status.message()))
                        }
                    }
                }
            }
        };
        if valid {
            Ok(())
        } else {
            Err(not_registered())
        }
    }

    async fn handle(
        &mut self,
        group: Group,
        func: &str,
        name: String,
        request: &Map<String, Json>,
    ) -> Result<(), String> {
        let key = (group, name);
        match func {
            "subscribe" => {
                if self.subscriptions.contains_key(&key) {
                    return Ok(());
                }
                if self.subscriptions.len() >= MAX_SUBSCRIPTIONS {
                    return Err(format!(
                        "a connection may hold at most {MAX_SUBSCRIPTIONS} subscriptions; unsubscribe from some first"
                    ));
                }
                let subscription = self.subscribe(group, &key.1);
                self.subscriptions.insert(key, subscription);
                Ok(())
            }
            "unsubscribe" => {
                self.subscriptions.remove(&key);
                Ok(())
            }
            "get" => {
                // A var's get has no page: its fields are not read.
                let page = match request.get("page").filter(|_| group == Group::List) {
                    None | Some(Json::Null) => 0,
                    Some(page) => whole(page).ok_or("page must be a whole number (from 0)")?,
                };
                let page_size = match request.get("page_size").filter(|_| group == Group::List) {
                    None | Some(Json::Null) => None,
                    Some(size) => Some(
                        whole(size)
                            .filter(|size| *size > 0)
                            .ok_or("page_size must be a whole number from 1")?,
                    ),
                };
                if let Some(Subscription::Watch { commands, .. }) = self.subscriptions.get(&key) {
                    let _ = commands.send(Command::Get { page, page_size }).await;
                }
                Ok(())
            }
            _ => {
                // "call": after the checks, run it (at most MAX_CALLS at once).
                let id = request["id"].clone();
                let args = match request.get("args") {
                    None | Some(Json::Null) => Map::new(),
                    Some(Json::Object(args)) => args.clone(),
                    Some(_) => {
                        return Err(format!(
                            "call {} of {} failed: args must be an object",
                            text_of(&id),
                            key.1
                        ))
                    }
                };
                let permit = tokio::select! {
                    permit = self.calls.clone().acquire_owned() => permit.map_err(|e| e.to_string())?,
                    () = self.out.closed() => return Ok(()),
                };
                let (functions, admitted, stream, out, revoked) = (
                    self.functions.clone(),
                    self.admitted.clone(),
                    self.stream,
                    self.out.clone(),
                    self.revoked.clone(),
                );
                let name = key.1;
                tokio::spawn(async move {
                    // Checked when the call runs, not when it arrived: it may have waited.
                    let rotated = revoked.is_some_and(|r| r.has_changed().unwrap_or(true));
                    let done = if rotated {
                        Err(ROTATED.to_string())
                    } else {
                        functions.call(&admitted, stream, &name, args).await
                    };
                    drop(permit);
                    let frame = match done {
                        Ok(value) => json!({
                            "func": "return", "type": "function", "name": name,
                            "id": id, "value": Json::Object(value),
                        }),
                        Err(error) => error_frame(
                            code::OTHER,
                            format!("call {} of {name} failed: {error}", text_of(&id)),
                        ),
                    };
                    let _ = out.send(Message::Text(frame.to_string())).await;
                });
                Ok(())
            }
        }
    }

    fn subscribe(&self, group: Group, name: &str) -> Subscription {
        let (commands, received) = mpsc::channel(16);
        let (hub, out, stream, name) = (
            self.hub.clone(),
            self.out.clone(),
            self.stream,
            name.to_string(),
        );
        let task = match group {
            Group::Function => return Subscription::Function,
            Group::Var => tokio::spawn(follow_var(hub, stream, name, received, out)),
            Group::List => tokio::spawn(follow_list(hub, stream, name, received, out)),
        };
        Subscription::Watch { commands, task }
    }
}

/// A JSON value as text: a string as itself, anything else as JSON.
fn text_of(value: &Json) -> String {
    match value {
        Json::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// A whole number from JSON: an integer, or a string of digits (the seed README's fields are
/// strings).
fn whole(value: &Json) -> Option<u64> {
    match value {
        Json::Number(n) => n.as_u64(),
        Json::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

/// Waits for a feed's first computed value.
async fn ready(feed: &mut watch::Receiver<Arc<Value>>) -> Option<Arc<Value>> {
    let value = feed
        .wait_for(|value| **value != Value::Pending)
        .await
        .ok()?
        .clone();
    Some(value)
}

/// The task of a subscribed var: `set` for every `get`, and for every change of the key.
async fn follow_var(
    hub: Hub,
    stream: StreamId,
    name: String,
    mut commands: mpsc::Receiver<Command>,
    out: mpsc::Sender<Message>,
) {
    let mut feed = hub.watch(FeedKey::Var {
        stream,
        key: name.clone(),
    });
    let set = |value: &Json| json!({"func": "set", "type": "var", "name": name, "value": value});
    // What the client holds (or, before its first get, what the key was when it subscribed).
    let mut last: Option<Json> = None;
    let mut failure: Option<String> = None;
    // The client asked for the value and got an error instead: it is owed a `set`.
    let mut owed = false;
    loop {
        let (value, asked) = tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Get { .. }) => match ready(&mut feed).await {
                    Some(value) => (value, true),
                    None => return,
                },
                None => return,
            },
            changed = feed.changed() => match changed {
                Ok(()) => (feed.borrow_and_update().clone(), false),
                Err(_) => return,
            },
        };
        let frame = match &*value {
            Value::Var(value) => {
                failure = None;
                let changed = last.as_ref().is_some_and(|last| last != value);
                let frame = (asked || owed || changed).then(|| set(value));
                owed = false;
                last = Some(value.clone());
                frame
            }
            Value::Failed(message) if failure.as_ref() != Some(message) || asked => {
                failure = Some(message.clone());
                owed |= asked;
                Some(error_frame(code::OTHER, format!("var {name}: {message}")))
            }
            _ => None,
        };
        if let Some(frame) = frame {
            if out.send(Message::Text(frame.to_string())).await.is_err() {
                return;
            }
        }
    }
}

/// The task of a subscribed list: `set_all` for every `get`, then the frames that keep the
/// client's page exact.
async fn follow_list(
    hub: Hub,
    stream: StreamId,
    name: String,
    mut commands: mpsc::Receiver<Command>,
    out: mpsc::Sender<Message>,
) {
    let mut feed: Option<watch::Receiver<Arc<Value>>> = None;
    // The page the client holds (None: nothing yet, or it was told the list failed).
    let mut shown: Option<Arc<Snapshot>> = None;
    let mut failure: Option<String> = None;
    loop {
        let changed = async {
            match feed.as_mut() {
                Some(feed) => feed
                    .changed()
                    .await
                    .map(|()| feed.borrow_and_update().clone()),
                None => std::future::pending().await,
            }
        };
        let (value, asked) = tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Get { page, page_size }) => {
                    let mut watched = hub.watch(FeedKey::Page {
                        stream,
                        list: name.clone(),
                        page,
                        page_size,
                    });
                    let Some(value) = ready(&mut watched).await else { return };
                    feed = Some(watched);
                    (value, true)
                }
                None => return,
            },
            value = changed => match value {
                Ok(value) => (value, false),
                Err(_) => return,
            },
        };
        let frames = match &*value {
            Value::Page(page, delta) => {
                failure = None;
                let frames = match (&shown, asked, delta) {
                    // The common case: this client held the page the feed published before.
                    (Some(shown), false, Some(delta)) if Arc::ptr_eq(shown, &delta.from) => {
                        delta.frames.clone()
                    }
                    (Some(shown), false, _)
                        if (shown.page, shown.page_size) == (page.page, page.page_size) =>
                    {
                        diff(shown, page)
                            .iter()
                            .map(|op| op.frame(&name).to_string())
                            .collect()
                    }
                    _ => vec![page.set_all(&name).to_string()],
                };
                shown = Some(page.clone());
                frames
            }
            Value::Unregistered => {
                shown = None;
                vec![
                    error_frame(code::INVALID_NAME, format!("{name} is not registered."))
                        .to_string(),
                ]
            }
            Value::Failed(message) if failure.as_ref() != Some(message) || asked => {
                failure = Some(message.clone());
                shown = None;
                vec![error_frame(code::OTHER, format!("list {name}: {message}")).to_string()]
            }
            _ => Vec::new(),
        };
        for frame in frames {
            if out.send(Message::Text(frame)).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn page(keys: &[(u8, u8)], total: u64) -> Snapshot {
        Snapshot {
            page: 0,
            page_size: 8,
            total,
            items: keys
                .iter()
                .map(|(key, value)| Item {
                    key: key.to_string(),
                    value: json!({"id": key.to_string(), "v": value}),
                })
                .collect(),
        }
    }

    /// What a client holds after applying `ops` to `held`.
    fn apply(held: &Snapshot, ops: &[Op]) -> (u64, Vec<Json>) {
        let mut total = held.total;
        let mut items: Vec<Json> = held.items.iter().map(|i| i.value.clone()).collect();
        for op in ops {
            match op {
                Op::SetCount(n) => total = *n,
                Op::Insert(i, v) => items.insert(*i, v.clone()),
                Op::Delete(i) => {
                    items.remove(*i);
                }
                Op::Set(i, v) => items[*i] = v.clone(),
            }
        }
        (total, items)
    }

    #[test]
    fn one_change_makes_the_frames_the_seed_describes() {
        let old = page(&[(1, 0), (2, 0), (3, 0)], 10);
        // An insert at the top pushes the last row out.
        let new = page(&[(9, 0), (1, 0), (2, 0)], 11);
        assert_eq!(
            diff(&old, &new),
            vec![
                Op::SetCount(11),
                Op::Insert(0, new.items[0].value.clone()),
                Op::Delete(3)
            ]
        );
        // A delete pulls the next row in at the end.
        let new = page(&[(1, 0), (3, 0), (4, 0)], 9);
        assert_eq!(
            diff(&old, &new),
            vec![
                Op::SetCount(9),
                Op::Delete(1),
                Op::Insert(2, new.items[2].value.clone())
            ]
        );
        // A changed row is a set.
        let new = page(&[(1, 0), (2, 5), (3, 0)], 10);
        assert_eq!(
            diff(&old, &new),
            vec![Op::Set(1, new.items[1].value.clone())]
        );
    }

    proptest! {
        #[test]
        fn applying_the_diff_gives_the_new_page(
            old in proptest::collection::btree_map(0u8..20, 0u8..3, 0..8),
            new in proptest::collection::btree_map(0u8..20, 0u8..3, 0..8),
            old_order in proptest::collection::vec(any::<u8>(), 8),
            new_order in proptest::collection::vec(any::<u8>(), 8),
            totals in (0u64..50, 0u64..50),
        ) {
            let shuffle = |map: &std::collections::BTreeMap<u8, u8>, order: &[u8]| {
                let mut items: Vec<(u8, u8)> = map.iter().map(|(k, v)| (*k, *v)).collect();
                items.sort_by_key(|(k, _)| order[*k as usize % order.len()] ^ k);
                items
            };
            let old = page(&shuffle(&old, &old_order), totals.0);
            let new = page(&shuffle(&new, &new_order), totals.1);
            let (total, items) = apply(&old, &diff(&old, &new));
            prop_assert_eq!(total, new.total);
            let expected: Vec<Json> = new.items.iter().map(|i| i.value.clone()).collect();
            prop_assert_eq!(items, expected);
        }
    }
}
