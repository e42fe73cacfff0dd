//! The kv projector: the fold's rules, and the conformance suite with leasing on and off.

use proptest::prelude::*;
use quire_projection_api::{testing, AuthorKey, Policy, Scribe, ScribeId, StreamId};
use quire_projection_kv::{encode, fold, superseded, Kv, Write, CONTENT_TYPE};

const MS: u64 = 1 << 16;

/// A write that names write `replaces` (0: none) as the one it replaces.
fn write(ms: u64, author: u8, id: u8, value: Option<&[u8]>, replaces: u8) -> Write {
    Write {
        hlc: ms * MS,
        author: AuthorKey([author; 32]),
        id: ScribeId([id; 32]),
        value: value.map(<[u8]>::to_vec),
        replaces: if replaces == 0 {
            ScribeId::default()
        } else {
            ScribeId([replaces; 32])
        },
        pruned_set: false,
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
        write(10, 1, 1, Some(b"mine"), 0),
        write(500, 2, 2, Some(b"theirs too early"), 1),
        write(1010, 2, 3, Some(b"theirs after the lease"), 1),
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
        write(10, 1, 1, Some(b"a"), 0),
        write(900, 1, 2, Some(b"b"), 1),
        write(1500, 2, 3, Some(b"other"), 2),
    ];
    let state = fold(&mut renewed, &policy);
    assert_eq!(
        state.value.as_deref(),
        Some(&b"b"[..]),
        "renewed at 900: still held at 1500"
    );
    let mut released = vec![
        write(10, 1, 1, Some(b"a"), 0),
        write(20, 1, 2, None, 1),
        write(30, 2, 3, Some(b"other"), 2),
    ];
    let state = fold(&mut released, &policy);
    assert_eq!(state.value.as_deref(), Some(&b"other"[..]));
    assert_eq!(state.fence, 3);
    let mut stolen_delete = vec![write(10, 1, 1, Some(b"a"), 0), write(20, 2, 2, None, 1)];
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
        write(10, 9, 1, Some(b"nine"), 0),
        write(10, 3, 2, Some(b"three"), 0),
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

fn kv_scribe(
    stream: StreamId,
    author: u8,
    ms: u64,
    key: &[u8],
    value: Option<Vec<u8>>,
    replaces: Option<&ScribeId>,
) -> Scribe {
    let (kind, payload) = encode(key, value.as_deref(), replaces);
    testing::scribe(
        stream,
        AuthorKey([author; 32]),
        ms * MS,
        kind,
        CONTENT_TYPE,
        payload,
    )
}

/// Writes that name an earlier generated write (or none) as the one they replace, so chains of
/// valid writes, stale names and backdated writes all occur.
fn scribes() -> impl Strategy<Value = Vec<Scribe>> {
    let one = (
        1u8..4,
        0u64..3000,
        prop::sample::select(vec![&b"a"[..], b"b", b"c"]),
        prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..4)),
        prop::option::weighted(0.8, any::<prop::sample::Index>()),
    );
    prop::collection::vec(one, 0..30).prop_map(|writes| {
        let mut out: Vec<Scribe> = Vec::new();
        for (author, ms, key, value, replaces) in writes {
            let replaces = replaces
                .filter(|_| !out.is_empty())
                .map(|index| out[index.index(out.len())].id);
            out.push(kv_scribe(
                ScribeId([7; 32]),
                author,
                ms,
                key,
                value,
                replaces.as_ref(),
            ));
        }
        out
    })
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
    let mut good = kv_scribe(ScribeId([7; 32]), 1, 1, b"k", Some(b"v".to_vec()), None);
    good.local_seq = 1;
    let mut bad = kv_scribe(
        ScribeId([7; 32]),
        1,
        2,
        &[0u8; 1025],
        Some(b"v".to_vec()),
        None,
    );
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
            replaces: ScribeId::default(),
            pruned_set: false,
        },
        Write {
            hlc: 10 * MS + 3,
            author: AuthorKey([3; 32]),
            id: ScribeId([2; 32]),
            value: Some(b"three, after the delete".to_vec()),
            replaces: ScribeId([1; 32]),
            pruned_set: false,
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
        write(10, 1, 1, Some(b"mine"), 0),
        write(1 << 40, 2, 2, Some(b"theirs"), 1),
    ];
    let state = fold(&mut writes, &leasing(u64::MAX));
    assert_eq!(
        state.value.as_deref(),
        Some(&b"mine"[..]),
        "no overflow into a free key"
    );
}

