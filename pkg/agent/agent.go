package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/backend"
	_ "github.com/flatnet-io/flatnet/pkg/backend/auto"   // registers auto
	_ "github.com/flatnet-io/flatnet/pkg/backend/hostgw" // registers host-gw
	_ "github.com/flatnet-io/flatnet/pkg/backend/vxlan"  // registers vxlan
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/nat"
	"github.com/flatnet-io/flatnet/pkg/reconcile"
)

// Run is the agent: lease -> node setup -> peer reconcile until ctx ends.
// Stopping (SIGTERM) or dying (SIGKILL) leaves the data plane and the lease
// in place; a restarted agent adopts what it finds, so pods keep talking.
func Run(ctx context.Context, cfg Config, log *slog.Logger) error {
	be, err := backend.New(cfg.Backend, backend.Options{VNI: cfg.VXLANVNI, Port: cfg.VXLANPort, ChecksumOffload: cfg.VXLANChecksumOffload})
	if err != nil {
		return err
	}
	self, err := detectUnderlay(cfg.Iface, cfg.NodeName)
	if err != nil {
		return err
	}
	inst, err := newInstaller(cfg)
	if err != nil {
		return err
	}
	ds, err := openDatastore(cfg, log)
	if err != nil {
		return err
	}
	masq := nat.New(-1)
	m := newMetrics(ds.LeaseHeld, func() float64 { p, _ := masq.Masqueraded(); return float64(p) })
	if cfg.Listen != "" {
		stuck := 3*max(cfg.ResyncInterval, cfg.InstallInterval) + 30*time.Second
		if err := m.serve(ctx, cfg.Listen, stuck, log); err != nil {
			return err
		}
	}
	log.Info("starting", "node", cfg.NodeName, "underlay", self.Underlay.Attrs().Name, "ip", self.UnderlayIP,
		"backend", be.Name(), "datastore", cfg.Datastore, "clusterCIDR", cfg.ClusterCIDR)

	// 1. Backend devices first: their data goes into the lease.
	data, mtu, err := be.Prepare(ctx, self)
	if err != nil {
		return fmt.Errorf("backend %s: %w", be.Name(), err)
	}
	if cfg.MTU != 0 {
		mtu = cfg.MTU
	}

	// 2. Lease. The CNI files do not depend on it, so they go in first:
	// the runtime can then ask the plugin's STATUS, which answers "no
	// subnet yet" (code 50) until the node state file is written.
	if _, err := inst.Ensure(); err != nil {
		return fmt.Errorf("install CNI files: %w", err)
	}
	m.setReady(false, "waiting for a subnet lease")
	lease, err := ds.Register(ctx, datastore.NodeInfo{
		Name: cfg.NodeName, UnderlayIP: self.UnderlayIP, Backend: be.Name(), BackendData: data,
		PreferredSubnet: loadLease(cfg.StateDir),
	})
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("lease: %w", err)
	}
	log.Info("holding lease", "subnet", lease.Subnet, "podMTU", mtu)
	if err := saveLease(cfg.StateDir, lease.Subnet); err != nil {
		return err
	}

	// 3. Node setup.
	if err := setupNode(cfg, lease, mtu, log); err != nil {
		return fmt.Errorf("node setup: %w", err)
	}

	// 4. Peer reconcile, on every lease change, when something it made is
	// deleted, and periodically to repair drift.
	snapshots, err := ds.Watch(ctx)
	if err != nil {
		return err
	}
	overlayDev := ""
	if ov, ok := be.(reconcile.Overlay); ok {
		overlayDev = ov.DeviceName()
	}
	deleted := watchDeletions(ctx, overlayDev, log)
	self.Subnet = lease.Subnet
	rec := &reconcile.Reconciler{Backend: be, Self: self, Log: log}
	cluster := netip.MustParsePrefix(cfg.ClusterCIDR)
	leases := []datastore.Lease{lease}
	sync := func() {
		start := time.Now()
		res, err := rec.Sync(lease, leases)
		nerr := masq.Sync(nat.Rules{ClusterCIDR: cluster, NodeIPs: nodeIPs(self.UnderlayIP, leases)})
		m.reconcileDur.Observe(time.Since(start).Seconds())
		for kind, n := range res.Changes {
			m.changes.WithLabelValues(kind).Add(float64(n))
		}
		m.peers.Set(float64(len(leases) - 1))
		m.peersProgrammed.Set(float64(len(res.Programmed)))
		m.peersFailed.Set(float64(len(res.Failed)))
		for peer, perr := range res.Failed {
			log.Error("cannot reach peer", "peer", peer, "err", perr)
		}
		m.setStatus(statusOf(cfg, lease, be.Name(), leases, res))
		if err != nil || nerr != nil || len(res.Failed) > 0 {
			m.reconcileErrs.Inc()
		}
		if err != nil {
			log.Error("reconcile", "err", err)
		}
		if nerr != nil {
			log.Error("masquerade rules", "err", nerr)
		}
	}
	// The first sync waits for the full set of leases: syncing with only
	// our own would prune every peer's route for a moment after a restart.
	select {
	case first, ok := <-snapshots:
		if !ok {
			return nil // ctx ended
		}
		leases = first
	case <-ctx.Done():
		return nil
	}
	sync()
	m.setReady(true, "")
	log.Info("node ready", "subnet", lease.Subnet, "peers", len(leases)-1)
	if r, ok := ds.(readyReporter); ok {
		if err := r.MarkReady(ctx); err != nil {
			log.Warn("cannot report the node ready yet; the datastore keeps trying", "err", err)
		}
	}

	resync := time.NewTicker(cfg.ResyncInterval)
	defer resync.Stop()
	install := time.NewTicker(cfg.InstallInterval)
	defer install.Stop()
	for {
		m.alive()
		select {
		case <-ctx.Done():
			log.Info("stopping; routes, NAT, bridge and lease stay in place")
			return nil
		case next, ok := <-snapshots:
			if !ok {
				// The store closes it when ctx ends. Syncing its zero
				// value would prune every peer's route on the way out.
				snapshots = nil
				continue
			}
			leases = next
			sync()
		case <-deleted:
			sync()
		case <-resync.C:
			if err := setupNode(cfg, lease, mtu, log); err != nil {
				log.Error("node setup drift repair", "err", err)
			}
			sync()
		case <-install.C:
			done, err := inst.Ensure()
			for _, f := range done {
				m.installs.WithLabelValues(f).Inc()
				log.Warn("reinstalled missing or changed CNI file", "file", f)
			}
			if err != nil {
				log.Error("install CNI files", "err", err)
			}
		}
	}
}

