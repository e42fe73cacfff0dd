//! Second round of attacks on the hostile-load defences: the listener's budget of unfinished peer
//! messages (`quire::net::PendingBytes`), the byte-metered channels of readers that stall, and
//! `Kv.Scan`'s pages. Attackers speak from other loopback addresses (127.0.0.2 and up), honest
//! peers and clients from 127.0.0.1.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use quire::pb;
use quire::pb::peer_message::Message as Wire;

use crate::attack_load::{grpc_frame, RawPeer};
use crate::common::*;
use crate::crash::spawn_serve_with;
use crate::hostile::{connect_from, new_stream, rss, ATTACKER};

const HONEST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// `raw`'s handshake, then the node's `Streams` (it accepted the fresh key and started).
async fn prove(raw: &mut RawPeer) {
    raw.handshake().await;
    assert!(
        raw.until_within(Duration::from_secs(10), |m| matches!(m, Wire::Streams(_)))
            .await,
        "the node accepts the fresh key and sends its streams"
    );
}

/// `Streams` naming 70,000 streams this node does not hold and `held` last: about 2.4 MiB, more
/// than one HTTP/2 window, so the node must read past the first frames to answer with a `Want`.
fn big_streams_message(held: &quire_projection_api::StreamId) -> Wire {
    let mut streams: Vec<Bytes> = (0..70_000u32)
        .map(|index| {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&index.to_be_bytes());
            id[4] = 0xee;
            Bytes::copy_from_slice(&id)
        })
        .collect();
    streams.push(bytes_of(held));
    Wire::Streams(pb::PeerStreams { streams })
}

/// Whether an honest peer from 127.0.0.1 gets a 2.4 MiB `Streams` message through within
/// `within` (the node answers it with a `Want` of the one stream it holds).
async fn honest_message_goes_through(
    peer: SocketAddr,
    held: &quire_projection_api::StreamId,
    within: Duration,
) -> bool {
    let mut honest = RawPeer::open(HONEST, peer).await;
    prove(&mut honest).await;
    honest.send(big_streams_message(held));
    let wanted = bytes_of(held);
    let through = honest
        .until_within(
            within,
            |message| matches!(message, Wire::Want(want) if want.stream == wanted),
        )
        .await;
    honest.connection.abort();
    through
}

/// Was a finding (the fix: `Drop for PeerBody` gives the bytes back, and a proven peer
/// connection with no call open is cut after `IDLE_PEER_TIMEOUT`). The bytes a peer call held of
/// an unfinished message were given back only on a whole message or when the connection closed:
/// four addresses (127.0.0.2–5; one IPv6 /62) each proved a fresh key, sent
/// `MAX_PEER_MESSAGE_BYTES - 1` of a message, reset the call and kept the idle connection, and
/// `PendingBytes` stayed full though the node held none of it — an honest peer's 2.4 MiB `Streams`
/// then got no `Want` within 20 s, for as long as the idle connections stayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_reset_mid_message_gives_its_pending_bytes_back_and_honest_peers_go_through() {
    let dir = tempfile::tempdir().unwrap();
    let (child, url, peer) = spawn_serve_with(dir.path(), &[]).await;
    let peer: SocketAddr = peer.parse().unwrap();
    let held = new_stream(&url, "held").await;
    let declared = quire::net::MAX_PEER_MESSAGE_BYTES;
    let mut idle = Vec::new();
    let mut taken = Vec::new();
    for last in 2..=5u8 {
        let mut raw = RawPeer::open(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), peer).await;
        prove(&mut raw).await;
        let mut head = vec![0u8];
        head.extend_from_slice(&(declared as u32).to_be_bytes());
        raw.send_stream
            .send_data(Bytes::from(head), false)
            .expect("head");
        // All but the message's last byte: the node reads them (the address is under its cap).
        let sent = raw.push(declared - 1, Duration::from_secs(3)).await;
        // The node has read all but the last window of it once the window comes back.
        raw.send_stream.reserve_capacity(1 << 20);
        let send_stream = &mut raw.send_stream;
        let _ = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| send_stream.poll_capacity(cx)),
        )
        .await;
        taken.push(sent >> 20);
        // The call ends mid-message; the connection stays open (its task answers pings).
        raw.send_stream.send_reset(h2::Reason::CANCEL);
        idle.push(raw);
    }
    let locked_out = !honest_message_goes_through(peer, &held, Duration::from_secs(20)).await;
    let open = idle
        .iter()
        .filter(|raw| !raw.connection.is_finished())
        .count();
    for raw in &idle {
        raw.connection.abort();
    }
    drop(idle);
    // The idle connections closed: their ProvenState drops and gives the bytes back.
    let after_close = honest_message_goes_through(peer, &held, Duration::from_secs(20)).await;
    assert!(
        !locked_out,
        "four strangers sent {taken:?} MiB of unfinished messages, reset their calls and kept \
         {open} idle connections: an honest peer's 2.4 MiB message then got no answer within 20 s \
         (after those connections closed it went through: {after_close})"
    );
    drop(child);
}

