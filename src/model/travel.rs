//! Impossible travel: a user's last known place, the flag a too-fast journey raises, and the
//! pure check between two places. The store records places; the rules here decide.

use crate::{clock::Timestamp, model::session::Location, token::SessionId};

use super::policy::TravelAction;

/// The travel settings of a policy, as the store needs them inside a write.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TravelRules {
    pub action: TravelAction,
    pub max_speed_kmh: f64,
    pub tolerance_km: f64,
}

/// A user's last known place.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSeen {
    pub location: Location,
    pub at: Timestamp,
    pub session_id: SessionId,
}

/// Impossible travel seen on a session.
#[derive(Debug, Clone, PartialEq)]
pub struct TravelFlag {
    pub flagged_at: Timestamp,
    pub from: Location,
    pub from_seen_at: Timestamp,
    pub from_session_id: Option<SessionId>,
    pub to: Location,
    pub distance_km: f64,
    pub speed_kmh: f64,
}

const EARTH_RADIUS_KM: f64 = 6371.0;

/// Great-circle distance (haversine) between two (latitude, longitude) points in degrees.
pub fn distance_km(a: (f64, f64), b: (f64, f64)) -> f64 {
    let (lat1, lon1) = (a.0.to_radians(), a.1.to_radians());
    let (lat2, lon2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2)
        + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * EARTH_RADIUS_KM * h.sqrt().min(1.0).asin()
}

/// Whether getting from `previous` to `here` at `now` needs an impossible speed. Places without
/// coordinates never trigger it; neither do places within the tolerance of each other.
pub fn impossible_travel(
    previous: &LastSeen,
    here: &Location,
    now: Timestamp,
    rules: &TravelRules,
) -> Option<TravelFlag> {
    if rules.action == TravelAction::Ignore {
        return None;
    }
    let (from, to) = (previous.location.coordinates?, here.coordinates?);
    let distance = distance_km(from, to);
    if distance <= rules.tolerance_km {
        return None;
    }
    let hours = now.since(previous.at).as_secs_f64() / 3600.0;
    let speed = if hours > 0.0 {
        distance / hours
    } else {
        f64::INFINITY
    };
    (speed > rules.max_speed_kmh).then(|| TravelFlag {
        flagged_at: now,
        from: previous.location.clone(),
        from_seen_at: previous.at,
        from_session_id: Some(previous.session_id),
        to: here.clone(),
        distance_km: distance,
        // An instant jump has no finite speed; report it as the largest finite one.
        speed_kmh: speed.min(f64::MAX),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(lat: f64, lon: f64) -> Location {
        Location {
            coordinates: Some((lat, lon)),
            ..Location::default()
        }
    }

    fn rules() -> TravelRules {
        TravelRules {
            action: TravelAction::Flag,
            max_speed_kmh: 1000.0,
            tolerance_km: 100.0,
        }
    }

    const MIN: u64 = 60_000;

    #[test]
    fn bangkok_then_london_five_minutes_later_is_impossible() {
        let bangkok = LastSeen {
            location: at(13.76, 100.50),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        let flag = impossible_travel(
            &bangkok,
            &at(51.51, -0.13),
            Timestamp::from_millis(5 * MIN),
            &rules(),
        )
        .expect("flagged");
        assert!(
            (9_400.0..9_700.0).contains(&flag.distance_km),
            "{}",
            flag.distance_km
        );
        assert!(flag.speed_kmh > 100_000.0);
    }

    #[test]
    fn london_then_paris_three_hours_later_is_possible() {
        let london = LastSeen {
            location: at(51.51, -0.13),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        let paris = at(48.86, 2.35);
        assert!((330.0..360.0).contains(&distance_km((51.51, -0.13), (48.86, 2.35))));
        assert!(
            impossible_travel(&london, &paris, Timestamp::from_millis(180 * MIN), &rules())
                .is_none()
        );
    }

    #[test]
    fn nearby_points_and_missing_coordinates_never_trigger() {
        let here = LastSeen {
            location: at(51.51, -0.13),
            at: Timestamp::from_millis(0),
            session_id: SessionId::from_bytes([1; 16]),
        };
        // 40 km away at the same instant: geolocation noise.
        assert!(impossible_travel(
            &here,
            &at(51.75, -0.45),
            Timestamp::from_millis(0),
            &rules()
        )
        .is_none());
        let no_coordinates = Location {
            country: "TH".into(),
            city: "Bangkok".into(),
            coordinates: None,
        };
        assert!(
            impossible_travel(&here, &no_coordinates, Timestamp::from_millis(1), &rules())
                .is_none()
        );
        let ignore = TravelRules {
            action: TravelAction::Ignore,
            ..rules()
        };
        assert!(
            impossible_travel(&here, &at(13.76, 100.5), Timestamp::from_millis(1), &ignore)
                .is_none()
        );
    }
}
