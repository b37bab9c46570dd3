// Package backend decides how this node reaches a peer node's pod subnet.
// Each backend lives in its own folder and registers itself by name; the
// reconciler (pkg/reconcile) asks it for a Plan per peer and makes the
// kernel match. The one place a cross-node packet's route is decided is the
// backend's Plan.
package backend

import (
	"context"
	"fmt"
	"net/netip"
	"sort"

	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// RouteProtocol tags every route flatnet installs (rtm_protocol), so a
// restarted agent can find and prune routes of nodes that left while it
// was down without touching anyone else's routes.
const RouteProtocol netlink.RouteProtocol = 244

// Node is this node as the backends see it.
type Node struct {
	Name       string
	Underlay   netlink.Link // the interface facing the other nodes
	UnderlayIP netip.Addr
	// Underlays are the underlay interface's own prefixes, e.g.
	// 10.99.0.11/24: a peer inside one of them is on-link.
	Underlays []netip.Prefix
	// Subnet is this node's pod subnet: unknown (zero) in Prepare, which
	// runs before the lease is taken, and set for Plan.
	Subnet netip.Prefix
}

// OnLink reports whether ip is directly reachable on the underlay segment.
func (n Node) OnLink(ip netip.Addr) bool {
	for _, p := range n.Underlays {
		if p.Contains(ip) {
			return true
		}
	}
	return false
}

// Mode says how a peer is reached, for status output.
type Mode string

const (
	Direct  Mode = "direct"  // plain route via the peer's underlay IP
	Overlay Mode = "overlay" // encapsulated
)

// Plan is everything the kernel needs to reach one peer's pod subnet.
type Plan struct {
	Peer  string
	Mode  Mode
	Route netlink.Route
	// Neigh and FDB are set by overlay backends: the peer VTEP's MAC for
	// its gateway address, and where to send frames for that MAC.
	Neigh *netlink.Neigh
	FDB   *netlink.Neigh
}

// Backend is one way of reaching peers.
type Backend interface {
	// Name is what this node publishes in its lease.
	Name() string
	// Prepare creates node-level devices before the lease is taken and
	// returns what peers need to reach this node, and the MTU pods get.
	Prepare(ctx context.Context, self Node) (data datastore.BackendData, podMTU int, err error)
	// Plan says how self reaches peer.
	Plan(self Node, peer datastore.Lease) (Plan, error)
}

// Factory builds a backend from the agent's settings.
type Factory func(Options) (Backend, error)

// Options are the settings every backend may read.
type Options struct {
	VNI  int // VXLAN network identifier
	Port int // VXLAN UDP port
	// ChecksumOffload is the VXLAN device's tx checksum offload policy:
	// "auto" (off only on kernels with the NAT checksum bug), "on", "off".
	ChecksumOffload string
}

var registry = map[string]Factory{}

// Register makes a backend available by name; called from init().
func Register(name string, f Factory) { registry[name] = f }

// New returns the named backend.
func New(name string, opts Options) (Backend, error) {
	f, ok := registry[name]
	if !ok {
		return nil, fmt.Errorf("unknown backend %q (known: %v)", name, Names())
	}
	return f(opts)
}

// Names lists the registered backends.
func Names() []string {
	var out []string
	for n := range registry {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}
