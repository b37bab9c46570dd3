#!/usr/bin/env bash
# build.sh [TARGET...] — build real Kubernetes binaries from the Go module proxy
# into a per-version cache outside the repo, skipping what is already there.
#
#   control-plane  etcd kube-apiserver kube-controller-manager kube-scheduler kubectl
#   node           kubelet kube-proxy
#   e2e            agnhost e2e.test
#   all            all of the above (default)
#
#   build.sh --print-dir    print the binary directory, build nothing
#
# Output: ${FLATNET_CACHE:-$HOME/.cache/flatnet}/k8s/<k8s version>/. Progress goes
# to stderr; the last line on stdout is that directory, so
#   BIN=$(hack/k8s/build.sh control-plane)
# works. The Kubernetes version is the one required in hack/k8s/go.mod
# (see gen-module.sh / README.md to change it).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
export GOTOOLCHAIN=local GOFLAGS=-modcacherw CGO_ENABLED=0

K8S_VERSION=$(sed -n 's#^[[:space:]]*k8s.io/kubernetes \(v[0-9][^ ]*\)$#\1#p' "$HERE/go.mod")
[[ $K8S_VERSION =~ ^v([0-9]+)\.([0-9]+)\.[0-9]+$ ]] || {
	echo "build.sh: cannot read the k8s.io/kubernetes version from $HERE/go.mod" >&2; exit 1; }
K8S_MAJOR=${BASH_REMATCH[1]} K8S_MINOR=${BASH_REMATCH[2]}
BIN_DIR=${FLATNET_CACHE:-$HOME/.cache/flatnet}/k8s/$K8S_VERSION

usage() { sed -n '2,16s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit "${1:-2}"; }

binaries_of() { # target -> binary names
	case $1 in
	control-plane) echo etcd kube-apiserver kube-controller-manager kube-scheduler kubectl ;;
	node) echo kubelet kube-proxy ;;
	e2e) echo agnhost e2e.test ;;
	*) return 1 ;;
	esac
}

targets=()
for a in "$@"; do
	case $a in
	--print-dir) echo "$BIN_DIR"; exit 0 ;;
	-h | --help) usage 0 ;;
	all) targets+=(control-plane node e2e) ;;
	control-plane | node | e2e) targets+=("$a") ;;
	*) echo "build.sh: unknown target '$a'" >&2; usage ;;
	esac
done
[ ${#targets[@]} -gt 0 ] || targets=(control-plane node e2e)

mkdir -p "$BIN_DIR"
# One build per cache dir at a time; a second caller waits, then finds the binaries.
exec 9>"$BIN_DIR/.lock"
flock 9
# Leftovers of a build that was killed hard (the trap below did not run).
rm -rf "$BIN_DIR"/.tmp.*
TMP=$(mktemp -d "$BIN_DIR/.tmp.XXXXXX") # same filesystem: rename is atomic
trap 'rm -rf "$TMP"' EXIT

cd "$HERE"
ldflags=""
build_setup() { # once, and only when something has to be built
	[ -z "$ldflags" ] || return 0
	local info date kdir
	echo ">> $(go version); k8s $K8S_VERSION; module cache $(go env GOMODCACHE)" >&2
	go mod download k8s.io/kubernetes
	info=$(go list -m -f '{{.Time.UTC.Format "2006-01-02T15:04:05Z"}} {{.Dir}}' k8s.io/kubernetes)
	date=${info%% *} kdir=${info#* }
	# Same variables as kubernetes' hack/lib/version.sh. buildDate is the tag's
	# date (from the proxy), not "now", so that builds are reproducible. The
	# git commit is unknown to the module proxy and stays empty.
	ldflags="-s -w"
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=$K8S_MAJOR -X $p.gitMinor=$K8S_MINOR"
		ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
	done
	AGNHOST_VERSION=$(cat "$kdir/test/images/agnhost/VERSION")
}

build_one() { # name: build into $TMP/name
	local name=$1
	case $name in
	etcd)
		go build -trimpath -ldflags "$ldflags" -o "$TMP/etcd" go.etcd.io/etcd/server/v3 ;;
	agnhost)
		go build -trimpath -ldflags "$ldflags -X main.Version=$AGNHOST_VERSION" \
			-o "$TMP/agnhost" k8s.io/kubernetes/test/images/agnhost ;;
	e2e.test)
		go test -c -trimpath -ldflags "$ldflags" -o "$TMP/e2e.test" k8s.io/kubernetes/test/e2e ;;
	*)
		go build -trimpath -ldflags "$ldflags" -o "$TMP/$name" "k8s.io/kubernetes/cmd/$name" ;;
	esac
}

declare -A done_bins=()
for t in "${targets[@]}"; do
	missing=()
	for b in $(binaries_of "$t"); do
		[ -n "${done_bins[$b]:-}" ] && continue
		done_bins[$b]=1
		[ -x "$BIN_DIR/$b" ] || missing+=("$b")
	done
	if [ ${#missing[@]} -eq 0 ]; then
		echo ">> $t: cached" >&2
		continue
	fi
	build_setup
	t0=$SECONDS
	for b in "${missing[@]}"; do
		s0=$SECONDS
		echo ">> $t: building $b" >&2
		build_one "$b"
		mv -f "$TMP/$b" "$BIN_DIR/$b"
		echo ">> $t: $b done in $((SECONDS - s0)) s ($(du -m "$BIN_DIR/$b" | cut -f1) MB)" >&2
	done
	echo ">> $t: built ${missing[*]} in $((SECONDS - t0)) s" >&2
done
echo "$BIN_DIR"
