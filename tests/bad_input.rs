//! Bad input: random bytes as the body of every method (the server stays up, answers each with a
//! gRPC status, and its memory stays flat), and values at and beyond every boundary.

mod common;

use bytes::{Buf, BufMut};
use common::*;
use http::uri::PathAndQuery;
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use session_authority::{proto::v1 as pb, security::methods::METHODS};
use tonic::{
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
    Code, Request, Status,
};

/// Sends and receives raw bytes, so a test can put anything on the wire.
#[derive(Default, Clone)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining()).to_vec()))
    }
}

/// One call of `path` with `body`; the server's status code (Ok included). Panics on anything
/// that is not a gRPC answer (the server died or broke the protocol).
async fn send(channel: Channel, path: &'static str, body: Vec<u8>) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("server reachable");
    let path_q = PathAndQuery::from_static(path);
    let streaming = path.ends_with("/WatchEvents")
        || path.ends_with("/Watch")
        || path.contains("ServerReflection");
    let result = if streaming {
        let request = Request::new(tokio_stream::iter(vec![body]));
        grpc.streaming(request, path_q, RawCodec).await.map(drop)
    } else {
        grpc.unary(Request::new(body), path_q, RawCodec)
            .await
            .map(drop)
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => {
            // A transport failure surfaces as Unknown/Unavailable with a source error.
            assert!(
                !(status.code() == Code::Unavailable && status.message().contains("transport")),
                "{path}: not a gRPC answer: {status:?}"
            );
            status.code()
        }
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn random_body(rng: &mut ChaCha8Rng) -> Vec<u8> {
    let len = (rng.next_u32() % 600) as usize;
    let mut body = vec![0u8; len];
    rng.fill_bytes(&mut body);
    body
}

#[tokio::test]
async fn random_bytes_to_every_method_get_grpc_answers_and_memory_stays_flat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, addr) = spawn_binary(&dir.path().join("data"), &[]).await;
    let pid = child.id().expect("pid");
    let channel = connect_channel(&addr).await;
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed);

    let mut round = |rounds: usize| {
        let channel = channel.clone();
        let bodies: Vec<(&'static str, Vec<u8>)> = (0..rounds)
            .flat_map(|_| METHODS.iter().map(|(p, _)| *p).collect::<Vec<_>>())
            .map(|p| (p, random_body(&mut rng)))
            .collect();
        async move {
            let mut codes = std::collections::BTreeMap::new();
            for (path, body) in bodies {
                let code = send(channel.clone(), path, body).await;
                *codes.entry(format!("{code:?}")).or_insert(0u32) += 1;
            }
            codes
        }
    };
    // Warm up (allocator, caches), then measure.
    round(30).await;
    let before = rss_kib(pid);
    let codes = round(250).await;
    let after = rss_kib(pid);
    assert!(
        child.try_wait().expect("poll").is_none(),
        "the server is still running"
    );
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("still healthy");
    println!("random bodies: answers {codes:?}; RSS {before} KiB -> {after} KiB");
    assert!(
        codes.contains_key("InvalidArgument"),
        "bad bodies are refused: {codes:?}"
    );
    assert!(
        after < before + 32 * 1024,
        "memory grew from {before} KiB to {after} KiB over {} calls",
        250 * METHODS.len()
    );
    child.start_kill().expect("kill");
    child.wait().await.expect("reaped");
}

