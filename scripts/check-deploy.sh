#!/usr/bin/env bash
# Deployment checks (issue #14): lints charts/herald with Helm's SDK, renders it
# with default values and with charts/herald/ci/full-values.yaml, validates
# every object strictly for Kubernetes 1.31 and the newest version
# kubernetes-validate knows, renders and validates k8s/dev with kubectl
# kustomize, checks that k8s/base is in step with the chart, then runs the
# self-test that proves these checks fail on a broken chart.
#
#   scripts/check-deploy.sh                  everything (what CI runs)
#   scripts/check-deploy.sh --no-self-test   the checks alone
#   scripts/check-deploy.sh --self-test      the self-test alone
#   scripts/check-deploy.sh --render-base    rewrite k8s/base/herald.yaml (scripts/render-k8s.sh)
#
# Tools (pinned in scripts/deploy-requirements.txt) go into a venv under
# target/deploy-venv, made on first use and reused while the pins are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
req=scripts/deploy-requirements.txt
stamp="$venv/.requirements.sha256"
want=$(sha256sum "$req" | cut -d' ' -f1)
if [[ ! -x "$venv/bin/python" || ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "Setting up $venv (pinned tools from $req)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  echo "$want" > "$stamp"
fi
py="$venv/bin/python"
# kubectl kustomize and anything else come from the venv, not the machine.
export PATH="$PWD/$venv/bin:$PATH"

case "${1:-}" in
  --render-base) exec "$py" scripts/deploy_checks.py render-base ;;
  --self-test) exec "$py" scripts/deploy_checks.py self-test ;;
  --no-self-test) exec "$py" scripts/deploy_checks.py check ;;
  "") exec "$py" scripts/deploy_checks.py all ;;
  *) echo "usage: $0 [--self-test | --no-self-test | --render-base]" >&2; exit 2 ;;
esac
