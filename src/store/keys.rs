//! The one key encoding of the store. All maps live in one sled tree, told apart by a one-byte
//! prefix, so that a change to a session, its indexes and its event is one atomic `sled::Batch`
//! (sled's batches are atomic within a tree; its multi-tree transactions are several times
//! slower). Integers are big-endian so that scans come out ordered.
//!
//! | prefix | map                     | key after the prefix                              | value          |
//! |--------|-------------------------|---------------------------------------------------|----------------|
//! | `s`    | sessionid_session       | session id (16)                                   | SessionRecord  |
//! | `u`    | user_sessionid          | tenant, 0, user, 0, created_at (8), id (16)       | empty          |
//! | `u`    | user_records (sled)     | tenant, 0, user, 0, kind (`l`, `o` or `q`)        | as below       |
//! | `d`    | deadline_sessionid      | next deadline (8), id (16)                        | empty          |
//! | `e`    | sequence_event          | sequence (8)                                      | EventRecord    |
//! | `m`    | meta                    | name                                              | varies         |
//! | `p`    | tenant_policy           | tenant                                            | policy (JSON)  |
//! | `l`    | user_lastseen (etcd)    | tenant, 0, user, 0                                | LastSeenRecord |
//! | `o`    | user_logins (etcd)      | tenant, 0, user, 0                                | logins         |
//! | `q`    | user_creations (etcd)   | tenant, 0, user, 0                                | timestamps     |
//! | `a`    | auditid_record          | id (8)                                            | entry (JSON)   |
//! | `T`    | round_lastuses          | round (8)                                         | entries        |
//!
//! `user_sessionid` holds active sessions only, so counting a user's sessions for the limit is a
//! short prefix scan. `deadline_sessionid` holds every session under the instant the sweeper must
//! look at it again (idle deadline while active, absolute deadline for a tombstone).
//!
//! `user_records` (sled only, since format 5) holds a user's per-user records at the end of the
//! user's own range of `user_sessionid`, after its session entries (whose first byte, a
//! timestamp's top byte, is 0). A create reads and writes the user's entries and records
//! together: one leaf of sled's tree instead of one per map, which with user ids spread at
//! random (UUIDs) was a leaf that no cache held. Backups and etcd keep the per-user maps (`l`,
//! `o`, `q`); format 4's were moved on open.
//!
//! `round_lastuses` (sled only, since format 4) holds sessions' last uses when they are newer
//! than their records': a touch writes its session's last use there instead of rewriting the
//! record and moving its deadline entry (three writes, each copying a node of sled's tree; at a
//! million sessions touches were most of the store's work). Each entry also holds the last use
//! the deadline entry is still filed under, so the entry can be found: it may be early, never
//! late, and the sweeper re-files a session it finds due but touched since. Every full write of
//! the record folds the last use in, which makes the entry stale; readers take the later of the
//! two. The touches of one round of the writer share one key (see `store::touch_log`); format 3
//! had one key per session (`t` + id), migrated on open.

use crate::{clock::Timestamp, token::SessionId};

pub const SESSION: u8 = b's';
pub const USER: u8 = b'u';
pub const DEADLINE: u8 = b'd';
pub const EVENT: u8 = b'e';
pub const POLICY: u8 = b'p';
pub const LAST_SEEN: u8 = b'l';
pub const CREATIONS: u8 = b'q';
/// A user's recent logins (new-device signals). Sorts between `LAST_SEEN` and `CREATIONS`, so
/// etcd's purge of per-user records walks all three in one range.
pub const LOGINS: u8 = b'o';
pub const AUDIT: u8 = b'a';
/// sled only: see `round_lastuses` above.
pub const TOUCH_LOG: u8 = b'T';
/// Format 3's last uses, one key per session (`t` + id -> `LastUse`): migrated into
/// `round_lastuses` on open, and never written since.
pub const TOUCH: u8 = b't';
/// Tenants whose policy changed and whose open sessions are not all enforced yet: tenant -> nonce.
pub const ENFORCE: u8 = b'n';
/// etcd only: a per-user key rewritten whenever the user's set of active sessions changes, so a
/// write that counted them conflicts with any other that changed them (see `store::etcd`).
/// Deleted when the set becomes empty, and then only by a write that compares it as not written
/// after its copy: a reader compares it as "not written after" its copy's revision, which a
/// delete passes.
pub const GUARD: u8 = b'g';

