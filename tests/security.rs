//! Security over real gRPC: TLS and mutual TLS with certificates made here, API keys, the role
//! table for every RPC, tenant isolation, throttling of token guessing, oversized requests, the
//! audit trail.

mod common;

use common::*;
use http::uri::PathAndQuery;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use session_authority::{
    clock::{Clock, SystemClock},
    config::{ClientIdentityConfig, Config, Role},
    proto::v1::{
        self as pb, audit_service_client::AuditServiceClient,
        event_service_client::EventServiceClient, policy_service_client::PolicyServiceClient,
        session_service_client::SessionServiceClient, watch_events_response::Message,
    },
    security::methods::{Access, METHODS},
    token::TokenGenerator,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
    Code, Request,
};

// === certificates ===

struct Pki {
    ca_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let issuer =
            CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key")).expect("ca");
        Self {
            ca_pem: issuer.pem(),
            issuer,
        }
    }

    /// A certificate and key (PEM) for `common_name` with these SANs.
    fn issue(&self, common_name: &str, sans: &[&str]) -> (String, String) {
        let mut params =
            CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }
}

/// Writes the server's TLS files and returns a config using them.
fn tls_config(dir: &std::path::Path, pki: &Pki, client_ca: Option<&Pki>) -> Config {
    let (cert, key) = pki.issue("session-authority", &["localhost"]);
    std::fs::write(dir.join("server.pem"), cert).expect("write");
    std::fs::write(dir.join("server.key"), key).expect("write");
    let mut config = test_config();
    config.tls_cert = Some(dir.join("server.pem"));
    config.tls_key = Some(dir.join("server.key"));
    if let Some(ca) = client_ca {
        std::fs::write(dir.join("clients-ca.pem"), &ca.ca_pem).expect("write");
        config.tls_client_ca = Some(dir.join("clients-ca.pem"));
    }
    config
}

async fn tls_channel(
    server: &TestServer,
    ca: &Pki,
    identity: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", server.addr))
        .expect("uri")
        .tls_config(tls)?
        .connect()
        .await
}

#[tokio::test]
async fn tls_serves_and_plaintext_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new("test CA");
    let server = TestServer::start_with(tls_config(dir.path(), &pki, None)).await;
    let channel = tls_channel(&server, &pki, None)
        .await
        .expect("TLS connects");
    let mut client = SessionServiceClient::new(channel);
    let s = create(&mut client, "t", "u").await;
    validate(&mut client, &s.token)
        .await
        .expect("valid over TLS");

    // A plaintext client gets no service.
    let plain = Channel::from_shared(format!("http://{}", server.addr))
        .expect("uri")
        .connect()
        .await;
    if let Ok(channel) = plain {
        let err = SessionServiceClient::new(channel)
            .create_session(create_request("t", "u"))
            .await
            .expect_err("plaintext refused");
        assert_ne!(err.code(), Code::Ok);
    }
    // A client that does not trust the server's CA refuses it.
    let other = Pki::new("someone else");
    match tls_channel(&server, &other, None).await {
        Err(_) => {}
        Ok(channel) => {
            SessionServiceClient::new(channel)
                .create_session(create_request("t", "u"))
                .await
                .expect_err("untrusted server certificate");
        }
    }
}

#[tokio::test]
async fn mutual_tls_requires_a_client_certificate_from_the_configured_ca() {
    let dir = tempfile::tempdir().expect("tempdir");
    let server_pki = Pki::new("server CA");
    let client_pki = Pki::new("client CA");
    let mut config = tls_config(dir.path(), &server_pki, Some(&client_pki));
    config.client_identities = vec![
        ClientIdentityConfig {
            identity: "spiffe://example.org/billing".into(),
            role: Role::Service,
            tenant: None,
        },
        ClientIdentityConfig {
            identity: "CN=ops".into(),
            role: Role::Admin,
            tenant: None,
        },
    ];
    let server = TestServer::start_with(config).await;

    // No client certificate: the handshake (or the first call) fails.
    match tls_channel(&server, &server_pki, None).await {
        Err(_) => {}
        Ok(channel) => {
            SessionServiceClient::new(channel)
                .create_session(create_request("t", "u"))
                .await
                .expect_err("no client certificate");
        }
    }
    // A certificate from another CA: refused too.
    let rogue = Pki::new("rogue CA").issue("ops", &[]);
    match tls_channel(&server, &server_pki, Some(rogue)).await {
        Err(_) => {}
        Ok(channel) => {
            SessionServiceClient::new(channel)
                .create_session(create_request("t", "u"))
                .await
                .expect_err("foreign client certificate");
        }
    }
    // The billing service, known by its SPIFFE SAN: service role.
    let billing = client_pki.issue("billing", &["spiffe://example.org/billing"]);
    let channel = tls_channel(&server, &server_pki, Some(billing))
        .await
        .expect("mTLS");
    let mut sessions = SessionServiceClient::new(channel.clone());
    create(&mut sessions, "t", "u").await;
    let err = PolicyServiceClient::new(channel)
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect_err("service may not read policies");
    assert_eq!(err.code(), Code::PermissionDenied);
    // The operator, known by its CN: admin.
    let ops = client_pki.issue("ops", &[]);
    let channel = tls_channel(&server, &server_pki, Some(ops))
        .await
        .expect("mTLS");
    PolicyServiceClient::new(channel)
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect("admin reads policies");
    // A valid certificate with an identity nobody configured: no role.
    let stranger = client_pki.issue("stranger", &[]);
    let channel = tls_channel(&server, &server_pki, Some(stranger))
        .await
        .expect("mTLS");
    let err = SessionServiceClient::new(channel)
        .create_session(create_request("t", "u"))
        .await
        .expect_err("unknown identity");
    assert_eq!(err.code(), Code::Unauthenticated);
}

