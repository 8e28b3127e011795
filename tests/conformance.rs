//! The store conformance suite: the store behaviours the service relies on, exercised through the
//! domain (`Sessions<S>`) with a manual clock, generic over the backend. The domain's API does not
//! change when a backend is added, so the suite states what every backend must do: atomic limits
//! under concurrency, exactly one event per change with gapless sequences, one winner among racing
//! rotations, one expiry however many notice it, durability across a reopen.
//!
//! Each backend instantiates every test with `conformance!(module, backend)`; sled does below.

#[path = "common/dbsc.rs"]
mod dbsc;
#[path = "common/etcd.rs"]
mod etcd_cluster;
#[path = "common/retention.rs"]
mod retention;

use std::{sync::Arc, time::Duration};

use retention::a_day_of_retention;
use session_authority::{
    clock::{Clock, ManualClock, Timestamp},
    config::Config,
    error::Error,
    model::{
        binding::BindingKey,
        event::{Event, EventKind},
        flag::{Drift, DriftKind, Flag, TokenReuse},
        policy::{DriftAction, LimitAction, Policy, TokenReuseAction, TravelAction},
        session::{Device, Location, RevokeReason, SessionState},
    },
    sessions::{
        policies::Policies, sweeper::sweep_once, Created, ListQuery, NewSession, SessionFilter,
        Sessions,
    },
    store::{EtcdOptions, EtcdStore, ListScope, RevokeTarget, SessionStore, SledStore},
    token::TokenGenerator,
};

/// 2026-01-01T00:00:00Z.
const START: Timestamp = Timestamp::from_millis(1_767_225_600_000);
const TOUCH: Duration = Duration::from_secs(10);

/// A store to test: opened (again) on the same state each time.
trait Backend: Send + Sync + 'static {
    type Store: SessionStore;
    fn open(&self) -> impl std::future::Future<Output = Arc<Self::Store>> + Send;
}

struct Sled(tempfile::TempDir);

impl Sled {
    fn new() -> Self {
        Self(tempfile::tempdir().expect("tempdir"))
    }
}

impl Backend for Sled {
    type Store = SledStore;
    async fn open(&self) -> Arc<SledStore> {
        Arc::new(
            SledStore::open(
                &self.0.path().join("data"),
                8 << 20,
                8 << 20,
                4096,
                Duration::from_secs(86_400),
            )
            .expect("open"),
        )
    }
}

/// A 3-member etcd cluster on loopback, and the prefix this test's deployment lives under (a
/// reopen is a replica restarting on the same cluster).
struct Etcd(etcd_cluster::EtcdCluster);

impl Etcd {
    fn new() -> Self {
        Self(etcd_cluster::EtcdCluster::start(3))
    }
}

impl Backend for Etcd {
    type Store = EtcdStore;
    async fn open(&self) -> Arc<EtcdStore> {
        let options = EtcdOptions {
            endpoints: self.0.endpoints(),
            timeout: Duration::from_secs(5),
            ..EtcdOptions::default()
        };
        Arc::new(
            EtcdStore::open(options, "/conformance/", 4096, Duration::from_secs(86_400))
                .await
                .expect("open"),
        )
    }
}

struct Harness<S> {
    sessions: Arc<Sessions<S>>,
    clock: Arc<ManualClock>,
}

fn policy(change: impl FnOnce(&mut Policy)) -> Policy {
    let mut p = Policy::from(&Config {
        idle_timeout: Duration::from_secs(600),
        absolute_timeout: Duration::from_secs(3600),
        ..Config::default()
    });
    change(&mut p);
    p
}

async fn harness<B: Backend>(backend: &B, default: Policy) -> Harness<B::Store> {
    let store = backend.open().await;
    let clock = Arc::new(ManualClock::new(START));
    let policies = Arc::new(Policies::load(store.clone(), default).expect("policies"));
    let sessions = Arc::new(Sessions::new(
        store,
        clock.clone(),
        TokenGenerator::from_os().expect("seed"),
        policies,
        TOUCH,
    ));
    Harness { sessions, clock }
}

fn new_session(tenant: &str, user: &str) -> NewSession {
    NewSession {
        tenant_id: tenant.into(),
        user_id: user.into(),
        remember_me: false,
        device: Device::default(),
        attributes: Default::default(),
        binding_key: None,
    }
}

fn at(lat: f64, lon: f64) -> NewSession {
    NewSession {
        device: Device {
            location: Some(Location {
                coordinates: Some((lat, lon)),
                ..Location::default()
            }),
            ..Device::default()
        },
        ..new_session("t", "u")
    }
}

/// A login that leaves every per-user record behind: a last place (coordinates), a login (a
/// platform and a country), and with a quota, a creation.
fn from_bangkok(tenant: &str, user: &str) -> NewSession {
    NewSession {
        device: Device {
            user_agent: CHROME_WINDOWS.into(),
            location: Some(Location {
                country: "TH".into(),
                coordinates: Some((13.75, 100.5)),
                ..Location::default()
            }),
            ..Device::default()
        },
        ..new_session(tenant, user)
    }
}

/// `n` logins of user "u" of tenant "t", one after another.
async fn logins<S: SessionStore>(s: &Sessions<S>, n: usize) -> Vec<Created> {
    let mut created = Vec::with_capacity(n);
    for _ in 0..n {
        created.push(s.create(new_session("t", "u")).await.expect("create"));
    }
    created
}

/// A login of user "u" of tenant "t" bound to the device key `jwk`.
fn bound_login(jwk: &str) -> NewSession {
    NewSession {
        binding_key: Some(BindingKey::from_jwk(jwk).expect("jwk")),
        ..new_session("t", "u")
    }
}

/// Every event in the log, in order.
fn events<S: SessionStore>(h: &Harness<S>) -> Vec<Event> {
    h.sessions.store().events_after(0, 100_000).expect("events")
}

fn is_not_valid<T: std::fmt::Debug>(r: Result<T, Error>) -> bool {
    matches!(r, Err(Error::SessionNotValid))
}

// === the tests, generic over the backend ===

