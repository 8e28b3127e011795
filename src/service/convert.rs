//! Decoding and validating requests into domain values (`TryFrom`), and encoding domain values
//! into replies. Every rejection names the proto field it is about.

use std::{collections::BTreeMap, net::IpAddr};

use base64::{engine::general_purpose::URL_SAFE_NO_PAD, Engine};

use crate::{
    clock::Timestamp,
    error::{Error, Result},
    events::{Event, EventKind, EventType},
    model::{
        binding::BindingKey,
        flag::{DriftKind, Flag},
        policy::{
            CookieAdvice, DriftAction, LimitAction, NewDeviceAction, Policy, SameSite,
            TokenReuseAction, TravelAction,
        },
        session::{Device, ExpiryKind, Location, RevokeReason, Session, SessionState},
        travel::TravelFlag,
    },
    proto::v1 as pb,
    sessions::subscription::Filter,
    sessions::{limits, ListQuery, MatchQuery, NewSession, SessionFilter},
    store::{ListScope, RevokeTarget},
    token::SessionId,
};

// === decoding ===

/// A tenant or user id: 1-128 bytes of UTF-8 without control characters.
pub fn id_field(field: &'static str, value: String) -> Result<String> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    if value.len() > limits::MAX_ID_BYTES {
        return Err(Error::invalid(
            field,
            format!("must be at most {} bytes", limits::MAX_ID_BYTES),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

fn text_field(field: &'static str, value: String, max: usize) -> Result<String> {
    if value.len() > max {
        return Err(Error::invalid(
            field,
            format!("must be at most {max} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(Error::invalid(field, "must not contain control characters"));
    }
    Ok(value)
}

pub fn session_id_field(field: &'static str, value: &str) -> Result<SessionId> {
    if value.is_empty() {
        return Err(Error::invalid(field, "is required"));
    }
    value
        .parse()
        .map_err(|e: crate::token::BadSessionId| Error::invalid(field, e.to_string()))
}

fn location(l: pb::Location) -> Result<Location> {
    let country = l.country;
    let well_formed = country.len() == 2 && country.bytes().all(|b| b.is_ascii_uppercase());
    if !country.is_empty() && !well_formed {
        return Err(Error::invalid(
            "device.location.country",
            "must be an ISO 3166-1 alpha-2 code in upper case, e.g. \"GB\"",
        ));
    }
    let coordinates = match (l.latitude, l.longitude) {
        (None, None) => None,
        (Some(lat), Some(lon)) => {
            if !(-90.0..=90.0).contains(&lat) {
                return Err(Error::invalid(
                    "device.location.latitude",
                    "must be within -90..90",
                ));
            }
            if !(-180.0..=180.0).contains(&lon) {
                return Err(Error::invalid(
                    "device.location.longitude",
                    "must be within -180..180",
                ));
            }
            Some((lat, lon))
        }
        (Some(_), None) => {
            return Err(Error::invalid(
                "device.location.longitude",
                "is required when latitude is set",
            ))
        }
        (None, Some(_)) => {
            return Err(Error::invalid(
                "device.location.latitude",
                "is required when longitude is set",
            ))
        }
    };
    Ok(Location {
        country,
        city: text_field("device.location.city", l.city, limits::MAX_CITY_BYTES)?,
        coordinates,
    })
}

impl TryFrom<pb::Device> for Device {
    type Error = Error;

    fn try_from(d: pb::Device) -> Result<Self> {
        let ip = if d.ip.is_empty() {
            None
        } else {
            Some(
                d.ip.parse::<IpAddr>()
                    .map_err(|_| Error::invalid("device.ip", "must be an IPv4 or IPv6 address"))?,
            )
        };
        Ok(Device {
            ip,
            user_agent: text_field(
                "device.user_agent",
                d.user_agent,
                limits::MAX_USER_AGENT_BYTES,
            )?,
            label: text_field(
                "device.device_label",
                d.device_label,
                limits::MAX_DEVICE_LABEL_BYTES,
            )?,
            location: d.location.map(location).transpose()?,
        })
    }
}

fn attributes(map: std::collections::HashMap<String, String>) -> Result<BTreeMap<String, String>> {
    if map.len() > limits::MAX_ATTRIBUTES {
        return Err(Error::invalid(
            "attributes",
            format!("at most {} entries", limits::MAX_ATTRIBUTES),
        ));
    }
    let mut out = BTreeMap::new();
    for (k, v) in map {
        let key_ok = !k.is_empty()
            && k.len() <= limits::MAX_ATTRIBUTE_KEY_BYTES
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !key_ok {
            return Err(Error::invalid(
                "attributes",
                format!(
                    "keys must be 1-{} characters of [A-Za-z0-9_.-]",
                    limits::MAX_ATTRIBUTE_KEY_BYTES
                ),
            ));
        }
        let v = text_field("attributes", v, limits::MAX_ATTRIBUTE_VALUE_BYTES)?;
        out.insert(k, v);
    }
    Ok(out)
}

impl TryFrom<pb::CreateSessionRequest> for NewSession {
    type Error = Error;

    fn try_from(r: pb::CreateSessionRequest) -> Result<Self> {
        Ok(NewSession {
            tenant_id: id_field("tenant_id", r.tenant_id)?,
            user_id: id_field("user_id", r.user_id)?,
            remember_me: r.remember_me,
            device: r
                .device
                .map(Device::try_from)
                .transpose()?
                .unwrap_or_default(),
            attributes: attributes(r.attributes)?,
            binding_key: if r.binding_key.is_empty() {
                None
            } else {
                Some(
                    BindingKey::from_jwk(&r.binding_key)
                        .map_err(|e| Error::invalid("binding_key", e.to_string()))?,
                )
            },
        })
    }
}

impl TryFrom<pb::ListSessionsRequest> for ListQuery {
    type Error = Error;

    fn try_from(r: pb::ListSessionsRequest) -> Result<Self> {
        let tenant_id = id_field("tenant_id", r.tenant_id)?;
        let user_id = if r.user_id.is_empty() {
            None
        } else {
            Some(id_field("user_id", r.user_id)?)
        };
        let page_size = match usize::try_from(r.page_size).unwrap_or(usize::MAX) {
            0 => limits::DEFAULT_PAGE_SIZE,
            n if n > limits::MAX_PAGE_SIZE => {
                return Err(Error::invalid(
                    "page_size",
                    format!("must be at most {}", limits::MAX_PAGE_SIZE),
                ))
            }
            n => n,
        };
        let cursor = if r.page_token.is_empty() {
            None
        } else {
            Some(
                URL_SAFE_NO_PAD
                    .decode(r.page_token.as_bytes())
                    .map_err(|_| {
                        Error::invalid("page_token", "is not a token from this service")
                    })?,
            )
        };
        Ok(ListQuery {
            scope: ListScope { tenant_id, user_id },
            page_size,
            cursor,
            filter: session_filter(r.filter.unwrap_or_default())?,
        })
    }
}

/// The reason a caller gave; `default` stands in for UNSPECIFIED.
pub fn revoke_reason(value: i32, default: RevokeReason) -> Result<RevokeReason> {
    let reason = pb::RevokeReason::try_from(value)
        .map_err(|_| Error::invalid("reason", format!("unknown value {value}")))?;
    Ok(match reason {
        pb::RevokeReason::Unspecified => default,
        pb::RevokeReason::UserLogout => RevokeReason::UserLogout,
        pb::RevokeReason::UserLogoutOthers => RevokeReason::UserLogoutOthers,
        pb::RevokeReason::Admin => RevokeReason::Admin,
        pb::RevokeReason::SuspiciousActivity => RevokeReason::SuspiciousActivity,
        pb::RevokeReason::Policy => RevokeReason::Policy,
        pb::RevokeReason::LimitEviction | pb::RevokeReason::TokenReuse => {
            return Err(Error::invalid(
                "reason",
                format!(
                    "{} is set by the service only",
                    reason.as_str_name().trim_start_matches("REVOKE_REASON_")
                ),
            ))
        }
    })
}

/// ValidateSessions takes 1 to `MAX_VALIDATE_TOKENS` tokens.
pub fn validate_tokens_count(n: usize) -> Result<()> {
    match n {
        0 => Err(Error::invalid("tokens", "at least one token is required")),
        n if n > limits::MAX_VALIDATE_TOKENS => Err(Error::invalid(
            "tokens",
            format!("at most {} tokens per call", limits::MAX_VALIDATE_TOKENS),
        )),
        _ => Ok(()),
    }
}

/// Decodes RevokeSessions' ids: 1-1000 valid ids, limited to `tenant` if the caller is bound.
pub fn revoke_ids(ids: Vec<String>, tenant: Option<String>) -> Result<RevokeTarget> {
    if ids.is_empty() {
        return Err(Error::invalid("session_ids", "at least one id is required"));
    }
    if ids.len() > limits::MAX_REVOKE_IDS {
        return Err(Error::invalid(
            "session_ids",
            format!("at most {} ids per call", limits::MAX_REVOKE_IDS),
        ));
    }
    ids.iter()
        .map(|id| session_id_field("session_ids", id))
        .collect::<Result<Vec<_>>>()
        .map(|ids| RevokeTarget::Sessions { ids, tenant })
}

/// Decodes an event filter; `user_id` needs `tenant_id`, since user ids are per tenant.
pub fn watch_filter(f: pb::EventFilter) -> Result<Filter> {
    let tenant_id = if f.tenant_id.is_empty() {
        None
    } else {
        Some(id_field("filter.tenant_id", f.tenant_id)?)
    };
    let user_id = if f.user_id.is_empty() {
        None
    } else if tenant_id.is_none() {
        return Err(Error::invalid(
            "filter.user_id",
            "requires filter.tenant_id",
        ));
    } else {
        Some(id_field("filter.user_id", f.user_id)?)
    };
    let types = f
        .event_types
        .into_iter()
        .map(|t| match pb::EventType::try_from(t) {
            Ok(pb::EventType::Created) => Ok(EventType::Created),
            Ok(pb::EventType::Revoked) => Ok(EventType::Revoked),
            Ok(pb::EventType::Expired) => Ok(EventType::Expired),
            Ok(pb::EventType::Rotated) => Ok(EventType::Rotated),
            Ok(pb::EventType::Flagged) => Ok(EventType::Flagged),
            Ok(pb::EventType::Unspecified) | Err(_) => Err(Error::invalid(
                "filter.event_types",
                format!("{t} is not an event type"),
            )),
        })
        .collect::<Result<_>>()?;
    Ok(Filter {
        tenant_id,
        user_id,
        types,
    })
}

fn duration_field(
    field: &'static str,
    d: Option<prost_types::Duration>,
) -> Result<std::time::Duration> {
    let d = d.ok_or_else(|| Error::invalid(field, "is required"))?;
    if d.seconds < 0 || d.nanos < 0 {
        return Err(Error::invalid(field, "must not be negative"));
    }
    let seconds = u64::try_from(d.seconds).map_err(|_| Error::invalid(field, "out of range"))?;
    let nanos = u32::try_from(d.nanos).map_err(|_| Error::invalid(field, "out of range"))?;
    if nanos >= 1_000_000_000 {
        return Err(Error::invalid(field, "nanos must be below 1e9"));
    }
    Ok(std::time::Duration::new(seconds, nanos))
}

/// A duration that may be absent (then `default`).
fn optional_duration(
    field: &'static str,
    d: Option<prost_types::Duration>,
    default: std::time::Duration,
) -> Result<std::time::Duration> {
    match d {
        None => Ok(default),
        some => duration_field(field, some),
    }
}

/// An enum whose UNSPECIFIED means a default: fields added after the first release, which
/// older clients' complete policies leave out.
fn optional_enum<T>(field: &'static str, value: i32) -> Result<T>
where
    T: TryFrom<i32>,
{
    T::try_from(value).map_err(|_| Error::invalid(field, format!("{value} is not a valid choice")))
}

fn required_enum<T>(field: &'static str, value: i32) -> Result<T>
where
    T: TryFrom<i32> + PartialEq + Default,
{
    match T::try_from(value) {
        Ok(v) if v != T::default() => Ok(v),
        _ => Err(Error::invalid(
            field,
            format!("{value} is not a valid choice"),
        )),
    }
}

/// Decodes and validates a policy: every field is required (start from GetPolicy).
pub fn policy_from_proto(p: pb::Policy) -> Result<(String, Policy)> {
    let tenant_id = id_field("policy.tenant_id", p.tenant_id)?;
    let max_session_age = match p.max_session_age {
        None => None,
        Some(d) if d.seconds == 0 && d.nanos == 0 => None,
        some => Some(duration_field("policy.max_session_age", some)?),
    };
    let policy = Policy {
        idle_timeout: duration_field("policy.idle_timeout", p.idle_timeout)?,
        absolute_timeout: duration_field("policy.absolute_timeout", p.absolute_timeout)?,
        remember_me_allowed: p.remember_me_allowed,
        remember_me_idle_timeout: duration_field(
            "policy.remember_me_idle_timeout",
            p.remember_me_idle_timeout,
        )?,
        remember_me_absolute_timeout: duration_field(
            "policy.remember_me_absolute_timeout",
            p.remember_me_absolute_timeout,
        )?,
        max_sessions_per_user: p.max_sessions_per_user,
        limit_action: match required_enum("policy.limit_action", p.limit_action)? {
            pb::LimitAction::Reject => LimitAction::Reject,
            _ => LimitAction::EvictLeastRecentlyUsed,
        },
        max_creations_per_day: p.max_creations_per_day,
        max_session_age,
        travel_action: match required_enum("policy.travel_action", p.travel_action)? {
            pb::TravelAction::Flag => TravelAction::Flag,
            pb::TravelAction::Revoke => TravelAction::Revoke,
            pb::TravelAction::Reject => TravelAction::Reject,
            _ => TravelAction::Ignore,
        },
        travel_max_speed_kmh: p.travel_max_speed_kmh,
        travel_tolerance_km: p.travel_tolerance_km,
        cookie_name: (!p.cookie_name.is_empty()).then_some(p.cookie_name),
        cookie_secure: p.cookie_secure,
        cookie_same_site: match required_enum("policy.cookie_same_site", p.cookie_same_site)? {
            pb::SameSite::Strict => SameSite::Strict,
            pb::SameSite::None => SameSite::None,
            _ => SameSite::Lax,
        },
        token_reuse_action: match optional_enum("policy.token_reuse_action", p.token_reuse_action)?
        {
            pb::TokenReuseAction::Flag => TokenReuseAction::Flag,
            pb::TokenReuseAction::Ignore => TokenReuseAction::Ignore,
            pb::TokenReuseAction::Revoke | pb::TokenReuseAction::Unspecified => {
                TokenReuseAction::Revoke
            }
        },
        rotation_grace_period: optional_duration(
            "policy.rotation_grace_period",
            p.rotation_grace_period,
            crate::model::policy::DEFAULT_ROTATION_GRACE_PERIOD,
        )?,
        new_device_action: match optional_enum("policy.new_device_action", p.new_device_action)? {
            pb::NewDeviceAction::None => NewDeviceAction::None,
            pb::NewDeviceAction::Flag | pb::NewDeviceAction::Unspecified => NewDeviceAction::Flag,
        },
        drift_action: match optional_enum("policy.drift_action", p.drift_action)? {
            pb::DriftAction::Flag => DriftAction::Flag,
            pb::DriftAction::Revoke => DriftAction::Revoke,
            pb::DriftAction::None | pb::DriftAction::Unspecified => DriftAction::None,
        },
        bound_token_ttl: optional_duration(
            "policy.bound_token_ttl",
            p.bound_token_ttl,
            crate::model::policy::DEFAULT_BOUND_TOKEN_TTL,
        )?,
    };
    policy.validate()?;
    Ok((tenant_id, policy))
}

fn timestamp_field(
    field: &'static str,
    t: Option<prost_types::Timestamp>,
) -> Result<Option<Timestamp>> {
    let Some(t) = t else { return Ok(None) };
    let seconds =
        u64::try_from(t.seconds).map_err(|_| Error::invalid(field, "must not be before 1970"))?;
    let nanos = u64::try_from(t.nanos)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| Error::invalid(field, "nanos must be 0..1e9"))?;
    let ms = seconds
        .checked_mul(1000)
        .and_then(|ms| ms.checked_add(nanos / 1_000_000))
        .ok_or_else(|| Error::invalid(field, "out of range"))?;
    Ok(Some(Timestamp::from_millis(ms)))
}

/// Decodes a session filter; every criterion is optional.
pub fn session_filter(f: pb::SessionFilter) -> Result<SessionFilter> {
    let country = if f.country.is_empty() {
        None
    } else if f.country.len() == 2 && f.country.bytes().all(|b| b.is_ascii_uppercase()) {
        Some(f.country)
    } else {
        return Err(Error::invalid(
            "filter.country",
            "must be an ISO 3166-1 alpha-2 code in upper case",
        ));
    };
    let ip = if f.ip.is_empty() {
        None
    } else {
        Some(
            f.ip.parse()
                .map_err(|_| Error::invalid("filter.ip", "must be an IPv4 or IPv6 address"))?,
        )
    };
    Ok(SessionFilter {
        older_than: f
            .older_than
            .map(|d| duration_field("filter.older_than", Some(d)))
            .transpose()?,
        idle_longer_than: f
            .idle_longer_than
            .map(|d| duration_field("filter.idle_longer_than", Some(d)))
            .transpose()?,
        flagged_only: f.flagged_only,
        ip,
        country,
        created_after: timestamp_field("filter.created_after", f.created_after)?,
        created_before: timestamp_field("filter.created_before", f.created_before)?,
    })
}

impl TryFrom<pb::RevokeSessionsMatchingRequest> for MatchQuery {
    type Error = Error;

    fn try_from(r: pb::RevokeSessionsMatchingRequest) -> Result<Self> {
        let tenant_id = id_field("tenant_id", r.tenant_id)?;
        let user_id = if r.user_id.is_empty() {
            None
        } else {
            Some(id_field("user_id", r.user_id)?)
        };
        let filter = session_filter(r.filter.unwrap_or_default())?;
        if filter.is_empty() && user_id.is_none() {
            return Err(Error::invalid(
                "filter",
                "set at least one criterion or user_id (older_than \"0s\" matches every session)",
            ));
        }
        Ok(MatchQuery {
            scope: ListScope { tenant_id, user_id },
            filter,
            reason: revoke_reason(r.reason, RevokeReason::Admin)?,
            dry_run: r.dry_run,
        })
    }
}

/// The caller's view of the client's place in a ValidateSession request, if any.
/// The device a ValidateSession carries, decoded and checked as CreateSession's is.
pub fn validate_device(device: Option<pb::Device>) -> Result<Option<Device>> {
    device.map(Device::try_from).transpose()
}

// === encoding ===

pub fn timestamp(t: Timestamp) -> prost_types::Timestamp {
    let ms = t.as_millis();
    prost_types::Timestamp {
        seconds: i64::try_from(ms / 1000).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

pub fn revoke_reason_to_proto(r: RevokeReason) -> pb::RevokeReason {
    match r {
        RevokeReason::UserLogout => pb::RevokeReason::UserLogout,
        RevokeReason::UserLogoutOthers => pb::RevokeReason::UserLogoutOthers,
        RevokeReason::Admin => pb::RevokeReason::Admin,
        RevokeReason::LimitEviction => pb::RevokeReason::LimitEviction,
        RevokeReason::SuspiciousActivity => pb::RevokeReason::SuspiciousActivity,
        RevokeReason::Policy => pb::RevokeReason::Policy,
        RevokeReason::TokenReuse => pb::RevokeReason::TokenReuse,
    }
}

pub fn expiry_kind_to_proto(k: ExpiryKind) -> pb::ExpiryKind {
    match k {
        ExpiryKind::Idle => pb::ExpiryKind::Idle,
        ExpiryKind::Absolute => pb::ExpiryKind::Absolute,
    }
}

impl From<&Location> for pb::Location {
    fn from(l: &Location) -> Self {
        pb::Location {
            country: l.country.clone(),
            city: l.city.clone(),
            latitude: l.coordinates.map(|c| c.0),
            longitude: l.coordinates.map(|c| c.1),
        }
    }
}

impl From<&Device> for pb::Device {
    fn from(d: &Device) -> Self {
        pb::Device {
            ip: d.ip.map(|ip| ip.to_string()).unwrap_or_default(),
            user_agent: d.user_agent.clone(),
            device_label: d.label.clone(),
            location: d.location.as_ref().map(pb::Location::from),
        }
    }
}

/// Any flag, as `Session.security_flags` and the `flagged` event carry it.
pub fn security_flag_to_proto(flag: &Flag) -> pb::SessionFlag {
    let mut out = pb::SessionFlag {
        flagged_at: Some(timestamp(flag.flagged_at())),
        ..Default::default()
    };
    let kind = match flag {
        Flag::Travel(f) => {
            out.travel = Some(flag_to_proto(f));
            pb::FlagKind::ImpossibleTravel
        }
        Flag::TokenReuse(r) => {
            out.reused_rotation = r.rotation;
            out.reused_replaced_at = Some(timestamp(r.replaced_at));
            pb::FlagKind::TokenReuse
        }
        Flag::NewDevice { .. } => pb::FlagKind::NewDevice,
        Flag::NewPlace { .. } => pb::FlagKind::NewPlace,
        Flag::Drift(d) => {
            out.drift_from = d.from.clone();
            out.drift_to = d.to.clone();
            match d.kind {
                DriftKind::Device => pb::FlagKind::DeviceDrift,
                DriftKind::Place => pb::FlagKind::PlaceDrift,
            }
        }
    };
    out.set_kind(kind);
    out
}

/// The impossible-travel flag, if `flag` is one (for the fields that predate the other kinds).
fn travel_flag(flag: &Flag) -> Option<&TravelFlag> {
    match flag {
        Flag::Travel(f) => Some(f),
        _ => None,
    }
}

pub fn flag_to_proto(f: &TravelFlag) -> pb::TravelFlag {
    pb::TravelFlag {
        flagged_at: Some(timestamp(f.flagged_at)),
        from: Some(pb::Location::from(&f.from)),
        from_seen_at: Some(timestamp(f.from_seen_at)),
        to: Some(pb::Location::from(&f.to)),
        distance_km: f.distance_km,
        speed_kmh: f.speed_kmh,
        from_session_id: f
            .from_session_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
    }
}

fn duration_to_proto(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 1e9, so it fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn same_site_to_proto(s: SameSite) -> pb::SameSite {
    match s {
        SameSite::Strict => pb::SameSite::Strict,
        SameSite::Lax => pb::SameSite::Lax,
        SameSite::None => pb::SameSite::None,
    }
}

pub fn cookie_to_proto(c: &CookieAdvice) -> pb::CookieAdvice {
    pb::CookieAdvice {
        name: c.name.clone(),
        max_age: c.max_age.map(duration_to_proto),
        secure: c.secure,
        http_only: c.http_only,
        same_site: same_site_to_proto(c.same_site).into(),
    }
}

/// Encodes a policy; `cookie_name` is the effective name (the generated one if not set).
/// Copies the fields of `from` that `paths` (an update mask) name into `into`.
pub fn merge_policy_fields(
    into: &mut pb::Policy,
    from: pb::Policy,
    paths: &[String],
) -> Result<()> {
    for path in paths {
        match path.as_str() {
            "idle_timeout" => into.idle_timeout = from.idle_timeout,
            "absolute_timeout" => into.absolute_timeout = from.absolute_timeout,
            "remember_me_allowed" => into.remember_me_allowed = from.remember_me_allowed,
            "remember_me_idle_timeout" => {
                into.remember_me_idle_timeout = from.remember_me_idle_timeout
            }
            "remember_me_absolute_timeout" => {
                into.remember_me_absolute_timeout = from.remember_me_absolute_timeout
            }
            "max_sessions_per_user" => into.max_sessions_per_user = from.max_sessions_per_user,
            "limit_action" => into.limit_action = from.limit_action,
            "max_creations_per_day" => into.max_creations_per_day = from.max_creations_per_day,
            "max_session_age" => into.max_session_age = from.max_session_age,
            "travel_action" => into.travel_action = from.travel_action,
            "travel_max_speed_kmh" => into.travel_max_speed_kmh = from.travel_max_speed_kmh,
            "travel_tolerance_km" => into.travel_tolerance_km = from.travel_tolerance_km,
            "cookie_name" => into.cookie_name = from.cookie_name.clone(),
            "cookie_secure" => into.cookie_secure = from.cookie_secure,
            "cookie_same_site" => into.cookie_same_site = from.cookie_same_site,
            "token_reuse_action" => into.token_reuse_action = from.token_reuse_action,
            "rotation_grace_period" => into.rotation_grace_period = from.rotation_grace_period,
            "new_device_action" => into.new_device_action = from.new_device_action,
            "drift_action" => into.drift_action = from.drift_action,
            "bound_token_ttl" => into.bound_token_ttl = from.bound_token_ttl,
            other => {
                return Err(Error::invalid(
                    "update_mask",
                    format!("\"{other}\" is not a field of Policy that can be set"),
                ))
            }
        }
    }
    Ok(())
}

pub fn policy_to_proto(tenant_id: &str, p: &Policy, cookie_name: String) -> pb::Policy {
    pb::Policy {
        tenant_id: tenant_id.to_string(),
        idle_timeout: Some(duration_to_proto(p.idle_timeout)),
        absolute_timeout: Some(duration_to_proto(p.absolute_timeout)),
        remember_me_allowed: p.remember_me_allowed,
        remember_me_idle_timeout: Some(duration_to_proto(p.remember_me_idle_timeout)),
        remember_me_absolute_timeout: Some(duration_to_proto(p.remember_me_absolute_timeout)),
        max_sessions_per_user: p.max_sessions_per_user,
        limit_action: match p.limit_action {
            LimitAction::EvictLeastRecentlyUsed => pb::LimitAction::EvictLeastRecentlyUsed,
            LimitAction::Reject => pb::LimitAction::Reject,
        }
        .into(),
        max_creations_per_day: p.max_creations_per_day,
        max_session_age: p.max_session_age.map(duration_to_proto),
        travel_action: match p.travel_action {
            TravelAction::Ignore => pb::TravelAction::Ignore,
            TravelAction::Flag => pb::TravelAction::Flag,
            TravelAction::Revoke => pb::TravelAction::Revoke,
            TravelAction::Reject => pb::TravelAction::Reject,
        }
        .into(),
        travel_max_speed_kmh: p.travel_max_speed_kmh,
        travel_tolerance_km: p.travel_tolerance_km,
        cookie_name,
        cookie_secure: p.cookie_secure,
        cookie_same_site: same_site_to_proto(p.cookie_same_site).into(),
        token_reuse_action: match p.token_reuse_action {
            TokenReuseAction::Revoke => pb::TokenReuseAction::Revoke,
            TokenReuseAction::Flag => pb::TokenReuseAction::Flag,
            TokenReuseAction::Ignore => pb::TokenReuseAction::Ignore,
        }
        .into(),
        rotation_grace_period: Some(duration_to_proto(p.rotation_grace_period)),
        new_device_action: match p.new_device_action {
            NewDeviceAction::None => pb::NewDeviceAction::None,
            NewDeviceAction::Flag => pb::NewDeviceAction::Flag,
        }
        .into(),
        drift_action: match p.drift_action {
            DriftAction::None => pb::DriftAction::None,
            DriftAction::Flag => pb::DriftAction::Flag,
            DriftAction::Revoke => pb::DriftAction::Revoke,
        }
        .into(),
        bound_token_ttl: Some(duration_to_proto(p.bound_token_ttl)),
    }
}

impl From<&Session> for pb::Session {
    fn from(s: &Session) -> Self {
        let mut out = validated(s);
        out.binding_key = s
            .binding
            .as_ref()
            .map(|b| b.key.to_jwk())
            .unwrap_or_default();
        out
    }
}

/// A session as a validation answers it: without the device key of a bound session, which the
/// hot path need not encode on every call (GetSession and the others show it).
pub fn validated(s: &Session) -> pb::Session {
    let mut out = pb::Session {
        session_id: s.id.to_string(),
        tenant_id: s.tenant_id.clone(),
        user_id: s.user_id.clone(),
        created_at: Some(timestamp(s.created_at)),
        last_seen_at: Some(timestamp(s.last_seen_at)),
        idle_expires_at: Some(timestamp(s.idle_expires_at())),
        absolute_expires_at: Some(timestamp(s.absolute_expires_at)),
        remember_me: s.remember_me,
        device: Some(pb::Device::from(&s.device)),
        attributes: s
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        rotation_count: s.rotation_count,
        flags: s
            .flags
            .iter()
            .filter_map(travel_flag)
            .map(flag_to_proto)
            .collect(),
        security_flags: s.flags.iter().map(security_flag_to_proto).collect(),
        bound: s.binding.is_some(),
        new_device: s.new_device,
        new_place: s.new_place,
        bound_token_expires_at: s.bound_token_expires_at().map(timestamp),

        ..Default::default()
    };
    match s.state {
        SessionState::Active => out.set_state(pb::SessionState::Active),
        SessionState::Revoked { at, reason } => {
            out.set_state(pb::SessionState::Revoked);
            out.ended_at = Some(timestamp(at));
            out.set_revoke_reason(revoke_reason_to_proto(reason));
        }
        SessionState::Expired { at, kind } => {
            out.set_state(pb::SessionState::Expired);
            out.ended_at = Some(timestamp(at));
            out.set_expiry_kind(expiry_kind_to_proto(kind));
        }
    }
    out
}

pub fn page_token(cursor: Option<Vec<u8>>) -> String {
    cursor
        .map(|c| URL_SAFE_NO_PAD.encode(c))
        .unwrap_or_default()
}

/// An event of the log whose epoch is `log_epoch`.
pub fn event_to_proto(e: &Event, log_epoch: u64) -> pb::SessionEvent {
    use pb::session_event::Body;
    let body = match &e.kind {
        EventKind::Created {
            device,
            remember_me,
            evicted,
            new_device,
            new_place,
        } => Body::Created(pb::SessionCreated {
            device: Some(pb::Device::from(device)),
            remember_me: *remember_me,
            evicted_session_ids: evicted.iter().map(ToString::to_string).collect(),
            new_device: *new_device,
            new_place: *new_place,
        }),
        EventKind::Revoked { reason } => Body::Revoked(pb::SessionRevoked {
            reason: revoke_reason_to_proto(*reason).into(),
        }),
        EventKind::Expired { kind } => Body::Expired(pb::SessionExpired {
            deadline: expiry_kind_to_proto(*kind).into(),
        }),
        EventKind::Rotated => Body::Rotated(pb::SessionRotated {}),
        EventKind::Flagged { flag } => Body::Flagged(pb::SessionFlagged {
            flag: travel_flag(flag).map(flag_to_proto),
            security_flag: Some(security_flag_to_proto(flag)),
        }),
    };
    pb::SessionEvent {
        sequence: e.sequence,
        occurred_at: Some(timestamp(e.occurred_at)),
        tenant_id: e.tenant_id.clone(),
        user_id: e.user_id.clone(),
        session_id: e.session_id.to_string(),
        log_epoch,
        body: Some(body),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn location() -> impl Strategy<Value = pb::Location> {
        (
            ".{0,4}",
            ".{0,140}",
            proptest::option::of(any::<f64>()),
            proptest::option::of(any::<f64>()),
        )
            .prop_map(|(country, city, latitude, longitude)| pb::Location {
                country,
                city,
                latitude,
                longitude,
            })
    }

    fn device() -> impl Strategy<Value = pb::Device> {
        (
            ".{0,50}",
            ".{0,600}",
            ".{0,140}",
            proptest::option::of(location()),
        )
            .prop_map(|(ip, user_agent, device_label, location)| pb::Device {
                ip,
                user_agent,
                device_label,
                location,
            })
    }

    fn duration() -> impl Strategy<Value = Option<prost_types::Duration>> {
        proptest::option::of(
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| prost_types::Duration { seconds, nanos }),
        )
    }

    fn timestamp_value() -> impl Strategy<Value = Option<prost_types::Timestamp>> {
        proptest::option::of(
            (any::<i64>(), any::<i32>())
                .prop_map(|(seconds, nanos)| prost_types::Timestamp { seconds, nanos }),
        )
    }

    proptest! {
        /// Whatever arrives, decoding never panics, and what it accepts obeys every limit.
        #[test]
        fn create_requests_are_decoded_safely(
            tenant_id in ".{0,140}",
            user_id in ".{0,140}",
            remember_me in any::<bool>(),
            device in proptest::option::of(device()),
            attributes in proptest::collection::hash_map(".{0,70}", ".{0,300}", 0..20),
            binding_key in ".{0,200}",
        ) {
            let request = pb::CreateSessionRequest { tenant_id, user_id, remember_me, device, attributes, binding_key };
            if let Ok(new) = NewSession::try_from(request) {
                prop_assert!(!new.tenant_id.is_empty() && new.tenant_id.len() <= limits::MAX_ID_BYTES);
                prop_assert!(!new.user_id.is_empty() && new.user_id.len() <= limits::MAX_ID_BYTES);
                prop_assert!(new.attributes.len() <= limits::MAX_ATTRIBUTES);
                prop_assert!(new.device.user_agent.len() <= limits::MAX_USER_AGENT_BYTES);
                if let Some((lat, lon)) = new.device.location.and_then(|l| l.coordinates) {
                    prop_assert!((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon));
                }
            }
        }

        #[test]
        fn list_requests_and_filters_are_decoded_safely(
            tenant_id in ".{0,140}",
            page_size in any::<u32>(),
            page_token in ".{0,64}",
            older_than in duration(),
            idle_longer_than in duration(),
            created_after in timestamp_value(),
            created_before in timestamp_value(),
            ip in ".{0,40}",
            country in ".{0,3}",
        ) {
            let request = pb::ListSessionsRequest {
                tenant_id,
                user_id: String::new(),
                page_size,
                page_token,
                filter: Some(pb::SessionFilter {
                    older_than, idle_longer_than, flagged_only: false, ip, country, created_after, created_before,
                }),
            };
            if let Ok(query) = ListQuery::try_from(request) {
                prop_assert!(query.page_size >= 1 && query.page_size <= limits::MAX_PAGE_SIZE);
            }
        }

        #[test]
        fn policies_are_decoded_safely(
            idle in duration(), absolute in duration(), rm_idle in duration(), rm_absolute in duration(),
            max_age in duration(), max_sessions in any::<u32>(), quota in any::<u32>(),
            limit_action in any::<i32>(), travel_action in any::<i32>(), same_site in any::<i32>(),
            speed in any::<f64>(), tolerance in any::<f64>(), cookie_name in ".{0,70}",
            reuse_action in any::<i32>(), grace in duration(), new_device_action in any::<i32>(),
            drift_action in any::<i32>(), bound_ttl in duration(),
        ) {
            let policy = pb::Policy {
                tenant_id: "t".into(),
                idle_timeout: idle,
                absolute_timeout: absolute,
                remember_me_allowed: true,
                remember_me_idle_timeout: rm_idle,
                remember_me_absolute_timeout: rm_absolute,
                max_sessions_per_user: max_sessions,
                limit_action,
                max_creations_per_day: quota,
                max_session_age: max_age,
                travel_action,
                travel_max_speed_kmh: speed,
                travel_tolerance_km: tolerance,
                cookie_name,
                cookie_secure: true,
                cookie_same_site: same_site,
                token_reuse_action: reuse_action,
                rotation_grace_period: grace,
                new_device_action,
                drift_action,
                bound_token_ttl: bound_ttl,
            };
            if let Ok((_, p)) = policy_from_proto(policy) {
                prop_assert!(p.validate().is_ok());
                prop_assert!(p.idle_timeout <= p.absolute_timeout);
            }
        }

        #[test]
        fn revoke_ids_are_decoded_safely(ids in proptest::collection::vec(".{0,40}", 0..5)) {
            let _ = revoke_ids(ids, None);
        }

        #[test]
        fn bulk_revocations_are_decoded_safely(
            tenant_id in ".{0,140}",
            user_id in ".{0,140}",
            older_than in duration(),
            created_after in timestamp_value(),
            reason in any::<i32>(),
            country in ".{0,3}",
            dry_run in any::<bool>(),
        ) {
            let request = pb::RevokeSessionsMatchingRequest {
                tenant_id,
                user_id,
                filter: Some(pb::SessionFilter { older_than, created_after, country, ..Default::default() }),
                reason,
                dry_run,
            };
            if let Ok(query) = MatchQuery::try_from(request) {
                // Never an empty filter over a whole tenant, never the service's own reason.
                prop_assert!(!query.filter.is_empty() || query.scope.user_id.is_some());
                prop_assert!(query.reason != RevokeReason::LimitEviction);
            }
        }

        #[test]
        fn validate_locations_are_decoded_safely(device in proptest::option::of(device())) {
            if let Ok(Some(location)) = validate_device(device).map(|d| d.and_then(|d| d.location)) {
                if let Some((lat, lon)) = location.coordinates {
                    prop_assert!((-90.0..=90.0).contains(&lat) && (-180.0..=180.0).contains(&lon));
                }
            }
        }

        #[test]
        fn event_filters_are_decoded_safely(
            tenant_id in ".{0,140}", user_id in ".{0,140}",
            types in proptest::collection::vec(any::<i32>(), 0..6),
        ) {
            let _ = watch_filter(pb::EventFilter { tenant_id, user_id, event_types: types });
        }
    }
}
