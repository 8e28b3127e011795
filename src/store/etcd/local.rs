//! A throwaway etcd cluster on loopback: members of a given etcd binary, each with its own data
//! directory and ports, killed when the value is dropped. For tests, `session-bench` and trying a
//! cluster on one machine; never for production (no TLS, data in a temporary directory).

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Members that live as long as the value.
pub struct LocalCluster {
    binary: PathBuf,
    members: Vec<Member>,
    initial_cluster: String,
    token: String,
    quota_bytes: Option<u64>,
    _dir: tempfile::TempDir,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl LocalCluster {
    /// Starts `n` members of `binary` (with `--quota-backend-bytes` if given) and waits until
    /// the cluster has a leader. A start that fails is tried again on fresh ports, up to three
    /// times: a port is free when picked but may be taken before etcd binds it (tests start
    /// many clusters and servers at once), and the member then exits at once.
    pub fn start(binary: &Path, n: usize, quota_bytes: Option<u64>) -> std::io::Result<Self> {
        let mut attempt = 1;
        loop {
            match Self::start_once(binary, n, quota_bytes) {
                Err(e) if attempt < 3 => {
                    tracing::warn!(error = %e, attempt, "local etcd did not start; trying new ports");
                    attempt += 1;
                }
                started => return started,
            }
        }
    }

    fn start_once(binary: &Path, n: usize, quota_bytes: Option<u64>) -> std::io::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut members = Vec::new();
        for i in 0..n {
            members.push(Member {
                name: format!("m{i}"),
                client_port: free_port()?,
                peer_port: free_port()?,
                dir: dir.path().join(format!("m{i}")),
                child: None,
            });
        }
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            binary: binary.to_path_buf(),
            members,
            initial_cluster,
            token: format!("local-{}", free_port()?),
            quota_bytes,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i)?;
        }
        // Every member, not a quorum: a member whose port was taken exits at once, and a cluster
        // missing it would serve until a call that needs each member (a defragment) failed.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !cluster.members.iter().all(|m| healthy(m.client_port)) {
            if cluster.members_exited() > 0 {
                return Err(std::io::Error::other("etcd members exited at start"));
            }
            if Instant::now() >= deadline {
                return Err(std::io::Error::other("etcd cluster not healthy in time"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(cluster)
    }

    /// How many members were started and have exited since.
    fn members_exited(&mut self) -> usize {
        self.members
            .iter_mut()
            .filter_map(|m| m.child.as_mut())
            .map(|c| c.try_wait())
            .filter(|exited| matches!(exited, Ok(Some(_))))
            .count()
    }

    fn spawn(&mut self, i: usize) -> std::io::Result<()> {
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.dir)
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &self.initial_cluster])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new", "--log-level", "error"])
            // Loopback: elect in half a second rather than the WAN defaults.
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(q) = self.quota_bytes {
            cmd.arg(format!("--quota-backend-bytes={q}"));
        }
        m.child = Some(cmd.spawn()?);
        Ok(())
    }

    /// `http://127.0.0.1:port` of every member, for `etcd_endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    /// Kills member `i` (SIGKILL); its data stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again on its data.
    pub fn restart(&mut self, i: usize) -> std::io::Result<()> {
        self.spawn(i)
    }

    /// Waits until a running member answers `/health` with a leader.
    pub fn wait_healthy(&self, limit: Duration) -> std::io::Result<()> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self
                .members
                .iter()
                .any(|m| m.child.is_some() && healthy(m.client_port))
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(std::io::Error::other("etcd cluster not healthy in time"))
    }
}

fn healthy(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    reply.contains("\"health\":\"true\"")
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// An etcd binary to run locally: `$ETCD_BIN`, else `etcd` on the `PATH`, else the static etcd
/// that the `etcd-bin-vendored` crate (a dev-dependency) put in cargo's registry.
pub fn find_etcd() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ETCD_BIN") {
        return Some(PathBuf::from(p));
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let candidate = dir.join("etcd");
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))?;
    // The registry holds the crate of every platform that Cargo.lock names: take this one's.
    let platform = match (std::env::consts::OS, std::env::consts::ARCH) {
        ("linux", "x86_64") => "linux-amd64",
        ("linux", "aarch64") => "linux-arm64",
        ("linux", "powerpc64") => "linux-ppc64le",
        ("linux", "s390x") => "linux-s390x",
        ("macos", "x86_64") => "darwin-amd64",
        ("macos", "aarch64") => "darwin-arm64",
        _ => return None,
    };
    let wanted = format!("etcd-bin-vendored-{platform}-");
    let registry = std::fs::read_dir(home.join("registry/src")).ok()?;
    for index in registry.flatten() {
        let Ok(crates) = std::fs::read_dir(index.path()) else {
            continue;
        };
        for krate in crates.flatten() {
            let name = krate.file_name().to_string_lossy().into_owned();
            if name.starts_with(&wanted) {
                let candidate = krate.path().join("bin/etcd");
                if candidate.is_file() {
                    return Some(candidate);
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Members that die at start (here a binary that exits at once, as etcd does when its port
    /// was taken) are noticed as such, and not waited for.
    #[test]
    fn members_that_exit_at_start_are_reported_not_waited_for() {
        let Err(e) = LocalCluster::start(Path::new("/bin/false"), 1, None) else {
            panic!("a cluster of /bin/false started");
        };
        assert!(e.to_string().contains("exited at start"), "{e}");
    }

    /// One member of three dies at start (its port taken, say) while the other two elect a
    /// leader: the cluster is not handed out with a member missing.
    #[cfg(unix)]
    #[test]
    fn a_cluster_is_started_whole_or_not_at_all() {
        use std::os::unix::fs::PermissionsExt;
        let etcd = find_etcd().expect("an etcd binary");
        let dir = tempfile::tempdir().expect("tempdir");
        let script = dir.path().join("etcd-but-m1");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\ncase \"$*\" in *\"--name m1 \"*) exit 1;; esac\nexec '{}' \"$@\"\n",
                etcd.display()
            ),
        )
        .expect("write the script");
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let Err(e) = LocalCluster::start(&script, 3, None) else {
            panic!("a cluster with a dead member was handed out");
        };
        assert!(e.to_string().contains("exited at start"), "{e}");
    }
}
