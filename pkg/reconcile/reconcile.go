// Package reconcile makes the kernel match the set of peers: one route per
// peer subnet (and, for overlay peers, one neighbour and one FDB entry). It
// is level-triggered: every call computes the whole desired state from the
// current leases and diffs it against what the kernel has, so the same call
// serves a watch event, a periodic resync, drift repair and a restart
// (routes carry backend.RouteProtocol, so stale ones are found and pruned).
package reconcile

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"sort"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Overlay is implemented by backends that own a tunnel device: the
// reconciler has the device (re)made before planning, and prunes that
// device's neighbour and FDB entries too.
type Overlay interface {
	// EnsureDevice returns the tunnel device, re-creating it if it was
	// deleted or changed.
	EnsureDevice() (netlink.Link, error)
	// DeviceName names the device, for watching its deletion.
	DeviceName() string
}

// Reconciler programs peers for one node.
type Reconciler struct {
	Backend backend.Backend
	Self    backend.Node
	Log     *slog.Logger
}

// Result says what a Sync did.
type Result struct {
	Programmed []backend.Plan   // peers with complete kernel state, sorted by peer
	Failed     map[string]error // peers that could not be programmed
	Changes    map[string]int   // "route_add", "route_del", "neigh_add", ... counts
}

func (r *Result) count(kind string) { r.Changes[kind]++ }

// Sync makes the kernel match leases (which may include this node's own).
// It returns an error only for failures that affect all peers; per-peer
// problems are in Result.Failed.
func (r *Reconciler) Sync(own datastore.Lease, leases []datastore.Lease) (*Result, error) {
	res := &Result{Failed: map[string]error{}, Changes: map[string]int{}}
	var errs []error
	// The device first: if it had to be re-created, the plans must name
	// the new one.
	var dev netlink.Link
	if ov, ok := r.Backend.(Overlay); ok {
		var err error
		if dev, err = ov.EnsureDevice(); err != nil {
			errs = append(errs, fmt.Errorf("overlay device: %w", err))
		}
	}
	desired := map[string]backend.Plan{} // by destination subnet
	for _, l := range leases {
		if l.Node == own.Node {
			continue
		}
		if l.Subnet.Overlaps(own.Subnet) {
			res.Failed[l.Node] = fmt.Errorf("peer %s claims %s, which overlaps this node's %s", l.Node, l.Subnet, own.Subnet)
			continue
		}
		p, err := r.Backend.Plan(r.Self, l)
		if err != nil {
			res.Failed[l.Node] = err
			continue
		}
		if p.FDB != nil && dev == nil {
			res.Failed[l.Node] = fmt.Errorf("peer %s needs the overlay device, which is missing: %w", l.Node, errors.Join(errs...))
		}
		desired[p.Route.Dst.String()] = p
	}

	if dev != nil {
		if err := r.syncOverlay(dev, desired, res); err != nil {
			errs = append(errs, err)
		}
	}
	if err := r.syncRoutes(desired, res); err != nil {
		errs = append(errs, err)
	}
	for _, p := range desired {
		if _, failed := res.Failed[p.Peer]; !failed {
			res.Programmed = append(res.Programmed, p)
		}
	}
	sort.Slice(res.Programmed, func(i, j int) bool { return res.Programmed[i].Peer < res.Programmed[j].Peer })
	return res, errors.Join(errs...)
}

