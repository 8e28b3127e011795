//! `sessionctl`: the operator's command line for session-authority.
//!
//! ```text
//! sessionctl list --tenant acme [--user alice] [--flagged] [--country GB]
//! sessionctl show <session_id>
//! sessionctl revoke <session_id> [--reason admin]
//! sessionctl revoke-user --tenant acme --user alice [--except <session_id>]
//! sessionctl revoke-matching --tenant acme --idle-longer-than 30d --dry-run
//! sessionctl watch [--tenant acme] [--from 0]
//! sessionctl stats --tenant acme
//! sessionctl policy get acme
//! sessionctl policy set acme --max-sessions-per-user 3 --idle-timeout 30m
//! ```
//!
//! `revoke-matching` revokes in pages of `--batch-size` and shows a progress bar on a terminal.
//!
//! Readable tables by default, `--json` (one JSON object per line) for scripts. The API key comes
//! from `SESSION_AUTHORITY_API_KEY`, never the command line. Exit codes: 0 success, 1 server or
//! connection error, 2 usage, 3 not found, 4 not authenticated or not allowed, 5 invalid argument.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use serde_json::{json, Value};
use session_authority::proto::v1::{
    self as pb, session_event::Body, watch_events_response::Message,
};
use session_authority_client::Client;
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig},
    Code, Status,
};