// === API keys and roles ===

fn keyed_config() -> Config {
    Config {
        api_keys: vec![
            api_key("ops", "admin-secret", Role::Admin, None),
            api_key("web", "service-secret", Role::Service, None),
            api_key("cache", "subscriber-secret", Role::Subscriber, None),
            api_key("acme-web", "acme-secret", Role::Service, Some("acme")),
            api_key("acme-ops", "acme-admin-secret", Role::Admin, Some("acme")),
            api_key("attacker", "attacker-secret", Role::Service, None),
        ],
        failed_validations_per_ip_per_minute: 30,
        failed_validations_per_caller_per_minute: 300,
        ..test_config()
    }
}

/// Calls any method with an empty request (valid protobuf for every message), streaming or not,
/// and returns the status of the call's start.
async fn call_raw(channel: Channel, path: &'static str, secret: Option<&str>) -> Code {
    call_raw_status(channel, path, secret).await.0
}

/// As [`call_raw`], with the status message.
async fn call_raw_status(
    channel: Channel,
    path: &'static str,
    secret: Option<&str>,
) -> (Code, String) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let mut request = Request::new(());
    if let Some(secret) = secret {
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {secret}").parse().expect("ascii"),
        );
    }
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = PathAndQuery::from_static(path);
    let streaming = path.as_str().ends_with("/WatchEvents")
        || path.as_str().ends_with("/Watch")
        || path.as_str().contains("ServerReflection");
    let result = if streaming {
        let request = request.map(|()| tokio_stream::iter(vec![()]));
        grpc.streaming(request, path, codec).await.map(drop)
    } else {
        grpc.unary(request, path, codec).await.map(drop)
    };
    match result {
        Ok(()) => (Code::Ok, String::new()),
        Err(status) => (status.code(), status.message().to_string()),
    }
}

#[tokio::test]
async fn the_role_table_is_enforced_for_every_rpc() {
    let server = TestServer::start_with(keyed_config()).await;
    let channel = server.channel().await;
    let roles = [
        (Role::Admin, "admin-secret"),
        (Role::Service, "service-secret"),
        (Role::Subscriber, "subscriber-secret"),
    ];
    for (path, access) in METHODS {
        let anonymous = call_raw(channel.clone(), path, None).await;
        let wrong_key = call_raw(channel.clone(), path, Some("not-a-key")).await;
        match access {
            Access::Open => {
                assert_ne!(anonymous, Code::Unauthenticated, "{path} is open");
                continue;
            }
            _ => {
                assert_eq!(
                    anonymous,
                    Code::Unauthenticated,
                    "{path} without credentials"
                );
                assert_eq!(wrong_key, Code::Unauthenticated, "{path} with a wrong key");
            }
        }
        for (role, secret) in roles {
            let allowed = match access {
                Access::Roles(allowed) => allowed.contains(&role),
                Access::Reflection => role == Role::Admin,
                Access::Open => true,
            };
            let (code, message) = call_raw_status(channel.clone(), path, Some(secret)).await;
            if allowed {
                // An allowed call may still fail on its (empty) input, e.g. ValidateSession's
                // "session not valid"; it must not fail on who is calling.
                let refused_caller = code == Code::PermissionDenied
                    || (code == Code::Unauthenticated && message != "session not valid");
                assert!(
                    !refused_caller,
                    "{path} as {role:?} must be allowed, got {code:?}: {message}"
                );
            } else {
                assert_eq!(code, Code::PermissionDenied, "{path} as {role:?}");
            }
        }
    }
}

