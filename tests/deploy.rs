//! The files in deploy/ are what operators run: they must parse, agree with the server's
//! configuration, and (where the tool exists) pass `systemd-analyze verify`.

use session_authority::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn manifests() -> Vec<Yaml> {
    manifests_of("deploy/kubernetes.yaml")
}

fn manifests_of(path: &str) -> Vec<Yaml> {
    let text = std::fs::read_to_string(path).expect("read manifests");
    YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{path} parses: {e}"))
}

fn of_kind<'a>(docs: &'a [Yaml], kind: &str) -> &'a Yaml {
    docs.iter()
        .find(|d| d["kind"].as_str() == Some(kind))
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes.yaml"))
}

#[test]
fn kubernetes_manifests_parse_and_hold_what_operators_need() {
    let docs = manifests();
    for kind in ["ConfigMap", "Service", "StatefulSet", "PodDisruptionBudget"] {
        of_kind(&docs, kind);
    }
    let container = &of_kind(&docs, "StatefulSet")["spec"]["template"]["spec"]["containers"][0];
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(8081),
            "{probe}"
        );
    }
    // Time to start before liveness counts: a format upgrade of a large store takes minutes.
    let startup = &container["startupProbe"];
    let budget = startup["periodSeconds"].as_i64().unwrap_or(10)
        * startup["failureThreshold"].as_i64().unwrap_or(3);
    assert!(budget >= 300, "startupProbe allows {budget} s");
    assert!(container["resources"]["requests"]["memory"]
        .as_str()
        .is_some());
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"].as_bool(),
        Some(false)
    );
}

#[test]
fn the_shipped_config_is_one_the_server_accepts() {
    let docs = manifests();
    let toml = of_kind(&docs, "ConfigMap")["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write");
    let config = Config::load(["session-authority", "-c", path.to_str().expect("utf-8")])
        .expect("the shipped config loads and validates");
    // Exposed beyond loopback, so it must carry TLS and credentials.
    assert!(!config.listen.ip().is_loopback());
    assert!(config.tls_cert.is_some() && config.auth_enabled());
    assert_eq!(config.health_listen.map(|a| a.port()), Some(8081));
}

#[test]
fn the_replicas_manifests_run_stateless_replicas_on_etcd() {
    let docs = manifests_of("deploy/kubernetes-replicas.yaml");
    for kind in ["ConfigMap", "Service", "Deployment", "PodDisruptionBudget"] {
        of_kind(&docs, kind);
    }
    let spec = &of_kind(&docs, "Deployment")["spec"];
    assert!(
        spec["replicas"].as_i64().unwrap_or(0) >= 2,
        "several replicas"
    );
    let container = &spec["template"]["spec"]["containers"][0];
    for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_i64(),
            Some(8081),
            "{probe}"
        );
    }
    // A disruption budget that lets drains proceed one replica at a time.
    assert_eq!(
        of_kind(&docs, "PodDisruptionBudget")["spec"]["maxUnavailable"].as_i64(),
        Some(1)
    );
    let toml = of_kind(&docs, "ConfigMap")["data"]["config.toml"]
        .as_str()
        .expect("config.toml in the ConfigMap");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("config.toml");
    std::fs::write(&path, toml).expect("write");
    let config = Config::load(["session-authority", "-c", path.to_str().expect("utf-8")])
        .expect("the shipped config loads and validates");
    assert_eq!(config.store, session_authority::config::StoreKind::Etcd);
    assert_eq!(config.etcd_endpoints.len(), 3, "a list in TOML");
    assert!(config.tls_cert.is_some() && config.auth_enabled());
    // The etcd password (from the environment) travels over https only, to members vouched for
    // by the cluster's own CA.
    assert!(config
        .etcd_endpoints
        .iter()
        .all(|e| e.starts_with("https://")));
    assert!(config.etcd_ca_file.is_some());
    let env = container["env"].as_vec().expect("env");
    assert!(env
        .iter()
        .any(|e| e["name"].as_str() == Some("SESSION_AUTHORITY_ETCD_PASSWORD")));
}

#[test]
fn the_try_cluster_script_is_valid_bash() {
    let status = std::process::Command::new("bash")
        .args(["-n", "deploy/try-cluster.sh"])
        .status()
        .expect("bash");
    assert!(status.success());
}

#[test]
fn the_systemd_unit_verifies() {
    let Ok(status) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        eprintln!("SKIPPED the_systemd_unit_verifies: no systemd-analyze here");
        return;
    };
    assert!(status.status.success());
    let unit = std::fs::read_to_string("deploy/session-authority.service").expect("read unit");
    // Verify against the binary just built (the unit names its installed path).
    let binary = env!("CARGO_BIN_EXE_session-authority");
    let dir = tempfile::tempdir().expect("tempdir");
    let copy = dir.path().join("session-authority.service");
    std::fs::write(
        &copy,
        unit.replace("/usr/local/bin/session-authority", binary),
    )
    .expect("write");
    let out = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze: {stderr}"
    );
    assert!(unit.contains("ProtectSystem=strict") && unit.contains("DynamicUser=yes"));
}
