#!/usr/bin/env bash
# netcat.sh — OpenBSD netcat for the agnhost test image of `make e2e-k8s`
# (test/e2e/k8s): e2e tests run `nc -w 1 -u`, which busybox's nc lacks.
#
#   apt:    Debian's netcat-openbsd .deb, fetched with `apt-get download`
#           and unpacked with `dpkg -x` (not installed), into
#           ${FLATNET_CACHE:-$HOME/.cache/flatnet}/deb/netcat-openbsd/;
#           its library libbsd0 is installed if missing
#
#   netcat.sh              fetch and unpack what is missing
#   netcat.sh --print-dir  print the unpacked tree, do nothing else
#
# The last line on stdout is the unpacked tree (nc is bin/nc.openbsd in it).
set -euo pipefail

DIR=${FLATNET_CACHE:-$HOME/.cache/flatnet}/deb/netcat-openbsd

case ${1:-} in
--print-dir) echo "$DIR"; exit 0 ;;
"") ;;
*) sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}" >&2; exit 2 ;;
esac

if ! dpkg -s libbsd0 >/dev/null 2>&1; then
	[ "$(id -u)" = 0 ] || { echo "netcat.sh: libbsd0 missing; run as root" >&2; exit 1; }
	echo ">> apt: installing libbsd0" >&2
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libbsd0 >&2 ||
		{ apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libbsd0 >&2; }
fi
mkdir -p "$DIR"
exec 9>"$DIR.lock"
flock 9
if [ -x "$DIR/bin/nc.openbsd" ]; then
	echo ">> netcat-openbsd: cached" >&2
else
	tmp=$(mktemp -d "$DIR.tmp.XXXXXX")
	trap 'rm -rf "$tmp"' EXIT
	(cd "$tmp" && { apt-get download netcat-openbsd >&2 || { apt-get update -qq >&2 && apt-get download netcat-openbsd >&2; }; })
	dpkg -x "$tmp"/netcat-openbsd_*.deb "$tmp/x"
	rm -rf "$DIR" && mv "$tmp/x" "$DIR"
	echo ">> netcat-openbsd: $(basename "$tmp"/netcat-openbsd_*.deb) unpacked" >&2
fi
echo "$DIR"