#[tokio::test]
async fn a_tenant_bound_caller_cannot_see_or_touch_another_tenant() {
    let server = TestServer::start_with(keyed_config()).await;
    let mut ops = sessions_as(&server, "admin-secret").await;
    let mut acme = sessions_as(&server, "acme-secret").await;
    // An unbound admin may act in any tenant.
    let globex = ops
        .create_session(create_request("globex", "u"))
        .await
        .expect("admin")
        .into_inner();
    let globex_id = globex.session.clone().expect("s").session_id;
    let mine = acme
        .create_session(create_request("acme", "u"))
        .await
        .expect("own tenant")
        .into_inner();

    let err = acme
        .create_session(create_request("globex", "u"))
        .await
        .expect_err("other tenant");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = acme
        .get_session(pb::GetSessionRequest {
            session_id: globex_id.clone(),
        })
        .await
        .expect_err("invisible");
    assert_eq!(err.code(), Code::NotFound);
    let err = acme
        .revoke_session(pb::RevokeSessionRequest {
            session_id: globex_id.clone(),
            reason: 0,
        })
        .await
        .expect_err("untouchable");
    assert_eq!(err.code(), Code::NotFound);
    let err = acme
        .revoke_sessions(pb::RevokeSessionsRequest {
            session_ids: vec![
                mine.session.clone().expect("s").session_id,
                globex_id.clone(),
            ],
            reason: 0,
        })
        .await
        .expect_err("all or nothing");
    assert_eq!(err.code(), Code::NotFound);
    let err = acme
        .validate_session(pb::ValidateSessionRequest {
            token: globex.token.clone(),
            touch: None,
            device: None,
        })
        .await
        .expect_err("another tenant's token is not valid here");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = acme
        .rotate_session(pb::RotateSessionRequest {
            token: globex.token.clone(),
            ..Default::default()
        })
        .await
        .expect_err("nor rotatable");
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = acme
        .list_sessions(pb::ListSessionsRequest {
            tenant_id: "globex".into(),
            ..Default::default()
        })
        .await
        .expect_err("no listing");
    assert_eq!(err.code(), Code::PermissionDenied);
    // Globex's session is untouched.
    ops.validate_session(pb::ValidateSessionRequest {
        token: globex.token.clone(),
        touch: None,
        device: None,
    })
    .await
    .expect("still valid");

    // Events: a bound subscriber sees its tenant only, and cannot ask for another.
    let mut events =
        EventServiceClient::with_interceptor(server.channel().await, bearer("acme-secret"));
    let mut stream = events
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: Some(0),
            filter: None,
        })
        .await
        .expect("watch")
        .into_inner();
    let first = loop {
        if let Some(Message::Event(e)) = stream.message().await.expect("ok").expect("open").message
        {
            break e;
        }
    };
    assert_eq!(first.tenant_id, "acme");
    let err = events
        .watch_events(pb::WatchEventsRequest {
            after_sequence: None,
            filter: Some(pb::EventFilter {
                tenant_id: "globex".into(),
                ..Default::default()
            }),
            announce_live: false,
            log_epoch: None,
        })
        .await
        .expect_err("other tenant's events");
    assert_eq!(err.code(), Code::PermissionDenied);

    // Policies: a tenant-bound admin manages its own tenant only.
    let mut policies =
        PolicyServiceClient::with_interceptor(server.channel().await, bearer("acme-admin-secret"));
    policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("own policy");
    let err = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "globex".into(),
        })
        .await
        .expect_err("other tenant's policy");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn a_hundred_thousand_guesses_find_nothing_and_are_throttled() {
    let server = TestServer::start_with(keyed_config()).await;
    let mut web = sessions_as(&server, "service-secret").await;
    let real = web
        .create_session(create_request("t", "u"))
        .await
        .expect("create")
        .into_inner();
    let attacker = sessions_as(&server, "attacker-secret").await;

    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let mut c = attacker.clone();
            tokio::spawn(async move {
                // Well-formed tokens (right prefix, length and checksum) for random sessions.
                let generator = TokenGenerator::from_os().expect("seed");
                let (mut validated, mut throttled, mut refused) = (0u32, 0u32, 0u32);
                for i in 0..6250 {
                    let token = generator
                        .issue(&generator.session_id(SystemClock.now()))
                        .token;
                    let ip = format!("203.0.113.{}", (t * 16 + i) % 250);
                    let r = c
                        .validate_session(pb::ValidateSessionRequest {
                            token: token.expose().to_string(),
                            touch: None,
                            device: Some(pb::Device {
                                ip,
                                ..Default::default()
                            }),
                        })
                        .await;
                    match r {
                        Ok(_) => validated += 1,
                        Err(s) if s.code() == Code::ResourceExhausted => throttled += 1,
                        Err(s) => {
                            assert_eq!(s.code(), Code::Unauthenticated);
                            refused += 1;
                        }
                    }
                }
                (validated, throttled, refused)
            })
        })
        .collect();
    // Meanwhile, a legitimate caller keeps validating a real session.
    let legit = {
        let mut web = web.clone();
        let token = real.token.clone();
        tokio::spawn(async move {
            for _ in 0..500 {
                web.validate_session(pb::ValidateSessionRequest {
                    token: token.clone(),
                    touch: None,
                    device: None,
                })
                .await
                .expect("a legitimate caller is unaffected");
            }
        })
    };
    let (mut validated, mut throttled, mut refused) = (0, 0, 0);
    for t in tasks {
        let (v, th, r) = t.await.expect("attacker task");
        validated += v;
        throttled += th;
        refused += r;
    }
    legit.await.expect("legit task");
    assert_eq!(validated + throttled + refused, 100_000);
    assert_eq!(validated, 0, "no guess validated");
    assert!(
        throttled > 90_000,
        "throttling engaged: {throttled} throttled, {refused} checked"
    );
}

