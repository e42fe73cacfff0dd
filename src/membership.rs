//! Stream membership as data: who may read, write and administer a stream, computed from the set
//! of its membership scribes (`acl.grant`, `acl.revoke`) so that every node that holds the same
//! set computes the same answer, whatever order the scribes arrived in.
//!
//! # The rules (docs/protocol.md, "Access control", states them for users)
//! - Roles nest: reader ⊂ writer ⊂ admin. The owner is an admin always and cannot be revoked. The
//!   genesis may name members from the start.
//! - Every scribe names, in its envelope's `membership` field, the newest membership scribe its
//!   author had seen: its **view** is that scribe and everything it links to. A membership scribe
//!   also links to its `parents` (the membership heads its author had, so concurrent branches
//!   merge). A view is a set that never changes once its scribes are stored.
//! - A membership scribe is **authorized** if its author was an admin in its own view (the view
//!   of its links). An unauthorized one is refused at admission, so a stored one always is.
//! - **Strong remove** (p2panda's rule). Revokes first: a revoke of K is dropped by a standing
//!   revoke of K concurrent with it (neither in the other's view) — unless it targets that
//!   revoke's author: **mutual removal removes both** (cycles of removals all stand). A grant by K
//!   is dropped by a standing revoke of K concurrent with it, whatever the dates (so a removed
//!   admin cannot act by claiming an old view). A member's other scribe is **excluded** if a
//!   standing revoke of its author is not in its view and it is dated after that revoke (its
//!   clock: had the revoke's author seen it, the revoke would be dated after it; membership views
//!   say nothing of other scribes).
//! - A key's role in a set of operations: among the not-dropped operations that target it, take
//!   the maximal ones (those no other one of them has in its view). If any is a revoke the key has
//!   no role (**a concurrent re-add loses to the remove**); otherwise the highest role granted.
//!   Genesis members are grants every operation has seen.
//!
//! Everything here is a pure function of the operations given; the log keeps one [`Membership`]
//! per stream that has membership (`log::rules` judges scribes with it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use quire_projection_api::{AuthorKey, ScribeId};

/// Content type of `acl.grant` and `acl.revoke` payloads.
pub const ACL_CONTENT_TYPE: &str = "application/vnd.quire.acl+protobuf";

/// Most membership scribes one stream may hold: each check walks them.
pub const MAX_MEMBERSHIP_SCRIBES: usize = 4096;

/// A member's role; each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// May receive the stream (a private stream is served only to its readers).
    Reader,
    /// May also write the kinds whose policy admits writers.
    Writer,
    /// May also grant and revoke roles.
    Admin,
}

impl Role {
    /// The wire value (`quire.v1.Role`).
    pub fn to_proto(self) -> i32 {
        match self {
            Role::Reader => 1,
            Role::Writer => 2,
            Role::Admin => 3,
        }
    }

    /// From the wire value; `None` for 0 or an unknown value.
    pub fn from_proto(value: i32) -> Option<Role> {
        match value {
            1 => Some(Role::Reader),
            2 => Some(Role::Writer),
            3 => Some(Role::Admin),
            _ => None,
        }
    }

    /// `reader`, `writer` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Reader => "reader",
            Role::Writer => "writer",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "reader" => Ok(Role::Reader),
            "writer" => Ok(Role::Writer),
            "admin" => Ok(Role::Admin),
            other => Err(format!("a role is reader, writer or admin, not {other:?}")),
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a membership scribe changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Change {
    /// `acl.grant { key, role }`.
    Grant(AuthorKey, Role),
    /// `acl.revoke { key }`.
    Revoke(AuthorKey),
}

impl Change {
    /// The key it is about.
    pub fn target(&self) -> AuthorKey {
        match self {
            Change::Grant(key, _) | Change::Revoke(key) => *key,
        }
    }
}

/// One stored membership scribe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    /// Its scribe id.
    pub id: ScribeId,
    /// Its author.
    pub author: AuthorKey,
    /// Its clock.
    pub hlc: u64,
    /// The membership scribes it links to: its `membership` field and its membership parents.
    pub links: Vec<ScribeId>,
    /// What it changes.
    pub change: Change,
}

