package reconcile_test

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/backend/auto"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/reconcile"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// kernel is what the node's kernel holds for peers.
type kernel struct {
	routes map[string]string // dst -> "dev gw src"
	neigh  map[string]string // IP -> MAC, on the device
	fdb    map[string]string // MAC -> underlay IP, on the device
}

func read(t *testing.T) kernel {
	t.Helper()
	k := kernel{routes: map[string]string{}, neigh: map[string]string{}, fdb: map[string]string{}}
	rs, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range rs {
		l, _ := netlink.LinkByIndex(r.LinkIndex)
		k.routes[r.Dst.String()] = l.Attrs().Name + " " + r.Gw.String() + " " + r.Src.String()
	}
	dev, err := netlinksafe.LinkByName("flatnet.1")
	if err != nil {
		t.Fatal(err)
	}
	ns4, _ := dataplane.NeighList(dev.Attrs().Index, netlink.FAMILY_V4)
	for _, n := range ns4 {
		k.neigh[n.IP.String()] = n.HardwareAddr.String()
	}
	fdb, _ := dataplane.NeighList(dev.Attrs().Index, unix.AF_BRIDGE)
	for _, f := range fdb {
		k.fdb[f.HardwareAddr.String()] = f.IP.String()
	}
	return k
}

func lease(node, ip, subnet string) datastore.Lease {
	l := datastore.Lease{Node: node, UnderlayIP: netip.MustParseAddr(ip), Subnet: netip.MustParsePrefix(subnet), Backend: vxlan.Name}
	l.BackendData = datastore.BackendData{VTEPMAC: vxlan.VTEPMAC(l.UnderlayIP).String(), VNI: 1, Port: 8472}
	return l
}

func want(t *testing.T, got kernel, peers ...datastore.Lease) {
	t.Helper()
	if len(got.routes) != len(peers) || len(got.neigh) != len(peers) || len(got.fdb) != len(peers) {
		t.Fatalf("kernel has %d routes, %d neighbours, %d FDB entries; want %d of each: %+v", len(got.routes), len(got.neigh), len(got.fdb), len(peers), got)
	}
	for _, p := range peers {
		mac := vxlan.VTEPMAC(p.UnderlayIP).String()
		if r := got.routes[p.Subnet.String()]; r != "flatnet.1 "+p.Subnet.Addr().String()+" 10.244.1.1" {
			t.Errorf("route to %s: %q", p.Subnet, r)
		}
		if got.neigh[p.Subnet.Addr().String()] != mac || got.fdb[mac] != p.UnderlayIP.String() {
			t.Errorf("peer %s: neighbours %v, FDB %v", p.Node, got.neigh, got.fdb)
		}
	}
}