#[test]
fn a_backdated_write_that_names_what_it_saw_cannot_rewrite_history() {
    let policy = leasing(1000);
    // X takes the key at 100 and renews at 600; Y saw X's first write but its clock says 50.
    let mut writes = vec![
        write(100, 1, 1, Some(b"x"), 0),
        write(600, 1, 2, Some(b"x renewed"), 1),
        write(50, 2, 3, Some(b"y, backdated"), 1),
    ];
    let state = fold(&mut writes, &policy);
    assert_eq!(state.value.as_deref(), Some(&b"x renewed"[..]));
    assert_eq!((state.fence, state.id), (2, ScribeId([2; 32])));
    // Without naming anything Y would have come first and taken the key from X, retroactively:
    // naming nothing on a key that has a value is exactly such a claim, and within the minute of
    // clock error a node accepts, it is a race Y may win; the same write naming X's is not.
    let mut stale = vec![
        write(100, 1, 1, Some(b"x"), 0),
        write(1500, 2, 3, Some(b"y names nothing"), 0),
    ];
    let state = fold(&mut stale, &policy);
    assert_eq!(
        state.value.as_deref(),
        Some(&b"x"[..]),
        "a stale name is invalid"
    );
}

#[test]
fn partitioned_holders_share_a_fence_but_never_an_id() {
    let policy = leasing(1000);
    // X holds (write 1). Partitioned: X renews (2); Y, after X's lease ran out on its side,
    // takes the key (3). Both name write 1; each side alone sees fence 2.
    let x_side = fold(
        &mut [
            write(0, 1, 1, Some(b"x"), 0),
            write(900, 1, 2, Some(b"x2"), 1),
        ],
        &policy,
    );
    let y_side = fold(
        &mut [
            write(0, 1, 1, Some(b"x"), 0),
            write(1100, 2, 3, Some(b"y"), 1),
        ],
        &policy,
    );
    assert_eq!(x_side.fence, y_side.fence);
    assert_ne!(x_side.id, y_side.id, "the tokens (fence, id) differ");
    // Healed: X's renewal came first, so Y's write names a replaced state and is invalid.
    let healed = fold(
        &mut [
            write(0, 1, 1, Some(b"x"), 0),
            write(900, 1, 2, Some(b"x2"), 1),
            write(1100, 2, 3, Some(b"y"), 1),
        ],
        &policy,
    );
    assert_eq!((healed.fence, healed.id), (x_side.fence, x_side.id));
}

/// A key's history: writes by three authors over three seconds, each naming an earlier write (or
/// none) as replaced, so valid chains, stale names, backdated writes and lease takeovers occur.
fn history() -> impl Strategy<Value = Vec<Write>> {
    let one = (
        1u8..4,
        0u64..3000,
        prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..4)),
        prop::option::weighted(0.8, any::<prop::sample::Index>()),
    );
    prop::collection::vec(one, 0..30).prop_map(|writes| {
        let mut out: Vec<Write> = Vec::new();
        for (n, (author, ms, value, replaces)) in writes.into_iter().enumerate() {
            let replaces = replaces
                .filter(|_| !out.is_empty())
                .map(|index| out[index.index(out.len())].id)
                .unwrap_or_default();
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(n as u64 + 1).to_be_bytes());
            out.push(Write {
                hlc: ms * MS,
                author: AuthorKey([author; 32]),
                id: ScribeId(id),
                value,
                replaces,
                pruned_set: false,
            });
        }
        out
    })
}

