package lab_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/safchain/ethtool"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

const vxDev = "flatnet.1"

// kernelView is what a node's kernel holds for its peers: flatnet's
// routes (by destination), and the permanent neighbour and FDB entries on
// the VXLAN device.
type kernelView struct {
	routes map[string]routeView // by peer subnet
	neigh  map[string]string    // VTEP address -> MAC
	fdb    map[string]string    // MAC -> underlay IP
}

type routeView struct{ dev, gw, src string }

func inNode(t *testing.T, n *lab.Node, f func() error) {
	t.Helper()
	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	if err := h.Do(func(ns.NetNS) error { return f() }); err != nil {
		t.Fatalf("in %s: %v", n.Name, err)
	}
}

func viewOf(t *testing.T, n *lab.Node) kernelView {
	t.Helper()
	v := kernelView{routes: map[string]routeView{}, neigh: map[string]string{}, fdb: map[string]string{}}
	inNode(t, n, func() error {
		rs, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		if err != nil {
			return err
		}
		for _, r := range rs {
			l, err := netlink.LinkByIndex(r.LinkIndex)
			if err != nil {
				return err
			}
			v.routes[r.Dst.String()] = routeView{dev: l.Attrs().Name, gw: r.Gw.String(), src: r.Src.String()}
		}
		dev, err := netlinksafe.LinkByName(vxDev)
		if err != nil {
			return nil // no overlay device: no entries
		}
		ns4, err := dataplane.NeighList(dev.Attrs().Index, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, e := range ns4 {
			if e.State&netlink.NUD_PERMANENT != 0 {
				v.neigh[e.IP.String()] = e.HardwareAddr.String()
			}
		}
		fdb, err := dataplane.NeighList(dev.Attrs().Index, unix.AF_BRIDGE)
		if err != nil {
			return err
		}
		for _, e := range fdb {
			v.fdb[e.HardwareAddr.String()] = e.IP.String()
		}
		return nil
	})
	return v
}

// wantPeer says how n must reach peer: direct (route via its underlay IP
// on eth0) or overlay (route, neighbour and FDB entry on the VXLAN device).
func checkPeer(v kernelView, n, peer *lab.Node, mode backend.Mode) error {
	rt, ok := v.routes[peer.Subnet.String()]
	if !ok {
		return fmt.Errorf("%s has no route to %s's %s", n.Name, peer.Name, peer.Subnet)
	}
	mac := vxlan.VTEPMAC(peer.UnderlayIP).String()
	vtep := peer.Subnet.Addr().String()
	switch mode {
	case backend.Direct:
		if rt != (routeView{dev: "eth0", gw: peer.UnderlayIP.String(), src: "<nil>"}) {
			return fmt.Errorf("%s reaches %s by %+v, want directly via %s on eth0", n.Name, peer.Name, rt, peer.UnderlayIP)
		}
		if _, ok := v.fdb[mac]; ok {
			return fmt.Errorf("%s has an FDB entry for direct peer %s", n.Name, peer.Name)
		}
	case backend.Overlay:
		want := routeView{dev: vxDev, gw: vtep, src: cidr.FirstHost(n.Subnet).String()}
		if rt != want {
			return fmt.Errorf("%s reaches %s by %+v, want %+v", n.Name, peer.Name, rt, want)
		}
		if v.neigh[vtep] != mac {
			return fmt.Errorf("%s: neighbour %s is %q, want %s (%s's VTEP MAC)", n.Name, vtep, v.neigh[vtep], mac, peer.Name)
		}
		if v.fdb[mac] != peer.UnderlayIP.String() {
			return fmt.Errorf("%s: FDB %s -> %q, want %s", n.Name, mac, v.fdb[mac], peer.UnderlayIP)
		}
	}
	return nil
}

// waitPeers polls until every node reaches every other node as mode(n, peer) says.
func waitPeers(t *testing.T, s *lab.State, mode func(n, peer *lab.Node) backend.Mode) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		var errs []error
		for _, n := range s.Nodes {
			v := viewOf(t, n)
			if len(v.routes) != len(s.Nodes)-1 {
				errs = append(errs, fmt.Errorf("%s has %d flatnet routes, want %d: %v", n.Name, len(v.routes), len(s.Nodes)-1, v.routes))
			}
			overlay := 0
			for _, p := range s.Nodes {
				if p != n {
					errs = append(errs, checkPeer(v, n, p, mode(n, p)))
					if mode(n, p) == backend.Overlay {
						overlay++
					}
				}
			}
			if len(v.neigh) != overlay || len(v.fdb) != overlay {
				errs = append(errs, fmt.Errorf("%s has %d neighbour and %d FDB entries, want %d (stale ones left?)", n.Name, len(v.neigh), len(v.fdb), overlay))
			}
		}
		err := errors.Join(errs...)
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func alwaysOverlay(_, _ *lab.Node) backend.Mode { return backend.Overlay }

func byRack(n, p *lab.Node) backend.Mode {
	if n.Rack == p.Rack {
		return backend.Direct
	}
	return backend.Overlay
}

func TestVXLANAcrossRacks(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 4, PodsPerNode: 1, Backend: "vxlan", Topology: "racks", Racks: 2})
	mustCheck(t, s)
	waitPeers(t, s, alwaysOverlay)
	n1 := s.Nodes[0]
	inNode(t, n1, func() error {
		e, err := ethtool.NewEthtool()
		if err != nil {
			return err
		}
		defer e.Close()
		// On with the kernel's NAT checksum fix (5.7+), off before it.
		if on, err := vxlan.TxChecksumOffload(e, vxDev); err != nil || on != vxlan.ChecksumOffloadByDefault() {
			t.Errorf("tx checksum offload on %s: %v, %v; want %v", vxDev, on, err, vxlan.ChecksumOffloadByDefault())
		}
		return nil
	})
	from, to := s.PodsOf("n1")[0], s.PodsOf("n2")[0] // rack 1 -> rack 2

	t.Run("path MTU", func(t *testing.T) { testPathMTU(t, from, to) })
	t.Run("large TCP transfer", func(t *testing.T) { testTransfer(t, from, to, 16<<20) })
}

