//! EventService over real gRPC: one event per change, filters, resume (after a disconnect and a
//! restart), retention and OUT_OF_RANGE, heartbeats, a stalled subscriber, many subscribers.

mod common;

use std::time::Duration;

use common::*;
use session_authority::{
    config::Config,
    proto::v1::{
        self as pb, event_service_client::EventServiceClient, session_event::Body,
        watch_events_response::Message,
    },
};
use tonic::{transport::Channel, Code, Streaming};

type Events = Streaming<pb::WatchEventsResponse>;

async fn events_client(server: &TestServer) -> EventServiceClient<Channel> {
    EventServiceClient::new(server.channel().await)
}

async fn watch(
    client: &mut EventServiceClient<Channel>,
    after: Option<u64>,
    filter: pb::EventFilter,
) -> Events {
    client
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: after,
            filter: Some(filter),
        })
        .await
        .expect("watch")
        .into_inner()
}

/// The next event, skipping heartbeats; fails after 10 s.
async fn next_event(stream: &mut Events) -> pb::SessionEvent {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("an event within 10 s")
            .expect("stream ok")
            .expect("stream open");
        if let Some(Message::Event(e)) = item.message {
            return e;
        }
    }
}

/// Asserts that no event arrives before a heartbeat proves the stream caught up to `head`.
async fn assert_quiet_until(stream: &mut Events, head: u64) {
    loop {
        let item = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("a heartbeat within 10 s")
            .expect("stream ok")
            .expect("stream open");
        match item.message {
            Some(Message::Heartbeat(h)) if h.delivered_through >= head => return,
            Some(Message::Heartbeat(_)) => {}
            other => panic!("unexpected message {other:?}"),
        }
    }
}

fn fast_heartbeats() -> Config {
    Config {
        heartbeat_interval: Duration::from_millis(50),
        ..test_config()
    }
}

#[tokio::test]
async fn each_change_yields_exactly_one_event_of_its_type() {
    let server = TestServer::start_with(fast_heartbeats()).await;
    let mut sessions = server.client().await;
    let mut events = watch(&mut events_client(&server).await, None, Default::default()).await;

    let mut req = create_request("t", "alice");
    req.device = Some(pb::Device {
        ip: "198.51.100.4".into(),
        ..Default::default()
    });
    let created = sessions
        .create_session(req)
        .await
        .expect("create")
        .into_inner();
    let id = created.session.clone().expect("s").session_id;
    let e = next_event(&mut events).await;
    assert_eq!(e.sequence, created.sequence);
    assert_eq!((e.tenant_id.as_str(), e.user_id.as_str()), ("t", "alice"));
    assert_eq!(e.session_id, id);
    match e.body {
        Some(Body::Created(c)) => {
            assert_eq!(c.device.expect("device").ip, "198.51.100.4");
            assert!(c.evicted_session_ids.is_empty());
        }
        other => panic!("expected created, got {other:?}"),
    }

    // A validate that only slides the deadline emits nothing.
    server.advance(Duration::from_secs(30));
    validate(&mut sessions, &created.token)
        .await
        .expect("valid");

    let rotated = sessions
        .rotate_session(pb::RotateSessionRequest {
            token: created.token.clone(),
            ..Default::default()
        })
        .await
        .expect("rotate")
        .into_inner();
    let e = next_event(&mut events).await;
    assert_eq!(
        e.sequence,
        created.sequence + 1,
        "the touch emitted nothing"
    );
    assert!(matches!(e.body, Some(Body::Rotated(_))));

    let other = create(&mut sessions, "t", "bob").await;
    assert_eq!(next_event(&mut events).await.sequence, other.sequence);
    let revoked = sessions
        .revoke_session(pb::RevokeSessionRequest {
            session_id: other.session.expect("s").session_id,
            reason: pb::RevokeReason::Admin as i32,
        })
        .await
        .expect("revoke")
        .into_inner();
    let e = next_event(&mut events).await;
    assert_eq!(e.sequence, revoked.sequence);
    match e.body {
        Some(Body::Revoked(r)) => assert_eq!(r.reason(), pb::RevokeReason::Admin),
        other => panic!("expected revoked, got {other:?}"),
    }

    // Expiry: noticed by a validate (and possibly the sweeper): exactly one event either way.
    server.advance(Duration::from_secs(700));
    for _ in 0..3 {
        assert_not_valid(validate(&mut sessions, &rotated.token).await);
    }
    let e = next_event(&mut events).await;
    assert_eq!(e.session_id, id);
    match e.body {
        Some(Body::Expired(x)) => assert_eq!(x.deadline(), pb::ExpiryKind::Idle),
        other => panic!("expected expired, got {other:?}"),
    }
    assert_quiet_until(&mut events, e.sequence).await;
    // Still nothing more after the sweeper has had many rounds.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let marker = create(&mut sessions, "t", "carol").await;
    assert_eq!(next_event(&mut events).await.sequence, marker.sequence);
    assert_eq!(marker.sequence, e.sequence + 1, "no second expiry event");
}

