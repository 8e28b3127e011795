//! A real etcd cluster on loopback for the etcd backend's tests: members of the static etcd 3.7.2
//! that the `etcd-bin-vendored` crate ships (`store::etcd::local` runs them).

#![allow(dead_code)]

use std::path::PathBuf;

use session_authority::store::etcd::local::LocalCluster;
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

/// A cluster of the vetted etcd.
pub struct EtcdCluster(LocalCluster);

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster has a leader.
    pub fn start(n: usize) -> Self {
        Self(LocalCluster::start(&etcd_binary(), n, None).expect("start etcd"))
    }

    /// Starts `n` members whose backends are full past `bytes` (`--quota-backend-bytes`).
    pub fn start_with_quota(n: usize, bytes: u64) -> Self {
        Self(LocalCluster::start(&etcd_binary(), n, Some(bytes)).expect("start etcd"))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.0.endpoints()
    }

    /// Kills member `i` (SIGKILL); its data stays for `restart`.
    pub fn kill(&mut self, i: usize) {
        self.0.kill(i)
    }

    pub fn restart(&mut self, i: usize) {
        self.0.restart(i).expect("restart etcd")
    }
}