#[tokio::test]
async fn oversized_requests_are_refused_and_the_server_stays_up() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut req = create_request("t", "u");
    req.attributes.insert("big".into(), "x".repeat(200_000));
    let err = client.create_session(req).await.expect_err("too big");
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    let s = create(&mut client, "t", "u").await;
    validate(&mut client, &s.token)
        .await
        .expect("still serving");
}

#[tokio::test]
async fn administrative_actions_are_in_the_audit_trail() {
    let server = TestServer::start_with(keyed_config()).await;
    let mut ops = sessions_as(&server, "admin-secret").await;
    let mut web = sessions_as(&server, "service-secret").await;
    let s = web
        .create_session(create_request("acme", "u"))
        .await
        .expect("c")
        .into_inner();
    // A user logging out through the web tier is not an administrative action.
    web.revoke_session(pb::RevokeSessionRequest {
        session_id: s.session.expect("s").session_id,
        reason: pb::RevokeReason::UserLogout as i32,
    })
    .await
    .expect("logout");
    // So is one without a reason: from a service-role caller it is the user's logout.
    let t = web
        .create_session(create_request("acme", "u"))
        .await
        .expect("c")
        .into_inner()
        .session
        .expect("s")
        .session_id;
    let ended = web
        .revoke_session(pb::RevokeSessionRequest {
            session_id: t,
            ..Default::default()
        })
        .await
        .expect("logout without a reason")
        .into_inner()
        .session
        .expect("s");
    assert_eq!(ended.revoke_reason(), pb::RevokeReason::UserLogout);
    ops.create_session(create_request("acme", "v"))
        .await
        .expect("c");
    ops.revoke_user_sessions(pb::RevokeUserSessionsRequest {
        tenant_id: "acme".into(),
        user_id: "v".into(),
        ..Default::default()
    })
    .await
    .expect("admin revoke");
    let mut policies =
        PolicyServiceClient::with_interceptor(server.channel().await, bearer("admin-secret"));
    let mut p = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "acme".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy
        .expect("p");
    p.max_sessions_per_user = 3;
    policies
        .set_policy(pb::SetPolicyRequest {
            policy: Some(p),
            update_mask: None,
        })
        .await
        .expect("set");

    let server = server.restart().await;
    let mut audit =
        AuditServiceClient::with_interceptor(server.channel().await, bearer("admin-secret"));
    let records = audit
        .list_audit_records(pb::ListAuditRecordsRequest::default())
        .await
        .expect("list")
        .into_inner()
        .records;
    let actions: Vec<_> = records
        .iter()
        .map(|r| (r.action.as_str(), r.caller.as_str()))
        .collect();
    assert_eq!(
        actions,
        [("RevokeUserSessions", "ops"), ("SetPolicy", "ops")]
    );
    assert!(records
        .iter()
        .all(|r| r.tenant_id == "acme" && r.role == "admin" && r.at.is_some()));
    assert!(
        records[1].detail.contains("\"max_sessions_per_user\":3"),
        "{}",
        records[1].detail
    );
    let err =
        AuditServiceClient::with_interceptor(server.channel().await, bearer("service-secret"))
            .list_audit_records(pb::ListAuditRecordsRequest::default())
            .await
            .expect_err("admins only");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[test]
fn a_non_loopback_address_needs_tls_and_credentials_or_insecure() {
    let exposed = |config: Config| config.check_exposure("10.1.2.3:50051".parse().expect("addr"));
    assert!(exposed(Config::default()).is_err());
    assert!(exposed(Config {
        insecure: true,
        ..Config::default()
    })
    .is_ok());
    let with_tls = Config {
        tls_cert: Some("cert.pem".into()),
        tls_key: Some("key.pem".into()),
        ..Config::default()
    };
    assert!(
        exposed(with_tls.clone()).is_err(),
        "TLS alone: anyone may still call"
    );
    assert!(exposed(Config {
        api_keys: vec![api_key("ops", "s", Role::Admin, None)],
        ..with_tls
    })
    .is_ok());
}

#[tokio::test]
async fn excess_calls_are_shed_at_once_not_queued() {
    let server = TestServer::start_with(Config {
        max_in_flight: 1,
        max_sessions_per_user: 10_000,
        ..test_config()
    })
    .await;
    let client = server.client().await;
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let mut c = client.clone();
            tokio::spawn(async move {
                c.create_session(create_request("t", &format!("u{i}")))
                    .await
            })
        })
        .collect();
    let (mut ok, mut shed) = (0, 0);
    for t in tasks {
        match t.await.expect("task") {
            Ok(_) => ok += 1,
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
                shed += 1;
            }
        }
    }
    assert!(ok >= 1 && shed >= 1, "{ok} served, {shed} shed");
    // Health is never shed, and the server recovers at once.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health");
    create(&mut server.client().await, "t", "after").await;
}