async fn created_sessions_validate_and_a_revoke_ends_them_once<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let created = s.create(new_session("t", "u")).await.expect("create");
    let token = created.token.expose().to_string();
    s.validate(&token, true, None, None).await.expect("valid");
    let target = || RevokeTarget::Sessions {
        ids: vec![created.session.id],
        tenant: None,
    };
    let revoked = s
        .revoke(target(), RevokeReason::Admin)
        .await
        .expect("revoke");
    assert_eq!(revoked.revoked, vec![created.session.id]);
    assert!(is_not_valid(s.validate(&token, true, None, None).await));
    let again = s
        .revoke(target(), RevokeReason::Admin)
        .await
        .expect("again");
    assert!(again.revoked.is_empty(), "already ended");
    assert_eq!(again.sequence, revoked.sequence, "no second event");
    let kinds: Vec<_> = events(&h).into_iter().map(|e| e.kind).collect();
    assert!(matches!(
        kinds.as_slice(),
        [
            EventKind::Created { .. },
            EventKind::Revoked {
                reason: RevokeReason::Admin
            }
        ]
    ));
}

async fn a_revoke_naming_an_unknown_or_foreign_session_changes_nothing<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let mine = s.create(new_session("t", "u")).await.expect("create");
    let unknown = TokenGenerator::from_os().expect("seed").session_id(START);
    let err = s
        .revoke(
            RevokeTarget::Sessions {
                ids: vec![mine.session.id, unknown],
                tenant: None,
            },
            RevokeReason::Admin,
        )
        .await
        .expect_err("all or nothing");
    assert!(matches!(err, Error::SessionNotFound(id) if id == unknown));
    let err = s
        .revoke(
            RevokeTarget::Sessions {
                ids: vec![mine.session.id],
                tenant: Some("other".into()),
            },
            RevokeReason::Admin,
        )
        .await
        .expect_err("another tenant's");
    assert!(matches!(err, Error::SessionNotFound(_)));
    s.validate(mine.token.expose(), false, None, None)
        .await
        .expect("untouched");
    assert_eq!(events(&h).len(), 1);
}

async fn the_limit_evicts_the_least_recently_used_and_says_so_first<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_sessions_per_user = 2)).await;
    let s = &h.sessions;
    let first = s.create(new_session("t", "u")).await.expect("1");
    h.clock.advance(Duration::from_secs(20));
    let second = s.create(new_session("t", "u")).await.expect("2");
    h.clock.advance(Duration::from_secs(20));
    // Using the first makes the second the least recently used.
    s.validate(first.token.expose(), true, None, None)
        .await
        .expect("use");
    let third = s.create(new_session("t", "u")).await.expect("3");
    assert_eq!(third.evicted, vec![second.session.id]);
    assert!(is_not_valid(
        s.validate(second.token.expose(), false, None, None).await
    ));
    let log = events(&h);
    let eviction = log
        .iter()
        .find(|e| e.session_id == second.session.id && matches!(e.kind, EventKind::Revoked { .. }))
        .expect("eviction event");
    assert!(matches!(
        eviction.kind,
        EventKind::Revoked {
            reason: RevokeReason::LimitEviction
        }
    ));
    assert!(
        eviction.sequence < third.sequence,
        "the eviction comes first"
    );
}

async fn concurrent_creates_never_exceed_a_rejecting_limit<B: Backend>(b: B) {
    let h = harness(
        &b,
        policy(|p| {
            p.max_sessions_per_user = 3;
            p.limit_action = LimitAction::Reject;
        }),
    )
    .await;
    let tasks: Vec<_> = (0..24)
        .map(|_| {
            let s = h.sessions.clone();
            tokio::spawn(async move { s.create(new_session("t", "u")).await })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(Error::ResourceExhausted(_)) => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, refused), (3, 21));
}

async fn the_login_quota_counts_a_rolling_day<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_creations_per_day = 2)).await;
    let s = &h.sessions;
    s.create(new_session("t", "u")).await.expect("1");
    h.clock.advance(Duration::from_secs(3600));
    s.create(new_session("t", "u")).await.expect("2");
    assert!(matches!(
        s.create(new_session("t", "u")).await,
        Err(Error::ResourceExhausted(_))
    ));
    s.create(new_session("t", "someone-else"))
        .await
        .expect("per user");
    h.clock.advance(Duration::from_secs(82_801));
    s.create(new_session("t", "u"))
        .await
        .expect("a day after the first");
}

async fn one_of_many_racing_rotations_wins<B: Backend>(b: B) {
    // The losers hold the replaced token within its grace period: refused, not taken for theft.
    let h = harness(
        &b,
        policy(|p| p.token_reuse_action = TokenReuseAction::Ignore),
    )
    .await;
    let created = h
        .sessions
        .create(new_session("t", "u"))
        .await
        .expect("create");
    let token = created.token.expose().to_string();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (s, token) = (h.sessions.clone(), token.clone());
            tokio::spawn(async move { s.rotate(&token, None, false).await })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => winners.push(r.token.expose().to_string()),
            Err(e) => assert!(matches!(e, Error::SessionNotValid), "{e}"),
        }
    }
    assert_eq!(winners.len(), 1);
    let s = &h.sessions;
    h.clock.advance(GRACE_AND_A_BIT);
    assert!(is_not_valid(s.validate(&token, false, None, None).await));
    s.validate(&winners[0], false, None, None)
        .await
        .expect("the new token");
    let rotations = events(&h)
        .iter()
        .filter(|e| e.kind == EventKind::Rotated)
        .count();
    assert_eq!(rotations, 1);
}

/// Just past the default rotation grace period.
const GRACE_AND_A_BIT: Duration = Duration::from_secs(11);