#[tokio::test]
async fn limit_evictions_are_revoke_events_before_the_create() {
    let server = TestServer::start_with(Config {
        max_sessions_per_user: 1,
        ..test_config()
    })
    .await;
    let mut sessions = server.client().await;
    let mut events = watch(&mut events_client(&server).await, None, Default::default()).await;
    let first = create(&mut sessions, "t", "u").await;
    let second = create(&mut sessions, "t", "u").await;
    let first_id = first.session.expect("s").session_id;
    assert_eq!(second.evicted_session_ids, vec![first_id.clone()]);
    next_event(&mut events).await;
    let evict = next_event(&mut events).await;
    assert_eq!(evict.session_id, first_id);
    match evict.body {
        Some(Body::Revoked(r)) => assert_eq!(r.reason(), pb::RevokeReason::LimitEviction),
        other => panic!("expected revoked, got {other:?}"),
    }
    let created = next_event(&mut events).await;
    assert_eq!(created.sequence, second.sequence);
    match created.body {
        Some(Body::Created(c)) => assert_eq!(c.evicted_session_ids, vec![first_id]),
        other => panic!("expected created, got {other:?}"),
    }
}

#[tokio::test]
async fn filters_select_by_tenant_user_and_type() {
    let server = TestServer::start_with(fast_heartbeats()).await;
    let mut sessions = server.client().await;
    let mut client = events_client(&server).await;
    let mut by_user = watch(
        &mut client,
        None,
        pb::EventFilter {
            tenant_id: "a".into(),
            user_id: "u1".into(),
            event_types: vec![],
        },
    )
    .await;
    let mut revokes_in_b = watch(
        &mut client,
        None,
        pb::EventFilter {
            tenant_id: "b".into(),
            user_id: String::new(),
            event_types: vec![pb::EventType::Revoked as i32],
        },
    )
    .await;
    let a1 = create(&mut sessions, "a", "u1").await;
    create(&mut sessions, "a", "u2").await;
    let b1 = create(&mut sessions, "b", "u1").await;
    let r = sessions
        .revoke_user_sessions(pb::RevokeUserSessionsRequest {
            tenant_id: "b".into(),
            user_id: "u1".into(),
            except_session_id: String::new(),
            reason: 0,
        })
        .await
        .expect("revoke")
        .into_inner();
    let last = create(&mut sessions, "a", "u1").await;

    assert_eq!(next_event(&mut by_user).await.sequence, a1.sequence);
    assert_eq!(next_event(&mut by_user).await.sequence, last.sequence);
    let e = next_event(&mut revokes_in_b).await;
    assert_eq!(e.sequence, r.sequence);
    assert_eq!(e.session_id, b1.session.expect("s").session_id);
    assert_quiet_until(&mut revokes_in_b, last.sequence).await;

    // Bad filters are refused by field.
    for (filter, field) in [
        (
            pb::EventFilter {
                user_id: "u1".into(),
                ..Default::default()
            },
            "filter.user_id",
        ),
        (
            pb::EventFilter {
                event_types: vec![0],
                ..Default::default()
            },
            "filter.event_types",
        ),
        (
            pb::EventFilter {
                event_types: vec![42],
                ..Default::default()
            },
            "filter.event_types",
        ),
    ] {
        let err = client
            .watch_events(pb::WatchEventsRequest {
                announce_live: false,
                log_epoch: None,
                after_sequence: None,
                filter: Some(filter),
            })
            .await
            .expect_err("refused");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
}

#[tokio::test]
async fn resuming_after_a_disconnect_delivers_every_event_once_in_order() {
    let server = TestServer::start().await;
    let mut sessions = server.client().await;
    let mut client = events_client(&server).await;
    let mut expected = Vec::new();
    for i in 0..10 {
        expected.push(create(&mut sessions, "t", &format!("u{i}")).await.sequence);
    }
    let mut stream = watch(&mut client, Some(0), Default::default()).await;
    let mut received = Vec::new();
    for _ in 0..4 {
        received.push(next_event(&mut stream).await.sequence);
    }
    drop(stream);
    for i in 10..25 {
        expected.push(create(&mut sessions, "t", &format!("u{i}")).await.sequence);
    }
    let last = *received.last().expect("some");
    let mut stream = watch(&mut client, Some(last), Default::default()).await;
    // Writes continue while the resumed stream switches from the log to live.
    let writer = {
        let mut sessions = sessions.clone();
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 25..60 {
                seqs.push(create(&mut sessions, "t", &format!("u{i}")).await.sequence);
            }
            seqs
        })
    };
    while received.len() < 60 {
        received.push(next_event(&mut stream).await.sequence);
    }
    expected.extend(writer.await.expect("writer"));
    assert_eq!(received, expected);
    assert!(
        received.windows(2).all(|w| w[1] == w[0] + 1),
        "no holes, no repeats"
    );
}

