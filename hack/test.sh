#!/usr/bin/env bash
# The test command (README: `make test`). Needs root: tests build real
# network namespaces (all named fnt<pid>-*, removed on exit).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH CGO_ENABLED=${CGO_ENABLED:-1}
[ "$(id -u)" = 0 ] || { echo "make test needs root (it creates network namespaces)" >&2; exit 1; }

echo "== vet"
go vet ./...
echo "== unit and namespace tests (-race)"
go test -race -count=1 -timeout 40m ./...
echo "== fuzz the CNI config parser"
go test -run '^$' -fuzz '^FuzzParseConfig$' -fuzztime "${FUZZTIME:-20s}" ./pkg/cni
echo "== all tests passed"