pub fn audit(id: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = AUDIT;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

/// The first byte of every meta record (`META_*`).
pub const META: u8 = b'm';
/// Marks a directory as ours, with the layout version. Checked at open.
pub const META_FORMAT: &[u8] = b"mformat";
/// sled's layout: format 5 keeps per-user records in their user's range (`user_records`).
pub const FORMAT_VALUE: &[u8] = b"session-authority/5";
/// sled's format with per-user records in maps of their own (`l`, `o`, `q`): moved on open, and
/// marked 5 first (so releases that know only 4 refuse a store they would half read).
pub const FORMAT_VALUE_4: &[u8] = b"session-authority/4";
/// sled's format with one last-use key per session (`t`): migrated on open, then as format 4.
pub const FORMAT_VALUE_3: &[u8] = b"session-authority/3";
/// The format before any last-use keys: format 4's keys without them, so it opens as format 4.
pub const FORMAT_VALUE_2: &[u8] = b"session-authority/2";
/// etcd's layout, which has no last-use keys (a touch is a record write there) and so stayed at
/// the number sled had when etcd came.
pub const ETCD_FORMAT_VALUE: &[u8] = b"session-authority/3";
/// The newest event sequence at the last prune; with the last event key it gives the head, even
/// when pruning emptied the log.
pub const META_HEAD: &[u8] = b"mhead";
/// The store's id, also in the `store.id` file beside sled's files.
pub const META_STORE_ID: &[u8] = b"mstoreid";
/// 32 random bytes made when the store is created: keys the tenants' generated cookie names.
pub const META_SECRET: &[u8] = b"msecret";
/// The event log's epoch: a random `u64` made when the store is created, and again by every
/// restore, whose log continues from the backup's head and so repeats sequence numbers.
pub const META_LOG_EPOCH: &[u8] = b"mlogepoch";
/// The newest audit id at the last audit prune, so ids never repeat once the oldest are gone.
pub const META_AUDIT_HEAD: &[u8] = b"maudithead";
/// etcd only: the replica that runs background work, under its lease (not a record: backups
/// leave it out).
pub const META_LEADER: &[u8] = b"mleader";

pub fn policy(tenant: &str) -> Vec<u8> {
    per_tenant(POLICY, tenant)
}

/// A per-tenant key in the map named by `prefix` (`POLICY`, `ENFORCE`).
pub fn per_tenant(prefix: u8, tenant: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + tenant.len());
    k.push(prefix);
    k.extend_from_slice(tenant.as_bytes());
    k
}

/// A per-user key in the map named by `prefix` (`LAST_SEEN`, `LOGINS`, `CREATIONS`, `GUARD`):
/// etcd's layout, and a backup's.
pub fn per_user(prefix: u8, tenant: &str, user: &str) -> Vec<u8> {
    let mut k = user_prefix(tenant, Some(user));
    k[0] = prefix;
    k
}

/// The kinds of per-user record, in the order they sort in a user's range.
pub const USER_RECORD_KINDS: [u8; 3] = [LAST_SEEN, LOGINS, CREATIONS];

/// The byte after a user's prefix from which its records sort: above its session entries'
/// (0, a timestamp's top byte), below every kind, and never a key's byte there itself.
pub const USER_RECORDS_FROM: u8 = 1;

/// sled's key of a per-user record of `kind` (one of [`USER_RECORD_KINDS`]), in `user_records`.
pub fn user_record(kind: u8, tenant: &str, user: &str) -> Vec<u8> {
    let mut k = user_prefix(tenant, Some(user));
    k.push(kind);
    k
}

/// sled's `user_records` key of a `per_user` key (format 4's, a backup's); `None` unless `key` is
/// one of a per-user record.
pub fn fold_user_record(key: &[u8]) -> Option<Vec<u8>> {
    let (&kind, rest) = key.split_first()?;
    let well_formed = USER_RECORD_KINDS.contains(&kind)
        && rest.last() == Some(&0)
        && rest.iter().filter(|&&b| b == 0).count() == 2;
    if !well_formed {
        return None;
    }
    let mut k = Vec::with_capacity(key.len() + 1);
    k.push(USER);
    k.extend_from_slice(rest);
    k.push(kind);
    Some(k)
}

