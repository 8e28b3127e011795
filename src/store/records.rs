//! How sessions and events are laid out on disk: protobuf records (prost), independent of the
//! wire API so that either can change without the other. Numbers for enums are fixed here.

use std::{collections::BTreeMap, time::Duration};

use prost::Message;

use crate::{
    clock::Timestamp,
    error::Error,
    events::{Event, EventKind},
    model::{
        binding::{Binding, BindingKey, Challenge},
        flag::{Drift, DriftKind, Flag, TokenReuse},
        login::Login,
        policy::Policy,
        session::{
            Device, ExpiryKind, Location, ReplacedToken, RevokeReason, Session, SessionState,
        },
        travel::{LastSeen, TravelFlag},
    },
    token::{SessionId, TokenHash},
};

#[derive(Clone, PartialEq, Message)]
pub struct SessionRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub token_hash: Vec<u8>,
    #[prost(string, tag = "2")]
    pub tenant_id: String,
    #[prost(string, tag = "3")]
    pub user_id: String,
    #[prost(uint64, tag = "4")]
    pub created_at: u64,
    #[prost(uint64, tag = "5")]
    pub last_seen_at: u64,
    #[prost(uint64, tag = "6")]
    pub idle_timeout_ms: u64,
    #[prost(uint64, tag = "7")]
    pub absolute_expires_at: u64,
    #[prost(bool, tag = "8")]
    pub remember_me: bool,
    #[prost(message, optional, tag = "9")]
    pub device: Option<DeviceRecord>,
    #[prost(btree_map = "string, string", tag = "10")]
    pub attributes: BTreeMap<String, String>,
    /// 0 active, 1 revoked, 2 expired.
    #[prost(uint32, tag = "11")]
    pub state: u32,
    #[prost(uint64, tag = "12")]
    pub ended_at: u64,
    /// The revoke reason or expiry kind code, by `state`.
    #[prost(uint32, tag = "13")]
    pub end_detail: u32,
    #[prost(uint32, tag = "14")]
    pub rotation_count: u32,
    /// 0: no maximum age.
    #[prost(uint64, tag = "15")]
    pub max_age_at: u64,
    #[prost(message, repeated, tag = "16")]
    pub flags: Vec<FlagRecord>,
    /// 0: not ended.
    #[prost(uint64, tag = "17")]
    pub purge_at: u64,
    #[prost(message, repeated, tag = "18")]
    pub replaced: Vec<ReplacedRecord>,
    #[prost(bool, tag = "19")]
    pub new_device: bool,
    #[prost(bool, tag = "20")]
    pub new_place: bool,
    #[prost(message, optional, tag = "21")]
    pub binding: Option<BindingRecord>,
}

/// A device-bound session's key, its token's issue and expiry, and the challenges refreshes used
/// that have not expired.
#[derive(Clone, PartialEq, Message)]
pub struct BindingRecord {
    /// SEC1 uncompressed point, 65 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub token_issued_at: u64,
    #[prost(message, repeated, tag = "3")]
    pub used: Vec<ChallengeRecord>,
    #[prost(uint64, tag = "4")]
    pub token_expires_at: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct ChallengeRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub nonce: Vec<u8>,
    #[prost(uint64, tag = "2")]
    pub expires_at: u64,
}

/// A token that rotation replaced.
#[derive(Clone, PartialEq, Message)]
pub struct ReplacedRecord {
    #[prost(bytes = "vec", tag = "1")]
    pub hash: Vec<u8>,
    #[prost(uint32, tag = "2")]
    pub rotation: u32,
    #[prost(uint64, tag = "3")]
    pub replaced_at: u64,
    /// A bound token's own end; 0: none.
    #[prost(uint64, tag = "4")]
    pub expires_at: u64,
}

