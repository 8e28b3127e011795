//! The comparison a user would otherwise pick: sessions as Redis hashes. Validate is one `HGETALL`;
//! create is `HSET` + `SADD` to the user's set + `EXPIRE` in a `MULTI`, with `appendfsync always`
//! so that, like the service, Redis acknowledges only what is on disk.

use std::{
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;

use crate::Error;

/// `redis-server` as a child process on a loopback port and a temporary directory; killed on drop.
pub struct OwnRedis {
    pub addr: SocketAddr,
    _child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    pub async fn start() -> Result<Self, Error> {
        let dir = tempfile::tempdir()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let child = tokio::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .arg("--dir")
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always", "--save", ""])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                format!("cannot start redis-server ({e}); install it with `apt-get install redis-server`")
            })?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(mut c) = connect(addr).await {
                if redis::cmd("PING")
                    .query_async::<String>(&mut c)
                    .await
                    .is_ok()
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err("redis-server did not answer within 10 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(OwnRedis {
            addr,
            _child: child,
            _dir: dir,
        })
    }
}

async fn connect(addr: SocketAddr) -> Result<MultiplexedConnection, Error> {
    let client = redis::Client::open(format!("redis://{addr}/"))?;
    Ok(client.get_multiplexed_async_connection().await?)
}

/// `n` connections; each multiplexes its callers' commands, as an HTTP/2 channel does.
pub async fn connections(addr: SocketAddr, n: usize) -> Result<Vec<MultiplexedConnection>, Error> {
    let mut all = Vec::with_capacity(n);
    for _ in 0..n {
        all.push(connect(addr).await?);
    }
    Ok(all)
}

/// What the service keeps per session, roughly: ids, times, flags, the token's hash, the device.
fn fields(i: usize) -> Vec<(&'static str, String)> {
    vec![
        ("tenant_id", "bench".into()),
        ("user_id", format!("user-{i}")),
        ("created_at", "1767225600000".into()),
        ("last_seen_at", "1767225600000".into()),
        ("idle_expires_at", "1767227400000".into()),
        ("absolute_expires_at", "1767268800000".into()),
        ("remember_me", "0".into()),
        ("token_sha256", format!("{i:064x}")),
        ("user_agent", "Mozilla/5.0 (X11; Linux x86_64) bench".into()),
        ("ip", "203.0.113.7".into()),
        ("country", "GB".into()),
        ("rotation_count", "0".into()),
    ]
}

/// Creates one session the way a Redis session store would, durably (`appendfsync always`).
pub async fn create(conn: &mut MultiplexedConnection, i: usize) -> redis::RedisResult<()> {
    let id = format!("{i:032x}");
    redis::pipe()
        .atomic()
        .hset_multiple(format!("session:{id}"), &fields(i))
        .ignore()
        .sadd(format!("user:bench:user-{i}"), &id)
        .ignore()
        .expire(format!("session:{id}"), 1800)
        .ignore()
        .query_async(conn)
        .await
}

/// The validate pool: `n` sessions, keyed as `create` keys them.
pub async fn preload(conn: &mut MultiplexedConnection, n: usize) -> Result<Vec<String>, Error> {
    let base = 1 << 40;
    for chunk in (0..n).collect::<Vec<_>>().chunks(500) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.hset_multiple(format!("session:{:032x}", base + i), &fields(i))
                .ignore();
        }
        pipe.query_async::<()>(conn).await?;
    }
    Ok((0..n)
        .map(|i| format!("session:{:032x}", base + i))
        .collect())
}

/// One `HGETALL`; an empty hash (unknown session) counts as an error, as it would for a caller.
pub async fn validate(conn: &mut MultiplexedConnection, key: &str) -> Result<(), String> {
    let fields: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(key)
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    if fields.is_empty() {
        return Err(format!("{key} is missing"));
    }
    Ok(())
}