// testPathMTU: a DF datagram of the pod MTU crosses the overlay intact;
// one byte more fails at the sender with EMSGSIZE instead of vanishing.
func testPathMTU(t *testing.T, from, to *lab.Pod) {
	src, dst := podNS(t, from), podNS(t, to)
	var mtu int
	src.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			t.Fatal(err)
		}
		mtu = l.Attrs().MTU
		return nil
	})
	if mtu != 1500-50 {
		t.Fatalf("pod MTU %d, want the underlay's 1500 less 50 of VXLAN over IPv4", mtu)
	}
	var rx *net.UDPConn
	dst.Do(func(ns.NetNS) (err error) {
		rx, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(to.IP, 0)))
		if err != nil {
			t.Fatal(err)
		}
		return nil
	})
	defer rx.Close()
	var tx *net.UDPConn
	src.Do(func(ns.NetNS) (err error) {
		if tx, err = net.DialUDP("udp4", nil, rx.LocalAddr().(*net.UDPAddr)); err != nil {
			t.Fatal(err)
		}
		return nil
	})
	defer tx.Close()
	rc, _ := tx.SyscallConn()
	rc.Control(func(fd uintptr) {
		if err := unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO); err != nil {
			t.Fatal(err)
		}
	})

	payload := bytes.Repeat([]byte{0x5a}, mtu-20-8) // a full-size packet: IP 20 + UDP 8 + payload = MTU
	buf := make([]byte, 65536)
	got := 0
	for try := 0; try < 20 && got != len(payload); try++ { // UDP may lose one; twenty all lost is a broken path
		if _, err := tx.Write(payload); err != nil {
			t.Fatalf("send %d bytes with DF: %v", len(payload), err)
		}
		rx.SetReadDeadline(time.Now().Add(250 * time.Millisecond))
		got, _ = rx.Read(buf)
	}
	if got != len(payload) {
		t.Fatalf("a DF packet of the pod MTU (%d bytes) never arrived across the overlay", mtu)
	}
	_, err := tx.Write(append(payload, 0))
	if !errors.Is(err, syscall.EMSGSIZE) {
		t.Fatalf("sending MTU+1 with DF: %v, want EMSGSIZE", err)
	}
	t.Logf("%d-byte DF packet crossed; %d bytes: %v", mtu, mtu+1, err)
}

// testTransfer sends n random bytes over TCP and compares digests: full
// MSS segments cross the overlay, checksummed right.
func testTransfer(t *testing.T, from, to *lab.Pod, n int64) {
	src, dst := podNS(t, from), podNS(t, to)
	ln, err := probe.Listen(dst, net.JoinHostPort(to.IP.String(), "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan []byte, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			got <- nil
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(60 * time.Second))
		h := sha256.New()
		io.Copy(h, c)
		got <- h.Sum(nil)
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c, err := probe.Dial(ctx, src, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	h := sha256.New()
	if _, err := io.Copy(io.MultiWriter(c, h), io.LimitReader(rand.Reader, n)); err != nil {
		t.Fatalf("send: %v", err)
	}
	c.Close()
	if sum := <-got; !bytes.Equal(sum, h.Sum(nil)) {
		t.Fatalf("receiver's digest of %d bytes differs from the sender's", n)
	}
}

func podNS(t *testing.T, p *lab.Pod) ns.NetNS {
	t.Helper()
	h, err := ns.GetNS(nsutil.Path(p.NetNS))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close() })
	return h
}

