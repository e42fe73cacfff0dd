//! The `Kv` gRPC service: the key/value table of each stream, read from this node's copy (the
//! built-in `kv` projector, `projections/kv`) and written as node-signed `kv.*` scribes.
//!
//! Reads go to the live copy's SQLite file through cached read-only connections (one per copy,
//! reopened when a rebuild swaps a new copy in). Writes are checked against the current state
//! first (a live lease of another author refuses them before anything is written), appended in
//! one commit, and answered once this node's table includes them, so a client reads its own
//! writes.

// Service code returns tonic's `Status`, as every client API service does.
#![allow(clippy::result_large_err)]

use std::pin::Pin;

use bytes::Bytes;
use futures::Stream;
use quire_projection_api::{hlc_millis, AuthorKey, Kind, Policy, StreamId};
use quire_projection_kv::{
    check_key, decode, encode, Entry, Reader, ScanPage, State, CONTENT_TYPE, NAME,
};
use tonic::{Request, Response, Status};

use crate::api::access::{self, Caller};
use crate::api::served::Served;
use crate::api::{append_status, projections_status, store_status};
use crate::log::subscribe::{metered, LogEvent, MeteredSender, SUBSCRIPTION_BYTES};
use crate::log::{Draft, Log, NewScribe, Origin};
use crate::pb;
use crate::projection::readers::TakeError;
use crate::projection::Projections;

/// Most entries of one Scan.
const SCAN_LIMIT: usize = 10_000;
/// Most bytes of keys and values in one Scan reply (at least one entry): within the 4 MiB that
/// gRPC clients accept by default.
const SCAN_BYTES: usize = 2 << 20;
/// Most entries and bytes of one page of a watch's snapshot: a watch holds about one page and
/// [`SUBSCRIPTION_BYTES`] of events, however large the table and however slowly it is read.
const WATCH_PAGE: usize = 256;
const WATCH_PAGE_BYTES: usize = 1 << 20;

/// Locks that order this node's writes to one key (by a hash of stream and key).
const WRITE_LOCKS: usize = 64;

/// The `Kv` service.
#[derive(Clone)]
pub struct KvService {
    served: Served<Reader>,
    /// A write names the state it replaces, read from the table: two writes of one key on this
    /// node take turns, so the second names the first instead of both naming the same state (and
    /// the rule making the second invalid).
    locks: std::sync::Arc<Vec<tokio::sync::Mutex<()>>>,
}

impl std::fmt::Debug for KvService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvService").finish()
    }
}

fn internal(error: impl std::fmt::Display) -> Status {
    Status::internal(error.to_string())
}

fn entry_to_proto(entry: &Entry, policy: &Policy) -> pb::KvEntry {
    let state = &entry.state;
    pb::KvEntry {
        key: Bytes::copy_from_slice(&entry.key),
        value: state.value.clone().map(Bytes::from).unwrap_or_default(),
        present: state.value.is_some(),
        fence: state.fence,
        owner: state
            .owner
            .map(|o| Bytes::copy_from_slice(o.as_bytes()))
            .unwrap_or_default(),
        lease_until_ms: state.lease_until_ms(policy).unwrap_or(0),
        id: Bytes::copy_from_slice(state.id.as_bytes()),
        hlc: state.hlc,
        seq: entry.seq,
        written: Bytes::new(),
    }
}

/// One write of a Set, Delete or Update.
struct Op {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
}

impl KvService {
    /// The service over `log`'s streams and their `kv` projections.
    pub fn new(log: Log, projections: Projections) -> KvService {
        KvService {
            served: Served::new(log, projections, NAME, Reader::open),
            locks: std::sync::Arc::new(
                (0..WRITE_LOCKS)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
            ),
        }
    }

    fn policy(&self, stream: &[u8], caller: Caller) -> Result<(StreamId, Policy), Status> {
        let stream = self.served.stream(stream, caller)?;
        let state = self.served.log.stream(&stream).ok_or_else(|| {
            Status::not_found(format!("stream {stream} is not held by this node"))
        })?;
        Ok((stream, state.policy))
    }