#[derive(Clone, PartialEq, Message)]
pub struct FlagRecord {
    #[prost(uint64, tag = "1")]
    pub flagged_at: u64,
    #[prost(message, optional, tag = "2")]
    pub from: Option<LocationRecord>,
    #[prost(uint64, tag = "3")]
    pub from_seen_at: u64,
    #[prost(bytes = "vec", tag = "4")]
    pub from_session_id: Vec<u8>,
    #[prost(message, optional, tag = "5")]
    pub to: Option<LocationRecord>,
    #[prost(double, tag = "6")]
    pub distance_km: f64,
    #[prost(double, tag = "7")]
    pub speed_kmh: f64,
    /// 0 impossible travel (the fields above), 1 token reuse, 2 new device, 3 new place, 4
    /// device drift, 5 place drift. Records from before the other kinds are all 0.
    #[prost(uint32, tag = "8")]
    pub kind: u32,
    #[prost(uint32, tag = "9")]
    pub rotation: u32,
    #[prost(uint64, tag = "10")]
    pub replaced_at: u64,
    #[prost(string, tag = "11")]
    pub drift_from: String,
    #[prost(string, tag = "12")]
    pub drift_to: String,
}

/// A user's recent logins (`userid_logins`).
#[derive(Clone, PartialEq, Message)]
pub struct LoginsRecord {
    #[prost(message, repeated, tag = "1")]
    pub logins: Vec<LoginRecord>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LoginRecord {
    #[prost(uint64, tag = "1")]
    pub at: u64,
    #[prost(string, tag = "2")]
    pub platform: String,
    #[prost(string, tag = "3")]
    pub label: String,
    #[prost(string, tag = "4")]
    pub country: String,
    #[prost(string, tag = "5")]
    pub city: String,
}

pub fn encode_logins(logins: &[Login]) -> Vec<u8> {
    LoginsRecord {
        logins: logins
            .iter()
            .map(|l| LoginRecord {
                at: l.at.as_millis(),
                platform: l.platform.clone(),
                label: l.label.clone(),
                country: l.country.clone(),
                city: l.city.clone(),
            })
            .collect(),
    }
    .encode_to_vec()
}

pub fn decode_logins(bytes: &[u8]) -> Result<Vec<Login>, Error> {
    let r = LoginsRecord::decode(bytes).map_err(|_| corrupt("logins"))?;
    Ok(r.logins
        .into_iter()
        .map(|l| Login {
            at: Timestamp::from_millis(l.at),
            platform: l.platform,
            label: l.label,
            country: l.country,
            city: l.city,
        })
        .collect())
}

/// A user's last known place (`lastseen` map).
#[derive(Clone, PartialEq, Message)]
pub struct LastSeenRecord {
    #[prost(message, optional, tag = "1")]
    pub location: Option<LocationRecord>,
    #[prost(uint64, tag = "2")]
    pub at: u64,
    #[prost(bytes = "vec", tag = "3")]
    pub session_id: Vec<u8>,
}

#[derive(Clone, PartialEq, Message)]
pub struct DeviceRecord {
    #[prost(string, tag = "1")]
    pub ip: String,
    #[prost(string, tag = "2")]
    pub user_agent: String,
    #[prost(string, tag = "3")]
    pub label: String,
    #[prost(message, optional, tag = "4")]
    pub location: Option<LocationRecord>,
}

#[derive(Clone, PartialEq, Message)]
pub struct LocationRecord {
    #[prost(string, tag = "1")]
    pub country: String,
    #[prost(string, tag = "2")]
    pub city: String,
    #[prost(bool, tag = "3")]
    pub has_coordinates: bool,
    #[prost(double, tag = "4")]
    pub latitude: f64,
    #[prost(double, tag = "5")]
    pub longitude: f64,
}

#[derive(Clone, PartialEq, Message)]
pub struct EventRecord {
    #[prost(uint64, tag = "1")]
    pub occurred_at: u64,
    #[prost(string, tag = "2")]
    pub tenant_id: String,
    #[prost(string, tag = "3")]
    pub user_id: String,
    #[prost(bytes = "vec", tag = "4")]
    pub session_id: Vec<u8>,
    /// 1 created, 2 revoked, 3 expired, 4 rotated.
    #[prost(uint32, tag = "5")]
    pub kind: u32,
    /// Revoke reason or expiry kind code, by `kind`.
    #[prost(uint32, tag = "6")]
    pub detail: u32,
    #[prost(message, optional, tag = "7")]
    pub device: Option<DeviceRecord>,
    #[prost(bool, tag = "8")]
    pub remember_me: bool,
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub evicted: Vec<Vec<u8>>,
    #[prost(message, optional, tag = "10")]
    pub flag: Option<FlagRecord>,
    #[prost(bool, tag = "11")]
    pub new_device: bool,
    #[prost(bool, tag = "12")]
    pub new_place: bool,
}

fn corrupt(what: &str) -> Error {
    Error::Storage(format!("corrupt {what} record"))
}

fn reason_code(r: RevokeReason) -> u32 {
    match r {
        RevokeReason::UserLogout => 1,
        RevokeReason::UserLogoutOthers => 2,
        RevokeReason::Admin => 3,
        RevokeReason::LimitEviction => 4,
        RevokeReason::SuspiciousActivity => 5,
        RevokeReason::Policy => 6,
        RevokeReason::TokenReuse => 7,
    }
}

fn reason_from(code: u32) -> Option<RevokeReason> {
    Some(match code {
        1 => RevokeReason::UserLogout,
        2 => RevokeReason::UserLogoutOthers,
        3 => RevokeReason::Admin,
        4 => RevokeReason::LimitEviction,
        5 => RevokeReason::SuspiciousActivity,
        6 => RevokeReason::Policy,
        7 => RevokeReason::TokenReuse,
        _ => return None,
    })
}

fn expiry_code(k: ExpiryKind) -> u32 {
    match k {
        ExpiryKind::Idle => 1,
        ExpiryKind::Absolute => 2,
    }
}

fn expiry_from(code: u32) -> Option<ExpiryKind> {
    match code {
        1 => Some(ExpiryKind::Idle),
        2 => Some(ExpiryKind::Absolute),
        _ => None,
    }
}

impl From<&Location> for LocationRecord {
    fn from(l: &Location) -> Self {
        Self {
            country: l.country.clone(),
            city: l.city.clone(),
            has_coordinates: l.coordinates.is_some(),
            latitude: l.coordinates.map_or(0.0, |c| c.0),
            longitude: l.coordinates.map_or(0.0, |c| c.1),
        }
    }
}

impl From<LocationRecord> for Location {
    fn from(l: LocationRecord) -> Self {
        Self {
            country: l.country,
            city: l.city,
            coordinates: l.has_coordinates.then_some((l.latitude, l.longitude)),
        }
    }
}

impl From<&Device> for DeviceRecord {
    fn from(d: &Device) -> Self {
        Self {
            ip: d.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            user_agent: d.user_agent.clone(),
            label: d.label.clone(),
            location: d.location.as_ref().map(LocationRecord::from),
        }
    }
}

impl From<&Flag> for FlagRecord {
    fn from(flag: &Flag) -> Self {
        let mut r = FlagRecord {
            flagged_at: flag.flagged_at().as_millis(),
            ..Default::default()
        };
        match flag {
            Flag::Travel(f) => {
                r.from = Some(LocationRecord::from(&f.from));
                r.from_seen_at = f.from_seen_at.as_millis();
                r.from_session_id = f
                    .from_session_id
                    .map(|id| id.as_bytes().to_vec())
                    .unwrap_or_default();
                r.to = Some(LocationRecord::from(&f.to));
                r.distance_km = f.distance_km;
                r.speed_kmh = f.speed_kmh;
            }
            Flag::TokenReuse(reuse) => {
                r.kind = 1;
                r.rotation = reuse.rotation;
                r.replaced_at = reuse.replaced_at.as_millis();
            }
            Flag::NewDevice { .. } => r.kind = 2,
            Flag::NewPlace { .. } => r.kind = 3,
            Flag::Drift(d) => {
                r.kind = match d.kind {
                    DriftKind::Device => 4,
                    DriftKind::Place => 5,
                };
                r.drift_from = d.from.clone();
                r.drift_to = d.to.clone();
            }
        }
        r
    }
}

impl TryFrom<FlagRecord> for Flag {
    type Error = Error;