#[tokio::test]
async fn a_caller_may_hold_only_so_many_event_streams() {
    let server = TestServer::start_with(Config {
        max_subscribers_per_caller: 2,
        ..keyed_config()
    })
    .await;
    let mut cache =
        EventServiceClient::with_interceptor(server.channel().await, bearer("subscriber-secret"));
    let watch = pb::WatchEventsRequest::default();
    let first = cache.watch_events(watch.clone()).await.expect("first");
    let _second = cache.watch_events(watch.clone()).await.expect("second");
    let err = cache.watch_events(watch.clone()).await.expect_err("third");
    assert_eq!(err.code(), Code::ResourceExhausted);
    // Another caller has its own allowance.
    EventServiceClient::with_interceptor(server.channel().await, bearer("service-secret"))
        .watch_events(watch.clone())
        .await
        .expect("another caller");
    // Closing a stream frees its slot.
    drop(first);
    eventually("slot freed", || {
        let mut cache = cache.clone();
        let watch = watch.clone();
        async move { cache.watch_events(watch).await.is_ok() }
    })
    .await;
}

#[tokio::test]
async fn a_refused_stream_is_answered_at_once_even_if_the_client_keeps_sending() {
    let server = TestServer::start_with(keyed_config()).await;
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    // One message, then the request stream stays open, as grpcurl's reflection client does.
    let open_ended =
        tokio_stream::StreamExt::chain(tokio_stream::iter(vec![()]), tokio_stream::pending::<()>());
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        std::time::Duration::from_secs(3),
        grpc.streaming(
            Request::new(open_ended),
            PathAndQuery::from_static("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            tonic_prost::ProstCodec::<(), ()>::default(),
        ),
    )
    .await
    .expect("answered without waiting for the client to finish");
    let status = result.map(drop).expect_err("no credentials");
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn the_health_port_answers_probes_without_credentials_and_serves_nothing_else() {
    let health_addr = free_loopback_addr();
    let server = TestServer::start_with(Config {
        health_listen: Some(health_addr),
        ..keyed_config()
    })
    .await;
    let channel = connect_channel(&health_addr.to_string()).await;
    let status = tonic_health::pb::health_client::HealthClient::new(channel.clone())
        .check(tonic_health::pb::HealthCheckRequest {
            service: "session_authority.v1.SessionService".into(),
        })
        .await
        .expect("health without credentials")
        .into_inner()
        .status();
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    let err = SessionServiceClient::new(channel)
        .create_session(create_request("t", "u"))
        .await
        .expect_err("nothing else on the health port");
    assert_eq!(err.code(), Code::Unimplemented);
    // The main port still wants credentials.
    let err = SessionServiceClient::new(server.channel().await)
        .create_session(create_request("t", "u"))
        .await
        .expect_err("main port");
    assert_eq!(err.code(), Code::Unauthenticated);
}