#[tokio::test]
async fn subscribers_resume_across_a_restart() {
    let server = TestServer::start().await;
    let mut sessions = server.client().await;
    let first = create(&mut sessions, "t", "u").await;
    let mut stream = watch(
        &mut events_client(&server).await,
        Some(0),
        Default::default(),
    )
    .await;
    assert_eq!(next_event(&mut stream).await.sequence, first.sequence);
    // Graceful shutdown ends the stream with UNAVAILABLE naming the resume point.
    let ending = tokio::spawn(async move {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("stream ended without a status"),
                Err(status) => return status,
            }
        }
    });
    drop(sessions);
    let server = server.restart().await;
    let status = ending.await.expect("stream task");
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("after_sequence=1"),
        "{}",
        status.message()
    );

    let mut sessions = server.client().await;
    let second = create(&mut sessions, "t", "u2").await;
    assert_eq!(second.sequence, first.sequence + 1);
    let mut stream = watch(
        &mut events_client(&server).await,
        Some(first.sequence),
        Default::default(),
    )
    .await;
    assert_eq!(next_event(&mut stream).await.sequence, second.sequence);
}

#[tokio::test]
async fn cursors_outside_the_kept_log_get_out_of_range_with_the_oldest_sequence() {
    let server = TestServer::start_with(Config {
        event_retention_count: 5,
        ..test_config()
    })
    .await;
    let mut sessions = server.client().await;
    let mut last = 0;
    for i in 0..20 {
        last = create(&mut sessions, "t", &format!("u{i}")).await.sequence;
    }
    let mut client = events_client(&server).await;
    // The sweeper prunes to the newest 5 events: 16..=20 (a cursor of 14 would need 15).
    eventually("log pruned to 5 events", || {
        let mut client = client.clone();
        async move {
            client
                .watch_events(pb::WatchEventsRequest {
                    announce_live: false,
                    log_epoch: None,
                    after_sequence: Some(14),
                    filter: None,
                })
                .await
                .is_err()
        }
    })
    .await;
    let err = client
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: Some(3),
            filter: None,
        })
        .await
        .expect_err("pruned");
    assert_eq!(err.code(), Code::OutOfRange);
    assert!(
        err.message().contains("oldest kept 16"),
        "{}",
        err.message()
    );
    assert_eq!(
        err.metadata()
            .get("oldest-sequence")
            .and_then(|v| v.to_str().ok()),
        Some("16")
    );
    // The oldest kept cursor still works, and so does the head.
    let mut stream = watch(&mut client, Some(15), Default::default()).await;
    assert_eq!(next_event(&mut stream).await.sequence, 16);
    let mut at_head = watch(&mut client, Some(last), Default::default()).await;
    let next = create(&mut sessions, "t", "late").await;
    assert_eq!(next_event(&mut at_head).await.sequence, next.sequence);
    // Beyond the head (e.g. a store restored from an older backup).
    let err = client
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: Some(1000),
            filter: None,
        })
        .await
        .expect_err("future cursor");
    assert_eq!(err.code(), Code::OutOfRange);
}