#[tokio::test]
async fn values_at_each_limit_pass_and_one_beyond_fails() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // At the limits.
    let mut req = create_request(&"t".repeat(128), &"ü".repeat(64));
    req.device = Some(pb::Device {
        ip: "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff".into(),
        user_agent: "a".repeat(512),
        device_label: "l".repeat(128),
        location: Some(pb::Location {
            country: "ZZ".into(),
            city: "c".repeat(128),
            latitude: Some(-90.0),
            longitude: Some(180.0),
        }),
    });
    for i in 0..16 {
        req.attributes.insert(format!("{i:0>64}"), "v".repeat(256));
    }
    let created = client
        .create_session(req.clone())
        .await
        .expect("at the limits")
        .into_inner();
    let listed = client
        .list_sessions(pb::ListSessionsRequest {
            tenant_id: "t".repeat(128),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .expect("page_size 1000")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1);
    assert_eq!(listed.sessions[0].attributes, req.attributes);
    assert_eq!(created.session.expect("s").user_id, "ü".repeat(64));

    // One beyond each: refused, naming the field.
    type Change = Box<dyn Fn(&mut pb::CreateSessionRequest)>;
    let beyond: Vec<(Change, &str)> = vec![
        (Box::new(|r| r.tenant_id.push('t')), "tenant_id"),
        (Box::new(|r| r.user_id.push('u')), "user_id"),
        (
            Box::new(|r| r.device.as_mut().expect("d").user_agent.push('a')),
            "device.user_agent",
        ),
        (
            Box::new(|r| r.device.as_mut().expect("d").device_label.push('l')),
            "device.device_label",
        ),
        (
            Box::new(|r| {
                r.device
                    .as_mut()
                    .expect("d")
                    .location
                    .as_mut()
                    .expect("l")
                    .city
                    .push('c')
            }),
            "device.location.city",
        ),
        (
            Box::new(|r| {
                r.device
                    .as_mut()
                    .expect("d")
                    .location
                    .as_mut()
                    .expect("l")
                    .latitude = Some(-90.0001)
            }),
            "device.location.latitude",
        ),
        (
            Box::new(|r| {
                r.device
                    .as_mut()
                    .expect("d")
                    .location
                    .as_mut()
                    .expect("l")
                    .longitude = Some(f64::INFINITY)
            }),
            "device.location.longitude",
        ),
        (
            Box::new(|r| {
                r.attributes.insert("x".repeat(65), "v".into());
            }),
            "attributes",
        ),
        (
            Box::new(|r| {
                let k = r.attributes.keys().next().expect("k").clone();
                r.attributes.insert(k, "v".repeat(257));
            }),
            "attributes",
        ),
    ];
    for (change, field) in beyond {
        let mut r = req.clone();
        change(&mut r);
        let err = client.create_session(r).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = client
        .list_sessions(pb::ListSessionsRequest {
            tenant_id: "t".into(),
            page_size: 1001,
            ..Default::default()
        })
        .await
        .expect_err("page_size 1001");
    assert!(err.message().starts_with("page_size"), "{}", err.message());
}

#[tokio::test]
async fn extreme_durations_and_timestamps_are_refused_or_handled_never_overflow() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    create(&mut client, "t", "u").await;
    let list = |filter: pb::SessionFilter| pb::ListSessionsRequest {
        tenant_id: "t".into(),
        filter: Some(filter),
        ..Default::default()
    };
    let huge = prost_types::Duration {
        seconds: i64::MAX,
        nanos: 999_999_999,
    };
    // A longest-possible age or idle time matches nothing, without overflowing.
    let r = client
        .list_sessions(list(pb::SessionFilter {
            older_than: Some(huge),
            idle_longer_than: Some(huge),
            ..Default::default()
        }))
        .await
        .expect("huge durations")
        .into_inner();
    assert!(r.sessions.is_empty());
    for (filter, field) in [
        (
            pb::SessionFilter {
                older_than: Some(prost_types::Duration {
                    seconds: -1,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "filter.older_than",
        ),
        (
            pb::SessionFilter {
                idle_longer_than: Some(prost_types::Duration {
                    seconds: 0,
                    nanos: -5,
                }),
                ..Default::default()
            },
            "filter.idle_longer_than",
        ),
        (
            pb::SessionFilter {
                created_after: Some(prost_types::Timestamp {
                    seconds: -10,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "filter.created_after",
        ),
        (
            pb::SessionFilter {
                created_before: Some(prost_types::Timestamp {
                    seconds: i64::MAX,
                    nanos: 0,
                }),
                ..Default::default()
            },
            "filter.created_before",
        ),
    ] {
        let err = client.list_sessions(list(filter)).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    // Policies with extreme durations are refused by bounds, not by overflow.
    let mut policies = pb::policy_service_client::PolicyServiceClient::new(server.channel().await);
    let mut p = policies
        .get_policy(pb::GetPolicyRequest {
            tenant_id: "t".into(),
        })
        .await
        .expect("get")
        .into_inner()
        .policy
        .expect("p");
    p.absolute_timeout = Some(huge);
    let err = policies
        .set_policy(pb::SetPolicyRequest {
            policy: Some(p),
            update_mask: None,
        })
        .await
        .expect_err("huge timeout");
    assert!(
        err.message().starts_with("policy.absolute_timeout"),
        "{}",
        err.message()
    );
}