/// A raw HTTP/2 client of the client API from `from` whose windows are the protocol's default
/// 64 KiB and which never reads: what the node sends it waits in the node.
async fn stalled_client(
    from: IpAddr,
    url: &str,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<()>,
    SocketAddr,
) {
    let to: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let tcp = connect_from(from, to).await;
    let (client, connection) = h2::client::handshake(tcp).await.expect("HTTP/2 handshake");
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, connection, to)
}

/// Starts a public unary-request, streaming-reply gRPC call and returns its reply (unread).
async fn start_call(
    client: &mut h2::client::SendRequest<Bytes>,
    to: SocketAddr,
    path: &str,
    request: &impl prost::Message,
) -> h2::client::ResponseFuture {
    let mut ready = client.clone().ready().await.expect("a stream");
    let head = http::Request::builder()
        .method("POST")
        .uri(format!("http://{to}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = ready.send_request(head, false).unwrap();
    send.send_data(grpc_frame(request), true).expect("request");
    response
}

/// Was a finding (the fix: `ReaderBytes`, a node-wide budget of what readers' channels hold with
/// a 32 MiB share per address, taken *before* a chunk is read). The byte caps of readers were
/// per call: a `Log.Read` whose client stopped reading held its 4 MiB store read, 4 MiB waiting
/// and the message being written, and one stranger connection may open 256 calls — 64 `Read`s of
/// a 16 MiB stream (1 MiB scribes) on one connection from 127.0.0.2, never read, moved the node's
/// resident set from 66 MiB to 571 MiB. Now they hold the address's share and one message each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_public_reads_on_one_connection_hold_only_their_addresses_share() {
    const SCRIBES: usize = 16;
    const CALLS: usize = 64;
    let dir = tempfile::tempdir().unwrap();
    let (child, url, _peer) = spawn_serve_with(dir.path(), &[]).await;
    let pid = child.id().unwrap();
    let mut owner = clients(&url).await;
    let stream = create_stream(
        &mut owner,
        "large",
        Some(pb::Policy {
            max_file_bytes: 8 << 20,
            max_stream_bytes: 1 << 30,
            ..Default::default()
        }),
    )
    .await;
    for index in 0..SCRIBES {
        let mut payload = vec![index as u8; 1 << 20];
        payload[..8].copy_from_slice(&(index as u64).to_le_bytes());
        owner
            .log
            .append(pb::AppendRequest {
                stream: bytes_of(&stream),
                kind: "x.blob".into(),
                content_type: "application/octet-stream".into(),
                payload: Bytes::from(payload),
                parents: vec![],
            })
            .await
            .expect("append a 1 MiB scribe");
    }
    let before = rss(pid);
    let (mut client, connection, to) = stalled_client(ATTACKER, &url).await;
    let mut replies = Vec::new();
    for _ in 0..CALLS {
        let reply = start_call(
            &mut client,
            to,
            "/quire.v1.Log/Read",
            &pb::ReadRequest {
                stream: bytes_of(&stream),
                from_seq: 1,
                limit: 1000,
            },
        )
        .await;
        replies.push(reply);
    }
    let mut answered = Vec::new();
    for reply in replies {
        let reply = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .expect("the node answers")
            .expect("a reply");
        assert_eq!(reply.status(), 200);
        answered.push(reply);
    }
    // Wait until the resident set stops growing (each call fills its budget, then waits).
    let mut most = rss(pid);
    let mut still = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while still < 10 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = rss(pid);
        if now > most + (1 << 20) {
            still = 0;
        } else {
            still += 1;
        }
        most = most.max(now);
    }
    let grown = most.saturating_sub(before) >> 20;
    eprintln!(
        "{CALLS} stalled Log.Read calls: RSS {} MiB -> {} MiB",
        before >> 20,
        most >> 20
    );
    assert!(
        grown < 128,
        "{CALLS} stalled Log.Read calls on one stranger connection grew the node by {grown} MiB \
         ({} MiB -> {} MiB; about {} MiB each)",
        before >> 20,
        most >> 20,
        grown / CALLS as u64
    );
    drop(answered);
    connection.abort();
    drop(child);
}