/// Why a membership scribe or a member's scribe is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The scribe names a view that is not a stored membership scribe of the stream.
    #[error("its membership field names {0}, which is not a membership scribe of this stream stored here (store it first)")]
    UnknownView(ScribeId),
    /// The author of a membership scribe was not an admin in its view.
    #[error("{author} was not an admin of the stream in the membership it had seen, so it may not grant or revoke")]
    NotAdmin {
        /// The author.
        author: AuthorKey,
    },
    /// A revoke of the owner.
    #[error("the owner cannot be revoked")]
    Owner,
    /// The stream holds [`MAX_MEMBERSHIP_SCRIBES`] already.
    #[error(
        "the stream holds {MAX_MEMBERSHIP_SCRIBES} membership scribes already, the most allowed"
    )]
    Full,
}

/// Every key's role in one view, shared.
pub type Roles = Arc<BTreeMap<AuthorKey, Role>>;

/// A stream's membership: its owner, its genesis members and its stored membership scribes.
#[derive(Debug)]
pub struct Membership {
    owner: AuthorKey,
    initial: BTreeMap<AuthorKey, Role>,
    ops: HashMap<ScribeId, Op>,
    /// The operations no other links to (kept as operations are added: a head only stops being
    /// one when a later operation links to it).
    heads: BTreeSet<ScribeId>,
    /// The state of each view asked about so far, by its link set (views never change).
    views: Mutex<HashMap<Vec<ScribeId>, Roles>>,
    /// The standing revokes of every operation held, once computed (cleared by an add).
    standing: Mutex<Option<BTreeSet<ScribeId>>>,
}

impl Clone for Membership {
    fn clone(&self) -> Membership {
        Membership {
            owner: self.owner,
            initial: self.initial.clone(),
            ops: self.ops.clone(),
            heads: self.heads.clone(),
            views: Mutex::new(HashMap::new()),
            standing: Mutex::new(None),
        }
    }
}

impl PartialEq for Membership {
    fn eq(&self, other: &Membership) -> bool {
        self.owner == other.owner && self.initial == other.initial && self.ops == other.ops
    }
}

impl Eq for Membership {}

impl Membership {
    /// The membership a genesis states: the owner (an admin) and `initial` members.
    pub fn new(owner: AuthorKey, initial: BTreeMap<AuthorKey, Role>) -> Membership {
        Membership {
            owner,
            initial,
            ops: HashMap::new(),
            heads: BTreeSet::new(),
            views: Mutex::new(HashMap::new()),
            standing: Mutex::new(None),
        }
    }

    /// How many membership scribes it holds.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether it holds no membership scribe.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Whether `id` is one of its membership scribes.
    pub fn holds(&self, id: &ScribeId) -> bool {
        self.ops.contains_key(id)
    }

    /// The membership scribes no other one links to, by id.
    pub fn heads(&self) -> Vec<ScribeId> {
        self.heads.iter().copied().collect()
    }

    /// The view an author signing now names in its scribe's `membership` field: a head under
    /// which `author` holds the most (the newest such head by id order when several tie); none
    /// while the stream has no membership scribe.
    pub fn view_for(&self, author: &AuthorKey) -> Option<ScribeId> {
        self.heads
            .iter()
            .copied()
            .max_by_key(|head| (self.role_at(&[*head], author).ok().flatten(), *head))
    }

    /// `links` and everything they link to (the view a scribe with these links had).
    fn closure(&self, links: &[ScribeId]) -> Result<BTreeSet<ScribeId>, MembershipError> {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<ScribeId> = links.to_vec();
        while let Some(id) = todo.pop() {
            let op = self.ops.get(&id).ok_or(MembershipError::UnknownView(id))?;
            if seen.insert(id) {
                todo.extend(op.links.iter().copied());
            }
        }
        Ok(seen)
    }

    /// The view of each operation of `within`.
    fn views_of(&self, within: &BTreeSet<ScribeId>) -> HashMap<ScribeId, BTreeSet<ScribeId>> {
        within
            .iter()
            .map(|id| {
                let view = self
                    .closure(&self.ops[id].links)
                    .expect("stored links are stored");
                (*id, view)
            })
            .collect()
    }