#[derive(Parser)]
#[command(
    name = "sessionctl",
    version,
    about = "Inspect and revoke sessions, tail events, read policies"
)]
struct Cli {
    /// The server.
    #[arg(
        long,
        global = true,
        default_value = "http://127.0.0.1:50051",
        env = "SESSION_AUTHORITY_SERVER"
    )]
    server: String,
    /// PEM CA to trust for an https server.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// One JSON object per line instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List live sessions of a tenant (or a user).
    List {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: Option<String>,
        /// Only sessions with impossible-travel flags.
        #[arg(long)]
        flagged: bool,
        /// Only sessions created from this country (ISO 3166-1 alpha-2).
        #[arg(long)]
        country: Option<String>,
        /// Stop after this many.
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Show one session, live or ended.
    Show { session_id: String },
    /// Revoke one session.
    Revoke {
        session_id: String,
        #[arg(long, default_value = "admin")]
        reason: Reason,
    },
    /// Revoke every live session of a user, optionally but one.
    RevokeUser {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: String,
        #[arg(long)]
        except: Option<String>,
        #[arg(long, default_value = "admin")]
        reason: Reason,
    },
    /// Revoke (or with --dry-run count) a tenant's sessions matching a filter.
    RevokeMatching {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        user: Option<String>,
        /// Created more than this long ago, e.g. 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
        /// Unused for more than this long, e.g. 12h.
        #[arg(long, value_parser = humantime::parse_duration)]
        idle_longer_than: Option<Duration>,
        #[arg(long)]
        flagged: bool,
        #[arg(long)]
        ip: Option<String>,
        #[arg(long)]
        country: Option<String>,
        #[arg(long, default_value = "admin")]
        reason: Reason,
        #[arg(long)]
        dry_run: bool,
        /// Sessions revoked per call (1-1000).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..=1000))]
        batch_size: u32,
    },
    /// Tail session events as they happen (Ctrl-C to stop).
    Watch {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        user: Option<String>,
        /// Replay from after this sequence (0: the whole kept log); default: from now.
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// A tenant's counts.
    Stats {
        #[arg(long)]
        tenant: String,
    },
    /// Read or change policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The policy a tenant follows.
    Get { tenant: String },
    /// Change some settings of a tenant's policy; the others keep their current values.
    Set(PolicyChanges),
}

#[derive(clap::Args)]
struct PolicyChanges {
    tenant: String,
    /// e.g. 30m
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// e.g. 12h
    #[arg(long, value_parser = humantime::parse_duration)]
    absolute_timeout: Option<Duration>,
    #[arg(long)]
    remember_me_allowed: Option<bool>,
    #[arg(long, value_parser = humantime::parse_duration)]
    remember_me_idle_timeout: Option<Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    remember_me_absolute_timeout: Option<Duration>,
    /// 0: no limit.
    #[arg(long)]
    max_sessions_per_user: Option<u32>,
    #[arg(long)]
    limit_action: Option<LimitAction>,
    /// 0: no limit.
    #[arg(long)]
    max_creations_per_day: Option<u32>,
    /// Sessions older than this are revoked (reason POLICY); 0s: no cap.
    #[arg(long, value_parser = humantime::parse_duration)]
    max_session_age: Option<Duration>,
    #[arg(long)]
    travel_action: Option<TravelAction>,
    #[arg(long)]
    travel_max_speed_kmh: Option<f64>,
    #[arg(long)]
    cookie_name: Option<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LimitAction {
    EvictLeastRecentlyUsed,
    Reject,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum TravelAction {
    Ignore,
    Flag,
    Revoke,
}

impl PolicyChanges {
    /// The changes as a policy carrying only them, and the update mask that names them: the
    /// server applies them to the tenant's current policy atomically.
    fn into_update(self) -> (pb::Policy, Vec<String>) {
        let mut p = pb::Policy {
            tenant_id: self.tenant,
            ..Default::default()
        };
        let mut paths = Vec::new();
        let mut set = |slot: &mut Option<prost_types::Duration>, d: Option<Duration>, path| {
            if let Some(d) = d {
                *slot = Some(duration(d));
                paths.push(path);
            }
        };
        set(&mut p.idle_timeout, self.idle_timeout, "idle_timeout");
        set(
            &mut p.absolute_timeout,
            self.absolute_timeout,
            "absolute_timeout",
        );
        set(
            &mut p.remember_me_idle_timeout,
            self.remember_me_idle_timeout,
            "remember_me_idle_timeout",
        );
        set(
            &mut p.remember_me_absolute_timeout,
            self.remember_me_absolute_timeout,
            "remember_me_absolute_timeout",
        );
        set(
            &mut p.max_session_age,
            self.max_session_age,
            "max_session_age",
        );
        if let Some(v) = self.remember_me_allowed {
            p.remember_me_allowed = v;
            paths.push("remember_me_allowed");
        }
        if let Some(v) = self.max_sessions_per_user {
            p.max_sessions_per_user = v;
            paths.push("max_sessions_per_user");
        }
        if let Some(v) = self.max_creations_per_day {
            p.max_creations_per_day = v;
            paths.push("max_creations_per_day");
        }
        if let Some(a) = self.limit_action {
            p.set_limit_action(match a {
                LimitAction::EvictLeastRecentlyUsed => pb::LimitAction::EvictLeastRecentlyUsed,
                LimitAction::Reject => pb::LimitAction::Reject,
            });
            paths.push("limit_action");
        }
        if let Some(a) = self.travel_action {
            p.set_travel_action(match a {
                TravelAction::Ignore => pb::TravelAction::Ignore,
                TravelAction::Flag => pb::TravelAction::Flag,
                TravelAction::Revoke => pb::TravelAction::Revoke,
            });
            paths.push("travel_action");
        }
        if let Some(v) = self.travel_max_speed_kmh {
            p.travel_max_speed_kmh = v;
            paths.push("travel_max_speed_kmh");
        }
        if let Some(v) = self.cookie_name {
            p.cookie_name = v;
            paths.push("cookie_name");
        }
        (p, paths.into_iter().map(String::from).collect())
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Reason {
    UserLogout,
    UserLogoutOthers,
    Admin,
    SuspiciousActivity,
    Policy,
}

impl Reason {
    fn proto(self) -> i32 {
        (match self {
            Reason::UserLogout => pb::RevokeReason::UserLogout,
            Reason::UserLogoutOthers => pb::RevokeReason::UserLogoutOthers,
            Reason::Admin => pb::RevokeReason::Admin,
            Reason::SuspiciousActivity => pb::RevokeReason::SuspiciousActivity,
            Reason::Policy => pb::RevokeReason::Policy,
        }) as i32
    }
}

/// Why the command failed, and so its exit code.
enum Failure {
    Status(Status),
    Other(String),
}

impl From<Status> for Failure {
    fn from(s: Status) -> Self {
        Failure::Status(s)
    }
}

impl Failure {
    fn exit(&self) -> ExitCode {
        match self {
            Failure::Status(s) => match s.code() {
                Code::NotFound => ExitCode::from(3),
                Code::Unauthenticated | Code::PermissionDenied => ExitCode::from(4),
                Code::InvalidArgument | Code::OutOfRange => ExitCode::from(5),
                _ => ExitCode::FAILURE,
            },
            Failure::Other(_) => ExitCode::FAILURE,
        }
    }

    fn message(&self) -> String {
        match self {
            Failure::Status(s) => format!("{:?}: {}", s.code(), s.message()),
            Failure::Other(m) => m.clone(),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sessionctl: {}", f.message());
            f.exit()
        }
    }
}

async fn connect(cli: &Cli) -> Result<Client, Failure> {
    let mut endpoint =
        Channel::from_shared(cli.server.clone()).map_err(|e| Failure::Other(e.to_string()))?;
    if let Some(ca) = &cli.ca {
        let pem = std::fs::read(ca)
            .map_err(|e| Failure::Other(format!("reading {}: {e}", ca.display())))?;
        endpoint = endpoint
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))
            .map_err(|e| Failure::Other(e.to_string()))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| Failure::Other(format!("connecting to {}: {e}", cli.server)))?;
    let key = std::env::var("SESSION_AUTHORITY_API_KEY").ok();
    Client::from_channel(channel, key.as_deref())
        .map_err(|_| Failure::Other("SESSION_AUTHORITY_API_KEY is not printable ASCII".into()))
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let d = Duration::new(u64::try_from(t.seconds).ok()?, u32::try_from(t.nanos).ok()?);
            Some(humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + d).to_string())
        })
        .unwrap_or_default()
}