    fn try_from(r: FlagRecord) -> Result<Self, Error> {
        let flagged_at = Timestamp::from_millis(r.flagged_at);
        let drift = |kind, r: FlagRecord| {
            Flag::Drift(Drift {
                flagged_at,
                kind,
                from: r.drift_from,
                to: r.drift_to,
            })
        };
        Ok(match r.kind {
            0 => Flag::Travel(TravelFlag {
                flagged_at,
                from: r.from.map(Location::from).unwrap_or_default(),
                from_seen_at: Timestamp::from_millis(r.from_seen_at),
                from_session_id: SessionId::from_slice(&r.from_session_id),
                to: r.to.map(Location::from).unwrap_or_default(),
                distance_km: r.distance_km,
                speed_kmh: r.speed_kmh,
            }),
            1 => Flag::TokenReuse(TokenReuse {
                flagged_at,
                rotation: r.rotation,
                replaced_at: Timestamp::from_millis(r.replaced_at),
            }),
            2 => Flag::NewDevice { flagged_at },
            3 => Flag::NewPlace { flagged_at },
            4 => drift(DriftKind::Device, r),
            5 => drift(DriftKind::Place, r),
            _ => return Err(corrupt("flag")),
        })
    }
}

impl From<DeviceRecord> for Device {
    fn from(r: DeviceRecord) -> Self {
        Self {
            // Written from a parsed address, so this only fails on a foreign record; drop it then.
            ip: r.ip.parse().ok(),
            user_agent: r.user_agent,
            label: r.label,
            location: r.location.map(Location::from),
        }
    }
}

pub fn encode_session(s: &Session) -> Vec<u8> {
    let (state, ended_at, end_detail) = match s.state {
        SessionState::Active => (0, 0, 0),
        SessionState::Revoked { at, reason } => (1, at.as_millis(), reason_code(reason)),
        SessionState::Expired { at, kind } => (2, at.as_millis(), expiry_code(kind)),
    };
    SessionRecord {
        token_hash: s.token_hash.as_bytes().to_vec(),
        tenant_id: s.tenant_id.clone(),
        user_id: s.user_id.clone(),
        created_at: s.created_at.as_millis(),
        last_seen_at: s.last_seen_at.as_millis(),
        idle_timeout_ms: u64::try_from(s.idle_timeout.as_millis()).unwrap_or(u64::MAX),
        absolute_expires_at: s.absolute_expires_at.as_millis(),
        remember_me: s.remember_me,
        device: Some(DeviceRecord::from(&s.device)),
        attributes: s.attributes.clone(),
        state,
        ended_at,
        end_detail,
        rotation_count: s.rotation_count,
        max_age_at: s.max_age_at.map_or(0, Timestamp::as_millis),
        flags: s.flags.iter().map(FlagRecord::from).collect(),
        purge_at: s.purge_at.map_or(0, Timestamp::as_millis),
        replaced: s
            .replaced
            .iter()
            .map(|r| ReplacedRecord {
                hash: r.hash.as_bytes().to_vec(),
                rotation: r.rotation,
                replaced_at: r.replaced_at.as_millis(),
                expires_at: r.expires_at.map_or(0, Timestamp::as_millis),
            })
            .collect(),
        new_device: s.new_device,
        new_place: s.new_place,
        binding: s.binding.as_ref().map(|b| BindingRecord {
            key: b.key.as_sec1().to_vec(),
            token_issued_at: b.token_issued_at.as_millis(),
            token_expires_at: b.token_expires_at.as_millis(),
            used: b
                .used
                .iter()
                .map(|c| ChallengeRecord {
                    nonce: c.nonce.to_vec(),
                    expires_at: c.expires_at.as_millis(),
                })
                .collect(),
        }),
    }
    .encode_to_vec()
}

pub fn decode_session(id: SessionId, bytes: &[u8]) -> Result<Session, Error> {
    let r = SessionRecord::decode(bytes).map_err(|_| corrupt("session"))?;
    let at = Timestamp::from_millis(r.ended_at);
    let state = match r.state {
        0 => SessionState::Active,
        1 => SessionState::Revoked {
            at,
            reason: reason_from(r.end_detail).ok_or_else(|| corrupt("session"))?,
        },
        2 => SessionState::Expired {
            at,
            kind: expiry_from(r.end_detail).ok_or_else(|| corrupt("session"))?,
        },
        _ => return Err(corrupt("session")),
    };
    Ok(Session {
        id,
        tenant_id: r.tenant_id,
        user_id: r.user_id,
        token_hash: TokenHash::from_slice(&r.token_hash).ok_or_else(|| corrupt("session"))?,
        created_at: Timestamp::from_millis(r.created_at),
        last_seen_at: Timestamp::from_millis(r.last_seen_at),
        idle_timeout: Duration::from_millis(r.idle_timeout_ms),
        absolute_expires_at: Timestamp::from_millis(r.absolute_expires_at),
        remember_me: r.remember_me,
        device: r.device.map(Device::from).unwrap_or_default(),
        attributes: r.attributes,
        state,
        rotation_count: r.rotation_count,
        max_age_at: (r.max_age_at != 0).then(|| Timestamp::from_millis(r.max_age_at)),
        flags: r
            .flags
            .into_iter()
            .map(Flag::try_from)
            .collect::<Result<_, _>>()?,
        purge_at: (r.purge_at != 0).then(|| Timestamp::from_millis(r.purge_at)),
        replaced: r
            .replaced
            .into_iter()
            .map(|r| {
                Ok(ReplacedToken {
                    hash: TokenHash::from_slice(&r.hash).ok_or_else(|| corrupt("session"))?,
                    rotation: r.rotation,
                    replaced_at: Timestamp::from_millis(r.replaced_at),
                    expires_at: (r.expires_at != 0).then(|| Timestamp::from_millis(r.expires_at)),
                })
            })
            .collect::<Result<_, Error>>()?,
        new_device: r.new_device,
        new_place: r.new_place,
        binding: r
            .binding
            .map(|b| {
                Ok::<_, Error>(Binding {
                    key: BindingKey::from_stored(&b.key).ok_or_else(|| corrupt("session"))?,
                    token_issued_at: Timestamp::from_millis(b.token_issued_at),
                    token_expires_at: Timestamp::from_millis(b.token_expires_at),
                    used: b
                        .used
                        .into_iter()
                        .map(|c| {
                            Ok(Challenge {
                                generation: None,
                                nonce: c.nonce.try_into().map_err(|_| corrupt("session"))?,
                                expires_at: Timestamp::from_millis(c.expires_at),
                            })
                        })
                        .collect::<Result<_, Error>>()?,
                })
            })
            .transpose()?,
    })
}

pub fn encode_event(e: &Event) -> Vec<u8> {
    let mut r = EventRecord {
        occurred_at: e.occurred_at.as_millis(),
        tenant_id: e.tenant_id.clone(),
        user_id: e.user_id.clone(),
        session_id: e.session_id.as_bytes().to_vec(),
        ..Default::default()
    };
    match &e.kind {
        EventKind::Created {
            device,
            remember_me,
            evicted,
            new_device,
            new_place,
        } => {
            r.kind = 1;
            r.device = Some(DeviceRecord::from(device));
            r.remember_me = *remember_me;
            r.evicted = evicted.iter().map(|id| id.as_bytes().to_vec()).collect();
            r.new_device = *new_device;
            r.new_place = *new_place;
        }
        EventKind::Revoked { reason } => {
            r.kind = 2;
            r.detail = reason_code(*reason);
        }
        EventKind::Expired { kind } => {
            r.kind = 3;
            r.detail = expiry_code(*kind);
        }
        EventKind::Rotated => r.kind = 4,
        EventKind::Flagged { flag } => {
            r.kind = 5;
            r.flag = Some(FlagRecord::from(flag));
        }
    }
    r.encode_to_vec()
}

pub fn decode_event(sequence: u64, bytes: &[u8]) -> Result<Event, Error> {
    let r = EventRecord::decode(bytes).map_err(|_| corrupt("event"))?;
    let kind = match r.kind {
        1 => EventKind::Created {
            device: r.device.map(Device::from).unwrap_or_default(),
            remember_me: r.remember_me,
            evicted: r
                .evicted
                .iter()
                .map(|b| SessionId::from_slice(b).ok_or_else(|| corrupt("event")))
                .collect::<Result<_, _>>()?,
            new_device: r.new_device,
            new_place: r.new_place,
        },
        2 => EventKind::Revoked {
            reason: reason_from(r.detail).ok_or_else(|| corrupt("event"))?,
        },
        3 => EventKind::Expired {
            kind: expiry_from(r.detail).ok_or_else(|| corrupt("event"))?,
        },
        4 => EventKind::Rotated,
        5 => EventKind::Flagged {
            flag: r
                .flag
                .ok_or_else(|| corrupt("event"))
                .and_then(Flag::try_from)?,
        },
        _ => return Err(corrupt("event")),
    };
    Ok(Event {
        sequence,
        occurred_at: Timestamp::from_millis(r.occurred_at),
        tenant_id: r.tenant_id,
        user_id: r.user_id,
        session_id: SessionId::from_slice(&r.session_id).ok_or_else(|| corrupt("event"))?,
        kind,
    })
}

pub fn encode_last_seen(l: &LastSeen) -> Vec<u8> {
    LastSeenRecord {
        location: Some(LocationRecord::from(&l.location)),
        at: l.at.as_millis(),
        session_id: l.session_id.as_bytes().to_vec(),
    }
    .encode_to_vec()
}

pub fn decode_last_seen(bytes: &[u8]) -> Result<LastSeen, Error> {
    let r = LastSeenRecord::decode(bytes).map_err(|_| corrupt("last seen"))?;
    Ok(LastSeen {
        location: r.location.map(Location::from).unwrap_or_default(),
        at: Timestamp::from_millis(r.at),
        session_id: SessionId::from_slice(&r.session_id).ok_or_else(|| corrupt("last seen"))?,
    })
}

/// Policies are rare writes read once at start: JSON, so new fields can get serde defaults.
pub fn encode_policy(p: &Policy) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(p).map_err(|e| Error::Storage(format!("encoding a policy: {e}")))
}