/// The `per_user` key of a `user_records` key: what a backup holds.
pub fn unfold_user_record(key: &[u8]) -> Option<Vec<u8>> {
    match parse_user_entry(key)? {
        UserEntry::Record { kind, .. } => {
            let mut k = Vec::with_capacity(key.len() - 1);
            k.push(kind);
            k.extend_from_slice(&key[1..key.len() - 1]);
            Some(k)
        }
        UserEntry::Session { .. } => None,
    }
}

/// What a key in the `u` range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserEntry {
    /// A session entry of `user_sessionid`.
    Session {
        /// Length of the key's tenant-and-user prefix.
        user_end: usize,
        id: SessionId,
    },
    /// A per-user record of `user_records`.
    Record { user_end: usize, kind: u8 },
}

/// Parses a key of the `u` range; `None` for any other key, or a damaged one.
pub fn parse_user_entry(key: &[u8]) -> Option<UserEntry> {
    let (&USER, rest) = key.split_first()? else {
        return None;
    };
    let tenant = rest.iter().position(|&b| b == 0)?;
    let user = rest[tenant + 1..].iter().position(|&b| b == 0)?;
    let user_end = 1 + tenant + 1 + user + 1;
    match &key[user_end..] {
        [kind] if USER_RECORD_KINDS.contains(kind) => Some(UserEntry::Record {
            user_end,
            kind: *kind,
        }),
        tail if tail.len() == 8 + SessionId::LEN => Some(UserEntry::Session {
            user_end,
            id: SessionId::from_slice(&tail[8..])?,
        }),
        _ => None,
    }
}

pub fn session(id: &SessionId) -> [u8; 17] {
    by_id(SESSION, id)
}

/// A round of last uses (`round_lastuses`).
pub fn touch_round(round: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = TOUCH_LOG;
    k[1..].copy_from_slice(&round.to_be_bytes());
    k
}

/// The round number of a `touch_round` key.
pub fn touch_round_of(key: &[u8]) -> Option<u64> {
    match key {
        [TOUCH_LOG, rest @ ..] => Some(u64::from_be_bytes(rest.try_into().ok()?)),
        _ => None,
    }
}

fn by_id(prefix: u8, id: &SessionId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(id.as_bytes());
    k
}

/// Prefix of a tenant's entries in `user_sessionid`, or of one user's if `user` is given. Ids
/// are terminated by a 0 byte, which validation keeps out of ids (no control characters): so
/// scans come out ordered by tenant, then user, bytewise, and no id's prefix is a prefix of
/// another's.
pub fn user_prefix(tenant: &str, user: Option<&str>) -> Vec<u8> {
    let mut k = Vec::with_capacity(3 + tenant.len() + user.map_or(0, str::len));
    k.push(USER);
    push_str(&mut k, tenant);
    if let Some(user) = user {
        push_str(&mut k, user);
    }
    k
}

fn push_str(k: &mut Vec<u8>, s: &str) {
    k.extend_from_slice(s.as_bytes());
    k.push(0);
}