func (r *Reconciler) syncRoutes(desired map[string]backend.Plan, res *Result) error {
	have, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4,
		&netlink.Route{Protocol: backend.RouteProtocol, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_PROTOCOL|netlink.RT_FILTER_TABLE)
	if err != nil {
		return fmt.Errorf("list routes: %w", err)
	}
	current := map[string]netlink.Route{}
	for _, rt := range have {
		if rt.Dst == nil {
			continue
		}
		if _, ok := desired[rt.Dst.String()]; !ok {
			if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
				return fmt.Errorf("delete stale route %s: %w", rt.Dst, err)
			}
			r.Log.Info("removed route of departed peer", "dst", rt.Dst, "gw", rt.Gw)
			res.count("route_del")
			continue
		}
		current[rt.Dst.String()] = rt
	}
	for dst, p := range desired {
		if _, failed := res.Failed[p.Peer]; failed {
			continue
		}
		if cur, ok := current[dst]; ok && sameRoute(cur, p.Route) {
			continue
		}
		rt := p.Route
		rt.Table = unix.RT_TABLE_MAIN
		if err := netlink.RouteReplace(&rt); err != nil {
			res.Failed[p.Peer] = fmt.Errorf("route %s via %s: %w", dst, rt.Gw, err)
			continue
		}
		r.Log.Info("programmed route", "peer", p.Peer, "dst", dst, "gw", rt.Gw, "mode", p.Mode)
		res.count("route_set")
	}
	return nil
}

func sameRoute(a, b netlink.Route) bool {
	return a.LinkIndex == b.LinkIndex && a.Gw.Equal(b.Gw) && a.Src.Equal(b.Src) &&
		a.Flags&int(netlink.FLAG_ONLINK) == b.Flags&int(netlink.FLAG_ONLINK)
}

// syncOverlay makes the tunnel device's permanent neighbour entries and
// FDB entries exactly those of the overlay peers. Neighbour and FDB come
// before the route, so the first packet routed to a peer can be sent.
func (r *Reconciler) syncOverlay(dev netlink.Link, desired map[string]backend.Plan, res *Result) error {
	idx := dev.Attrs().Index
	wantNeigh := map[string]backend.Plan{} // by IP
	wantFDB := map[string]backend.Plan{}   // by MAC
	for _, p := range desired {
		if _, failed := res.Failed[p.Peer]; !failed && p.Neigh != nil && p.FDB != nil {
			wantNeigh[p.Neigh.IP.String()] = p
			wantFDB[p.FDB.HardwareAddr.String()] = p
		}
	}
	neighs, err := dataplane.NeighList(idx, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list neighbours on %s: %w", dev.Attrs().Name, err)
	}
	for _, n := range neighs {
		p, ok := wantNeigh[n.IP.String()]
		if ok && n.HardwareAddr.String() == p.Neigh.HardwareAddr.String() && n.State&netlink.NUD_PERMANENT != 0 {
			delete(wantNeigh, n.IP.String())
			continue
		}
		if !ok && n.State&netlink.NUD_PERMANENT != 0 {
			if err := netlink.NeighDel(&n); err == nil {
				res.count("neigh_del")
			}
		}
	}
	fdbs, err := dataplane.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return fmt.Errorf("list fdb on %s: %w", dev.Attrs().Name, err)
	}
	for _, f := range fdbs {
		mac := f.HardwareAddr.String()
		if isZeroMAC(f.HardwareAddr) {
			continue
		}
		p, ok := wantFDB[mac]
		if ok && f.IP.Equal(p.FDB.IP) {
			delete(wantFDB, mac)
			continue
		}
		if !ok {
			if err := netlink.NeighDel(&f); err == nil {
				res.count("fdb_del")
			}
		}
	}
	for _, p := range wantNeigh {
		if err := netlink.NeighSet(p.Neigh); err != nil {
			res.Failed[p.Peer] = fmt.Errorf("neighbour %s: %w", p.Neigh.IP, err)
			continue
		}
		res.count("neigh_set")
	}
	for _, p := range wantFDB {
		if err := netlink.NeighSet(p.FDB); err != nil {
			res.Failed[p.Peer] = fmt.Errorf("fdb %s: %w", p.FDB.HardwareAddr, err)
			continue
		}
		res.count("fdb_set")
	}
	return nil
}

func isZeroMAC(m net.HardwareAddr) bool {
	for _, b := range m {
		if b != 0 {
			return false
		}
	}
	return true
}