pub fn decode_policy(bytes: &[u8]) -> Result<Policy, Error> {
    serde_json::from_slice(bytes).map_err(|_| corrupt("policy"))
}

/// A user's recent session creations (login quota): big-endian millisecond timestamps.
/// A session's entry in the last-use log (sled, `store::touch_log`): its last use, and the last
/// use its deadline entry is filed under (its record's, which touches leave as it is).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastUse {
    pub at: Timestamp,
    pub filed: Timestamp,
}

/// Two big-endian millisecond counts: `at`, then `filed`.
pub fn encode_last_use(l: &LastUse) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&l.at.as_millis().to_be_bytes());
    out[8..].copy_from_slice(&l.filed.as_millis().to_be_bytes());
    out
}

pub fn decode_last_use(bytes: &[u8]) -> Result<LastUse, Error> {
    let millis = |b: &[u8]| -> Result<Timestamp, Error> {
        let b: [u8; 8] = b.try_into().map_err(|_| corrupt("last use"))?;
        Ok(Timestamp::from_millis(u64::from_be_bytes(b)))
    };
    if bytes.len() != 16 {
        return Err(corrupt("last use"));
    }
    Ok(LastUse {
        at: millis(&bytes[..8])?,
        filed: millis(&bytes[8..])?,
    })
}

pub fn encode_creations(times: &[Timestamp]) -> Vec<u8> {
    times
        .iter()
        .flat_map(|t| t.as_millis().to_be_bytes())
        .collect()
}

pub fn decode_creations(bytes: &[u8]) -> Vec<Timestamp> {
    bytes
        .chunks_exact(8)
        .filter_map(|c| c.try_into().ok().map(u64::from_be_bytes))
        .map(Timestamp::from_millis)
        .collect()
}
