//! A real etcd cluster on loopback for the etcd backend's tests: members of the static etcd 3.7.2
//! that the `etcd-bin-vendored` crate ships, each with its own data directory and ports.

#![allow(dead_code)]

use std::{
    net::TcpListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

/// SHA-256 of the etcd binary that `etcd-bin-vendored-linux-amd64` 3.7.2 ships, as vetted when
/// it was adopted (`etcd --version`: 3.7.2, git 68c065e). A changed file fails every etcd test.
const ETCD_SHA256: &str = "7a0c00e4ee33bea9bdec0c8abd771ef4e1685deb134a17cf58c11985d2fe51ca";

/// The etcd binary, after checking it is the one vetted.
pub fn etcd_binary() -> PathBuf {
    let path = etcd_bin_vendored::etcd_bin_path().expect("etcd is shipped for this platform");
    let bytes = std::fs::read(path).expect("read the etcd binary");
    let digest = hex::encode(Sha256::digest(&bytes));
    if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
        assert_eq!(
            digest,
            ETCD_SHA256,
            "{} is not the etcd binary vetted",
            path.display()
        );
    }
    path.to_path_buf()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

pub struct Member {
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

/// Members that live as long as the value; dropped, they are killed.
pub struct EtcdCluster {
    pub members: Vec<Member>,
    initial_cluster: String,
    token: String,
    quota_bytes: Option<u64>,
    _dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader.
    pub fn start(n: usize) -> Self {
        Self::start_with(n, None)
    }

    /// As `start`, with `--quota-backend-bytes`.
    pub fn start_with(n: usize, quota_bytes: Option<u64>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                dir: dir.path().join(format!("m{i}")),
                child: None,
            })
            .collect();
        let initial_cluster = members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Self {
            members,
            initial_cluster,
            token: format!("t{}", free_port()),
            quota_bytes,
            _dir: dir,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        cluster.wait_healthy();
        cluster
    }

    fn spawn(&mut self, i: usize) {
        let binary = etcd_binary();
        let m = &mut self.members[i];
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let mut cmd = Command::new(binary);
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
            .args(["--initial-cluster-state", "new"])
            .args([
                "--log-level",
                "error",
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(q) = self.quota_bytes {
            cmd.arg(format!("--quota-backend-bytes={q}"));
        }
        m.child = Some(cmd.spawn().expect("start etcd"));
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

    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Waits until a member answers `/health` with a leader.
    pub fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if self
                .members
                .iter()
                .any(|m| m.child.is_some() && healthy(m.client_port))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd cluster not healthy within 30 s");
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

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