/// Pinned: `Kv.Scan` pages by `after` cover every key of a prefix exactly once and in order, for
/// binary keys (0x00, 0xff, LIKE's `%` and `_`), keys that are prefixes of each other, an empty
/// prefix, `after` equal to a key, between keys, before the prefix and past its end; a page is
/// cut by its 2 MiB of keys and values (at least one entry) with `more` set only when a key
/// follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_scan_pages_cover_binary_and_nested_keys_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut owner = clients(&node.url()).await;
    let stream = create_stream(&mut owner, "scan", None).await;
    let mut kv = crate::kv::kv(&node).await;
    let keys: Vec<&[u8]> = vec![
        b"\x00",
        b"\x00\x00",
        b"a",
        b"a\x00",
        b"a\x00\x01",
        b"a\x7f",
        b"a\xff",
        b"a\xff\xff",
        b"a\xff\xff\xff",
        b"a%",
        b"a_",
        b"a%b",
        b"ab",
        b"abc",
        b"b",
        b"b\x00",
        b"\xff",
        b"\xff\xff",
        b"\xff\xff\xff",
    ];
    let mut table: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut sets = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let value = format!("value {index}").into_bytes();
        table.insert(key.to_vec(), value.clone());
        sets.push(pb::KvSetRequest {
            stream: bytes_of(&stream),
            key: Bytes::copy_from_slice(key),
            value: Bytes::from(value),
        });
    }
    kv.update(pb::KvUpdateRequest {
        stream: bytes_of(&stream),
        sets,
        deletes: vec![],
    })
    .await
    .expect("set the keys");
    // Three large values: 2 MiB of keys and values hold two of them a page.
    for index in 0..3u8 {
        let key = vec![b'z', index];
        let value = vec![index; 900 << 10];
        crate::kv::set(&mut kv, &stream, &key, &value)
            .await
            .expect("a large value");
        table.insert(key, value);
    }
    let prefixes: Vec<&[u8]> = vec![
        b"",
        b"\x00",
        b"a",
        b"a\x00",
        b"a\xff",
        b"a\xff\xff",
        b"a%",
        b"a_",
        b"ab",
        b"\xff",
        b"\xff\xff",
        b"b",
        b"c",
        b"z",
    ];
    for prefix in &prefixes {
        let expected: Vec<Vec<u8>> = table
            .keys()
            .filter(|key| key.starts_with(prefix))
            .cloned()
            .collect();
        for limit in [1u32, 2, 3, 0] {
            let mut got: Vec<Vec<u8>> = Vec::new();
            let mut after = Bytes::new();
            for page in 0.. {
                assert!(
                    page < 100,
                    "prefix {prefix:?} limit {limit}: pages never end"
                );
                let reply = kv
                    .scan(pb::KvScanRequest {
                        stream: bytes_of(&stream),
                        prefix: Bytes::copy_from_slice(prefix),
                        limit,
                        after: after.clone(),
                    })
                    .await
                    .expect("scan")
                    .into_inner();
                let bytes: usize = reply
                    .entries
                    .iter()
                    .map(|entry| entry.key.len() + entry.value.len())
                    .sum();
                assert!(
                    reply.entries.len() == 1 || bytes <= 2 << 20,
                    "a page of {bytes} bytes"
                );
                for entry in &reply.entries {
                    assert_eq!(table.get(entry.key.as_ref()), Some(&entry.value.to_vec()));
                    got.push(entry.key.to_vec());
                }
                if !reply.more {
                    break;
                }
                after = reply.entries.last().expect("a page with more").key.clone();
            }
            assert_eq!(got, expected, "prefix {prefix:?} limit {limit}");
        }
    }
    // `after` equal to a key, between keys, before the prefix and past its end.
    let cases: Vec<(&[u8], &[u8])> = vec![
        (b"a", b"a"),
        (b"a", b"a\x00"),
        (b"a", b"a\x00\x00"),
        (b"a", b"a\xff\xff"),
        (b"a", b"\x00"),
        (b"a", b"b"),
        (b"", b"\xff\xff"),
        (b"", b"\xff\xff\xff"),
        (b"", b"\xff\xff\xff\xff"),
        (b"\xff", b"\xff"),
    ];
    for (prefix, after) in cases {
        let expected: Vec<Vec<u8>> = table
            .keys()
            .filter(|key| key.starts_with(prefix) && key.as_slice() > after)
            .filter(|key| !key.starts_with(b"z"))
            .cloned()
            .collect();
        let reply = kv
            .scan(pb::KvScanRequest {
                stream: bytes_of(&stream),
                prefix: Bytes::copy_from_slice(prefix),
                limit: 0,
                after: Bytes::copy_from_slice(after),
            })
            .await
            .expect("scan")
            .into_inner();
        let got: Vec<Vec<u8>> = reply
            .entries
            .iter()
            .map(|entry| entry.key.to_vec())
            .filter(|key| !key.starts_with(b"z"))
            .collect();
        assert_eq!(got, expected, "prefix {prefix:?} after {after:?}");
    }
    node.stop().await.unwrap();
}