    /// The revokes of `within` that stand. A revoke of K is dropped by a standing revoke of K
    /// concurrent with it (neither in the other's view), unless it targets that revoke's author
    /// (mutual removal removes both). Computed to a fixed point; removals that drop each other in
    /// a cycle longer than two all stand (removal wins).
    fn standing_revokes(
        &self,
        within: &BTreeSet<ScribeId>,
        views: &HashMap<ScribeId, BTreeSet<ScribeId>>,
    ) -> BTreeSet<ScribeId> {
        let revokes: BTreeSet<ScribeId> = within
            .iter()
            .filter(|id| matches!(self.ops[*id].change, Change::Revoke(_)))
            .copied()
            .collect();
        let concurrent =
            |a: &ScribeId, b: &ScribeId| a != b && !views[a].contains(b) && !views[b].contains(a);
        let mut standing = revokes.clone();
        let mut previous = BTreeSet::new();
        for _ in 0..64 {
            let next: BTreeSet<ScribeId> = revokes
                .iter()
                .filter(|id| {
                    let revoke = &self.ops[*id];
                    !standing.iter().any(|other_id| {
                        let other = &self.ops[other_id];
                        other.change == Change::Revoke(revoke.author)
                            && concurrent(id, other_id)
                            && revoke.change != Change::Revoke(other.author)
                    })
                })
                .copied()
                .collect();
            if next == standing {
                return standing;
            }
            previous = std::mem::replace(&mut standing, next);
        }
        standing.union(&previous).copied().collect()
    }

    /// Whether a grant of `within` is dropped: a standing revoke of its author is concurrent
    /// with it (strong remove; judged causally, whatever the dates).
    fn grant_dropped(
        &self,
        id: &ScribeId,
        standing: &BTreeSet<ScribeId>,
        views: &HashMap<ScribeId, BTreeSet<ScribeId>>,
    ) -> bool {
        let op = &self.ops[id];
        standing.iter().any(|revoke_id| {
            self.ops[revoke_id].change == Change::Revoke(op.author)
                && !views[id].contains(revoke_id)
                && !views[revoke_id].contains(id)
        })
    }

    /// The operations of `within` that count: in causal order, an operation counts if it
    /// survives strong remove (a standing revoke; a grant no standing revoke of its author is
    /// concurrent with) and its author is an admin given the counted operations of its view — so
    /// authority that came from a dropped grant is void, and so is all that flowed from it.
    fn counted_in(
        &self,
        within: &BTreeSet<ScribeId>,
    ) -> (BTreeSet<ScribeId>, HashMap<ScribeId, BTreeSet<ScribeId>>) {
        let views = self.views_of(within);
        let standing = self.standing_revokes(within, &views);
        let mut order: Vec<ScribeId> = within.iter().copied().collect();
        // An operation's view is larger than the view of anything in it: a causal order.
        order.sort_by_key(|id| (views[id].len(), self.ops[id].hlc, *id));
        let mut counted = BTreeSet::new();
        for id in order {
            let op = &self.ops[&id];
            let survives = match op.change {
                Change::Revoke(_) => standing.contains(&id),
                Change::Grant(..) => !self.grant_dropped(&id, &standing, &views),
            };
            if !survives {
                continue;
            }
            let seen: Vec<ScribeId> = views[&id]
                .iter()
                .filter(|seen| counted.contains(*seen))
                .copied()
                .collect();
            if self.role_among(&op.author, &seen, &views) == Some(Role::Admin) {
                counted.insert(id);
            }
        }
        (counted, views)
    }

    /// `key`'s role given the counted operations `ids`: among those about it, the maximal ones
    /// (no other has it in its view) decide — any revoke wins, else the highest grant; with none,
    /// its genesis role. The owner is an admin always.
    fn role_among(
        &self,
        key: &AuthorKey,
        ids: &[ScribeId],
        views: &HashMap<ScribeId, BTreeSet<ScribeId>>,
    ) -> Option<Role> {
        if *key == self.owner {
            return Some(Role::Admin);
        }
        let about: Vec<&ScribeId> = ids
            .iter()
            .filter(|id| self.ops[*id].change.target() == *key)
            .collect();
        if about.is_empty() {
            return self.initial.get(key).copied();
        }
        let mut revoked = false;
        let mut best: Option<Role> = None;
        for id in &about {
            if about
                .iter()
                .any(|other| other != id && views[*other].contains(*id))
            {
                continue;
            }
            match self.ops[*id].change {
                Change::Revoke(_) => revoked = true,
                Change::Grant(_, role) => best = best.max(Some(role)),
            }
        }
        if revoked {
            None
        } else {
            best
        }
    }

    /// Every key's role in the set `within` (closed under links).
    fn roles_in(&self, within: &BTreeSet<ScribeId>) -> BTreeMap<AuthorKey, Role> {
        let (counted, views) = self.counted_in(within);
        let counted: Vec<ScribeId> = counted.into_iter().collect();
        let keys: BTreeSet<AuthorKey> = self
            .initial
            .keys()
            .copied()
            .chain(counted.iter().map(|id| self.ops[id].change.target()))
            .collect();
        let mut roles: BTreeMap<AuthorKey, Role> = keys
            .into_iter()
            .filter_map(|key| Some((key, self.role_among(&key, &counted, &views)?)))
            .collect();
        roles.insert(self.owner, Role::Admin);
        roles
    }

