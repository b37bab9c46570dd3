// Package datastore is where nodes meet: each node claims a pod subnet and
// publishes how to reach it (a Lease); every node watches all leases. Two
// implementations sit behind one small interface: etcd (pkg/datastore/etcd)
// and the Kubernetes API (pkg/datastore/kube).
package datastore

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
)

// Lease is one node's claim on a pod subnet, plus what peers need to reach
// that subnet.
type Lease struct {
	Node       string       `json:"node"`
	Subnet     netip.Prefix `json:"subnet"`
	UnderlayIP netip.Addr   `json:"underlayIP"`
	// Backend is how this node wants to be reached ("host-gw", "vxlan", ...)
	// and BackendData what that backend needs (e.g. the VTEP MAC).
	Backend     string      `json:"backend"`
	BackendData BackendData `json:"backendData,omitzero"`
}

// BackendData is per-backend information published with a lease.
type BackendData struct {
	VTEPMAC string `json:"vtepMAC,omitempty"`
	VNI     int    `json:"vni,omitempty"`
	Port    int    `json:"port,omitempty"`
}

// NodeInfo is what a node publishes about itself when it registers.
type NodeInfo struct {
	Name        string
	UnderlayIP  netip.Addr
	Backend     string
	BackendData BackendData
	// PreferredSubnet is the subnet this node held before (from its state
	// dir), tried first so a restarted node gets its own subnet back.
	PreferredSubnet netip.Prefix
}

// Lease is what the node publishes when it holds subnet p.
func (n NodeInfo) Lease(p netip.Prefix) Lease {
	return Lease{Node: n.Name, Subnet: p, UnderlayIP: n.UnderlayIP.Unmap(), Backend: n.Backend, BackendData: n.BackendData}
}

// Validate rejects a NodeInfo no store can publish.
func (n NodeInfo) Validate() error {
	if n.Name == "" {
		return errors.New("node name is empty")
	}
	if ip := n.UnderlayIP; !ip.IsValid() || ip.IsUnspecified() || ip.IsMulticast() || ip.Zone() != "" {
		return fmt.Errorf("node %q: invalid underlay IP %q", n.Name, n.UnderlayIP)
	}
	return nil
}

// Datastore is the whole contract between the agent and its store.
type Datastore interface {
	// Register claims a subnet for the node (its previous one if it is
	// still free or still its own), publishes the node's info with it, and
	// keeps the claim alive until ctx ends. Losing the store later does not
	// end the claim; Register's keepalive re-establishes it when the store
	// returns. Errors are returned only for the first claim.
	Register(ctx context.Context, self NodeInfo) (Lease, error)
	// Watch sends the complete set of leases (self included) at start and
	// after every change, until ctx ends. A reader that falls behind only
	// sees the newest set: the reconciler is level-triggered.
	Watch(ctx context.Context) (<-chan []Lease, error)
	// LeaseHeld reports whether the node's claim is currently confirmed by
	// the store (false while the store is unreachable or before Register).
	LeaseHeld() bool
}

// ErrExhausted means the cluster CIDR has no free node subnet left.
var ErrExhausted = errors.New("cluster CIDR has no free node subnet")

// SortLeases orders leases by subnet, so equal sets compare equal.
func SortLeases(ls []Lease) {
	slices.SortFunc(ls, func(a, b Lease) int { return a.Subnet.Addr().Compare(b.Subnet.Addr()) })
}

// SendLatest puts v into ch (capacity 1, one sender), replacing an unread
// value: how a store hands Watch snapshots to a reader that may lag.
func SendLatest[T any](ch chan T, v T) {
	for {
		select {
		case ch <- v:
			return
		default:
		}
		select {
		case <-ch:
		default:
		}
	}
}