pub fn user_session(tenant: &str, user: &str, created_at: Timestamp, id: &SessionId) -> Vec<u8> {
    let mut k = user_prefix(tenant, Some(user));
    k.extend_from_slice(&created_at.as_millis().to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// The session id at the end of a `user_sessionid` key.
pub fn session_id_of_user_key(key: &[u8]) -> Option<SessionId> {
    key.len()
        .checked_sub(SessionId::LEN)
        .and_then(|start| SessionId::from_slice(&key[start..]))
}

pub fn deadline(at: Timestamp, id: &SessionId) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = DEADLINE;
    k[1..9].copy_from_slice(&at.as_millis().to_be_bytes());
    k[9..].copy_from_slice(id.as_bytes());
    k
}

/// The deadline and session id of a `deadline_sessionid` key.
pub fn parse_deadline(key: &[u8]) -> Option<(Timestamp, SessionId)> {
    if key.len() != 25 || key[0] != DEADLINE {
        return None;
    }
    let at = u64::from_be_bytes(key[1..9].try_into().ok()?);
    Some((
        Timestamp::from_millis(at),
        SessionId::from_slice(&key[9..])?,
    ))
}

pub fn event(sequence: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT;
    k[1..].copy_from_slice(&sequence.to_be_bytes());
    k
}

pub fn parse_event(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != EVENT {
        return None;
    }
    Some(u64::from_be_bytes(key[1..].try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_prefixes_do_not_overlap() {
        // "ab" + user "c" must not fall under tenant "a" + user "bc".
        let a = user_session(
            "ab",
            "c",
            Timestamp::from_millis(1),
            &SessionId::from_bytes([1; 16]),
        );
        assert!(!a.starts_with(&user_prefix("a", Some("bc"))));
        assert!(a.starts_with(&user_prefix("ab", None)));
        assert!(!a.starts_with(&user_prefix("a", None)));
    }

    #[test]
    fn users_sort_bytewise_not_by_length() {
        let id = SessionId::from_bytes([1; 16]);
        let t = Timestamp::from_millis(1);
        assert!(user_session("t", "alice", t, &id) < user_session("t", "bob", t, &id));
        assert!(user_session("a", "zzz", t, &id) < user_session("ab", "a", t, &id));
    }

    #[test]
    fn keys_round_trip() {
        let id = SessionId::from_bytes([9; 16]);
        let k = deadline(Timestamp::from_millis(42), &id);
        assert_eq!(parse_deadline(&k), Some((Timestamp::from_millis(42), id)));
        assert_eq!(parse_event(&event(7)), Some(7));
        let u = user_session("t", "u", Timestamp::from_millis(5), &id);
        assert_eq!(session_id_of_user_key(&u), Some(id));
    }

    #[test]
    fn a_users_records_close_its_range_and_fold_both_ways() {
        let id = SessionId::from_bytes([0xff; 16]);
        let t = Timestamp::from_millis(u64::MAX >> 8);
        let entry = user_session("t", "u", t, &id);
        for kind in USER_RECORD_KINDS {
            let record = user_record(kind, "t", "u");
            assert!(record > entry, "after the user's latest session entry");
            assert!(record < user_session("t", "u0", Timestamp::from_millis(0), &id));
            assert!(record.starts_with(&user_prefix("t", Some("u"))));
            let mut from = user_prefix("t", Some("u"));
            from.push(USER_RECORDS_FROM);
            assert!(entry < from && from < record);
            assert_eq!(
                parse_user_entry(&record),
                Some(UserEntry::Record { user_end: 5, kind })
            );
            let backup = unfold_user_record(&record).expect("a record");
            assert_eq!(backup, per_user(kind, "t", "u"));
            assert_eq!(fold_user_record(&backup), Some(record));
        }
        assert_eq!(
            parse_user_entry(&entry),
            Some(UserEntry::Session { user_end: 5, id })
        );
        assert_eq!(unfold_user_record(&entry), None);
    }

    #[test]
    fn damaged_user_keys_are_told_apart() {
        assert_eq!(parse_user_entry(b"ut\0u\0"), None);
        assert_eq!(parse_user_entry(b"ut\0u\0x"), None);
        assert_eq!(parse_user_entry(b"ut\0u"), None);
        assert_eq!(parse_user_entry(b"st\0u\0o"), None);
        assert_eq!(fold_user_record(b"ot\0u"), None);
        assert_eq!(fold_user_record(b"ot\0u\0x\0"), None);
        assert_eq!(fold_user_record(b"pt\0u\0"), None);
        assert_eq!(fold_user_record(b"ot\0u\0"), Some(b"ut\0u\0o".to_vec()));
    }

    #[test]
    fn deadlines_and_events_sort_by_number() {
        let id = SessionId::from_bytes([0; 16]);
        assert!(
            deadline(Timestamp::from_millis(255), &id) < deadline(Timestamp::from_millis(256), &id)
        );
        assert!(event(255) < event(256));
    }
}
