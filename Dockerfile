# flatnet's image: flatnetd and the flatnet CNI plugin, static, on an empty
# base. flatnetd runs from the DaemonSet in deploy/flatnet.yaml and copies
# /flatnet into the node's /opt/cni/bin.
#
#   docker build -t ghcr.io/flatnet-io/flatnet:dev .
ARG GO_VERSION=1.26.8
FROM golang:${GO_VERSION} AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY cmd ./cmd
COPY pkg ./pkg
ENV CGO_ENABLED=0 GOTOOLCHAIN=local
RUN go build -trimpath -ldflags "-s -w" -o /out/ ./cmd/flatnet ./cmd/flatnetd

FROM scratch
COPY --from=build /out/flatnetd /flatnetd
COPY --from=build /out/flatnet /flatnet
ENTRYPOINT ["/flatnetd"]
