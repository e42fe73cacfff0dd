//! Subscriptions (invariant 8): `CaughtUp` at once on an empty stream, and a slow subscriber during
//! a 100k-scribe burst receives every scribe exactly once, in local order.

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use quire::pb;
use quire::pb::subscribe_event::Event;

use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_stream_says_caught_up_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    // The whole log of an empty node.
    let mut events = clients
        .log
        .subscribe(pb::SubscribeRequest {
            stream: Bytes::new(),
            from_seq: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.event, Some(Event::CaughtUp(pb::CaughtUp { seq: 0 })));

    // A stream with only its genesis, from after the genesis: caught up, nothing else.
    let stream = create_stream(&mut clients, "empty", None).await;
    let mut events = clients
        .log
        .subscribe(pb::SubscribeRequest {
            stream: bytes_of(&stream),
            from_seq: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.event, Some(Event::CaughtUp(pb::CaughtUp { seq: 1 })));

    // Then live scribes arrive, in order.
    let reply = append_note(&mut clients, &stream, "live").await;
    let next = tokio::time::timeout(Duration::from_secs(10), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match next.event {
        Some(Event::Scribe(entry)) => assert_eq!((entry.seq, entry.id), (reply.seq, reply.id)),
        other => panic!("expected the live scribe, got {other:?}"),
    }

    // Unknown streams are NOT_FOUND, not an endless wait.
    let status = clients
        .log
        .subscribe(pb::SubscribeRequest {
            stream: Bytes::from(vec![7u8; 32]),
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    node.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_receives_every_scribe_exactly_once_in_order() {
    const TOTAL: usize = 100_000;
    const BATCH: usize = 1_000;
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path()).await;
    let mut clients = clients(&node.url()).await;
    let stream = create_stream(&mut clients, "burst", None).await;
    let mut events = clients
        .log
        .subscribe(pb::SubscribeRequest {
            stream: bytes_of(&stream),
            from_seq: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let writer = {
        let mut clients = crate::common::clients(&node.url()).await;
        tokio::spawn(async move {
            let mut ids = Vec::with_capacity(TOTAL);
            for batch in 0..TOTAL / BATCH {
                let appends = (0..BATCH)
                    .map(|index| pb::AppendRequest {
                        stream: bytes_of(&stream),
                        kind: "x.burst".into(),
                        content_type: String::new(),
                        payload: Bytes::from(format!("{batch}/{index}")),
                        parents: vec![],
                    })
                    .collect();
                let reply = clients
                    .log
                    .append_batch(pb::AppendBatchRequest {
                        appends,
                        signed: vec![],
                        sealed: vec![],
                    })
                    .await
                    .unwrap()
                    .into_inner();
                ids.extend(reply.results.into_iter().map(|result| result.id));
            }
            ids
        })
    };

    let mut seen = HashSet::with_capacity(TOTAL + 1);
    let mut last_seq = 0;
    let mut caught_up = 0;
    let mut received = Vec::with_capacity(TOTAL);
    while received.len() < TOTAL {
        let event = tokio::time::timeout(Duration::from_secs(120), events.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        match event.event {
            Some(Event::Scribe(entry)) => {
                assert!(
                    entry.seq > last_seq,
                    "local order: {} after {last_seq}",
                    entry.seq
                );
                last_seq = entry.seq;
                assert!(
                    seen.insert(entry.id.clone()),
                    "seq {} delivered twice",
                    entry.seq
                );
                if entry.kind == "x.burst" {
                    received.push(entry.id);
                }
                // Read slowly: the writer runs far ahead and the subscription must fall back to
                // storage rather than drop or skip.
                if received.len() % 10_000 == 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
            Some(Event::CaughtUp(_)) => caught_up += 1,
            None => panic!("empty event"),
        }
    }
    let written = writer.await.unwrap();
    assert_eq!(
        received, written,
        "every scribe, exactly once, in commit order"
    );
    assert_eq!(
        caught_up, 1,
        "CaughtUp is sent exactly once, even while writes go on"
    );
    node.stop().await.unwrap();
}