#[tokio::test]
async fn idle_streams_receive_heartbeats_with_the_head() {
    let server = TestServer::start_with(fast_heartbeats()).await;
    let mut sessions = server.client().await;
    let last = create(&mut sessions, "t", "u").await;
    let mut stream = watch(
        &mut events_client(&server).await,
        None,
        pb::EventFilter {
            tenant_id: "nobody".into(),
            ..Default::default()
        },
    )
    .await;
    let item = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("heartbeat in time")
        .expect("ok")
        .expect("open");
    match item.message {
        Some(Message::Heartbeat(h)) => {
            assert_eq!(h.head_sequence, last.sequence);
            assert_eq!(h.delivered_through, last.sequence);
            assert!(h.sent_at.is_some());
        }
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    // Filtered-out traffic does not suppress heartbeats, and they report progress through it.
    let other = create(&mut sessions, "t", "u2").await;
    assert_quiet_until(&mut stream, other.sequence).await;
}

#[tokio::test]
async fn a_stalled_subscriber_blocks_nobody_and_later_gets_everything_in_order() {
    let server = TestServer::start_with(Config {
        // A small fan-out buffer, so the stalled subscriber falls far behind it.
        event_buffer: 64,
        max_sessions_per_user: 10_000,
        ..test_config()
    })
    .await;
    let mut client = events_client(&server).await;
    let mut stalled = watch(&mut client, None, Default::default()).await;
    let mut live = watch(&mut client, None, Default::default()).await;

    // 10,000 events from 16 concurrent writers while `stalled` reads nothing.
    let sessions = server.client().await;
    let mut writers = Vec::new();
    for w in 0..16 {
        let mut s = sessions.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..625 {
                create(&mut s, "t", &format!("w{w}-{}", i % 50)).await;
            }
        }));
    }
    // The live subscriber keeps up while the stalled one is stuck.
    let mut seen = 0;
    while seen < 10_000 {
        next_event(&mut live).await;
        seen += 1;
    }
    for w in writers {
        w.await
            .expect("writers finish while a subscriber is stalled");
    }
    let mut expected = 1;
    while expected <= 10_000 {
        let e = next_event(&mut stalled).await;
        assert_eq!(e.sequence, expected, "in order, nothing dropped");
        expected += 1;
    }
}

#[tokio::test]
async fn a_thousand_subscribers_each_receive_every_event() {
    let server = TestServer::start().await;
    let mut channels = Vec::new();
    for _ in 0..10 {
        channels.push(server.channel().await);
    }
    let mut streams = Vec::new();
    for i in 0..1000 {
        let mut client = EventServiceClient::new(channels[i % channels.len()].clone());
        streams.push(watch(&mut client, Some(0), Default::default()).await);
    }
    let mut sessions = server.client().await;
    let mut expected = Vec::new();
    for i in 0..20 {
        expected.push(create(&mut sessions, "t", &format!("u{i}")).await.sequence);
    }
    let mut readers = Vec::new();
    for mut stream in streams {
        let n = expected.len();
        readers.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                got.push(next_event(&mut stream).await.sequence);
            }
            got
        }));
    }
    for r in readers {
        assert_eq!(r.await.expect("reader"), expected);
    }
}

#[tokio::test]
async fn events_older_than_the_retention_age_are_pruned() {
    let server = TestServer::start_with(Config {
        event_retention_age: Duration::from_secs(3600),
        ..test_config()
    })
    .await;
    let mut sessions = server.client().await;
    for i in 0..5 {
        create(&mut sessions, "t", &format!("old{i}")).await;
    }
    server.advance(Duration::from_secs(2 * 3600));
    let recent = create(&mut sessions, "t", "recent").await;
    let mut client = events_client(&server).await;
    eventually("old events pruned by age", || {
        let mut client = client.clone();
        async move {
            client
                .watch_events(pb::WatchEventsRequest {
                    announce_live: false,
                    log_epoch: None,
                    after_sequence: Some(0),
                    filter: None,
                })
                .await
                .is_err()
        }
    })
    .await;
    let err = client
        .watch_events(pb::WatchEventsRequest {
            announce_live: false,
            log_epoch: None,
            after_sequence: Some(0),
            filter: None,
        })
        .await
        .expect_err("pruned");
    assert_eq!(err.code(), Code::OutOfRange);
    // Events younger than the retention age are all still there, in order. (The 5 old sessions
    // also expired at the sweep, after `recent`.)
    let mut stream = watch(&mut client, Some(recent.sequence - 1), Default::default()).await;
    assert_eq!(next_event(&mut stream).await.sequence, recent.sequence);
}