    /// Every key's role in the view named by `links` (a scribe's `membership` field, and a
    /// membership scribe's parents): what its author had seen.
    pub fn roles_at(&self, links: &[ScribeId]) -> Result<Roles, MembershipError> {
        let mut key: Vec<ScribeId> = links.to_vec();
        key.sort();
        key.dedup();
        if let Some(roles) = self.views.lock().expect("views lock").get(&key) {
            return Ok(roles.clone());
        }
        let within = self.closure(&key)?;
        let roles = Arc::new(self.roles_in(&within));
        self.views
            .lock()
            .expect("views lock")
            .insert(key, roles.clone());
        Ok(roles)
    }

    /// `key`'s role in the view named by `links`.
    pub fn role_at(
        &self,
        links: &[ScribeId],
        key: &AuthorKey,
    ) -> Result<Option<Role>, MembershipError> {
        Ok(self.roles_at(links)?.get(key).copied())
    }

    /// Every key's role given every membership scribe held: what serving a stream goes by.
    pub fn roles(&self) -> Roles {
        let heads = self.heads();
        self.roles_at(&heads).expect("heads are stored")
    }

    /// Checks a membership scribe against its view and adds it. An error leaves it unchanged.
    pub fn add(&mut self, op: Op) -> Result<(), MembershipError> {
        if self.ops.contains_key(&op.id) {
            return Ok(());
        }
        self.check(&op)?;
        // Nothing stored links to a scribe added now (links must be stored first): it is a head,
        // and what it links to no longer is.
        for link in &op.links {
            self.heads.remove(link);
        }
        self.heads.insert(op.id);
        self.ops.insert(op.id, op);
        *self.standing.lock().expect("standing lock") = None;
        Ok(())
    }

    /// Whether [`Membership::add`] would take `op`.
    pub fn check(&self, op: &Op) -> Result<(), MembershipError> {
        if self.ops.len() >= MAX_MEMBERSHIP_SCRIBES {
            return Err(MembershipError::Full);
        }
        if op.change == Change::Revoke(self.owner) {
            return Err(MembershipError::Owner);
        }
        if self.role_at(&op.links, &op.author)? != Some(Role::Admin) {
            return Err(MembershipError::NotAdmin { author: op.author });
        }
        Ok(())
    }

    /// Whether a stored scribe of `author`, dated `hlc`, with view `links`, is excluded: dropped by
    /// an authorized revoke of its author it had not seen and is dated after (strong remove).
    pub fn excludes(
        &self,
        author: &AuthorKey,
        hlc: u64,
        links: &[ScribeId],
    ) -> Result<bool, MembershipError> {
        if !self
            .ops
            .values()
            .any(|op| op.change == Change::Revoke(*author))
        {
            return Ok(false);
        }
        let view = self.closure(links)?;
        let standing = self.standing();
        Ok(standing.iter().any(|id| {
            let revoke = &self.ops[id];
            revoke.change == Change::Revoke(*author) && !view.contains(id) && hlc > revoke.hlc
        }))
    }

