// Package hostgw reaches peers with plain routes: peer subnet via the peer's
// underlay IP. No encapsulation, so it needs every node on one L2 segment.
package hostgw

import (
	"context"
	"fmt"

	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Name of this backend.
const Name = "host-gw"

func init() {
	backend.Register(Name, func(backend.Options) (backend.Backend, error) { return HostGW{}, nil })
}

// HostGW is the host-gw backend.
type HostGW struct{}

func (HostGW) Name() string { return Name }

// Prepare needs no device; pods get the underlay MTU.
func (HostGW) Prepare(_ context.Context, self backend.Node) (datastore.BackendData, int, error) {
	return datastore.BackendData{}, self.Underlay.Attrs().MTU, nil
}

// Plan routes the peer's subnet via its underlay IP. A peer that is not on
// our segment cannot be reached this way: say so instead of installing a
// route that the kernel would reject or that would black-hole traffic.
func (HostGW) Plan(self backend.Node, peer datastore.Lease) (backend.Plan, error) {
	if !self.OnLink(peer.UnderlayIP) {
		return backend.Plan{}, fmt.Errorf("peer %s (%s) is not on this node's segment %v: host-gw needs all nodes on one L2 segment; use --backend vxlan or auto",
			peer.Node, peer.UnderlayIP, self.Underlays)
	}
	return DirectPlan(self, peer), nil
}

// DirectPlan is the direct route, shared with the auto backend.
func DirectPlan(self backend.Node, peer datastore.Lease) backend.Plan {
	return backend.Plan{
		Peer: peer.Node,
		Mode: backend.Direct,
		Route: netlink.Route{
			LinkIndex: self.Underlay.Attrs().Index,
			Dst:       dataplane.PrefixToIPNet(peer.Subnet),
			Gw:        peer.UnderlayIP.AsSlice(),
			Protocol:  backend.RouteProtocol,
		},
	}
}
