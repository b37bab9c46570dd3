// Package auto reaches each peer the cheapest way that works: a plain
// route (as host-gw) when the peer's underlay IP is on this node's
// segment, the VXLAN overlay otherwise. One node can have both kinds of
// peers, e.g. same-rack peers direct and other racks encapsulated.
package auto

import (
	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/backend/hostgw"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Name of this backend.
const Name = "auto"

func init() {
	backend.Register(Name, func(o backend.Options) (backend.Backend, error) {
		vx, err := vxlan.New(o)
		if err != nil {
			return nil, err
		}
		return &Auto{vx}, nil
	})
}

// Auto is the auto backend. Its Prepare, device and lease data are the
// VXLAN backend's: peers may need the overlay at any time, and the pods'
// MTU must fit it (a pod cannot have one MTU per destination).
type Auto struct{ *vxlan.VXLAN }

func (*Auto) Name() string { return Name }

// Plan routes on-link peers directly and the others through VXLAN.
func (a *Auto) Plan(self backend.Node, peer datastore.Lease) (backend.Plan, error) {
	if self.OnLink(peer.UnderlayIP) {
		return hostgw.DirectPlan(self, peer), nil
	}
	return a.VXLAN.Plan(self, peer)
}