#[tokio::test]
async fn the_sequence_continues_after_pruning_empties_the_log_and_a_restart() {
    let server = TestServer::start_with(Config {
        event_retention_age: Duration::from_secs(3600),
        ..test_config()
    })
    .await;
    let mut sessions = server.client().await;
    let mut last = 0;
    for i in 0..3 {
        let s = create(&mut sessions, "t", &format!("u{i}")).await;
        last = sessions
            .revoke_session(pb::RevokeSessionRequest {
                session_id: s.session.expect("s").session_id,
                reason: 0,
            })
            .await
            .expect("revoke")
            .into_inner()
            .sequence;
    }
    assert_eq!(last, 6);
    // Two hours later every event is older than the retention: the log empties.
    server.advance(Duration::from_secs(2 * 3600));
    let client = events_client(&server).await;
    eventually("log pruned empty", || {
        let mut client = client.clone();
        async move {
            match client
                .watch_events(pb::WatchEventsRequest {
                    announce_live: false,
                    log_epoch: None,
                    after_sequence: Some(0),
                    filter: None,
                })
                .await
            {
                Err(status) => {
                    status
                        .metadata()
                        .get("oldest-sequence")
                        .and_then(|v| v.to_str().ok())
                        == Some("7")
                }
                Ok(_) => false,
            }
        }
    })
    .await;
    drop(sessions);
    let server = server.restart().await;
    let mut sessions = server.client().await;
    assert_eq!(
        create(&mut sessions, "t", "after").await.sequence,
        7,
        "no sequence reused"
    );
}

/// The next item, whatever it is.
async fn next_item(stream: &mut Events) -> Message {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("an item within 10 s")
        .expect("stream ok")
        .expect("stream open")
        .message
        .expect("item has a message")
}

#[tokio::test]
async fn announce_live_heartbeats_once_the_replay_reaches_the_head() {
    // Default heartbeats (15 s): any heartbeat seen within the test is the announcement.
    let server = TestServer::start().await;
    let mut sessions = server.client().await;
    let mut last = 0;
    for i in 0..3 {
        last = create(&mut sessions, "t", &format!("u{i}")).await.sequence;
    }
    let mut client = events_client(&server).await;
    let request = |after| pb::WatchEventsRequest {
        after_sequence: after,
        filter: None,
        announce_live: true,
        log_epoch: None,
    };
    // Replay first, then the announcement with the cursor at the head.
    let mut stream = client
        .watch_events(request(Some(0)))
        .await
        .expect("watch")
        .into_inner();
    for expected in 1..=last {
        match next_item(&mut stream).await {
            Message::Event(e) => assert_eq!(e.sequence, expected),
            other => panic!("expected event {expected}, got {other:?}"),
        }
    }
    match next_item(&mut stream).await {
        Message::Heartbeat(h) => {
            assert_eq!(h.delivered_through, last);
            assert_eq!(h.head_sequence, last);
        }
        other => panic!("expected the announcement, got {other:?}"),
    }
    // From the head: the announcement comes at once and carries the cursor.
    let mut stream = client
        .watch_events(request(None))
        .await
        .expect("watch")
        .into_inner();
    match next_item(&mut stream).await {
        Message::Heartbeat(h) => assert_eq!(h.delivered_through, last),
        other => panic!("expected the announcement, got {other:?}"),
    }
    // Then events as usual, and no second announcement.
    let next = create(&mut sessions, "t", "late").await.sequence;
    match next_item(&mut stream).await {
        Message::Event(e) => assert_eq!(e.sequence, next),
        other => panic!("expected event {next}, got {other:?}"),
    }
}