/// Waits (bounded) until `check` holds for session `id`: reuse is acted on after the answer.
async fn until_session<S: SessionStore>(
    h: &Harness<S>,
    id: &session_authority::token::SessionId,
    what: &str,
    check: impl Fn(&session_authority::model::session::Session) -> bool,
) -> session_authority::model::session::Session {
    for _ in 0..500 {
        let s = h.sessions.get(id).expect("get");
        if check(&s) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The kinds of the events about session `id`, in order.
fn kinds_of<S: SessionStore>(
    h: &Harness<S>,
    id: &session_authority::token::SessionId,
) -> Vec<EventKind> {
    events(h)
        .into_iter()
        .filter(|e| e.session_id == *id)
        .map(|e| e.kind)
        .collect()
}

/// A replaced token validates within the grace period; after it, presenting it (to validate or
/// rotate) revokes the session (REVOKE, the default), with a `flagged` event naming the rotation
/// that replaced it, then `revoked` with reason token reuse; the current token dies too.
async fn a_reused_token_after_the_grace_period_revokes_the_session<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let created = s.create(new_session("t", "u")).await.expect("create");
    let id = created.session.id;
    let first = created.token.expose().to_string();
    h.clock.advance(Duration::from_secs(1));
    let rotated = s.rotate(&first, None, false).await.expect("rotate");
    let replaced_at = h.clock.now();
    let second = rotated.token.expose().to_string();
    h.clock.advance(Duration::from_secs(5));
    s.validate(&first, false, None, None)
        .await
        .expect("within the grace period the old token still validates");
    assert!(
        is_not_valid(s.rotate(&first, None, false).await),
        "but never rotates again"
    );
    let third = s.rotate(&second, None, false).await.expect("rotate again");
    let third = third.token.expose().to_string();
    assert_eq!(
        kinds_of(&h, &id).len(),
        3,
        "nothing but two rotations so far"
    );

    h.clock.advance(GRACE_AND_A_BIT);
    assert!(is_not_valid(s.validate(&first, false, None, None).await));
    let ended = until_session(&h, &id, "revoked for reuse", |s| !s.is_active()).await;
    assert!(matches!(
        ended.state,
        SessionState::Revoked {
            reason: RevokeReason::TokenReuse,
            ..
        }
    ));
    assert!(is_not_valid(s.validate(&third, false, None, None).await));
    // The events are read from the durable log, which may trail the record by a flush.
    let mut kinds = kinds_of(&h, &id);
    for _ in 0..500 {
        if kinds.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        kinds = kinds_of(&h, &id);
    }
    let reuse = TokenReuse {
        flagged_at: h.clock.now(),
        rotation: 1,
        replaced_at,
    };
    assert_eq!(
        kinds[3..],
        [
            EventKind::Flagged {
                flag: Flag::TokenReuse(reuse)
            },
            EventKind::Revoked {
                reason: RevokeReason::TokenReuse
            }
        ]
    );
    assert!(ended.flags.contains(&Flag::TokenReuse(reuse)));
    // A second presentation finds an ended session: nothing more happens.
    assert!(is_not_valid(s.validate(&first, false, None, None).await));
    assert!(is_not_valid(s.rotate(&second, None, false).await));
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(kinds_of(&h, &id).len(), 5);
}

/// FLAG flags the session once per reused token and leaves it working; IGNORE does nothing.
async fn token_reuse_flag_flags_once_and_ignore_ignores<B: Backend>(b: B) {
    let h = harness(
        &b,
        policy(|p| p.token_reuse_action = TokenReuseAction::Flag),
    )
    .await;
    let s = &h.sessions;
    let created = s.create(new_session("t", "u")).await.expect("create");
    let id = created.session.id;
    let first = created.token.expose().to_string();
    let second = s.rotate(&first, None, false).await.expect("rotate");
    let second = second.token.expose().to_string();
    h.clock.advance(GRACE_AND_A_BIT);
    for _ in 0..3 {
        assert!(is_not_valid(s.validate(&first, false, None, None).await));
    }
    assert!(is_not_valid(s.rotate(&first, None, false).await));
    until_session(&h, &id, "flagged", |s| !s.flags.is_empty()).await;
    let is_flagged = |k: &EventKind| matches!(k, EventKind::Flagged { .. });
    for _ in 0..500 {
        if kinds_of(&h, &id).iter().any(is_flagged) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // More presentations could only add flags: give them time to show.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session = s
        .validate(&second, false, None, None)
        .await
        .expect("a flagged session works");
    assert_eq!(session.flags.len(), 1, "one flag per reused token");
    assert!(matches!(
        session.flags[0],
        Flag::TokenReuse(TokenReuse { rotation: 1, .. })
    ));
    let flagged = kinds_of(&h, &id)
        .into_iter()
        .filter(|k| matches!(k, EventKind::Flagged { .. }))
        .count();
    assert_eq!(flagged, 1);

    // IGNORE, for another tenant.
    s.policies()
        .set(
            "quiet".into(),
            policy(|p| p.token_reuse_action = TokenReuseAction::Ignore),
        )
        .await
        .expect("policy");
    let created = s.create(new_session("quiet", "v")).await.expect("create");
    let first = created.token.expose().to_string();
    let second = s.rotate(&first, None, false).await.expect("rotate");
    h.clock.advance(GRACE_AND_A_BIT);
    assert!(is_not_valid(s.validate(&first, false, None, None).await));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let session = s
        .validate(second.token.expose(), false, None, None)
        .await
        .expect("ignored");
    assert!(session.flags.is_empty());
    assert_eq!(kinds_of(&h, &created.session.id).len(), 2);
}

const CHROME_WINDOWS: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
const CHROME_WINDOWS_NEWER: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const FIREFOX_LINUX: &str =
    "Mozilla/5.0 (X11; Linux x86_64; rv:121.0) Gecko/20100101 Firefox/121.0";

fn device(user_agent: &str, country: &str) -> Device {
    Device {
        user_agent: user_agent.into(),
        location: Some(Location {
            country: country.into(),
            ..Location::default()
        }),
        ..Device::default()
    }
}

/// A session presented from another browser or OS, or another country, than it was created
/// from drifted: FLAG flags each kind once (not once per request), REVOKE ends the session.
async fn drift_flags_once_per_kind_and_revoke_revokes<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.drift_action = DriftAction::Flag)).await;
    let s = &h.sessions;
    let created = s
        .create(NewSession {
            device: device(CHROME_WINDOWS, "TH"),
            ..new_session("t", "u")
        })
        .await
        .expect("create");
    let token = created.token.expose().to_string();
    let id = created.session.id;
    let same = s
        .validate(&token, true, Some(device(CHROME_WINDOWS_NEWER, "TH")), None)
        .await
        .expect("an updated browser is the same device");
    assert!(same.flags.is_empty());
    for _ in 0..3 {
        let moved = s
            .validate(&token, true, Some(device(FIREFOX_LINUX, "TH")), None)
            .await
            .expect("flagged, still valid");
        assert_eq!(
            moved.flags,
            vec![Flag::Drift(Drift {
                flagged_at: START,
                kind: DriftKind::Device,
                from: "Chrome on Windows".into(),
                to: "Firefox on Linux".into(),
            })]
        );
    }
    h.clock.advance(Duration::from_secs(1));
    let abroad = s
        .validate(&token, true, Some(device(CHROME_WINDOWS, "GB")), None)
        .await
        .expect("flagged, still valid");
    assert!(matches!(
        &abroad.flags[1],
        Flag::Drift(Drift { kind: DriftKind::Place, from, to, .. }) if from == "TH" && to == "GB"
    ));
    s.validate(&token, true, Some(device(FIREFOX_LINUX, "GB")), None)
        .await
        .expect("valid");
    let flagged = kinds_of(&h, &id)
        .into_iter()
        .filter(|k| matches!(k, EventKind::Flagged { .. }))
        .count();
    assert_eq!(flagged, 2, "one flag per kind");

    s.policies()
        .set(
            "strict".into(),
            policy(|p| p.drift_action = DriftAction::Revoke),
        )
        .await
        .expect("policy");
    let created = s
        .create(NewSession {
            device: device(CHROME_WINDOWS, "TH"),
            ..new_session("strict", "u")
        })
        .await
        .expect("create");
    let token = created.token.expose().to_string();
    assert!(is_not_valid(
        s.validate(&token, true, Some(device(FIREFOX_LINUX, "TH")), None)
            .await
    ));
    let ended = s.get(&created.session.id).expect("get");
    assert!(matches!(
        ended.state,
        SessionState::Revoked {
            reason: RevokeReason::SuspiciousActivity,
            ..
        }
    ));
    assert!(is_not_valid(s.validate(&token, true, None, None).await));
}