fn session_json(s: &pb::Session) -> Value {
    let place = s.device.as_ref().and_then(|d| d.location.as_ref());
    json!({
        "session_id": s.session_id,
        "tenant_id": s.tenant_id,
        "user_id": s.user_id,
        "state": s.state().as_str_name(),
        "created_at": time(&s.created_at),
        "last_seen_at": time(&s.last_seen_at),
        "idle_expires_at": time(&s.idle_expires_at),
        "absolute_expires_at": time(&s.absolute_expires_at),
        "remember_me": s.remember_me,
        "ip": s.device.as_ref().map(|d| d.ip.clone()).unwrap_or_default(),
        "country": place.map(|l| l.country.clone()).unwrap_or_default(),
        "city": place.map(|l| l.city.clone()).unwrap_or_default(),
        "flags": s
            .security_flags
            .iter()
            .map(|f| f.kind().as_str_name().trim_start_matches("FLAG_KIND_").to_string())
            .collect::<Vec<_>>()
            .join(","),
        "revoke_reason": s.revoke_reason().as_str_name(),
        "new_device": s.new_device,
        "new_place": s.new_place,
        "bound": s.bound,
        "bound_token_expires_at": time(&s.bound_token_expires_at),
        "attributes": s.attributes,
    })
}

/// What a `flagged` event says, in a few words.
fn flag_detail(f: &pb::SessionFlagged) -> String {
    let Some(flag) = &f.security_flag else {
        // A server from before the other kinds: impossible travel only.
        return f
            .flag
            .as_ref()
            .map(|t| format!("IMPOSSIBLE_TRAVEL {:.0} km/h", t.speed_kmh))
            .unwrap_or_default();
    };
    let kind = flag.kind().as_str_name().trim_start_matches("FLAG_KIND_");
    match flag.kind() {
        pb::FlagKind::ImpossibleTravel => format!(
            "{kind} {:.0} km/h",
            flag.travel.as_ref().map_or(0.0, |t| t.speed_kmh)
        ),
        pb::FlagKind::TokenReuse => format!("{kind} of rotation {}", flag.reused_rotation),
        pb::FlagKind::DeviceDrift | pb::FlagKind::PlaceDrift => {
            format!("{kind} {} -> {}", flag.drift_from, flag.drift_to)
        }
        _ => kind.to_string(),
    }
}

