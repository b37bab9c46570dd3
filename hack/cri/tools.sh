#!/usr/bin/env bash
# tools.sh — what the containerd CRI end-to-end test (test/e2e/cri) needs:
#
#   apt:     containerd runc busybox-static containernetworking-plugins
#            (installed when missing; the reference plugins give the CRI
#            plugin its `loopback` and the latency comparison its `bridge`)
#   crictl:  built from the Go module proxy into a cache outside the repo,
#            ${FLATNET_CACHE:-$HOME/.cache/flatnet}/crictl/<version>/crictl,
#            skipped when already there
#
#   tools.sh              install and build what is missing
#   tools.sh --print-dir  print crictl's directory, do nothing else
#
# The last line on stdout is crictl's directory, so
#   CRICTL_DIR=$(hack/cri/tools.sh)
# works. Progress goes to stderr.
set -euo pipefail

# v1.34.0 speaks CRI v1 to Debian 12's containerd 1.6.20 and builds with Go 1.26.
CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}
DIR=${FLATNET_CACHE:-$HOME/.cache/flatnet}/crictl/$CRICTL_VERSION
APT_PACKAGES=(containerd runc busybox-static containernetworking-plugins)

case ${1:-} in
--print-dir) echo "$DIR"; exit 0 ;;
"") ;;
*) sed -n '2,17s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac

missing=()
for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
	[ "$(id -u)" = 0 ] || { echo "tools.sh: apt packages missing (${missing[*]}); run as root" >&2; exit 1; }
	t0=$SECONDS
	echo ">> apt: installing ${missing[*]}" >&2
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq >&2
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
	echo ">> apt: done in $((SECONDS - t0)) s" >&2
fi

mkdir -p "$DIR"
# One build per cache dir at a time; a second caller waits, then finds crictl.
exec 9>"$DIR/.lock"
flock 9
if [ -x "$DIR/crictl" ]; then
	echo ">> crictl $CRICTL_VERSION: cached" >&2
else
	t0=$SECONDS
	echo ">> crictl $CRICTL_VERSION: building ($(go version))" >&2
	rm -rf "$DIR"/.tmp.*
	tmp=$(mktemp -d "$DIR/.tmp.XXXXXX") # same filesystem: the rename below is atomic
	trap 'rm -rf "$tmp"' EXIT
	GOTOOLCHAIN=local GOFLAGS=-modcacherw CGO_ENABLED=0 GOBIN=$tmp \
		go install -trimpath -ldflags "-s -w" "sigs.k8s.io/cri-tools/cmd/crictl@$CRICTL_VERSION"
	mv -f "$tmp/crictl" "$DIR/crictl"
	echo ">> crictl $CRICTL_VERSION: built in $((SECONDS - t0)) s" >&2
fi
echo "$DIR"