/// The second login from another browser or country is new; one from the same device and place
/// is not; the first ever is not. FLAG flags them; the created event says so.
async fn a_login_from_a_new_device_or_place_is_marked_and_flagged<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let login = |ua: &str, country: &str| NewSession {
        device: device(ua, country),
        ..new_session("t", "u")
    };
    let first = s.create(login(CHROME_WINDOWS, "TH")).await.expect("first");
    assert!(!first.session.new_device && !first.session.new_place);
    assert!(first.session.flags.is_empty(), "nothing to compare with");
    h.clock.advance(Duration::from_secs(3600));
    let same = s
        .create(login(CHROME_WINDOWS_NEWER, "TH"))
        .await
        .expect("same");
    assert!(!same.session.new_device && !same.session.new_place);
    let elsewhere = s.create(login(FIREFOX_LINUX, "GB")).await.expect("new");
    assert!(elsewhere.session.new_device && elsewhere.session.new_place);
    assert_eq!(
        elsewhere.session.flags,
        vec![
            Flag::NewDevice {
                flagged_at: h.clock.now()
            },
            Flag::NewPlace {
                flagged_at: h.clock.now()
            }
        ]
    );
    let kinds = kinds_of(&h, &elsewhere.session.id);
    assert!(matches!(
        kinds[0],
        EventKind::Created {
            new_device: true,
            new_place: true,
            ..
        }
    ));
    assert_eq!(kinds.len(), 3, "created, then one flagged event per flag");
    // Now known: the same device again is not new.
    let again = s.create(login(FIREFOX_LINUX, "GB")).await.expect("again");
    assert!(!again.session.new_device && !again.session.new_place);
    // Another user's history is not this user's.
    let other = s
        .create(NewSession {
            device: device(FIREFOX_LINUX, "GB"),
            ..new_session("t", "someone-else")
        })
        .await
        .expect("other user");
    assert!(!other.session.new_device, "a first login");
    // A stored session remembers it.
    let stored = s.get(&elsewhere.session.id).expect("get");
    assert!(stored.new_device && stored.new_place);
}

/// A device-bound session's token lives `bound_token_ttl`; a proof signed by the device key
/// answers a challenge once and renews the token, with a `rotated` event.
async fn a_bound_session_renews_only_against_a_fresh_challenge<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.bound_token_ttl = Duration::from_secs(120))).await;
    let s = &h.sessions;
    let (key, jwk) = dbsc::key_pair(21);
    let created = s.create(bound_login(&jwk)).await.expect("create");
    let id = created.session.id;
    let token = created.token.expose().to_string();
    h.clock.advance(Duration::from_secs(61));
    s.validate(&token, true, None, None).await.expect("fresh");
    let challenge = s.binding_challenge(&id, None).expect("challenge").challenge;
    // The token's 120 s are up; the challenge has a second left.
    h.clock.advance(Duration::from_secs(59));
    assert!(is_not_valid(s.validate(&token, true, None, None).await));
    let iat = (h.clock.now().as_millis() / 1000) as i64;
    let proof = dbsc::proof(&key, &challenge, &id.to_string(), iat);
    let refreshed = s.refresh_bound(&id, &proof, None).await.expect("refresh");
    assert!(is_not_valid(s.refresh_bound(&id, &proof, None).await));
    assert!(is_not_valid(
        s.refresh_bound(&id, &proof, Some("another tenant")).await
    ));
    s.validate(refreshed.rotated.token.expose(), true, None, None)
        .await
        .expect("renewed");
    assert_eq!(
        refreshed.rotated.session.bound_token_expires_at(),
        Some(h.clock.now().saturating_add(Duration::from_secs(120)))
    );
    // The refresh hands out the next challenge: it answers once, like one fetched.
    let next = dbsc::proof(
        &key,
        &refreshed.next_challenge.challenge,
        &id.to_string(),
        iat,
    );
    s.refresh_bound(&id, &next, None)
        .await
        .expect("next refresh");
    assert!(is_not_valid(s.refresh_bound(&id, &next, None).await));
    assert_eq!(
        kinds_of(&h, &id),
        vec![
            EventKind::Created {
                device: Device::default(),
                remember_me: false,
                evicted: Vec::new(),
                new_device: false,
                new_place: false,
            },
            EventKind::Rotated,
            EventKind::Rotated
        ]
    );
    // Bound sessions survive a reopen with their key.
    drop(h);
    let h = harness(&b, policy(|_| {})).await;
    let reopened = h.sessions.get(&id).expect("get");
    assert_eq!(
        reopened.binding.map(|b| b.key),
        Some(BindingKey::from_jwk(&jwk).expect("jwk"))
    );
}

