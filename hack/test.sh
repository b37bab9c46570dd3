#!/usr/bin/env bash
# The test command (README: `make test`). Needs root: tests build real
# network namespaces (all named fnt<pid>-* or flab-*, removed on exit).
# On a fresh machine it first installs and builds what the tests need
# (hack/prereqs.sh: apt packages, Kubernetes binaries, crictl; all cached).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=${CGO_ENABLED:-1}
[ "$(id -u)" = 0 ] || { echo "make test needs root (it creates network namespaces)" >&2; exit 1; }

hack/prereqs.sh
echo "== vet ($(date -u +%T))"
go vet ./...
echo "== unit, namespace, lab, Kubernetes and containerd tests (-race) ($(date -u +%T))"
go test -race -count=1 -timeout 40m ./...
echo "== fuzz the CNI config parser ($(date -u +%T))"
go test -run '^$' -fuzz '^FuzzParseConfig$' -fuzztime "${FUZZTIME:-20s}" ./pkg/cni
echo "== all tests passed ($(date -u +%T))"