/// The median of `runs` timings of `f`.
fn median_time(runs: usize, mut f: impl FnMut()) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let start = std::time::Instant::now();
            f();
            start.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

/// Was a finding (the fix: `Reader::scan` binds one lower bound, the prefix or `after`, so SQLite
/// seeks to where the page starts). A page's query had two lower bounds on the one indexed column
/// and SQLite seeked by the prefix, testing `after` row by row: paging through N keys read N²/2
/// rows (a one-entry page after the last-but-one of 200,000 keys took 12.5 ms against 17 µs after
/// the first; a watch's 782 pages took 5.2 s against 0.46 s for one pass). The test runs the real
/// `quire_projection_kv::Reader` on a 200,000-key table.
#[test]
fn a_scan_page_costs_its_own_keys_not_the_keys_before_after() {
    const KEYS: usize = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let key = |index: usize| format!("k{index:08}").into_bytes();
    {
        let mut db =
            rusqlite::Connection::open(dir.path().join(quire_projection_kv::DB_FILE)).unwrap();
        db.execute_batch(
            "CREATE TABLE current (
                 key BLOB PRIMARY KEY, value BLOB, owner BLOB, hlc INTEGER NOT NULL,
                 id BLOB NOT NULL, fence INTEGER NOT NULL, seq INTEGER NOT NULL) WITHOUT ROWID;
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO meta VALUES ('checkpoint', 1);",
        )
        .unwrap();
        let tx = db.transaction().unwrap();
        {
            let mut insert = tx
                .prepare("INSERT INTO current VALUES (?1, x'76', NULL, 1, ?2, 0, 1)")
                .unwrap();
            for index in 0..KEYS {
                insert
                    .execute(rusqlite::params![key(index), vec![0u8; 32]])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let mut reader = quire_projection_kv::Reader::open(dir.path()).unwrap();
    let mut page = |after: &[u8]| {
        let page = reader.scan(b"", Some(after), 1, 2 << 20).unwrap();
        assert_eq!(page.entries.len(), 1);
    };
    let near_start = median_time(21, || page(&key(0)));
    let near_end = median_time(21, || page(&key(KEYS - 2)));
    // The whole table as a watch's snapshot reads it: 256 entries a page.
    let start = std::time::Instant::now();
    let (mut after, mut pages, mut seen) = (None::<Vec<u8>>, 0, 0);
    loop {
        let page = reader.scan(b"", after.as_deref(), 256, 1 << 20).unwrap();
        pages += 1;
        seen += page.entries.len();
        if !page.more {
            break;
        }
        after = page.entries.last().map(|entry| entry.key.clone());
    }
    let paged = start.elapsed();
    assert_eq!(seen, KEYS);
    let one_pass = median_time(3, || {
        let page = reader.scan(b"", None, KEYS, usize::MAX).unwrap();
        assert_eq!(page.entries.len(), KEYS);
    });
    eprintln!(
        "scan of {KEYS} keys: one entry after the first key {near_start:?}, after the last but \
         one {near_end:?}; {pages} pages of 256 took {paged:?}, one pass {one_pass:?}"
    );
    assert!(
        near_end < near_start * 10 + Duration::from_millis(1),
        "a one-entry page after the last-but-one of {KEYS} keys took {near_end:?}, after the \
         first {near_start:?}; {pages} watch pages of the table took {paged:?} against \
         {one_pass:?} for one pass"
    );
}

/// A stranger that proves a fresh key and then ends its call but keeps the connection (answering
/// pings) is cut once it has held the connection `IDLE_PEER_TIMEOUT` with no call open: idle
/// proven connections cannot fill the peer listener's connection caps.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proven_peer_connection_with_no_call_open_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _url, peer) = spawn_serve_with(dir.path(), &[]).await;
    let peer: SocketAddr = peer.parse().unwrap();
    let mut raw = RawPeer::open(ATTACKER, peer).await;
    prove(&mut raw).await;
    raw.send_stream.send_reset(h2::Reason::CANCEL);
    let timeout = quire::net::IDLE_PEER_TIMEOUT + Duration::from_secs(15);
    wait_until(timeout, "the node to cut the idle connection", || async {
        raw.connection.is_finished()
    })
    .await;
    drop(child);
}