/// A device with a long token life may refresh as often as it likes (once, a session kept the
/// challenges it consumed until they expired, at most 32: a device with a day-long token was
/// refused at its 33rd refresh of the day), and every challenge still answers once: one made
/// before a refresh, even unused, never answers after it.
async fn a_device_refreshes_as_often_as_it_likes_and_each_challenge_answers_once<B: Backend>(b: B) {
    let h = harness(
        &b,
        policy(|p| p.bound_token_ttl = Duration::from_secs(86_400)),
    )
    .await;
    let s = &h.sessions;
    let (key, jwk) = dbsc::key_pair(22);
    let created = s.create(bound_login(&jwk)).await.expect("create");
    let id = created.session.id;
    let sign = |challenge: &str| {
        let iat = (h.clock.now().as_millis() / 1000) as i64;
        dbsc::proof(&key, challenge, &id.to_string(), iat)
    };
    let mut carried = created.next_challenge.expect("first challenge").challenge;
    for i in 0..40 {
        h.clock.advance(Duration::from_secs(1));
        let fetched = s.binding_challenge(&id, None).expect("challenge").challenge;
        let refreshed = s
            .refresh_bound(&id, &sign(&carried), None)
            .await
            .unwrap_or_else(|e| panic!("refresh {}: {e}", i + 1));
        assert!(
            is_not_valid(s.refresh_bound(&id, &sign(&carried), None).await),
            "a used challenge"
        );
        assert!(
            is_not_valid(s.refresh_bound(&id, &sign(&fetched), None).await),
            "an unused challenge made before the refresh"
        );
        carried = refreshed.next_challenge.challenge;
    }
    let session = s.get(&id).expect("get");
    assert_eq!(session.rotation_count, 40);
}

/// A store writes touches in rounds (sled a moment after the first, etcd in the background), and
/// keeps only a session's latest while one waits, so a busy writer can meet a use more than an
/// idle timeout after the stored one. Each use was live when a validate answered for it, so the
/// latest must still be written: judged against the stored last use alone, it looked idle and was
/// dropped, and a session used every 50 s of a 60 s idle timeout expired (a hardening test caught
/// it when the writer lagged). On etcd the writer also planned on a copy that already showed the
/// queued touch, so it found nothing to write, and no touch reached etcd but through a sweep.
async fn a_later_use_queued_over_an_earlier_one_is_still_written<B: Backend>(b: B) {
    let second = START.saturating_add(Duration::from_secs(1000));
    let (token, id) = {
        let h = harness(&b, policy(|_| {})).await;
        let s = &h.sessions;
        let created = s.create(new_session("t", "u")).await.expect("create");
        // Two uses 500 s apart, both queued before the store writes either; a close writes
        // what is queued (reads would answer from the queue, so only a reopen shows the write).
        s.store().touch(
            created.session.id,
            START.saturating_add(Duration::from_secs(500)),
        );
        s.store().touch(created.session.id, second);
        s.store().close().await.expect("close");
        (created.token.expose().to_string(), created.session.id)
    };
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let stored = s.store().get(&id).expect("get").map(|s| s.last_seen_at);
    assert_eq!(stored, Some(second), "the later use is written");
    // Past the first use's idle deadline (1,100 s), before the second's (1,600 s).
    h.clock.advance(Duration::from_secs(1500));
    let retention = a_day_of_retention();
    sweep_once(s, retention, &mut Default::default())
        .await
        .expect("sweep");
    s.validate(&token, false, None, None)
        .await
        .expect("live: last used 500 s ago");
}

/// A use slides the idle deadline: the sweeper leaves the session alone at its first deadline
/// (even a backend that files touches lazily must not expire it, nor keep finding it due), and
/// ends it once at the deadline its last use gave it.
async fn a_used_session_outlives_its_first_idle_deadline_and_expires_at_its_last<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let created = s.create(new_session("t", "u")).await.expect("create");
    let token = created.token.expose().to_string();
    let retention = a_day_of_retention();
    h.clock.advance(Duration::from_secs(300));
    s.validate(&token, true, None, None).await.expect("a use");
    // Past the idle deadline of creation (600 s), before that of the use (900 s).
    h.clock.advance(Duration::from_secs(310));
    sweep_once(s, retention, &mut Default::default())
        .await
        .expect("sweep");
    s.validate(&token, false, None, None)
        .await
        .expect("still live after its first deadline");
    // Nothing stays due: a backend may file the use late (etcd writes touches in the
    // background), but once it has, the sweeper stops finding the session.
    let now = h.clock.now();
    let mut due = s.store().due(now, 100).expect("due");
    for _ in 0..100 {
        if due.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        sweep_once(s, retention, &mut Default::default())
            .await
            .expect("sweep");
        due = s.store().due(now, 100).expect("due");
    }
    assert!(due.is_empty(), "still due after every sweep: {due:?}");
    h.clock.advance(Duration::from_secs(300));
    sweep_once(s, retention, &mut Default::default())
        .await
        .expect("sweep");
    assert!(is_not_valid(s.validate(&token, false, None, None).await));
    let expiries = events(&h)
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Expired { .. }))
        .count();
    assert_eq!(expiries, 1);
}

async fn an_expiry_is_recorded_once_however_many_notice_it<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let created = s.create(new_session("t", "u")).await.expect("create");
    h.clock.advance(Duration::from_secs(601));
    let retention = a_day_of_retention();
    for _ in 0..3 {
        assert!(is_not_valid(
            s.validate(created.token.expose(), true, None, None).await
        ));
        sweep_once(s, retention, &mut Default::default())
            .await
            .expect("sweep");
    }
    let expiries = events(&h)
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Expired { .. }))
        .count();
    assert_eq!(expiries, 1);
    let ended = s.get(&created.session.id).expect("tombstone");
    assert!(matches!(ended.state, SessionState::Expired { .. }));
}

async fn event_sequences_are_gapless_under_concurrent_writes<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_sessions_per_user = 2)).await;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let s = h.sessions.clone();
            // Eight users at a limit of two: creates that evict, too.
            tokio::spawn(async move { s.create(new_session("t", &format!("u{}", i % 8))).await })
        })
        .collect();
    for t in tasks {
        t.await.expect("task").expect("create");
    }
    let log = events(&h);
    let head = h.sessions.store().log_bounds().expect("bounds").head;
    let sequences: Vec<u64> = log.iter().map(|e| e.sequence).collect();
    assert_eq!(sequences, (1..=head).collect::<Vec<_>>());
    assert_eq!(
        log.iter()
            .filter(|e| matches!(e.kind, EventKind::Created { .. }))
            .count(),
        64
    );
}

