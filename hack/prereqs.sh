#!/usr/bin/env bash
# prereqs.sh — everything the test suite needs on a fresh Debian 12 machine,
# each step skipped when already done:
#   apt:  iproute2 iputils-ping nftables iperf3 iptables curl dash
#         gcc libc6-dev (go test -race needs cgo)
#         containerd runc busybox-static containernetworking-plugins
#         (via hack/cri/tools.sh)
#   Go:   module downloads
#   bins: Kubernetes v1.37.2 (hack/k8s/build.sh, cached by version in
#         ~/.cache/flatnet/k8s/), crictl (hack/cri/tools.sh, cached likewise),
#         netcat-openbsd unpacked for the e2e image (hack/k8s/netcat.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH=/usr/local/go/bin:$PATH DEBIAN_FRONTEND=noninteractive

step() { echo ">> $* ($(date -u +%T))" >&2; }

pkgs=(iproute2 iputils-ping nftables iperf3 iptables curl dash gcc libc6-dev)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  step "apt: ${missing[*]}"
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
step "go mod download"
go mod download
step "containerd, runc, busybox, crictl"
hack/cri/tools.sh >/dev/null
step "Kubernetes binaries"
hack/k8s/build.sh all >/dev/null
step "netcat-openbsd for the e2e agnhost image (apt-get download, not installed)"
hack/k8s/netcat.sh >/dev/null
step "prerequisites ready"
