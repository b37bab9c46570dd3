# flatnet: see README.md
GO ?= go
BIN := bin

.PHONY: build test lab clean
build:
	CGO_ENABLED=0 $(GO) build -trimpath -o $(BIN)/ ./cmd/...

test: build
	hack/test.sh

clean:
	rm -rf $(BIN)