/// A user may hold as many sessions as the tenant allows: on etcd each of them once cost the
/// next login a compare, and etcd takes 128 per transaction.
async fn a_user_holds_a_thousand_sessions_and_the_next_login_evicts_one<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_sessions_per_user = 1000)).await;
    let s = &h.sessions;
    let mut first = None;
    for i in 0..1000 {
        let created = s
            .create(new_session("t", "u"))
            .await
            .unwrap_or_else(|e| panic!("login {}: {e}", i + 1));
        assert!(
            created.evicted.is_empty(),
            "login {}: under the limit",
            i + 1
        );
        first.get_or_insert(created.session.id);
        h.clock.advance(Duration::from_millis(10));
    }
    let next = s.create(new_session("t", "u")).await.expect("login 1001");
    assert_eq!(next.evicted, first.into_iter().collect::<Vec<_>>());
    let scope = ListScope {
        tenant_id: "t".into(),
        user_id: Some("u".into()),
    };
    let listed = h.sessions.store().list(&scope, None, 2000).expect("list");
    assert_eq!(listed.sessions.len(), 1000);
}

/// Revoking every session of a user with a thousand ends each once, with its event.
async fn a_revoke_of_every_session_of_a_user_with_a_thousand_ends_them_all<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_sessions_per_user = 1000)).await;
    let s = &h.sessions;
    let tokens: Vec<_> = logins(s, 1000).await.into_iter().map(|c| c.token).collect();
    let target = RevokeTarget::User {
        tenant_id: "t".into(),
        user_id: "u".into(),
        except: None,
    };
    let revoked = s.revoke(target, RevokeReason::Admin).await.expect("revoke");
    assert_eq!(revoked.revoked.len(), 1000);
    for token in [&tokens[0], &tokens[499], &tokens[999]] {
        assert!(is_not_valid(
            s.validate(token.expose(), false, None, None).await
        ));
    }
    let revocations = events(&h)
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Revoked { .. }))
        .count();
    assert_eq!(revocations, 1000);
}

/// A login ends every session of its user found past a deadline, however many: a hundred idle
/// sessions are more than one etcd transaction holds together.
async fn a_login_ends_a_hundred_idle_sessions_of_its_user<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_sessions_per_user = 1000)).await;
    let s = &h.sessions;
    let ids: Vec<_> = logins(s, 100)
        .await
        .into_iter()
        .map(|c| c.session.id)
        .collect();
    h.clock.advance(Duration::from_secs(601));
    s.create(new_session("t", "u")).await.expect("login");
    for id in [ids[0], ids[99]] {
        let ended = s.get(&id).expect("tombstone");
        assert!(matches!(ended.state, SessionState::Expired { .. }));
    }
    let expiries = events(&h)
        .iter()
        .filter(|e| matches!(e.kind, EventKind::Expired { .. }))
        .count();
    assert_eq!(expiries, 100);
}

async fn impossible_travel_with_revoke_ends_every_session_of_the_user<B: Backend>(b: B) {
    let h = harness(
        &b,
        policy(|p| {
            p.travel_action = TravelAction::Revoke;
            p.travel_max_speed_kmh = 1000.0;
            p.travel_tolerance_km = 100.0;
        }),
    )
    .await;
    let s = &h.sessions;
    let london = s.create(at(51.51, -0.13)).await.expect("london");
    h.clock.advance(Duration::from_secs(300));
    let err = s.create(at(13.76, 100.50)).await.expect_err("bangkok");
    assert!(matches!(err, Error::PermissionDenied(_)));
    assert!(is_not_valid(
        s.validate(london.token.expose(), false, None, None).await
    ));
    let ended = s.get(&london.session.id).expect("tombstone");
    assert!(matches!(
        ended.state,
        SessionState::Revoked {
            reason: RevokeReason::SuspiciousActivity,
            ..
        }
    ));
}

async fn policies_audit_and_sessions_survive_a_reopen<B: Backend>(b: B) {
    let (token, id) = {
        let h = harness(&b, policy(|_| {})).await;
        let s = &h.sessions;
        let created = s.create(new_session("t", "u")).await.expect("create");
        s.policies()
            .set("t".into(), policy(|p| p.max_sessions_per_user = 7))
            .await
            .expect("policy");
        assert_eq!(
            s.audit("ops", "admin", "A", None, "1".into())
                .await
                .expect("a"),
            1
        );
        assert_eq!(
            s.audit("ops", "admin", "B", None, "2".into())
                .await
                .expect("b"),
            2
        );
        s.store().close().await.expect("close");
        (created.token.expose().to_string(), created.session.id)
    };
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    assert_eq!(s.policies().for_tenant("t").max_sessions_per_user, 7);
    let audit = s.store().audit_after(0, 10).expect("audit");
    assert_eq!(audit.iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        s.audit("ops", "admin", "C", None, "3".into())
            .await
            .expect("c"),
        3
    );
    let session = s
        .validate(&token, false, None, None)
        .await
        .expect("still valid");
    assert_eq!(session.id, id);
}

/// Also with every user's per-user records stored (which sled keeps beside the user's sessions).
async fn listing_pages_cover_every_live_session_once<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_creations_per_day = 100)).await;
    let s = &h.sessions;
    let mut created = Vec::new();
    for i in 0..25 {
        created.push(
            s.create(from_bangkok("t", &format!("user-{}", i % 3)))
                .await
                .expect("create")
                .session
                .id,
        );
    }
    s.create(from_bangkok("other", "x")).await.expect("other");
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = s
            .list(&ListQuery {
                scope: ListScope {
                    tenant_id: "t".into(),
                    user_id: None,
                },
                page_size: 7,
                cursor: cursor.take(),
                filter: SessionFilter::default(),
            })
            .expect("list");
        assert!(page.sessions.len() <= 7);
        seen.extend(page.sessions.into_iter().map(|x| (x.user_id, x.id)));
        match page.next {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let users: Vec<&String> = seen.iter().map(|(u, _)| u).collect();
    let mut sorted = users.clone();
    sorted.sort();
    assert_eq!(users, sorted, "ordered by user");
    let mut ids: Vec<_> = seen.iter().map(|(_, id)| *id).collect();
    ids.sort();
    created.sort();
    assert_eq!(ids, created);
}

