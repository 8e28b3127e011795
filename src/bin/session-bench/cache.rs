//! `cache`: the Rust client's `CachedValidator`. Validations per second answered from memory on
//! one core, and the time from a revoke to the cache dropping the session.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use session_authority::proto::v1 as pb;
use session_authority_client::{CacheConfig, CachedValidator, Client, Eviction};
use tonic::transport::Channel;

use crate::{fmt_ms, make_pool, percentile, Error};

pub async fn run(
    addr: SocketAddr,
    channels: &[Channel],
    pool: usize,
    seconds: f64,
    revokes: usize,
) -> Result<(), Error> {
    let client = Client::connect(&format!("http://{addr}"), None).await?;
    let validator = Arc::new(CachedValidator::start(
        client.clone(),
        CacheConfig::default(),
    ));
    tokio::time::timeout(Duration::from_secs(10), validator.ready())
        .await
        .map_err(|_| "the cache's event stream did not go live within 10 s")?;
    let tokens = Arc::new(make_pool(channels, pool).await?);
    for token in tokens.iter() {
        validator.validate(token).await?;
    }
    hits_on_one_core(validator.clone(), tokens, seconds)?;
    revoke_to_eviction(&client, &validator, revokes).await
}

/// A current-thread runtime on a thread of its own: what one core answers from memory.
fn hits_on_one_core(
    validator: Arc<CachedValidator>,
    tokens: Arc<Vec<String>>,
    seconds: f64,
) -> Result<(), Error> {
    let (count, misses, mut latencies, elapsed) = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    let before = validator.stats().misses;
                    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
                    let start = Instant::now();
                    let mut latencies = Vec::with_capacity(1 << 20);
                    let mut i = 0usize;
                    // The token's index, cycled by hand: a division per call would be a
                    // tenth of the hit it measures.
                    let mut next = 0usize;
                    while i % 1024 != 0 || Instant::now() < deadline {
                        // Every 16th call is timed, so that reading the clock (about as long
                        // as a hit) does not halve the rate measured.
                        let timed = (i % 16 == 0).then(Instant::now);
                        validator.validate(&tokens[next]).await?;
                        if let Some(t) = timed {
                            latencies.push(t.elapsed());
                        }
                        i += 1;
                        next += 1;
                        if next == tokens.len() {
                            next = 0;
                        }
                    }
                    let misses = validator.stats().misses - before;
                    Ok::<_, Error>((i, misses, latencies, start.elapsed()))
                })
            })
            .join()
            .map_err(|_| Error::from("the measuring thread panicked"))?
    })?;
    latencies.sort_unstable();
    println!(
        "scenario=cache-hit threads=1 sessions={} seconds={:.1} calls_per_sec={:.0} p50={:.2}us p99={:.2}us misses={misses}",
        tokens.len(),
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e6,
        percentile(&latencies, 0.99).as_secs_f64() * 1e6,
    );
    Ok(())
}

/// Revokes cached sessions one at a time; for each, the time from the request and from its reply
/// until the cache has dropped the session.
async fn revoke_to_eviction(
    client: &Client,
    validator: &CachedValidator,
    revokes: usize,
) -> Result<(), Error> {
    let mut from_request = Vec::with_capacity(revokes);
    let mut from_reply = Vec::with_capacity(revokes);
    for i in 0..revokes {
        let created = client.create("bench", &format!("evict-{i}"), false).await?;
        validator.validate(&created.token).await?;
        let id = created.session.session_id;
        let mut evictions = validator.evictions();
        let sent = Instant::now();
        client.revoke(&id, pb::RevokeReason::Admin).await?;
        let replied = Instant::now();
        loop {
            let eviction = tokio::time::timeout(Duration::from_secs(5), evictions.recv())
                .await
                .map_err(|_| "no eviction within 5 s")??;
            if matches!(&eviction, Eviction::Session { session_id, .. } if *session_id == id) {
                break;
            }
        }
        let evicted = Instant::now();
        from_request.push(evicted - sent);
        from_reply.push(evicted.saturating_duration_since(replied));
        if validator.validate(&created.token).await.is_ok() {
            return Err("a revoked session still validated after its eviction".into());
        }
    }
    from_request.sort_unstable();
    from_reply.sort_unstable();
    println!(
        "scenario=cache-eviction revokes={revokes} from_reply_p50={} from_reply_p99={} from_reply_max={} from_request_p50={} from_request_p99={}",
        fmt_ms(percentile(&from_reply, 0.50)),
        fmt_ms(percentile(&from_reply, 0.99)),
        fmt_ms(*from_reply.last().unwrap_or(&Duration::ZERO)),
        fmt_ms(percentile(&from_request, 0.50)),
        fmt_ms(percentile(&from_request, 0.99)),
    );
    Ok(())
}