/// `writes` with those at `indices` pruned: value-less, as a `prune` keeps them.
fn pruned(writes: &[Write], indices: &[usize]) -> Vec<Write> {
    let mut out = writes.to_vec();
    for &index in indices {
        out[index].pruned_set = out[index].sets();
        out[index].value = None;
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Retention's rule for kv keys: pruning any of the superseded writes of any history, in any
    /// number of passes, under leases or not, leaves the key's state (value, holder, fence, last
    /// write) exactly as it was, and never prunes the last valid write.
    #[test]
    fn pruning_superseded_writes_in_any_passes_leaves_the_state_unchanged(
        writes in history(),
        leases in prop::option::of(1u64..2000),
        keep in 1usize..4,
        passes in prop::collection::vec(prop::collection::vec(any::<bool>(), 30), 1..4),
    ) {
        let policy = match leases {
            Some(lease_ms) => leasing(lease_ms),
            None => Policy { leasing: false, ..Policy::default() },
        };
        let mut writes = writes;
        let before = fold(&mut writes, &policy);
        for pass in passes {
            let candidates = superseded(&mut writes, &policy, keep);
            prop_assert!(candidates.iter().all(|&(index, _)| writes[index].id != before.id));
            let chosen: Vec<usize> = candidates
                .iter()
                .filter(|&&(index, _)| pass[index % pass.len()])
                .map(|&(index, _)| index)
                .collect();
            writes = pruned(&writes, &chosen);
            prop_assert_eq!(&fold(&mut writes, &policy), &before);
        }
    }
}

#[test]
fn the_newest_valid_writes_are_kept_and_an_invalid_write_goes_with_its_elders() {
    let policy = leasing(1000);
    // 1 takes the key; 2 tries too early (invalid); 1 renews twice.
    let mut writes = vec![
        write(10, 1, 1, Some(b"a"), 0),
        write(500, 2, 2, Some(b"too early"), 1),
        write(600, 1, 3, Some(b"b"), 1),
        write(700, 1, 4, Some(b"c"), 3),
    ];
    let ids = |found: Vec<(usize, u64)>, writes: &[Write]| {
        found
            .into_iter()
            .map(|(index, at)| (writes[index].id.0[0], at / MS))
            .collect::<Vec<_>>()
    };
    let found = superseded(&mut writes, &policy, 1);
    assert_eq!(ids(found, &writes), vec![(1, 600), (2, 600), (3, 700)]);
    let found = superseded(&mut writes, &policy, 2);
    assert_eq!(ids(found, &writes), vec![(1, 700), (2, 700)]);
    assert!(superseded(&mut writes, &policy, 3).is_empty());
    assert!(superseded(&mut writes, &policy, 0).is_empty());
}

/// A `prune` (or `redact`) scribe of `target` as the node writes it: its payload is a
/// `quire.v1.Redact`, which this crate reads through its `Prune` mirror.
fn erasure(
    stream: StreamId,
    kind: quire_projection_api::Kind,
    ms: u64,
    target: &Scribe,
    kv: Option<quire_projection_kv::PrunedKvWrite>,
) -> Scribe {
    use prost::Message as _;
    let payload = quire_projection_kv::Prune {
        target: target.id.0.to_vec(),
        kv,
    }
    .encode_to_vec();
    testing::scribe(
        stream,
        AuthorKey([9; 32]),
        ms * MS,
        kind,
        "application/vnd.quire.prune+protobuf",
        payload,
    )
}

/// What a prune of `write` (a set of `key` naming `replaces`) states.
fn stated(
    write: &Scribe,
    key: &[u8],
    replaces: Option<&Scribe>,
) -> quire_projection_kv::PrunedKvWrite {
    quire_projection_kv::PrunedKvWrite {
        key: key.to_vec(),
        replaces: replaces.map(|r| r.id.0.to_vec()).unwrap_or_default(),
        deleted: false,
        author: write.author.0.to_vec(),
        hlc: write.hlc,
    }
}

/// The digest of a fresh projector after `scribes`, applied one per batch in this order.
fn digest_after(policy: &Policy, scribes: &[&Scribe]) -> [u8; 32] {
    use quire_projection_api::{Place, Plugin};
    let dir = tempfile::tempdir().unwrap();
    let mut place = Place::new(dir.path().to_path_buf(), Some(ScribeId([7; 32])));
    place.policy = policy.clone();
    let mut projector = Kv.open(&place).unwrap();
    for (n, scribe) in scribes.iter().enumerate() {
        let mut scribe = (*scribe).clone();
        scribe.local_seq = n as u64 + 1;
        projector.apply(&[scribe], n as u64 + 1).unwrap();
    }
    projector.digest().unwrap()
}

fn permutations<'a>(items: &[&'a Scribe]) -> Vec<Vec<&'a Scribe>> {
    if items.len() <= 1 {
        return vec![items.to_vec()];
    }
    let mut out = Vec::new();
    for index in 0..items.len() {
        let mut rest = items.to_vec();
        let first = rest.remove(index);
        for mut tail in permutations(&rest) {
            tail.insert(0, first);
            out.push(tail);
        }
    }
    out
}