/// Places and login histories are bounded by count as well as by age (every etcd replica holds
/// them in memory): once a sweeper's pass has counted more than `user_state_count`, the next
/// pass forgets those written longest ago.
async fn per_user_records_beyond_their_count_go_oldest_first<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    // Ten users a login each (a place and a login history each), two hours apart.
    for i in 0..10 {
        s.create(from_bangkok("t", &format!("u{i}")))
            .await
            .expect("create");
        h.clock.advance(Duration::from_secs(7200));
    }
    let mut retention = a_day_of_retention();
    retention.user_state = Duration::from_secs(30 * 86_400);
    retention.user_state_count = 6;
    let mut pass = Default::default();
    // A pass counts (a call reads at most 1,024 keys: one call here), the next one forgets.
    for _ in 0..4 {
        sweep_once(s, retention, &mut pass).await.expect("sweep");
    }
    let store = s.store();
    let kept: Vec<bool> = (0..10)
        .map(|i| {
            store
                .last_seen("t", &format!("u{i}"))
                .expect("read")
                .is_some()
        })
        .collect();
    assert_eq!(
        kept,
        [false, false, false, false, false, false, false, true, true, true],
        "the newest 6 records: 3 users' places and histories"
    );
}

/// Stale per-user records go, in short calls that together cover every user, also users whose
/// sessions are live; fresh ones stay. A forgotten quota and history show in the next login.
async fn stale_per_user_records_are_purged_in_short_calls<B: Backend>(b: B) {
    let h = harness(&b, policy(|p| p.max_creations_per_day = 2)).await;
    let s = &h.sessions;
    let store = s.store();
    for i in 0..5 {
        for _ in 0..2 {
            s.create(from_bangkok("t", &format!("u{i}")))
                .await
                .expect("create");
        }
    }
    let purge = |older_than: Timestamp, now: Timestamp| async move {
        let (mut purged, mut cursor, mut calls) = (0, None, 0);
        loop {
            let page = store
                .purge_user_state(older_than, now, cursor.take(), 3)
                .await
                .expect("purge");
            purged += page.purged;
            calls += 1;
            assert!(calls < 100, "the walk ends");
            match page.next {
                Some(next) => cursor = Some(next),
                None => return (purged, calls),
            }
        }
    };
    let (purged, calls) = purge(START, START).await;
    assert_eq!(purged, 0, "nothing stale yet");
    assert!(calls > 1, "{calls} calls of at most 3 keys each");
    assert!(store.last_seen("t", "u0").expect("read").is_some());
    assert!(matches!(
        s.create(from_bangkok("t", "u0")).await,
        Err(Error::ResourceExhausted(_))
    ));

    let later = START.saturating_add(Duration::from_secs(2 * 86_400));
    let (purged, _) = purge(START.saturating_add(Duration::from_secs(1)), later).await;
    assert_eq!(purged, 15, "5 users' places, logins and quotas");
    for i in 0..5 {
        assert_eq!(store.last_seen("t", &format!("u{i}")).expect("read"), None);
    }
    let after = s
        .create(NewSession {
            device: device(FIREFOX_LINUX, "GB"),
            ..new_session("t", "u0")
        })
        .await
        .expect("the quota was forgotten");
    assert!(!after.session.new_device, "no history to compare with");
    assert_eq!(
        s.list(&ListQuery {
            scope: ListScope {
                tenant_id: "t".into(),
                user_id: None,
            },
            page_size: 100,
            cursor: None,
            filter: SessionFilter::default(),
        })
        .expect("list")
        .sessions
        .len(),
        11,
        "sessions untouched"
    );
}

/// The audit trail is bounded by count as well as by age (every etcd replica holds it in
/// memory): the sweeper keeps the newest `audit_count`, and ids go on after them.
async fn the_audit_trail_keeps_the_newest_records_beyond_its_count<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    for i in 1..=10 {
        s.audit("ops", "admin", "A", None, i.to_string())
            .await
            .expect("audit");
    }
    let mut retention = a_day_of_retention();
    retention.audit_count = 3;
    sweep_once(s, retention, &mut Default::default())
        .await
        .expect("sweep");
    let kept = s.store().audit_after(0, 100).expect("audit");
    assert_eq!(
        kept.iter().map(|e| e.id).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    let next = s
        .audit("ops", "admin", "B", None, "11".into())
        .await
        .expect("audit");
    assert_eq!(next, 11);
    // And by age: a day later every record is past its retention.
    h.clock.advance(Duration::from_secs(86_401));
    sweep_once(s, a_day_of_retention(), &mut Default::default())
        .await
        .expect("sweep");
    assert!(s.store().audit_after(0, 100).expect("audit").is_empty());
}

async fn pruning_keeps_the_newest_events_and_the_head<B: Backend>(b: B) {
    let head = {
        let h = harness(&b, policy(|_| {})).await;
        let s = &h.sessions;
        for i in 0..10 {
            s.create(new_session("t", &format!("u{i}")))
                .await
                .expect("create");
        }
        let store = s.store();
        while store.prune_events(START, 4).await.expect("prune") > 0 {}
        let bounds = store.log_bounds().expect("bounds");
        assert_eq!((bounds.first, bounds.head), (7, 10));
        store.close().await.expect("close");
        bounds.head
    };
    let h = harness(&b, policy(|_| {})).await;
    assert_eq!(h.sessions.store().log_bounds().expect("bounds").head, head);
    let next = h
        .sessions
        .create(new_session("t", "later"))
        .await
        .expect("create");
    assert_eq!(next.sequence, head + 1, "no sequence reused");
}

