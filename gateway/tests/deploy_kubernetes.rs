//! The Kubernetes manifests under `deploy/kubernetes` pass their offline validation
//! (`deploy/kubernetes/validate.sh`: kustomize renders the base and every overlay, each object
//! is checked against the Kubernetes API schemas and the prometheus-operator CRDs, then the
//! gateway's own rules), and a copy of them with broken fields fails it, every break named in
//! the report.
//!
//! Needs kubectl (or kustomize) and the Python packages in `deploy/kubernetes/requirements.txt`;
//! `scripts/test.sh` installs them.

mod common;

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::edge::{describe, repo_root};
use common::temp_dir;

/// Runs a copy of `validate.sh` (it checks the tree it sits in).
fn validate(script: &Path) -> Output {
    Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("run deploy/kubernetes/validate.sh")
}

fn copy_tree(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create a directory in the copy");
    for entry in fs::read_dir(from).expect("read a directory of the tree") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Replaces the one occurrence of `old` in `file` with `new`.
fn break_file(file: &Path, old: &str, new: &str) {
    let text = fs::read_to_string(file).expect("read a manifest");
    assert_eq!(
        text.matches(old).count(),
        1,
        "{old:?} occurs once in {}",
        file.display()
    );
    fs::write(file, text.replacen(old, new, 1)).expect("write a manifest");
}

#[test]
fn the_shipped_kubernetes_manifests_pass_validation() {
    let output = validate(&repo_root().join("deploy/kubernetes/validate.sh"));
    assert!(
        output.status.success(),
        "deploy/kubernetes/validate.sh failed: {}",
        describe(&output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "kustomize build base",
        "kustomize build overlays/single-redis",
        "kustomize build overlays/redis-cluster",
        "kustomize build overlays/redis-sentinel",
        "ok    schemas:",
        "kubernetes validate: all checks passed",
    ] {
        assert!(
            stdout.contains(expected),
            "the report says {expected:?}: {}",
            describe(&output)
        );
    }
}

#[test]
fn broken_manifests_fail_validation_and_each_break_is_reported() {
    let dir = temp_dir("k8s-validate");
    let deploy = dir.path().join("deploy");
    for part in ["kubernetes", "prometheus"] {
        copy_tree(&repo_root().join("deploy").join(part), &deploy.join(part));
    }
    // The ConfigMap is checked against the variables the gateway's sources declare.
    copy_tree(
        &repo_root().join("gateway/src"),
        &dir.path().join("gateway/src"),
    );
    let kube = deploy.join("kubernetes");

    // (file, text, replacement, what the report must say about it)
    let breaks = [
        // A wrong type in a core object.
        (
            "base/deployment.yaml",
            "terminationGracePeriodSeconds: 30",
            "terminationGracePeriodSeconds: \"thirty\"",
            "spec.template.spec.terminationGracePeriodSeconds: 'thirty' is not of type 'integer'",
        ),
        // A field the Kubernetes API does not know.
        (
            "base/service.yaml",
            "  type: ClusterIP\n",
            "  type: ClusterIP\n  sessionAffinityy: None\n",
            "Service/chat-gateway: did not validate: Kubernetes 1.30.0: spec: Additional properties are not allowed ('sessionAffinityy' was unexpected)",
        ),
        // A required field missing.
        (
            "base/horizontalpodautoscaler.yaml",
            "  maxReplicas: 12\n",
            "",
            "HorizontalPodAutoscaler/chat-gateway: did not validate: Kubernetes 1.30.0: spec: 'maxReplicas' is a required property",
        ),
        // A field the ServiceMonitor CRD does not know.
        (
            "base/servicemonitor.yaml",
            "      scrapeTimeout: 10s\n",
            "      scrapeTimeoutt: 10s\n",
            "ServiceMonitor/chat-gateway: did not validate: spec.endpoints[0].scrapeTimeoutt: unknown field",
        ),
        // A value the PrometheusRule CRD refuses (and the rules no longer match alerts.yml).
        (
            "base/prometheusrule.yaml",
            "    - alert: ChatGatewayNodeDown\n      expr: up{job=\"chat-gateway\"} == 0\n      for: 1m\n",
            "    - alert: ChatGatewayNodeDown\n      expr: up{job=\"chat-gateway\"} == 0\n      for: soon\n",
            "PrometheusRule/chat-gateway: did not validate: spec.groups.0.rules.0.for: String should match pattern",
        ),
        // A wrong type in an object only one overlay has.
        (
            "overlays/single-redis/redis.yaml",
            "  serviceName: redis\n",
            "  serviceName: 42\n",
            "overlays/single-redis StatefulSet/redis: did not validate: Kubernetes 1.30.0: spec.serviceName: 42 is not of type 'string'",
        ),
        // Valid for the API, wrong for the gateway: a setting the gateway does not read.
        (
            "base/kustomization.yaml",
            "      - RUST_LOG=info\n",
            "      - GATEWAY_SHUTDOWN_GRACE_PERIOD=5s\n      - RUST_LOG=info\n",
            "ConfigMap: ['GATEWAY_SHUTDOWN_GRACE_PERIOD']: not a variable the gateway reads",
        ),
        // ... an Ingress that would not pass a not-ready node's 503 on to another pod.
        (
            "base/ingress.yaml",
            "proxy-next-upstream: \"error timeout http_503\"",
            "proxy-next-upstream: \"error timeout\"",
            "Ingress/chat-gateway: proxy-next-upstream must include http_503",
        ),
        // ... and the Ingress publishing /metrics.
        (
            "base/ingress.yaml",
            "          - path: /sse/send\n",
            "          - path: /metrics\n",
            "Ingress/chat-gateway: routes ['/', '/chat-client.js', '/favicon.ico', '/favicon.svg', '/metrics', '/sse', '/ws']",
        ),
    ];
    for (file, old, new, _) in &breaks {
        break_file(&kube.join(file), old, new);
    }

    let output = validate(&kube.join("validate.sh"));
    let report = describe(&output);
    assert!(
        !output.status.success(),
        "validation passed a broken tree: {report}"
    );
    assert!(
        report.contains("kubernetes validate: FAILED"),
        "the report ends in FAILED: {report}"
    );
    for (file, _, _, expected) in &breaks {
        assert!(
            report.contains(expected),
            "the break in {file} is reported as {expected:?}: {report}"
        );
    }
}