    /// Runs `read` on a reader of the live copy of `stream`'s table.
    fn read<T>(
        &self,
        stream: &StreamId,
        read: impl Fn(&mut Reader) -> Result<T, quire_projection_api::ProjectionError>,
    ) -> Result<T, Status> {
        let mut last_error = None;
        // A rebuild may swap the copy between finding its directory and reading it: try again.
        for _ in 0..3 {
            let mut loan = match self.served.readers.take(stream) {
                Ok(loan) => loan,
                Err(TakeError::Runner(error)) => return Err(projections_status(&error)),
                Err(error) => {
                    last_error = Some(error.to_string());
                    continue;
                }
            };
            match read(&mut loan.reader) {
                Ok(value) => {
                    self.served.readers.give(loan);
                    return Ok(value);
                }
                Err(error) => last_error = Some(error.to_string()),
            }
        }
        Err(internal(format!(
            "reading the kv table: {}",
            last_error.unwrap_or_default()
        )))
    }

    /// A page of `stream`'s table: entries whose keys start with `prefix` and sort after `after`,
    /// at most `limit` and about `max_bytes`, and the seq the table is at: on a blocking thread, in
    /// the node's turn to read (a scan may be long).
    async fn scan_table(
        &self,
        stream: StreamId,
        prefix: Vec<u8>,
        after: Option<Vec<u8>>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<ScanPage, Status> {
        self.served
            .read(
                stream,
                move |reader: &mut Reader| reader.scan(&prefix, after.as_deref(), limit, max_bytes),
                |error: &quire_projection_api::ProjectionError| {
                    internal(format!("reading the kv table: {error}"))
                },
            )
            .await
    }

    /// The value of `key` in `stream`'s table (`None`: unset or deleted). Blocks on SQLite: call
    /// it off the async executor.
    pub fn value(&self, stream: &StreamId, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
        check_key(key).map_err(Status::invalid_argument)?;
        Ok(self
            .get_entry(stream, key)?
            .and_then(|entry| entry.state.value))
    }

    fn get_entry(&self, stream: &StreamId, key: &[u8]) -> Result<Option<Entry>, Status> {
        self.read(stream, |reader| reader.get(key))
    }

    /// [`KvService::get_entry`] for a caller's read (a `Get`, a watch's change): on a blocking
    /// thread in the node's turn to read, as a value may be megabytes.
    async fn read_entry(&self, stream: StreamId, key: Vec<u8>) -> Result<Option<Entry>, Status> {
        self.served
            .read(
                stream,
                move |reader: &mut Reader| reader.get(&key),
                |error: &quire_projection_api::ProjectionError| {
                    internal(format!("reading the kv table: {error}"))
                },
            )
            .await
    }

    /// Checks, appends and waits for `ops`; returns the entries after them.
    async fn write(&self, stream: &[u8], ops: Vec<Op>) -> Result<Vec<pb::KvEntry>, Status> {
        // Writes are the owner's (the access rules let no one else call them).
        let (stream, policy) = self.policy(stream, Caller::Owner)?;
        if ops.is_empty() {
            return Err(Status::invalid_argument(
                "nothing to write: give at least one key",
            ));
        }
        let mut keys = std::collections::HashSet::new();
        for op in &ops {
            check_key(&op.key).map_err(Status::invalid_argument)?;
            if !keys.insert(op.key.as_slice()) {
                return Err(Status::invalid_argument(format!(
                    "key {} appears twice in one update: give each key once",
                    show_key(&op.key)
                )));
            }
        }
        let mut shards: Vec<usize> = ops
            .iter()
            .map(|op| {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                (stream, &op.key).hash(&mut hasher);
                hasher.finish() as usize % WRITE_LOCKS
            })
            .collect();
        shards.sort_unstable();
        shards.dedup();
        let mut _turns = Vec::with_capacity(shards.len());
        for shard in shards {
            // In index order: two multi-key writes never wait for each other in a circle.
            _turns.push(self.locks[shard].lock().await);
        }
        // Judge the write against everything this node holds: wait for its table to apply the
        // stream's scribes received so far.
        let held = self
            .served
            .log
            .stream(&stream)
            .map_or(0, |s| s.record.head_seq);
        self.served.wait(&stream, held).await?;
        let node = self.served.log.node_key();
        let now = self
            .served
            .log
            .clock()
            .peek()
            .max(self.served.log.clock().wall_ms() << 16);
        let mut drafts = Vec::with_capacity(ops.len());
        for op in &ops {
            let current = self.get_entry(&stream, &op.key)?;
            let state = current.map(|e| e.state).unwrap_or_default();
            if op.value.is_none() && state.value.is_none() {
                return Err(Status::not_found(format!(
                    "key {} has no value to delete",
                    show_key(&op.key)
                )));
            }
            refuse_if_leased(&state, &node, now, &policy, &op.key)?;
            // The write names the state it replaces: the rule makes it invalid if it lands
            // anywhere but right after that state.
            let replaces = (state.fence > 0).then_some(&state.id);
            let (kind, payload) = encode(&op.key, op.value.as_deref(), replaces);
            drafts.push(Draft::New(NewScribe {
                stream: Some(stream),
                kind,
                content_type: CONTENT_TYPE.into(),
                payload: Bytes::from(payload),
                parents: Vec::new(),
            }));
        }
        let appended = self
            .served
            .log
            .append(drafts, Origin::Local)
            .await
            .map_err(|error| append_status(&error))?;
        let last = appended.iter().map(|a| a.seq).max().unwrap_or(0);
        self.served.wait(&stream, last).await?;
        let mut out = Vec::with_capacity(ops.len());
        for (op, written) in ops.iter().zip(&appended) {
            let entry = self.get_entry(&stream, &op.key)?.unwrap_or(Entry {
                key: op.key.clone(),
                state: State::default(),
                seq: last,
            });
            let mut reply = entry_to_proto(&entry, &policy);
            reply.written = Bytes::copy_from_slice(written.id.as_bytes());
            out.push(reply);
        }
        Ok(out)
    }
}

fn show_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) => format!("{text:?}"),
        Err(_) => format!("0x{}", hex::encode(key)),
    }
}