/// One write that ends many sessions records their events together: the log reads from any
/// sequence, with any limit, newest first by time, and prunes to an exact count, across a
/// reopen.
async fn the_log_reads_and_prunes_from_inside_one_writes_events<B: Backend>(b: B) {
    let sequences = |events: Vec<Event>| events.iter().map(|e| e.sequence).collect::<Vec<_>>();
    {
        let h = harness(&b, policy(|_| {})).await;
        let s = &h.sessions;
        let ids: Vec<_> = logins(s, 6)
            .await
            .into_iter()
            .map(|c| c.session.id)
            .collect();
        h.clock.advance(Duration::from_secs(60));
        let revoked = s
            .revoke(
                RevokeTarget::Sessions { ids, tenant: None },
                RevokeReason::Admin,
            )
            .await
            .expect("revoke");
        assert_eq!((revoked.revoked.len(), revoked.sequence), (6, 12));
        let store = s.store();
        for after in 0..=12 {
            let all = store.events_after(after, 100).expect("events");
            assert_eq!(
                sequences(all),
                (after + 1..=12).collect::<Vec<_>>(),
                "after {after}"
            );
            let two = store.events_after(after, 2).expect("events");
            assert_eq!(
                sequences(two),
                (after + 1..=12).take(2).collect::<Vec<_>>(),
                "two after {after}"
            );
        }
        let mut newest_first = Vec::new();
        store
            .visit_events_since(START.saturating_add(Duration::from_secs(60)), &mut |e| {
                newest_first.push(e.sequence)
            })
            .expect("visit");
        assert_eq!(
            newest_first,
            (7..=12).rev().collect::<Vec<_>>(),
            "the revokes only"
        );
        while store.prune_events(START, 3).await.expect("prune") > 0 {}
        let bounds = store.log_bounds().expect("bounds");
        assert_eq!((bounds.first, bounds.head), (10, 12));
        store.close().await.expect("close");
    }
    let h = harness(&b, policy(|_| {})).await;
    let store = h.sessions.store();
    let bounds = store.log_bounds().expect("bounds");
    assert_eq!((bounds.first, bounds.head), (10, 12), "after a reopen");
    let kept = store.events_after(0, 100).expect("events");
    assert_eq!(sequences(kept.clone()), vec![10, 11, 12]);
    assert!(kept.iter().all(|e| matches!(
        e.kind,
        EventKind::Revoked {
            reason: RevokeReason::Admin
        }
    )));
}

async fn a_tightened_policy_ends_open_sessions_with_their_events<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let old = s.create(new_session("t", "u")).await.expect("old");
    h.clock.advance(Duration::from_secs(400));
    let fresh = s.create(new_session("t", "u")).await.expect("fresh");
    s.policies()
        .set(
            "t".into(),
            policy(|p| p.idle_timeout = Duration::from_secs(300)),
        )
        .await
        .expect("tighten");
    assert_eq!(s.enforce_policy("t").await.expect("enforce"), 2);
    assert!(is_not_valid(
        s.validate(old.token.expose(), false, None, None).await
    ));
    s.validate(fresh.token.expose(), false, None, None)
        .await
        .expect("within the new idle timeout");
    let expired: Vec<_> = events(&h)
        .into_iter()
        .filter(|e| matches!(e.kind, EventKind::Expired { .. }))
        .map(|e| e.session_id)
        .collect();
    assert_eq!(expired, vec![old.session.id]);
}

async fn a_policy_write_is_marked_until_its_enforcement_finishes<B: Backend>(b: B) {
    let h = harness(&b, policy(|_| {})).await;
    let s = &h.sessions;
    let store = s.store();
    assert!(store.pending_enforcements().expect("pending").is_empty());
    s.policies()
        .set("t".into(), policy(|p| p.max_sessions_per_user = 3))
        .await
        .expect("set");
    assert_eq!(store.pending_enforcements().expect("pending"), vec!["t"]);
    s.enforce_policy("t").await.expect("enforce");
    assert!(store.pending_enforcements().expect("pending").is_empty());
    // An enforcement that finishes after a newer write leaves the newer write's mark.
    s.policies()
        .set("t".into(), policy(|p| p.max_sessions_per_user = 4))
        .await
        .expect("set");
    let older = store
        .enforcement_pending("t")
        .expect("mark")
        .expect("marked");
    s.policies().delete("t").await.expect("delete");
    store
        .enforcement_done("t".into(), older)
        .await
        .expect("done");
    assert_eq!(store.pending_enforcements().expect("pending"), vec!["t"]);
}

/// Instantiates every test of the suite for one backend.
macro_rules! conformance {
    ($module:ident, $backend:expr) => {
        mod $module {
            use super::*;

            conformance!(@tests $backend;
                created_sessions_validate_and_a_revoke_ends_them_once,
                a_revoke_naming_an_unknown_or_foreign_session_changes_nothing,
                the_limit_evicts_the_least_recently_used_and_says_so_first,
                concurrent_creates_never_exceed_a_rejecting_limit,
                the_login_quota_counts_a_rolling_day,
                one_of_many_racing_rotations_wins,
                a_reused_token_after_the_grace_period_revokes_the_session,
                token_reuse_flag_flags_once_and_ignore_ignores,
                drift_flags_once_per_kind_and_revoke_revokes,
                a_bound_session_renews_only_against_a_fresh_challenge,
                a_device_refreshes_as_often_as_it_likes_and_each_challenge_answers_once,
                a_login_from_a_new_device_or_place_is_marked_and_flagged,
                an_expiry_is_recorded_once_however_many_notice_it,
                a_used_session_outlives_its_first_idle_deadline_and_expires_at_its_last,
                a_later_use_queued_over_an_earlier_one_is_still_written,
                event_sequences_are_gapless_under_concurrent_writes,
                impossible_travel_with_revoke_ends_every_session_of_the_user,
                a_user_holds_a_thousand_sessions_and_the_next_login_evicts_one,
                a_revoke_of_every_session_of_a_user_with_a_thousand_ends_them_all,
                a_login_ends_a_hundred_idle_sessions_of_its_user,
                policies_audit_and_sessions_survive_a_reopen,
                listing_pages_cover_every_live_session_once,
                stale_per_user_records_are_purged_in_short_calls,
                per_user_records_beyond_their_count_go_oldest_first,
                pruning_keeps_the_newest_events_and_the_head,
                the_audit_trail_keeps_the_newest_records_beyond_its_count,
                the_log_reads_and_prunes_from_inside_one_writes_events,
                a_tightened_policy_ends_open_sessions_with_their_events,
                a_policy_write_is_marked_until_its_enforcement_finishes,
            );
        }
    };
    (@tests $backend:expr; $($test:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                super::$test($backend).await
            }
        )*
    };
}

conformance!(sled, Sled::new());
conformance!(etcd, Etcd::new());