/// Which erasures count is a function of their set: a true prune keeps the key's state; prunes of
/// one write that disagree take it out of the fold (as an owner's redaction could), on every node
/// whatever the order they arrived in; a redact wins over any prune.
#[test]
fn erasures_count_by_their_set_whatever_their_order() {
    use quire_projection_api::Kind;
    let stream = ScribeId([7; 32]);
    let policy = leasing(1_000_000);
    let w1 = kv_scribe(stream, 1, 10, b"k", Some(b"one".to_vec()), None);
    let w2 = kv_scribe(stream, 1, 20, b"k", Some(b"two".to_vec()), Some(&w1.id));
    let truth = erasure(stream, Kind::Prune, 30, &w1, Some(stated(&w1, b"k", None)));
    let lie = erasure(
        stream,
        Kind::Prune,
        31,
        &w1,
        Some(stated(&w1, b"lock", None)),
    );
    let other_lie = erasure(
        stream,
        Kind::Prune,
        32,
        &w1,
        Some(stated(&w1, b"k", Some(&w2))),
    );
    let redact = erasure(stream, Kind::Redact, 33, &w1, None);

    // A true prune: the state with the whole write, on a copy that held it or was rebuilt.
    let whole = digest_after(&policy, &[&w1, &w2]);
    assert_eq!(digest_after(&policy, &[&w1, &w2, &truth]), whole);
    for order in permutations(&[&w2, &truth]) {
        assert_eq!(digest_after(&policy, &order), whole);
    }
    // Prunes that disagree: w1 counts nowhere (w2 names it, so w2 is not valid either), and
    // "lock", which w1 never wrote, is held by nobody — in every order.
    let disagreeing = [&w2, &truth, &lie, &other_lie];
    let expected = digest_after(&policy, &disagreeing);
    assert_ne!(expected, whole);
    for order in permutations(&disagreeing) {
        assert_eq!(digest_after(&policy, &order), expected, "{order:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    {
        use quire_projection_api::{Place, Plugin};
        let mut place = Place::new(dir.path().to_path_buf(), Some(stream));
        place.policy = policy.clone();
        let mut projector = Kv.open(&place).unwrap();
        for (n, scribe) in [&w2, &lie, &truth].iter().enumerate() {
            let mut scribe = (*scribe).clone();
            scribe.local_seq = n as u64 + 1;
            projector.apply(&[scribe], n as u64 + 1).unwrap();
        }
        let reader = quire_projection_kv::Reader::open(&place.dir).unwrap();
        for key in [&b"k"[..], b"lock"] {
            let state = reader.get(key).unwrap().map(|entry| entry.state);
            assert!(
                state
                    .as_ref()
                    .is_none_or(|state| state.owner.is_none() && state.fence == 0),
                "{key:?}: {state:?}"
            );
        }
    }
    // A redact wins over any prune: the state of a fold without w1, in every order.
    let without = digest_after(&policy, &[&w2, &redact]);
    for order in permutations(&[&w2, &truth, &redact]) {
        assert_eq!(digest_after(&policy, &order), without, "{order:?}");
    }
    assert_eq!(digest_after(&policy, &[&w1, &w2, &truth, &redact]), without);
}