/// Prints one record as `key value` lines, or as one JSON line.
fn print_record(json: bool, v: &Value) {
    if json {
        println!("{v}");
    } else if let Value::Object(map) = v {
        for (k, v) in map {
            println!(
                "{k:<24} {}",
                v.as_str().map_or_else(|| v.to_string(), str::to_string)
            );
        }
    }
}

/// Prints rows of `columns` as an aligned table, or each row as a JSON line.
fn print(json: bool, columns: &[&str], rows: &[Value]) {
    if json {
        for r in rows {
            println!("{r}");
        }
        return;
    }
    let cell = |r: &Value, c: &str| match &r[c] {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| {
            rows.iter()
                .map(|r| cell(r, c).len())
                .max()
                .unwrap_or(0)
                .max(c.len())
        })
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(columns.iter().map(|c| c.to_uppercase()).collect());
    for r in rows {
        line(columns.iter().map(|c| cell(r, c)).collect());
    }
}

fn duration(d: Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: 0,
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let conn = connect(&cli).await?;
    let json = cli.json;
    match cli.command {
        Command::List {
            tenant,
            user,
            flagged,
            country,
            limit,
        } => {
            let mut client = conn.sessions();
            let mut rows = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_sessions(pb::ListSessionsRequest {
                        tenant_id: tenant.clone(),
                        user_id: user.clone().unwrap_or_default(),
                        page_size: 1000,
                        page_token,
                        filter: Some(pb::SessionFilter {
                            flagged_only: flagged,
                            country: country.clone().unwrap_or_default(),
                            ..Default::default()
                        }),
                    })
                    .await?
                    .into_inner();
                rows.extend(page.sessions.iter().map(session_json));
                if page.next_page_token.is_empty() || rows.len() >= limit {
                    break;
                }
                page_token = page.next_page_token;
            }
            rows.truncate(limit);
            print(
                json,
                &[
                    "session_id",
                    "user_id",
                    "created_at",
                    "last_seen_at",
                    "ip",
                    "country",
                    "city",
                    "flags",
                ],
                &rows,
            );
        }
        Command::Show { session_id } => {
            let s = conn
                .sessions()
                .get_session(pb::GetSessionRequest { session_id })
                .await?
                .into_inner()
                .session
                .unwrap_or_default();
            let v = session_json(&s);
            print_record(json, &v);
        }
        Command::Revoke { session_id, reason } => {
            let r = conn
                .sessions()
                .revoke_session(pb::RevokeSessionRequest {
                    session_id: session_id.clone(),
                    reason: reason.proto(),
                })
                .await?
                .into_inner();
            print(
                json,
                &["session_id", "revoked", "sequence"],
                &[json!({"session_id": session_id, "revoked": r.revoked, "sequence": r.sequence})],
            );
        }
        Command::RevokeUser {
            tenant,
            user,
            except,
            reason,
        } => {
            let r = conn
                .sessions()
                .revoke_user_sessions(pb::RevokeUserSessionsRequest {
                    tenant_id: tenant,
                    user_id: user,
                    except_session_id: except.unwrap_or_default(),
                    reason: reason.proto(),
                })
                .await?
                .into_inner();
            let rows: Vec<Value> = r
                .revoked_session_ids
                .iter()
                .map(|id| json!({"session_id": id, "sequence": r.sequence}))
                .collect();
            print(json, &["session_id", "sequence"], &rows);
        }
        Command::RevokeMatching {
            tenant,
            user,
            older_than,
            idle_longer_than,
            flagged,
            ip,
            country,
            reason,
            dry_run,
            batch_size,
        } => {
            let filter = pb::SessionFilter {
                older_than: older_than.map(duration),
                idle_longer_than: idle_longer_than.map(duration),
                flagged_only: flagged,
                ip: ip.unwrap_or_default(),
                country: country.unwrap_or_default(),
                ..Default::default()
            };
            let user = user.unwrap_or_default();
            // The count and sample (and the server's check that the filter is not empty) first.
            let r = conn
                .sessions()
                .revoke_sessions_matching(pb::RevokeSessionsMatchingRequest {
                    tenant_id: tenant.clone(),
                    user_id: user.clone(),
                    filter: Some(filter.clone()),
                    reason: reason.proto(),
                    dry_run: true,
                })
                .await?
                .into_inner();
            let (revoked, sequence) = if dry_run {
                (r.matched, r.sequence)
            } else {
                let (revoked, last) =
                    revoke_in_pages(&conn, tenant, user, filter, reason, batch_size, r.matched)
                        .await?;
                (revoked, last.unwrap_or(r.sequence))
            };
            if json {
                println!(
                    "{}",
                    json!({"matched": revoked, "dry_run": dry_run, "sequence": sequence,
                           "sample": r.sample.iter().map(session_json).collect::<Vec<_>>()})
                );
            } else {
                let verb = if dry_run { "would revoke" } else { "revoked" };
                println!("{verb} {revoked} sessions; sample:");
                let rows: Vec<Value> = r.sample.iter().map(session_json).collect();
                print(
                    false,
                    &[
                        "session_id",
                        "user_id",
                        "created_at",
                        "last_seen_at",
                        "country",
                    ],
                    &rows,
                );
            }
        }
        Command::Watch {
            tenant,
            user,
            from,
            count,
        } => {
            let mut stream = conn
                .events()
                .watch_events(pb::WatchEventsRequest {
                    announce_live: false,
                    log_epoch: None,
                    after_sequence: from,
                    filter: Some(pb::EventFilter {
                        tenant_id: tenant.unwrap_or_default(),
                        user_id: user.unwrap_or_default(),
                        event_types: vec![],
                    }),
                })
                .await?
                .into_inner();
            let mut seen = 0u64;
            while let Some(item) = stream.message().await? {
                let Some(Message::Event(e)) = item.message else {
                    continue;
                };
                let (kind, detail) = match &e.body {
                    Some(Body::Created(c)) => (
                        "created",
                        c.device
                            .as_ref()
                            .map(|d| {
                                format!(
                                    "ip={} {}",
                                    d.ip,
                                    d.location
                                        .as_ref()
                                        .map(|l| l.country.clone())
                                        .unwrap_or_default()
                                )
                            })
                            .unwrap_or_default(),
                    ),
                    Some(Body::Revoked(r)) => ("revoked", r.reason().as_str_name().to_string()),
                    Some(Body::Expired(x)) => ("expired", x.deadline().as_str_name().to_string()),
                    Some(Body::Rotated(_)) => ("rotated", String::new()),
                    Some(Body::Flagged(f)) => ("flagged", flag_detail(f)),
                    None => ("unknown", String::new()),
                };
                if json {
                    println!(
                        "{}",
                        json!({"sequence": e.sequence, "occurred_at": time(&e.occurred_at), "type": kind,
                               "tenant_id": e.tenant_id, "user_id": e.user_id, "session_id": e.session_id,
                               "detail": detail})
                    );
                } else {
                    println!(
                        "{:>8}  {}  {:<8} {}/{} {} {detail}",
                        e.sequence,
                        time(&e.occurred_at),
                        kind,
                        e.tenant_id,
                        e.user_id,
                        e.session_id
                    );
                }
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
        }
        Command::Stats { tenant } => {
            let s = conn
                .sessions()
                .get_session_stats(pb::GetSessionStatsRequest {
                    tenant_id: tenant.clone(),
                })
                .await?
                .into_inner();
            let v = json!({"tenant_id": tenant, "live_sessions": s.live_sessions,
                           "distinct_users": s.distinct_users, "flagged_sessions": s.flagged_sessions,
                           "created_last_24h": s.created_last_24h, "expired_last_24h": s.expired_last_24h,
                           "revoked_last_24h": s.revoked_last_24h});
            print_record(json, &v);
        }
        Command::Policy {
            command: PolicyCommand::Get { tenant },
        } => {
            let r = conn
                .policies()
                .get_policy(pb::GetPolicyRequest { tenant_id: tenant })
                .await?
                .into_inner();
            print_record(
                json,
                &policy_json(&r.policy.unwrap_or_default(), r.is_default),
            );
        }
        Command::Policy {
            command: PolicyCommand::Set(changes),
        } => {
            let mut client = conn.policies();
            let (policy, paths) = changes.into_update();
            if paths.is_empty() {
                // Nothing to change: show the policy as it is (an empty mask would replace it).
                let r = client
                    .get_policy(pb::GetPolicyRequest {
                        tenant_id: policy.tenant_id,
                    })
                    .await?
                    .into_inner();
                print_record(
                    json,
                    &policy_json(&r.policy.unwrap_or_default(), r.is_default),
                );
                return Ok(());
            }
            let stored = client
                .set_policy(pb::SetPolicyRequest {
                    policy: Some(policy),
                    update_mask: Some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner()
                .policy
                .unwrap_or_default();
            print_record(json, &policy_json(&stored, false));
        }
    }
    Ok(())
}

fn policy_json(p: &pb::Policy, is_default: bool) -> Value {
    let secs = |d: &Option<prost_types::Duration>| {
        d.as_ref()
            .map_or(String::new(), |d| format!("{}s", d.seconds))
    };
    json!({"tenant_id": p.tenant_id, "is_default": is_default,
           "idle_timeout": secs(&p.idle_timeout), "absolute_timeout": secs(&p.absolute_timeout),
           "remember_me_allowed": p.remember_me_allowed,
           "remember_me_idle_timeout": secs(&p.remember_me_idle_timeout),
           "remember_me_absolute_timeout": secs(&p.remember_me_absolute_timeout),
           "max_sessions_per_user": p.max_sessions_per_user,
           "limit_action": p.limit_action().as_str_name(),
           "max_creations_per_day": p.max_creations_per_day,
           "max_session_age": secs(&p.max_session_age),
           "travel_action": p.travel_action().as_str_name(),
           "travel_max_speed_kmh": p.travel_max_speed_kmh,
           "cookie_name": p.cookie_name})
}

/// Lists the matching sessions a page at a time and revokes each page with one call, so a long
/// revocation shows progress (on a terminal) and can be interrupted between pages. Returns how
/// many this run ended and the last revoke event's sequence.
async fn revoke_in_pages(
    conn: &Client,
    tenant: String,
    user: String,
    filter: pb::SessionFilter,
    reason: Reason,
    batch_size: u32,
    expected: u64,
) -> Result<(u64, Option<u64>), Failure> {
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(expected),
        indicatif::ProgressDrawTarget::stderr(),
    )
    .with_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} revoked ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut client = conn.sessions();
    let (mut revoked, mut sequence) = (0u64, None);
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sessions(pb::ListSessionsRequest {
                tenant_id: tenant.clone(),
                user_id: user.clone(),
                page_size: batch_size,
                page_token,
                filter: Some(filter.clone()),
            })
            .await?
            .into_inner();
        if !page.sessions.is_empty() {
            let r = client
                .revoke_sessions(pb::RevokeSessionsRequest {
                    session_ids: page.sessions.into_iter().map(|s| s.session_id).collect(),
                    reason: reason.proto(),
                })
                .await?
                .into_inner();
            revoked += r.revoked_session_ids.len() as u64;
            sequence = Some(r.sequence);
            if revoked > bar.length().unwrap_or(0) {
                // Sessions that began to match after the count.
                bar.set_length(revoked);
            }
            bar.set_position(revoked);
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    bar.finish_and_clear();
    Ok((revoked, sequence))
}