// With resync an hour away, only the agent's deletion events can repair.
func TestVXLANRepairsDeletedEntriesAndPrunesRemovedPeers(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 3, PodsPerNode: 1, Backend: "vxlan", Topology: "racks", Racks: 2,
		Resync: time.Hour, LeaseTTL: 3 * time.Second})
	waitPeers(t, s, alwaysOverlay)
	n1, n2 := s.Nodes[0], s.Nodes[1]
	vtep := n2.Subnet.Addr()
	mac := vxlan.VTEPMAC(n2.UnderlayIP)
	deleteOnN1 := func(what string, f func(dev netlink.Link) error) {
		t.Helper()
		inNode(t, n1, func() error {
			dev, err := netlinksafe.LinkByName(vxDev)
			if err != nil {
				return err
			}
			if err := f(dev); err != nil {
				return fmt.Errorf("delete %s: %w", what, err)
			}
			return nil
		})
		waitPeers(t, s, alwaysOverlay)
	}
	deleteOnN1("neighbour entry", func(dev netlink.Link) error {
		return netlink.NeighDel(&netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4, IP: vtep.AsSlice()})
	})
	deleteOnN1("FDB entry", func(dev netlink.Link) error {
		return netlink.NeighDel(&netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
			IP: n2.UnderlayIP.AsSlice(), HardwareAddr: mac})
	})
	deleteOnN1("VXLAN device", func(dev netlink.Link) error { return netlink.LinkDel(dev) })
	mustCheck(t, s)

	// A removed node's route, neighbour and FDB entry go when its lease expires.
	gone := s.Nodes[2]
	if err := s.RemoveNode(gone); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, s, alwaysOverlay)
	mustCheck(t, s)
}

func TestAutoMixesDirectAndOverlayAndFollowsANewUnderlayIP(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 4, PodsPerNode: 1, Backend: "auto", Topology: "racks", Racks: 2})
	mustCheck(t, s)
	waitPeers(t, s, byRack)
	for _, n := range s.Status(context.Background()).Nodes {
		var direct, overlay []string
		for _, p := range s.Nodes {
			if p.Name != n.Name && p.Rack == n.Rack {
				direct = append(direct, p.Name)
			} else if p.Name != n.Name {
				overlay = append(overlay, p.Name)
			}
		}
		if !slices.Equal(n.Direct, direct) || !slices.Equal(n.Overlay, overlay) || len(n.Unreached) != 0 {
			t.Errorf("lab status of %s: direct %v overlay %v unreached %v; want direct %v overlay %v",
				n.Name, n.Direct, n.Overlay, n.Unreached, direct, overlay)
		}
	}

	// n1 comes back with a new address: same-rack peers re-route to it,
	// other racks get its new VTEP MAC and FDB entry, stale ones go.
	n1 := s.Nodes[0]
	old := n1.UnderlayIP
	if err := s.ReaddressNode(context.Background(), n1, netip.MustParsePrefix("10.99.1.111/24")); err != nil {
		t.Fatal(err)
	}
	waitPeers(t, s, byRack)
	for _, n := range s.Nodes {
		v := viewOf(t, n)
		_, staleFDB := v.fdb[vxlan.VTEPMAC(old).String()]
		for _, rt := range v.routes {
			if staleFDB || rt.gw == old.String() {
				t.Errorf("%s still refers to n1's old address %s: %+v", n.Name, old, v)
			}
		}
	}
	mustCheck(t, s)
}

func TestHostGWAcrossRacksFailsClearly(t *testing.T) {
	s := newLab(t, lab.Options{Nodes: 3, PodsPerNode: 1, Backend: "host-gw", Topology: "racks", Racks: 2})
	rep, err := s.Check(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	rack := map[string]int{}
	for _, p := range s.Pods {
		n, _ := s.NodeByName(p.Node)
		rack[p.Name] = n.Rack
	}
	for _, p := range rep.Probes {
		if p.Kind != "pod-pod" {
			continue
		}
		if cross := rack[p.From] != rack[p.To]; p.OK == cross {
			t.Errorf("pod-pod %s -> %s (cross-rack %v): ok=%v %s", p.From, p.To, cross, p.OK, p.Err)
		}
	}
	// Every node says, for each peer in the other rack, why.
	var out strings.Builder
	rep.Print(&out)
	for _, n := range s.Nodes {
		for _, p := range s.Nodes {
			if n.Rack == p.Rack {
				continue
			}
			want := fmt.Sprintf("%s cannot reach %s: peer %s (%s) is not on this node's segment", n.Name, p.Name, p.Name, p.UnderlayIP)
			if !strings.Contains(out.String(), want) || !strings.Contains(out.String(), "host-gw needs all nodes on one L2 segment; use --backend vxlan or auto") {
				t.Errorf("check output does not say %q and why:\n%s", want, out.String())
			}
		}
	}
	for _, st := range s.Status(context.Background()).Nodes {
		n, _ := s.NodeByName(st.Name)
		var other []string
		for _, p := range s.Nodes {
			if p.Rack != n.Rack {
				other = append(other, p.Name)
			}
		}
		if !slices.Equal(st.Unreached, other) || len(st.Overlay) != 0 {
			t.Errorf("lab status of %s: %+v, want unreached %v", n.Name, st, other)
		}
	}
}
