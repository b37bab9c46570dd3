# flatnet: see README.md
GO ?= go
BIN := bin
LAB ?= demo
NODES ?= 3
PODS ?= 2
BACKEND ?= auto
TOPOLOGY ?= flat

export PATH := /usr/local/go/bin:$(PATH)

.PHONY: build test lab lab-check lab-status lab-down clean cri-tools e2e-cri bench-cri e2e-k8s

build:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o $(BIN)/ ./cmd/...

test: build
	hack/test.sh

# The main job: a running multi-node cluster network on this machine, checked.
lab: build
	$(BIN)/flatnetctl lab down --name $(LAB) >/dev/null
	$(BIN)/flatnetctl lab up --name $(LAB) --nodes $(NODES) --pods-per-node $(PODS) --backend $(BACKEND) --topology $(TOPOLOGY)
	$(BIN)/flatnetctl lab check --name $(LAB)

lab-check:
	$(BIN)/flatnetctl lab check --name $(LAB)

lab-status:
	$(BIN)/flatnetctl lab status --name $(LAB)

lab-down:
	$(BIN)/flatnetctl lab down --name $(LAB)

# What the containerd CRI test needs: apt containerd runc busybox-static
# containernetworking-plugins, and crictl built once into ~/.cache/flatnet.
cri-tools:
	hack/cri/tools.sh >/dev/null

# A real container runtime calls flatnet: containerd on two lab nodes (root).
e2e-cri: cri-tools
	$(GO) test -race -count=1 -v -run . ./test/e2e/cri/

# CRI runp latency, flatnet next to the reference bridge + host-local.
# A Kubernetes cluster on this machine gets `kubectl apply -f deploy/flatnet.yaml`,
# then the upstream sig-network e2e specs run against it (root; README).
# SERVICES=1 adds the Service checks through kube-proxy.
e2e-k8s: build cri-tools
	hack/k8s/build.sh all >/dev/null
	hack/k8s/netcat.sh >/dev/null
	E2E_K8S_SERVICES=$(SERVICES) $(GO) test -race -count=1 -v -timeout 60m -run . ./test/e2e/k8s/

bench-cri: build cri-tools
	$(GO) run ./bench/crilatency -bin $(BIN) -pods 20

clean:
	rm -rf $(BIN)
