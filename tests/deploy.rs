//! The deployment example (`deploy/`): every `patchflow serve` flag of the Kubernetes manifest
//! parses, and the manifest wires what `deploy/README.md` promises — grpc.health.v1 probes,
//! `/dev/shm` as a memory-backed volume shared with the trainer, the token from a Secret, and
//! metrics scraped.

mod common;

use std::path::Path;

use common::patchflow;

fn manifest() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes/patchflow.yaml");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `args:` list of the container named `name`.
fn container_args(yaml: &str, name: &str) -> Vec<String> {
    let mut lines = yaml
        .lines()
        .skip_while(|l| l.trim() != format!("- name: {name}"))
        .skip(1);
    lines
        .by_ref()
        .position(|l| l.trim() == "args:")
        .unwrap_or_else(|| panic!("container {name} has no args"));
    lines
        .map_while(|l| l.trim().strip_prefix("- ").map(str::to_owned))
        .map(|a| a.trim_matches('"').to_owned())
        .collect()
}

#[test]
fn every_serve_flag_of_the_kubernetes_example_parses() {
    let yaml = manifest();
    let args = container_args(&yaml, "patchflow");
    assert_eq!(args.first().map(String::as_str), Some("serve"), "{args:?}");
    assert!(args.iter().any(|a| a.starts_with("s3://")), "{args:?}");
    // The arguments parse (a usage error exits with 2); the daemon then stops at the token file,
    // which exists only in the pod.
    let out = patchflow().args(&args).output().expect("patchflow runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "usage error: {stderr}");
    assert!(!out.status.success());
    assert!(stderr.contains("/var/run/patchflow/token"), "{stderr}");
}

#[test]
fn the_kubernetes_example_wires_probes_shared_memory_token_and_metrics() {
    let yaml = manifest();
    for needed in [
        "kind: Deployment",
        "readinessProbe:",
        "livenessProbe:",
        "grpc_health_probe -addr=127.0.0.1:50051",
        "medium: Memory",
        "mountPath: /dev/shm",
        "secretName: patchflow-token",
        "--token-file",
        "prometheus.io/scrape: \"true\"",
        "prometheus.io/port: \"9464\"",
        "kind: ServiceMonitor",
    ] {
        assert!(
            yaml.contains(needed),
            "deploy/kubernetes/patchflow.yaml lacks {needed:?}"
        );
    }
    // Both containers mount the shared memory and the token.
    assert_eq!(yaml.matches("{name: shm, mountPath: /dev/shm}").count(), 2);
    assert_eq!(
        yaml.matches("{name: token, mountPath: /var/run/patchflow")
            .count(),
        2
    );
    let trainer = container_args(&yaml, "trainer");
    assert!(
        trainer
            .windows(2)
            .any(|w| w[0] == "--server" && w[1] == "http://127.0.0.1:50051")
    );
    let dockerfile =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/Dockerfile"))
            .unwrap();
    assert!(dockerfile.contains("--bin patchflow") && dockerfile.contains("grpc_health_probe"));
}
