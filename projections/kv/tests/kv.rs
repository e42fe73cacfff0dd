//! The kv projector: the fold's rules, and the conformance suite with leasing on and off.

use proptest::prelude::*;
use quire_projection_api::{testing, AuthorKey, Policy, Scribe, ScribeId, StreamId};
use quire_projection_kv::{encode, fold, Kv, Write, CONTENT_TYPE};

const MS: u64 = 1 << 16;

fn write(ms: u64, author: u8, id: u8, value: Option<&[u8]>) -> Write {
    Write {
        hlc: ms * MS,
        author: AuthorKey([author; 32]),
        id: ScribeId([id; 32]),
        value: value.map(<[u8]>::to_vec),
    }
}

fn leasing(lease_ms: u64) -> Policy {
    Policy {
        leasing: true,
        lease_ms,
        ..Policy::default()
    }
}

#[test]
fn a_lease_keeps_others_out_until_it_ends() {
    let policy = leasing(1000);
    let mut writes = vec![
        write(10, 1, 1, Some(b"mine")),
        write(500, 2, 2, Some(b"theirs too early")),
        write(1010, 2, 3, Some(b"theirs after the lease")),
    ];
    let state = fold(&mut writes, &policy);
    assert_eq!(state.value.as_deref(), Some(&b"theirs after the lease"[..]));
    assert_eq!(state.owner, Some(AuthorKey([2; 32])));
    assert_eq!(state.fence, 2, "the early write was not valid");
}

#[test]
fn the_owner_renews_and_its_delete_releases() {
    let policy = leasing(1000);
    let mut renewed = vec![
        write(10, 1, 1, Some(b"a")),
        write(900, 1, 2, Some(b"b")),
        write(1500, 2, 3, Some(b"other")),
    ];
    let state = fold(&mut renewed, &policy);
    assert_eq!(
        state.value.as_deref(),
        Some(&b"b"[..]),
        "renewed at 900: still held at 1500"
    );
    let mut released = vec![
        write(10, 1, 1, Some(b"a")),
        write(20, 1, 2, None),
        write(30, 2, 3, Some(b"other")),
    ];
    let state = fold(&mut released, &policy);
    assert_eq!(state.value.as_deref(), Some(&b"other"[..]));
    assert_eq!(state.fence, 3);
    let mut stolen_delete = vec![write(10, 1, 1, Some(b"a")), write(20, 2, 2, None)];
    let state = fold(&mut stolen_delete, &policy);
    assert_eq!(
        state.value.as_deref(),
        Some(&b"a"[..]),
        "a non-owner's delete is invalid"
    );
}

#[test]
fn at_the_same_instant_the_lower_author_wins_under_leases_and_the_last_without() {
    let mut writes = vec![
        write(10, 9, 1, Some(b"nine")),
        write(10, 3, 2, Some(b"three")),
    ];
    let state = fold(&mut writes.clone(), &leasing(1000));
    assert_eq!(state.value.as_deref(), Some(&b"three"[..]));
    let state = fold(
        &mut writes,
        &Policy {
            leasing: false,
            ..Policy::default()
        },
    );
    assert_eq!(
        state.value.as_deref(),
        Some(&b"nine"[..]),
        "(hlc, author, id): 9 is last"
    );
    assert_eq!(state.fence, 2);
}

fn kv_scribe(stream: StreamId, author: u8, ms: u64, key: &[u8], value: Option<Vec<u8>>) -> Scribe {
    let (kind, payload) = encode(key, value.as_deref());
    testing::scribe(
        stream,
        AuthorKey([author; 32]),
        ms * MS,
        kind,
        CONTENT_TYPE,
        payload,
    )
}

fn scribes() -> impl Strategy<Value = Vec<Scribe>> {
    let one = (
        1u8..4,
        0u64..3000,
        prop::sample::select(vec![&b"a"[..], b"b", b"c"]),
        prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..4)),
    )
        .prop_map(|(author, ms, key, value)| kv_scribe(ScribeId([7; 32]), author, ms, key, value));
    prop::collection::vec(one, 0..30)
}

#[test]
fn conformance_with_leases() {
    // Leases of one second, so writes in the generated 3-second range both hold and expire.
    testing::check_all_with_policy(&Kv, leasing(1000), scribes(), 48).unwrap();
}

#[test]
fn conformance_without_leases() {
    let policy = Policy {
        leasing: false,
        ..Policy::default()
    };
    testing::check_all_with_policy(&Kv, policy, scribes(), 48).unwrap();
}

#[test]
fn a_bad_payload_is_refused_by_index() {
    use quire_projection_api::{ApplyError, Place, Plugin};
    let dir = std::env::temp_dir().join(format!("kv-bad-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut projector = Kv
        .open(&Place::new(dir.clone(), Some(ScribeId([7; 32]))))
        .unwrap();
    let mut good = kv_scribe(ScribeId([7; 32]), 1, 1, b"k", Some(b"v".to_vec()));
    good.local_seq = 1;
    let mut bad = kv_scribe(ScribeId([7; 32]), 1, 2, &[0u8; 1025], Some(b"v".to_vec()));
    bad.local_seq = 2;
    match projector.apply(&[good, bad], 2) {
        Err(ApplyError::Scribe { index, reason }) => {
            assert_eq!(index, 1);
            assert!(reason.contains("1024"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(projector.checkpoint().unwrap(), 0, "nothing committed");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_write_made_after_seeing_another_sorts_after_it_within_one_millisecond() {
    // Author 3 wrote at counter 3 of the same millisecond, after seeing author 9's write at
    // counter 0: causality, not the author id, orders them.
    let mut writes = vec![
        Write {
            hlc: 10 * MS,
            author: AuthorKey([9; 32]),
            id: ScribeId([1; 32]),
            value: None,
        },
        Write {
            hlc: 10 * MS + 3,
            author: AuthorKey([3; 32]),
            id: ScribeId([2; 32]),
            value: Some(b"three, after the delete".to_vec()),
        },
    ];
    let state = fold(&mut writes, &leasing(1000));
    assert_eq!(
        state.value.as_deref(),
        Some(&b"three, after the delete"[..])
    );
}

#[test]
fn a_lease_of_any_length_holds() {
    let mut writes = vec![
        write(10, 1, 1, Some(b"mine")),
        write(1 << 40, 2, 2, Some(b"theirs")),
    ];
    let state = fold(&mut writes, &leasing(u64::MAX));
    assert_eq!(
        state.value.as_deref(),
        Some(&b"mine"[..]),
        "no overflow into a free key"
    );
}
