#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests in this directory (run through validate.sh).

1. Renders the base and every overlay with kustomize.
2. Validates every rendered object against the Kubernetes API schemas, strictly: a wrong type,
   a missing required field or a field the API does not know fails. Core objects use the
   kubernetes-validate schemas of the oldest and the newest Kubernetes version checked;
   ServiceMonitor and PrometheusRule use the prometheus-operator CRD models of
   cloudcoil-models-prometheus-operator, plus a check that no field was left unread.
   An object of any other kind fails: nothing is skipped.
3. Checks what the deployment relies on but no schema says (security context, probes,
   ports, what the Ingress and the NetworkPolicy let through, the drain budget, that every
   ConfigMap setting is a variable the gateway reads) and that the PrometheusRule carries
   exactly the groups of deploy/prometheus/alerts.yml.

    validate.py                 check everything
    validate.py --sync-rules    rewrite base/prometheusrule.yaml from alerts.yml, then check

Needs kustomize (or kubectl, whose `kubectl kustomize` is kustomize), and the Python packages
kubernetes-validate and cloudcoil-models-prometheus-operator (scripts/test.sh installs them).
Works without a cluster and without network access.
"""

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
BASE = os.path.join(HERE, "base")
OVERLAYS = os.path.join(HERE, "overlays")
ALERTS = os.path.join(HERE, "..", "prometheus", "alerts.yml")
RULE_FILE = os.path.join(BASE, "prometheusrule.yaml")
GATEWAY_SOURCES = os.path.join(HERE, "..", "..", "gateway", "src")

# The preStop `sleep` handler is on by default from 1.30: the oldest version the manifests
# target. The newest is the newest kubernetes-validate ships.
OLDEST_KUBERNETES = "1.30.0"

PUBLIC_PATHS = {
    "/", "/ws", "/sse", "/sse/send", "/chat-client.js", "/favicon.svg", "/favicon.ico",
}
GATEWAY = "chat-gateway"


class Problems:
    def __init__(self):
        self.items = []

    def add(self, where, message):
        self.items.append(f"{where}: {message}")


def kustomize_command():
    if os.environ.get("KUSTOMIZE"):
        return os.environ["KUSTOMIZE"].split()
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    sys.exit("validate: neither kustomize nor kubectl found (scripts/test.sh installs kubectl)")


def render(directory):
    result = subprocess.run(
        kustomize_command() + [directory], capture_output=True, text=True, timeout=120
    )
    if result.returncode != 0:
        raise RuntimeError(result.stderr.strip() or result.stdout.strip())
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return [doc for doc in yaml.load_all(result.stdout, Loader=loader) if doc]


def name_of(doc):
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


# --- schemas -------------------------------------------------------------------------------


def core_validator():
    import functools

    import kubernetes_validate
    from kubernetes_validate import utils

    # validate() reads and parses the (large) definitions file for every object: parse each
    # schema file once.
    utils.schema_contents = functools.lru_cache(maxsize=None)(utils.schema_contents)
    versions = [OLDEST_KUBERNETES, utils.latest_version()]

    def check(doc):
        errors = []
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except utils.ValidationError as e:
                path = ".".join(str(p) for p in e.path) or "(top)"
                errors.append(f"Kubernetes {version}: {path}: {e.message}")
            except utils.SchemaNotFoundError:
                errors.append(f"Kubernetes {version} has no {doc.get('apiVersion')} {doc.get('kind')}")
        return errors

    return check, versions


def unread_fields(given, parsed, path=""):
    """Keys present in `given` that the model did not keep: fields unknown to the CRD."""
    found = []
    if isinstance(given, dict) and isinstance(parsed, dict):
        for key, value in given.items():
            here = f"{path}.{key}" if path else key
            if key not in parsed:
                found.append(here)
            else:
                found += unread_fields(value, parsed[key], here)
    elif isinstance(given, list) and isinstance(parsed, list):
        for i, (a, b) in enumerate(zip(given, parsed)):
            found += unread_fields(a, b, f"{path}[{i}]")
    return found


def crd_validator():
    import importlib.util

    import cloudcoil.models
    import pydantic

    # The package's __init__ also builds the v1alpha1 models (a second or so): load v1 alone.
    path = os.path.join(cloudcoil.models.__path__[0], "prometheus_operator", "v1.py")
    spec = importlib.util.spec_from_file_location("prometheus_operator_v1", path)
    v1 = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = v1  # pydantic resolves the models' forward references here
    spec.loader.exec_module(v1)

    models = {"ServiceMonitor": v1.ServiceMonitor, "PrometheusRule": v1.PrometheusRule}

    def check(doc):
        model = models.get(doc.get("kind"))
        if model is None or doc.get("apiVersion") != "monitoring.coreos.com/v1":
            return [f"no schema for {doc.get('apiVersion')} {doc.get('kind')}"]
        try:
            parsed = model.model_validate(doc)
        except pydantic.ValidationError as e:
            return [
                f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
            ]
        dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return [f"{field}: unknown field" for field in unread_fields(doc, dumped)]

    return check


def validate_schemas(rendered, problems):
    core, versions = core_validator()
    crd = crd_validator()
    count = 0
    for label, docs in rendered.items():
        for doc in docs:
            check = crd if doc.get("apiVersion", "").startswith("monitoring.coreos.com/") else core
            for error in check(doc):
                problems.add(f"{label} {name_of(doc)}", f"did not validate: {error}")
            count += 1
    return count, versions


# --- what no schema says -----------------------------------------------------------------


def find(docs, kind, name=GATEWAY):
    for doc in docs:
        if doc.get("kind") == kind and doc["metadata"]["name"] == name:
            return doc
    return None


def duration_seconds(text):
    match = re.fullmatch(r"(\d+)(ms|s|m)", text.strip())
    if not match:
        raise ValueError(f"unsupported duration {text!r}")
    value, unit = int(match.group(1)), match.group(2)
    return {"ms": value / 1000, "s": value, "m": value * 60}[unit]


def memory_bytes(text):
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", str(text))
    if not match:
        raise ValueError(f"unsupported quantity {text!r}")
    return int(match.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match.group(2)]


def gateway_variables():
    """The environment variables the gateway reads: every `env = "..."` of its flags."""
    if not os.path.isdir(GATEWAY_SOURCES):
        raise ValueError(f"gateway sources not found at {os.path.normpath(GATEWAY_SOURCES)}")
    names = {"RUST_LOG"}
    for directory, _, files in os.walk(GATEWAY_SOURCES):
        for file in files:
            if file.endswith(".rs"):
                with open(os.path.join(directory, file)) as f:
                    names.update(re.findall(r'\benv\s*=\s*"([A-Z0-9_]+)"', f.read()))
    return names


def check_gateway(label, docs, alerts, problems):
    def need(condition, what, message):
        if not condition:
            problems.add(f"{label} {what}", message)
        return condition

    @contextlib.contextmanager
    def section(what):
        # An object too malformed to read (the schema check reports why) must not keep the
        # other objects from being checked.
        try:
            yield
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
            problems.add(f"{label} {what}", f"could not be checked: {e!r}")

    deployment = find(docs, "Deployment")
    if not need(deployment is not None, "Deployment/chat-gateway", "missing"):
        return
    where = "Deployment/chat-gateway"
    pod = deployment["spec"]["template"]["spec"]
    pod_labels = deployment["spec"]["template"]["metadata"].get("labels", {})
    containers = {c["name"]: c for c in pod["containers"]}
    gateway = containers.get("gateway")
    if not need(gateway is not None, where, "no container named gateway"):
        return
    config, resources = {}, {}

    with section("Deployment/chat-gateway"):
        # The image's non-root user, a read-only root, nothing to escalate.
        pod_sc = pod.get("securityContext", {})
        sc = gateway.get("securityContext", {})
        need(pod_sc.get("runAsNonRoot") is True and pod_sc.get("runAsUser") == 10001, where,
             "pod must run as non-root uid 10001 (the image's user)")
        need((pod_sc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", where,
             "seccompProfile RuntimeDefault required")
        need(sc.get("readOnlyRootFilesystem") is True, where, "readOnlyRootFilesystem must be true")
        need(sc.get("allowPrivilegeEscalation") is False, where, "allowPrivilegeEscalation must be false")
        need((sc.get("capabilities") or {}).get("drop") == ["ALL"], where, "capabilities must drop ALL")
        resources = gateway.get("resources") or {}
        need(set(resources.get("requests", {})) >= {"cpu", "memory"}
             and set(resources.get("limits", {})) >= {"memory"}, where,
             "cpu/memory requests and a memory limit required")

        # Ports, probes, identity, configuration.
        ports = {p["name"]: p["containerPort"] for p in gateway.get("ports", [])}
        need(ports == {"http": 8080, "internal": 9091}, where, f"ports must be http 8080 and internal 9091, got {ports}")
        ready = (gateway.get("readinessProbe") or {}).get("httpGet") or {}
        live = (gateway.get("livenessProbe") or {}).get("httpGet") or {}
        need(ready.get("path") == "/readyz" and ready.get("port") == "http", where, "readiness probe must be GET /readyz on http")
        need(live.get("path") == "/healthz" and live.get("port") == "http", where, "liveness probe must be GET /healthz on http")
        env = {e["name"]: e for e in gateway.get("env", [])}
        node_id = ((env.get("GATEWAY_NODE_ID") or {}).get("valueFrom") or {}).get("fieldRef") or {}
        need(node_id.get("fieldPath") == "metadata.name", where, "GATEWAY_NODE_ID must come from the pod name")
        sources = gateway.get("envFrom", [])
        config_maps = [s["configMapRef"]["name"] for s in sources if "configMapRef" in s]
        secrets = [s["secretRef"]["name"] for s in sources if "secretRef" in s]
        need(secrets == [GATEWAY], where, "environment from the Secret chat-gateway expected")
        for name in config_maps:
            cm = find(docs, "ConfigMap", name)
            if need(cm is not None, where, f"ConfigMap {name} is not part of the rendering"):
                config.update(cm.get("data", {}))
        for key, value in {
            "GATEWAY_INTERNAL_LISTEN": "0.0.0.0:9091",
            "GATEWAY_LOG_FORMAT": "json",
        }.items():
            need(config.get(key) == value, "ConfigMap", f"{key} must be {value}")
        need(bool(config.get("GATEWAY_TRUSTED_PROXIES")), "ConfigMap", "GATEWAY_TRUSTED_PROXIES must be set")
        unknown = sorted(set(config) - gateway_variables())
        need(not unknown, "ConfigMap", f"{unknown}: not a variable the gateway reads (chat-gateway --help)")
        need("REDIS_URL" not in config and not any("SECRET" in k or "API_KEY" in k for k in config),
             "ConfigMap", "credentials belong in the Secret, not the ConfigMap")

    with section("Deployment/chat-gateway"):
        # Termination: the preStop sleep and the node's drain fit in the grace period.
        pre_stop = ((gateway.get("lifecycle") or {}).get("preStop")) or {}
        if "sleep" in pre_stop:
            pre_stop_seconds = pre_stop["sleep"]["seconds"]
        else:
            command = " ".join((pre_stop.get("exec") or {}).get("command", []))
            match = re.search(r"sleep (\d+)", command)
            pre_stop_seconds = int(match.group(1)) if match else None
        if need(pre_stop_seconds, where, "a preStop sleep is required"):
            grace = duration_seconds(config.get("GATEWAY_SHUTDOWN_GRACE", "5s"))
            budget = pod.get("terminationGracePeriodSeconds", 30)
            need(budget > pre_stop_seconds + grace, where,
                 f"terminationGracePeriodSeconds {budget} must exceed preStop {pre_stop_seconds}s + drain {grace}s")

    with section("Deployment/chat-gateway"):
        # The memory alert measures against the container's limit.
        limit = resources.get("limits", {}).get("memory")
        threshold = None
        for rule in alerts:
            if rule.get("alert") == "ChatMemoryNearLimit":
                match = re.search(r">\s*[\d.]+\s*\*\s*(\d+)", rule["expr"])
                threshold = int(match.group(1)) if match else None
        if limit is not None:
            need(threshold == memory_bytes(limit), where,
                 f"memory limit {limit} differs from the ChatMemoryNearLimit rule's {threshold} bytes")

    def selects(selector):
        return bool(selector) and all(pod_labels.get(k) == v for k, v in selector.items())

    service = find(docs, "Service")
    with section("Service/chat-gateway"):
        if need(service is not None, "Service/chat-gateway", "missing"):
            need(selects(service["spec"].get("selector")), "Service/chat-gateway", "selector does not match the pods")
            service_ports = {p["name"]: p.get("targetPort") for p in service["spec"]["ports"]}
            need(service_ports == {"http": "http", "internal": "internal"}, "Service/chat-gateway",
                 "ports http and internal (to the named container ports) expected")

    with section("PodDisruptionBudget/chat-gateway"):
        pdb = find(docs, "PodDisruptionBudget")
        if need(pdb is not None, "PodDisruptionBudget/chat-gateway", "missing"):
            need(selects(pdb["spec"]["selector"].get("matchLabels")), "PodDisruptionBudget/chat-gateway",
                 "selector does not match the pods")

    with section("HorizontalPodAutoscaler/chat-gateway"):
        hpa = find(docs, "HorizontalPodAutoscaler")
        if need(hpa is not None, "HorizontalPodAutoscaler/chat-gateway", "missing"):
            target = hpa["spec"]["scaleTargetRef"]
            need(target.get("kind") == "Deployment" and target.get("name") == deployment["metadata"]["name"],
                 "HorizontalPodAutoscaler/chat-gateway", "must scale the Deployment")
            need(hpa["spec"].get("minReplicas", 1) >= 2, "HorizontalPodAutoscaler/chat-gateway",
                 "minReplicas must be at least 2")
            need("replicas" not in deployment["spec"], where,
                 "spec.replicas fights the HorizontalPodAutoscaler: leave it out")

    with section("Ingress/chat-gateway"):
        # The Ingress routes the public chat paths, and nothing else, to port http.
        ingress = find(docs, "Ingress")
        if need(ingress is not None, "Ingress/chat-gateway", "missing"):
            paths = set()
            for rule in ingress["spec"].get("rules", []):
                for p in rule.get("http", {}).get("paths", []):
                    paths.add(p["path"])
                    backend = p["backend"].get("service", {})
                    need(backend.get("port", {}).get("name") == "http", "Ingress/chat-gateway",
                         f"{p['path']} must go to port http")
                    need(p.get("pathType") == "Exact", "Ingress/chat-gateway",
                         f"{p['path']} must be an Exact path (a prefix would expose more)")
            need(paths == PUBLIC_PATHS, "Ingress/chat-gateway",
                 f"routes {sorted(paths)}; exactly {sorted(PUBLIC_PATHS)} expected")
            annotations = ingress["metadata"].get("annotations", {})
            for key in ("proxy-read-timeout", "proxy-send-timeout"):
                value = annotations.get(f"nginx.ingress.kubernetes.io/{key}", "60")
                need(int(value) >= 75, "Ingress/chat-gateway", f"{key} {value}s is below 75s")
            need(annotations.get("nginx.ingress.kubernetes.io/proxy-buffering") == "off",
                 "Ingress/chat-gateway", "proxy-buffering must be off for SSE")
            need(bool(ingress["spec"].get("tls")), "Ingress/chat-gateway", "TLS required")
            retried = annotations.get("nginx.ingress.kubernetes.io/proxy-next-upstream", "").split()
            need("http_503" in retried and "non_idempotent" not in retried, "Ingress/chat-gateway",
                 "proxy-next-upstream must include http_503 (a node that is not ready refuses the "
                 "handshake with 503) and not non_idempotent")

    with section("NetworkPolicy/chat-gateway"):
        # The NetworkPolicy lets the ingress controller reach http, and only monitoring and the
        # backend reach internal.
        policy = find(docs, "NetworkPolicy")
        if need(policy is not None, "NetworkPolicy/chat-gateway", "missing"):
            need(selects(policy["spec"]["podSelector"].get("matchLabels")), "NetworkPolicy/chat-gateway",
                 "podSelector does not match the pods")
            need("Ingress" in policy["spec"].get("policyTypes", []), "NetworkPolicy/chat-gateway",
                 "policyTypes must include Ingress")
            for rule in policy["spec"].get("ingress", []):
                ports = {p.get("port") for p in rule.get("ports", [])}
                need(bool(rule.get("from")) and bool(ports), "NetworkPolicy/chat-gateway",
                     "every rule names its sources and ports")
                sources = rule.get("from", [])
                if ports & {"internal", 9091}:
                    for source in sources:
                        ns = (source.get("namespaceSelector") or {}).get("matchLabels", {})
                        pods = (source.get("podSelector") or {}).get("matchLabels", {})
                        ok = (ns.get("kubernetes.io/metadata.name") == "monitoring" and not pods) or (
                            not source.get("namespaceSelector")
                            and pods.get("app.kubernetes.io/component") == "backend"
                        )
                        need(ok, "NetworkPolicy/chat-gateway",
                             f"port internal open to {source}: only monitoring and backend pods")
                    need(not (ports & {"http", 8080}), "NetworkPolicy/chat-gateway",
                         "http and internal belong in separate rules")
                elif ports & {"http", 8080}:
                    for source in sources:
                        ns = (source.get("namespaceSelector") or {}).get("matchLabels", {})
                        need(ns.get("kubernetes.io/metadata.name") == "ingress-nginx", "NetworkPolicy/chat-gateway",
                             f"port http open to {source}: only the ingress controller")

    with section("ServiceMonitor/chat-gateway"):
        monitor = find(docs, "ServiceMonitor")
        if need(monitor is not None, "ServiceMonitor/chat-gateway", "missing"):
            endpoints = monitor["spec"].get("endpoints", [])
            need([(e.get("port"), e.get("path", "/metrics")) for e in endpoints] == [("internal", "/metrics")],
                 "ServiceMonitor/chat-gateway", "must scrape /metrics on port internal only")
            need(selects(monitor["spec"]["selector"].get("matchLabels")) and service is not None
                 and all(service["metadata"]["labels"].get(k) == v
                         for k, v in monitor["spec"]["selector"]["matchLabels"].items()),
                 "ServiceMonitor/chat-gateway", "selector does not match the Service")

    with section("PrometheusRule/chat-gateway"):
        rule = find(docs, "PrometheusRule")
        if need(rule is not None, "PrometheusRule/chat-gateway", "missing"):
            need(rule["spec"].get("groups") == alerts_groups(), "PrometheusRule/chat-gateway",
                 "groups differ from deploy/prometheus/alerts.yml (run validate.sh --sync-rules)")


def alerts_groups():
    with open(ALERTS) as f:
        return yaml.safe_load(f)["groups"]


RULE_HEADER = """\
# Generated from deploy/prometheus/alerts.yml by
# `deploy/kubernetes/validate.sh --sync-rules`; do not edit by hand
# (validate.sh fails when the two differ). Tests: alerts_test.yml.
# If your Prometheus selects rules by label (kube-prometheus-stack:
# release=<name>), add it in your overlay.
"""


def sync_rules():
    document = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": GATEWAY,
            "labels": {
                "app.kubernetes.io/name": GATEWAY,
                "app.kubernetes.io/component": "gateway",
                "app.kubernetes.io/part-of": "chat",
            },
        },
        "spec": {"groups": alerts_groups()},
    }
    text = RULE_HEADER + yaml.safe_dump(document, sort_keys=False, width=1000, allow_unicode=True)
    with open(RULE_FILE, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(RULE_FILE)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync-rules", action="store_true",
                        help="rewrite base/prometheusrule.yaml from deploy/prometheus/alerts.yml first")
    args = parser.parse_args()
    if args.sync_rules:
        sync_rules()

    problems = Problems()
    rendered = {}
    targets = [("base", BASE)] + [
        (f"overlays/{name}", os.path.join(OVERLAYS, name))
        for name in sorted(os.listdir(OVERLAYS))
        if os.path.isfile(os.path.join(OVERLAYS, name, "kustomization.yaml"))
    ]
    for label, directory in targets:
        try:
            rendered[label] = render(directory)
            print(f"ok    kustomize build {label}: {len(rendered[label])} objects")
        except (RuntimeError, yaml.YAMLError) as e:
            problems.add(label, f"kustomize build failed: {e}")
    if len(targets) < 4:
        problems.add("overlays", "expected the single-redis, redis-cluster and redis-sentinel overlays")

    before = len(problems.items)
    count, versions = validate_schemas(rendered, problems)
    verdict = "ok  " if len(problems.items) == before else "FAIL"
    print(f"{verdict}  schemas: {count} objects against Kubernetes {' and '.join(versions)} "
          "and the prometheus-operator CRDs")

    alerts = [r for g in alerts_groups() for r in g["rules"]]
    for label, docs in rendered.items():
        try:
            check_gateway(label, docs, alerts, problems)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            # A malformed object the schema check has reported already.
            problems.add(label, f"gateway checks could not read the objects: {e!r}")
        names = [name_of(d) for d in docs]
        for duplicate in sorted({n for n in names if names.count(n) > 1}):
            problems.add(label, f"{duplicate} rendered twice")

    if problems.items:
        for item in problems.items:
            print(f"FAIL  {item}", file=sys.stderr)
        print(f"kubernetes validate: FAILED ({len(problems.items)} problems)", file=sys.stderr)
        return 1
    print("ok    gateway objects: security context, probes, ports, drain budget, Ingress paths, "
          "NetworkPolicy, monitoring, rules = alerts.yml")
    print("kubernetes validate: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