func TestSyncProgramsRepairsAndPrunes(t *testing.T) {
	h := testutil.NewNS(t, "reconcile")
	own := lease("n1", "10.99.1.11", "10.244.1.0/24")
	n2 := lease("n2", "10.99.2.12", "10.244.2.0/24")
	n3 := lease("n3", "10.99.2.13", "10.244.3.0/24")
	err := h.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1500, Flags: net.FlagUp}, PeerName: "eth1"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		ul, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(ul, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(netip.MustParsePrefix("10.99.1.11/24"))}); err != nil {
			return err
		}
		if _, err := dataplane.EnsureBridge("flatnet0", netip.MustParsePrefix("10.244.1.1/24"), 1450); err != nil {
			return err
		}
		self := backend.Node{Name: "n1", Underlay: ul, UnderlayIP: own.UnderlayIP,
			Underlays: []netip.Prefix{netip.MustParsePrefix("10.99.1.0/24")}, Subnet: own.Subnet}
		be, err := vxlan.New(backend.Options{})
		if err != nil {
			return err
		}
		if _, _, err := be.Prepare(context.Background(), self); err != nil {
			return err
		}
		rec := &reconcile.Reconciler{Backend: be, Self: self, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		sync := func(leases ...datastore.Lease) *reconcile.Result {
			t.Helper()
			res, err := rec.Sync(own, append(leases, own))
			if err != nil || len(res.Failed) > 0 {
				t.Fatalf("sync: %v %v", err, res.Failed)
			}
			return res
		}

		if res := sync(n2, n3); len(res.Programmed) != 2 {
			t.Fatalf("programmed %v", res.Programmed)
		}
		want(t, read(t), n2, n3)
		if res := sync(n2, n3); len(res.Changes) != 0 {
			t.Errorf("a second sync changed %v: it must be a no-op", res.Changes)
		}

		// Drift: a route without the source address, a foreign permanent
		// neighbour and FDB entry on the device.
		dev, _ := netlinksafe.LinkByName("flatnet.1")
		rt := netlink.Route{LinkIndex: dev.Attrs().Index, Dst: dataplane.PrefixToIPNet(n2.Subnet), Gw: net.IPv4(10, 244, 2, 0),
			Flags: int(netlink.FLAG_ONLINK), Protocol: backend.RouteProtocol}
		stray := net.HardwareAddr{0x0e, 0xfa, 1, 2, 3, 4}
		for _, err := range []error{
			netlink.RouteReplace(&rt),
			netlink.NeighSet(&netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT, IP: net.IPv4(10, 244, 9, 0), HardwareAddr: stray}),
			netlink.NeighSet(&netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT, IP: net.IPv4(10, 99, 9, 9), HardwareAddr: stray}),
		} {
			if err != nil {
				t.Fatal(err)
			}
		}
		res := sync(n2, n3)
		if res.Changes["route_set"] != 1 || res.Changes["neigh_del"] != 1 || res.Changes["fdb_del"] != 1 {
			t.Errorf("drift repair changed %v", res.Changes)
		}
		want(t, read(t), n2, n3)

		// n3 comes back with another underlay IP: new MAC, old FDB entry gone.
		moved := lease("n3", "10.99.2.99", "10.244.3.0/24")
		sync(n2, moved)
		want(t, read(t), n2, moved)

		// n3 leaves: its route, neighbour and FDB entry go.
		sync(n2)
		want(t, read(t), n2)

		// The device is deleted: the next sync brings it back, fully programmed.
		if err := netlink.LinkDel(dev); err != nil {
			t.Fatal(err)
		}
		sync(n2)
		want(t, read(t), n2)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestPeersOfAMissingOverlayDeviceFailButDirectPeersDoNot(t *testing.T) {
	// The auto backend with its VXLAN device blocked by a VNI clash: the
	// on-link peer is still routed, the far one fails with the reason.
	h := testutil.NewNS(t, "reconcile")
	err := h.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", MTU: 1500, Flags: net.FlagUp}, PeerName: "eth1"}
		if err := netlink.LinkAdd(veth); err != nil {
			return err
		}
		ul, _ := netlinksafe.LinkByName("eth0")
		if err := netlink.AddrAdd(ul, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(netip.MustParsePrefix("10.99.1.11/24"))}); err != nil {
			return err
		}
		self := backend.Node{Name: "n1", Underlay: ul, UnderlayIP: netip.MustParseAddr("10.99.1.11"),
			Underlays: []netip.Prefix{netip.MustParsePrefix("10.99.1.0/24")}, Subnet: netip.MustParsePrefix("10.244.1.0/24")}
		be, err := backend.New(auto.Name, backend.Options{})
		if err != nil {
			return err
		}
		if _, _, err := be.Prepare(context.Background(), self); err != nil {
			return err
		}
		dev, _ := netlinksafe.LinkByName("flatnet.1")
		netlink.LinkDel(dev)
		// Someone else's device with VNI 1 and port 8472 blocks ours.
		if err := netlink.LinkAdd(&netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: "other.1"}, VxlanId: 1, Port: 8472}); err != nil {
			return err
		}
		rec := &reconcile.Reconciler{Backend: be, Self: self, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
		own := lease("n1", "10.99.1.11", "10.244.1.0/24")
		near, far := lease("n2", "10.99.1.12", "10.244.2.0/24"), lease("n3", "10.99.2.13", "10.244.3.0/24")
		res, err := rec.Sync(own, []datastore.Lease{own, near, far})
		if err == nil || res.Failed["n3"] == nil || res.Failed["n2"] != nil || len(res.Programmed) != 1 || res.Programmed[0].Peer != "n2" {
			t.Errorf("sync: err %v, failed %v, programmed %v; want n2 direct, n3 failed for the device", err, res.Failed, res.Programmed)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}