    /// The revokes that count among every membership scribe held (cached until one is added).
    fn standing(&self) -> BTreeSet<ScribeId> {
        let mut cached = self.standing.lock().expect("standing lock");
        if let Some(standing) = cached.as_ref() {
            return standing.clone();
        }
        let within: BTreeSet<ScribeId> = self.ops.keys().copied().collect();
        let (counted, _) = self.counted_in(&within);
        let standing: BTreeSet<ScribeId> = counted
            .into_iter()
            .filter(|id| matches!(self.ops[id].change, Change::Revoke(_)))
            .collect();
        *cached = Some(standing.clone());
        standing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(n: u8) -> AuthorKey {
        AuthorKey([n; 32])
    }

    fn id(n: u16) -> ScribeId {
        let mut bytes = [0u8; 32];
        bytes[..2].copy_from_slice(&n.to_be_bytes());
        ScribeId(bytes)
    }

    fn op(n: u16, author: u8, hlc: u64, links: &[u16], change: Change) -> Op {
        Op {
            id: id(n),
            author: key(author),
            hlc,
            links: links.iter().map(|n| id(*n)).collect(),
            change,
        }
    }

    fn owner_only() -> Membership {
        Membership::new(key(0), BTreeMap::new())
    }

    #[test]
    fn grants_nest_and_only_admins_grant() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Writer)))
            .unwrap();
        assert_eq!(m.roles().get(&key(1)), Some(&Role::Writer));
        // A writer may not grant.
        let refused = m.add(op(2, 1, 20, &[1], Change::Grant(key(2), Role::Reader)));
        assert_eq!(refused, Err(MembershipError::NotAdmin { author: key(1) }));
        // A view that names an unknown scribe is refused.
        assert!(matches!(
            m.add(op(3, 0, 20, &[99], Change::Grant(key(2), Role::Reader))),
            Err(MembershipError::UnknownView(_))
        ));
        assert_eq!(
            m.add(op(4, 0, 20, &[1], Change::Revoke(key(0)))),
            Err(MembershipError::Owner)
        );
    }

    #[test]
    fn a_write_concurrent_with_its_authors_revoke_is_excluded_an_earlier_one_is_not() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Writer)))
            .unwrap();
        m.add(op(2, 0, 50, &[1], Change::Revoke(key(1)))).unwrap();
        assert_eq!(m.roles().get(&key(1)), None);
        // Written before the revoke (dated before it), not having seen it: kept.
        assert!(!m.excludes(&key(1), 40, &[id(1)]).unwrap());
        // Written concurrently (dated after it), not having seen it: excluded.
        assert!(m.excludes(&key(1), 60, &[id(1)]).unwrap());
        // Having seen the revoke the writer holds no role: refused at admission instead.
        assert_eq!(m.role_at(&[id(2)], &key(1)).unwrap(), None);
    }

    #[test]
    fn mutual_revoke_removes_both_and_a_concurrent_re_add_loses() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(2, 0, 11, &[1], Change::Grant(key(2), Role::Admin)))
            .unwrap();
        m.add(op(3, 1, 20, &[2], Change::Revoke(key(2)))).unwrap();
        m.add(op(4, 2, 21, &[2], Change::Revoke(key(1)))).unwrap();
        let roles = m.roles();
        assert_eq!(roles.get(&key(1)), None);
        assert_eq!(roles.get(&key(2)), None);
        assert_eq!(roles.get(&key(0)), Some(&Role::Admin));

        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(2, 0, 11, &[1], Change::Grant(key(3), Role::Reader)))
            .unwrap();
        // The owner revokes 3 while admin 1 re-adds it, concurrently.
        m.add(op(3, 0, 20, &[2], Change::Revoke(key(3)))).unwrap();
        m.add(op(4, 1, 20, &[2], Change::Grant(key(3), Role::Writer)))
            .unwrap();
        assert_eq!(m.roles().get(&key(3)), None);
        // A grant that had seen the revoke brings it back.
        m.add(op(5, 0, 30, &[3, 4], Change::Grant(key(3), Role::Reader)))
            .unwrap();
        assert_eq!(m.roles().get(&key(3)), Some(&Role::Reader));
    }

    #[test]
    fn a_removed_admins_concurrent_grant_is_dropped() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(2, 0, 20, &[1], Change::Revoke(key(1)))).unwrap();
        // Admin 1, not having seen its removal, grants 5 afterwards.
        m.add(op(3, 1, 30, &[1], Change::Grant(key(5), Role::Writer)))
            .unwrap();
        assert_eq!(m.roles().get(&key(5)), None);
        assert_eq!(m.heads(), vec![id(2), id(3)]);
    }

    #[test]
    fn a_revoked_admin_cannot_act_by_claiming_an_old_view() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(2, 0, 50, &[1], Change::Revoke(key(1)))).unwrap();
        // Admin 1, revoked, grants 2 admin at its old view, dated before its revoke: valid in
        // its view, dropped in the set (concurrent with the revoke, whatever the dates).
        m.add(op(3, 1, 40, &[1], Change::Grant(key(2), Role::Admin)))
            .unwrap();
        // 2, an admin only in that view, grants 1 back and 3 a writer: void, as its authority is.
        m.add(op(4, 2, 41, &[3], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(5, 2, 42, &[3], Change::Grant(key(3), Role::Writer)))
            .unwrap();
        let roles = m.roles();
        assert_eq!(roles.get(&key(1)), None);
        assert_eq!(roles.get(&key(2)), None);
        assert_eq!(roles.get(&key(3)), None);
    }

    #[test]
    fn a_dropped_revoke_neither_removes_nor_excludes() {
        let mut m = owner_only();
        m.add(op(1, 0, 10, &[], Change::Grant(key(1), Role::Admin)))
            .unwrap();
        m.add(op(2, 0, 11, &[1], Change::Grant(key(2), Role::Admin)))
            .unwrap();
        m.add(op(3, 0, 12, &[2], Change::Grant(key(4), Role::Writer)))
            .unwrap();
        // The owner revokes 1; 1, concurrently, revokes the writer 4 and the admin 2.
        m.add(op(4, 0, 50, &[3], Change::Revoke(key(1)))).unwrap();
        m.add(op(5, 1, 60, &[3], Change::Revoke(key(4)))).unwrap();
        m.add(op(6, 1, 61, &[3], Change::Revoke(key(2)))).unwrap();
        // 2, having seen 1's removal (not 1's revoke of it), grants a reader.
        m.add(op(7, 2, 70, &[4], Change::Grant(key(5), Role::Reader)))
            .unwrap();
        let roles = m.roles();
        assert_eq!(roles.get(&key(4)), Some(&Role::Writer));
        assert_eq!(roles.get(&key(2)), Some(&Role::Admin));
        assert_eq!(roles.get(&key(5)), Some(&Role::Reader));
        // The writer's earlier writes are not excluded by the dropped revoke.
        assert!(!m.excludes(&key(4), 65, &[id(3)]).unwrap());
    }

    /// A random history: admins 0..3 (0 the owner) grant and revoke keys 1..6, each op linking
    /// to a random subset of the ops before it; only the authorized ones are kept.
    fn history() -> impl Strategy<Value = Vec<Op>> {
        proptest::collection::vec(
            (
                0u8..4,
                1u8..7,
                0u8..4,
                proptest::collection::vec(any::<prop::sample::Index>(), 0..3),
                1u64..40,
            ),
            1..24,
        )
        .prop_map(|raw| {
            let mut m = owner_only();
            let mut kept: Vec<Op> = Vec::new();
            for (n, (author, target, action, links, hlc)) in raw.into_iter().enumerate() {
                let links: Vec<ScribeId> = if kept.is_empty() {
                    vec![]
                } else {
                    let mut links: Vec<ScribeId> = links
                        .iter()
                        .map(|index| kept[index.index(kept.len())].id)
                        .collect();
                    links.sort();
                    links.dedup();
                    links
                };
                let change = match action {
                    0 => Change::Revoke(key(target)),
                    1 => Change::Grant(key(target), Role::Reader),
                    2 => Change::Grant(key(target), Role::Writer),
                    _ => Change::Grant(key(target), Role::Admin),
                };
                // A clock past everything it links to, as an HLC is.
                let floor = links
                    .iter()
                    .map(|link| kept.iter().find(|op| op.id == *link).unwrap().hlc)
                    .max()
                    .unwrap_or(0);
                let candidate = Op {
                    id: id(n as u16 + 1),
                    author: key(author),
                    hlc: floor + hlc,
                    links,
                    change,
                };
                if m.add(candidate.clone()).is_ok() {
                    kept.push(candidate);
                }
            }
            kept
        })
    }

    proptest! {
        /// The roles (and what is excluded) are a function of the set: every order in which a
        /// node can receive the scribes (each after the ones it links to) gives the same answer.
        #[test]
        fn membership_is_a_function_of_the_set(ops in history(), seed in any::<u64>()) {
            let mut reference = owner_only();
            for op in &ops {
                reference.add(op.clone()).unwrap();
            }
            // Another causal order: repeatedly take a random op whose links are all added.
            let mut rng = seed;
            let mut left = ops.clone();
            let mut other = owner_only();
            while !left.is_empty() {
                let ready: Vec<usize> = (0..left.len())
                    .filter(|i| left[*i].links.iter().all(|link| other.holds(link)))
                    .collect();
                rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let pick = ready[(rng >> 33) as usize % ready.len()];
                let op = left.remove(pick);
                other.add(op).unwrap();
            }
            prop_assert_eq!(reference.roles(), other.roles());
            prop_assert_eq!(reference.heads(), other.heads());
            for author in 0..7u8 {
                for hlc in [5u64, 50, 500] {
                    prop_assert_eq!(
                        reference.excludes(&key(author), hlc, &[]).unwrap(),
                        other.excludes(&key(author), hlc, &[]).unwrap()
                    );
                }
            }
        }
    }
}
