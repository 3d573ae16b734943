#!/usr/bin/env bash
# Writes k8s/base/herald.yaml: charts/herald rendered with k8s/base/values.yaml
# (release and namespace "herald"). Run it after changing the chart;
# scripts/check-deploy.sh fails while the two differ.
set -euo pipefail
exec "$(dirname "$0")/check-deploy.sh" --render-base