fn refuse_if_leased(
    state: &State,
    node: &AuthorKey,
    now: u64,
    policy: &Policy,
    key: &[u8],
) -> Result<(), Status> {
    if state.admits(node, now, &state.id, policy) {
        return Ok(());
    }
    let owner = state.owner.map(|o| o.to_hex()).unwrap_or_default();
    let until = state.lease_until_ms(policy).unwrap_or(0);
    Err(Status::failed_precondition(format!(
        "key {} is leased to {owner} until unix ms {until} ({} s from now): only its holder may write it until then",
        show_key(key),
        until.saturating_sub(hlc_millis(now)) / 1000
    )))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::KvWatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::kv_server::Kv for KvService {
    async fn get(
        &self,
        request: Request<pb::KvGetRequest>,
    ) -> Result<Response<pb::KvEntry>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let (stream, policy) = self.policy(&request.stream, caller)?;
        check_key(&request.key).map_err(Status::invalid_argument)?;
        match self.read_entry(stream, request.key.to_vec()).await? {
            Some(entry) if entry.state.value.is_some() => {
                Ok(Response::new(entry_to_proto(&entry, &policy)))
            }
            // Its last valid write is a set whose value the retention rule pruned (a later write
            // was redacted, or found invalid): held, with no value to show.
            Some(entry) if entry.state.owner.is_some() => Err(Status::not_found(format!(
                "key {} of stream {stream} has no value: its last valid write {} (fence {}, by {}) was pruned by the stream's retention rule",
                show_key(&request.key),
                entry.state.id,
                entry.state.fence,
                entry.state.owner.map(|owner| owner.to_string()).unwrap_or_default()
            ))),
            _ => Err(Status::not_found(format!(
                "key {} is not set in stream {stream}",
                show_key(&request.key)
            ))),
        }
    }

    async fn set(
        &self,
        request: Request<pb::KvSetRequest>,
    ) -> Result<Response<pb::KvEntry>, Status> {
        let request = request.into_inner();
        let op = Op {
            key: request.key.to_vec(),
            value: Some(request.value.to_vec()),
        };
        let mut entries = self.write(&request.stream, vec![op]).await?;
        Ok(Response::new(entries.remove(0)))
    }

    async fn delete(
        &self,
        request: Request<pb::KvDeleteRequest>,
    ) -> Result<Response<pb::KvEntry>, Status> {
        let request = request.into_inner();
        let op = Op {
            key: request.key.to_vec(),
            value: None,
        };
        let mut entries = self.write(&request.stream, vec![op]).await?;
        Ok(Response::new(entries.remove(0)))
    }

    async fn update(
        &self,
        request: Request<pb::KvUpdateRequest>,
    ) -> Result<Response<pb::KvUpdateReply>, Status> {
        let request = request.into_inner();
        let ops = request
            .sets
            .into_iter()
            .map(|set| Op {
                key: set.key.to_vec(),
                value: Some(set.value.to_vec()),
            })
            .chain(request.deletes.into_iter().map(|delete| Op {
                key: delete.key.to_vec(),
                value: None,
            }))
            .collect();
        let entries = self.write(&request.stream, ops).await?;
        Ok(Response::new(pb::KvUpdateReply { entries }))
    }

    async fn scan(
        &self,
        request: Request<pb::KvScanRequest>,
    ) -> Result<Response<pb::KvScanReply>, Status> {
        let caller = access::caller_of(&request);
        let request = request.into_inner();
        let (stream, policy) = self.policy(&request.stream, caller)?;
        let limit = match request.limit {
            0 => SCAN_LIMIT,
            n => (n as usize).min(SCAN_LIMIT),
        };
        let after = (!request.after.is_empty()).then(|| request.after.to_vec());
        let page = self
            .scan_table(stream, request.prefix.to_vec(), after, limit, SCAN_BYTES)
            .await?;
        Ok(Response::new(pb::KvScanReply {
            entries: page
                .entries
                .iter()
                .map(|e| entry_to_proto(e, &policy))
                .collect(),
            seq: page.seq,
            more: page.more,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::KvWatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let caller = request.remote_addr();
        let admitted = access::caller_of(&request);
        let request = request.into_inner();
        let (stream, policy) = self.policy(&request.stream, admitted)?;
        let exact = !request.key.is_empty();
        if exact {
            check_key(&request.key).map_err(Status::invalid_argument)?;
        }
        let filter = if exact {
            request.key.to_vec()
        } else {
            request.prefix.to_vec()
        };
        let matches = move |key: &[u8]| {
            if exact {
                key == filter
            } else {
                key.starts_with(&filter)
            }
        };
        let share = self.served.log.reader_share(caller);
        let (events, receiver) = metered(256, SUBSCRIPTION_BYTES, share);
        let next = request.from_seq;
        if next == 0 {
            let prefix = if exact {
                request.key.to_vec()
            } else {
                request.prefix.to_vec()
            };
            // The first page is read now, so a watch of a stream with no table yet fails here.
            let first = self
                .scan_table(stream, prefix.clone(), None, WATCH_PAGE, WATCH_PAGE_BYTES)
                .await?;
            let service = self.clone();
            let sink = Sink::new(events, &self.served.log, caller);
            tokio::spawn(async move {
                service
                    .snapshot(stream, prefix, first, policy, matches, sink)
                    .await
            });
        } else {
            let service = self.clone();
            let sink = Sink::new(events, &self.served.log, caller);
            let from = Follow {
                from: next,
                pages: Pages::default(),
            };
            tokio::spawn(async move { service.follow(stream, from, policy, matches, sink).await });
        }
        Ok(Response::new(Box::pin(receiver)))
    }
}

/// The pages a watch's snapshot was read in: each page's last key (`None`: through the end) and
/// the seq it was read at, in key order. A change to a key at a seq its page was read at or
/// before is in the snapshot already.
#[derive(Default)]
struct Pages {
    pages: Vec<(Option<Vec<u8>>, u64)>,
}

impl Pages {
    /// The seq the page holding `key` was read at (0 without pages).
    fn read_at(&self, key: &[u8]) -> u64 {
        let index = self
            .pages
            .partition_point(|(last, _)| last.as_deref().is_some_and(|last| last < key));
        self.pages.get(index).map_or(0, |(_, seq)| *seq)
    }

    /// The seq the last page was read at.
    fn last_seq(&self) -> u64 {
        self.pages.last().map_or(0, |(_, seq)| *seq)
    }
}

/// Where a watch's changes start, and the snapshot pages they complete.
struct Follow {
    from: u64,
    pages: Pages,
}

/// The sending end of a watch: every send also ends when the client goes away or the node
/// starts shutting down, so a watch never holds the node open.
struct Sink {
    events: MeteredSender<Result<pb::KvWatchEvent, Status>>,
    closing: tokio::sync::watch::Receiver<bool>,
    /// Who watches (the changes' subscription draws on their address's share too).
    caller: Option<std::net::SocketAddr>,
}

impl Sink {
    fn new(
        events: MeteredSender<Result<pb::KvWatchEvent, Status>>,
        log: &Log,
        caller: Option<std::net::SocketAddr>,
    ) -> Sink {
        Sink {
            events,
            closing: log.watch_closing(),
            caller,
        }
    }

    /// Sends `event`; false when the watch is over.
    async fn send(&mut self, event: pb::kv_watch_event::Event) -> bool {
        let size = match &event {
            pb::kv_watch_event::Event::Entry(entry) => entry.key.len() + entry.value.len(),
            pb::kv_watch_event::Event::CaughtUp(_) => 0,
        };
        let event = Ok(pb::KvWatchEvent { event: Some(event) });
        let sent = tokio::select! {
            sent = self.events.send(event, size) => Some(sent.is_ok()),
            _ = self.closing.wait_for(|closing| *closing) => None,
        };
        sent.unwrap_or_else(|| {
            self.fail(Status::unavailable(
                "the node is shutting down; resume the watch from the last seq seen + 1",
            ));
            false
        })
    }

    /// Ends the watch with `status` (dropped if the client is not reading: it ends anyway).
    fn fail(&self, status: Status) {
        self.events.try_send(Err(status));
    }

    /// Completes when the client is gone or the node is shutting down.
    async fn over(&mut self) {
        tokio::select! {
            () = self.events.closed() => {}
            _ = self.closing.wait_for(|closing| *closing) => {}
        }
    }
}

impl KvService {
    /// Sends a watch's snapshot, page by page from `first` (each page in its own read, so a
    /// watch holds a page, not the table); then the changes made while it was read that its
    /// pages do not hold, `CaughtUp` with the seq of the last page, and every change after.
    async fn snapshot(
        &self,
        stream: StreamId,
        prefix: Vec<u8>,
        first: ScanPage,
        policy: Policy,
        matches: impl Fn(&[u8]) -> bool,
        mut sink: Sink,
    ) {
        let from = first.seq + 1;
        let mut pages = Pages::default();
        let mut page = first;
        loop {
            for entry in page.entries.iter().filter(|e| matches(&e.key)) {
                let event = pb::kv_watch_event::Event::Entry(entry_to_proto(entry, &policy));
                if !sink.send(event).await {
                    return;
                }
            }
            let last = page.entries.last().map(|entry| entry.key.clone());
            match last {
                Some(last) if page.more => {
                    pages.pages.push((Some(last.clone()), page.seq));
                    let next = self
                        .scan_table(
                            stream,
                            prefix.clone(),
                            Some(last),
                            WATCH_PAGE,
                            WATCH_PAGE_BYTES,
                        )
                        .await;
                    page = match next {
                        Ok(page) => page,
                        Err(status) => return sink.fail(status),
                    };
                }
                _ => {
                    pages.pages.push((None, page.seq));
                    break;
                }
            }
        }
        let from = Follow { from, pages };
        self.follow(stream, from, policy, matches, sink).await
    }

    /// Whether `view` is a `redact` of a `kv.*` write.
    fn redacts_a_kv_write(&self, view: &quire_projection_api::Scribe) -> bool {
        if view.kind != Kind::Redact {
            return false;
        }
        view.parents.iter().any(|parent| {
            self.served
                .log
                .get(parent)
                .ok()
                .flatten()
                .and_then(|entry| crate::scribe::decode_envelope(&entry.parts.envelope).ok())
                .is_some_and(|(body, ..)| matches!(body.kind, Kind::KvSet | Kind::KvDelete))
        })
    }

    /// Sends a change for every kv scribe of `stream` from `from.from` on whose key `matches`,
    /// but those `from.pages` hold already; `CaughtUp` once every change up to the seq of their
    /// last page is sent (if there are pages).
    async fn follow(
        &self,
        stream: StreamId,
        from: Follow,
        policy: Policy,
        matches: impl Fn(&[u8]) -> bool,
        mut sink: Sink,
    ) {
        let Follow { from, pages } = from;
        let snapshot_at = (!pages.pages.is_empty()).then(|| pages.last_seq());
        let mut caught_up = snapshot_at.is_none();
        let mut log = self
            .served
            .log
            .subscribe(Some(stream), from.max(1), 256, sink.caller);
        loop {
            let event = tokio::select! {
                event = log.recv() => match event {
                    Some(event) => event,
                    None => return,
                },
                () = sink.over() => return,
            };
            let entry = match event {
                Ok(LogEvent::Entry(entry)) => entry,
                Ok(LogEvent::CaughtUp(_)) => {
                    // The log's head when the subscription began is at or past the snapshot's.
                    if !caught_up {
                        caught_up = true;
                        let seq = snapshot_at.unwrap_or_default();
                        let event = pb::kv_watch_event::Event::CaughtUp(pb::KvCaughtUp { seq });
                        if !sink.send(event).await {
                            return;
                        }
                    }
                    continue;
                }
                Err(error) => return sink.fail(store_status(&error)),
            };
            if let Some(seq) = snapshot_at.filter(|seq| !caught_up && entry.seq > *seq) {
                caught_up = true;
                let event = pb::kv_watch_event::Event::CaughtUp(pb::KvCaughtUp { seq });
                if !sink.send(event).await {
                    return;
                }
            }
            let view = crate::projection::to_view(&entry).ok();
            if view
                .as_ref()
                .is_some_and(|view| self.redacts_a_kv_write(view))
            {
                // Its key went with its payload, so which change to send is not known: once the
                // copy no longer holds the write, end the watch; watching again gives a fresh
                // snapshot without it.
                let _ = self.served.wait(&stream, entry.seq).await;
                return sink.fail(Status::aborted(format!(
                    "scribe {} redacted a kv write of this stream, which may change a value this watch sent: watch again for a fresh snapshot",
                    entry.id
                )));
            }
            let key = view
                .and_then(|view| decode(&view.kind, &view.payload).ok().flatten())
                .map(|(key, _)| key);
            let Some(key) = key.filter(|key| matches(key)) else {
                continue;
            };
            if entry.seq <= pages.read_at(&key) {
                continue; // the snapshot's page of this key holds it already
            }
            // A table that lags (catching up after a start) delays the watch, never ends it.
            let applied = async {
                loop {
                    match self.served.wait(&stream, entry.seq).await {
                        Err(status) if status.code() == tonic::Code::DeadlineExceeded => continue,
                        other => return other,
                    }
                }
            };
            let applied = tokio::select! {
                applied = applied => applied,
                () = sink.over() => return,
            };
            if let Err(status) = applied {
                return sink.fail(status);
            }
            let change = match self.read_entry(stream, key).await {
                Ok(Some(found)) => Entry {
                    seq: entry.seq,
                    ..found
                },
                Ok(None) => continue,
                Err(status) => return sink.fail(status),
            };
            let event = pb::kv_watch_event::Event::Entry(entry_to_proto(&change, &policy));
            if !sink.send(event).await {
                return;
            }
        }
    }
}