func statusOf(cfg Config, own datastore.Lease, backendName string, leases []datastore.Lease, res *reconcile.Result) Status {
	st := Status{Node: cfg.NodeName, Subnet: own.Subnet.String(), UnderlayIP: own.UnderlayIP.String(), Backend: backendName}
	mode := map[string]backend.Mode{}
	for _, p := range res.Programmed {
		mode[p.Peer] = p.Mode
	}
	for _, l := range leases {
		if l.Node == own.Node {
			continue
		}
		ps := PeerStatus{Node: l.Node, Subnet: l.Subnet.String(), UnderlayIP: l.UnderlayIP.String()}
		if md, ok := mode[l.Node]; ok {
			ps.Mode, ps.Programmed = string(md), true
		}
		if err := res.Failed[l.Node]; err != nil {
			ps.Error = err.Error()
		}
		st.Peers = append(st.Peers, ps)
	}
	sort.Slice(st.Peers, func(i, j int) bool { return st.Peers[i].Node < st.Peers[j].Node })
	return st
}

// nodeIPs are never masqueraded: this node's own (even while its lease is
// not in the store) and every peer's.
func nodeIPs(self netip.Addr, leases []datastore.Lease) []netip.Addr {
	out := []netip.Addr{self}
	for _, l := range leases {
		if l.UnderlayIP.IsValid() {
			out = append(out, l.UnderlayIP)
		}
	}
	return out
}

// watchDeletions signals when someone deletes what the reconciler made:
// one of flatnet's routes, the overlay device (the kernel drops its routes
// without telling), or a neighbour or FDB entry on it. The next sync puts
// it back at once rather than at the next resync.
func watchDeletions(ctx context.Context, overlayDev string, log *slog.Logger) <-chan struct{} {
	out := make(chan struct{}, 1)
	signal := func() {
		select {
		case out <- struct{}{}:
		default:
		}
	}
	warn := func(what string) func(error) {
		return func(err error) {
			if ctx.Err() == nil {
				log.Warn(what+" event subscription", "err", err)
			}
		}
	}
	routes := make(chan netlink.RouteUpdate, 64)
	forward(log, "route", routes, netlink.RouteSubscribeWithOptions(routes, ctx.Done(), netlink.RouteSubscribeOptions{ErrorCallback: warn("route")}),
		func(u netlink.RouteUpdate) bool {
			return u.Type == unix.RTM_DELROUTE && u.Protocol == backend.RouteProtocol
		}, signal)
	if overlayDev == "" {
		return out
	}
	links := make(chan netlink.LinkUpdate, 64)
	forward(log, "link", links, netlink.LinkSubscribeWithOptions(links, ctx.Done(), netlink.LinkSubscribeOptions{ErrorCallback: warn("link")}),
		func(u netlink.LinkUpdate) bool {
			return u.Header.Type == unix.RTM_DELLINK && u.Link != nil && u.Link.Attrs().Name == overlayDev
		}, signal)
	neighs := make(chan netlink.NeighUpdate, 256)
	forward(log, "neighbour", neighs, netlink.NeighSubscribeWithOptions(neighs, ctx.Done(), netlink.NeighSubscribeOptions{ErrorCallback: warn("neighbour")}),
		func(u netlink.NeighUpdate) bool {
			// Every entry on the overlay device is ours (it learns nothing);
			// a deleted neighbour is reported as failed, not permanent, so
			// its state cannot tell.
			if u.Type != unix.RTM_DELNEIGH {
				return false
			}
			l, err := netlink.LinkByIndex(u.LinkIndex)
			return err == nil && l.Attrs().Name == overlayDev
		}, signal)
	return out
}

// forward calls signal for every update that matches, until the
// subscription ends; if subscribing failed, only the resync is left.
func forward[T any](log *slog.Logger, what string, updates <-chan T, subscribeErr error, match func(T) bool, signal func()) {
	if subscribeErr != nil {
		log.Warn("no "+what+" events; relying on periodic resync", "err", subscribeErr)
		return
	}
	go func() {
		for u := range updates {
			if match(u) {
				signal()
			}
		}
	}()
}
