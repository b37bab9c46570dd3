package vxlan_test

import (
	"context"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/safchain/ethtool"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/backend/auto"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// node makes a throwaway namespace with an underlay link (one end of a veth,
// 10.99.1.11/24) and returns the namespace and the node as the agent
// would detect it.
func node(t *testing.T) (ns.NetNS, backend.Node) {
	t.Helper()
	h := testutil.NewNS(t, "vxlan")
	var self backend.Node
	err := h.Do(func(ns.NetNS) error {
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "ul0", MTU: 1500, Flags: net.FlagUp}, PeerName: "ul1"}); err != nil {
			return err
		}
		l, err := netlinksafe.LinkByName("ul0")
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 99, 1, 11), Mask: net.CIDRMask(24, 32)}}); err != nil {
			return err
		}
		self = backend.Node{Name: "n1", Underlay: l, UnderlayIP: netip.MustParseAddr("10.99.1.11"),
			Underlays: []netip.Prefix{netip.MustParsePrefix("10.99.1.0/24")}, Subnet: netip.MustParsePrefix("10.244.1.0/24")}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return h, self
}

func newVXLAN(t *testing.T, o backend.Options) *vxlan.VXLAN {
	t.Helper()
	v, err := vxlan.New(o)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func device(t *testing.T, h ns.NetNS, name string) *netlink.Vxlan {
	t.Helper()
	var vx *netlink.Vxlan
	h.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(name)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		vx = l.(*netlink.Vxlan)
		return nil
	})
	return vx
}

func TestPrepareCreatesTheDevice(t *testing.T) {
	h, self := node(t)
	data, mtu, csum := prepare(t, h, self, backend.Options{})
	if mtu != 1450 {
		t.Errorf("pod MTU %d, want 1500-50", mtu)
	}
	if want := (datastore.BackendData{VTEPMAC: "0e:fa:0a:63:01:0b", VNI: 1, Port: 8472}); data != want {
		t.Errorf("lease data %+v, want %+v", data, want)
	}
	if want := vxlan.ChecksumOffloadByDefault(); csum != want {
		t.Errorf("tx checksum offload on = %v on kernel %s, want %v", csum, kernelReleaseForTest(), want)
	}
	vx := device(t, h, "flatnet.1")
	if vx.VxlanId != 1 || vx.Port != 8472 || vx.Learning || !vx.SrcAddr.Equal(net.IPv4(10, 99, 1, 11)) ||
		vx.VtepDevIndex != self.Underlay.Attrs().Index || vx.MTU != 1450 || vx.HardwareAddr.String() != "0e:fa:0a:63:01:0b" ||
		vx.Flags&net.FlagUp == 0 {
		t.Errorf("device %+v", vx)
	}
}

func TestPrepareAdoptsACompatibleDeviceAndRecreatesAnIncompatibleOne(t *testing.T) {
	h, self := node(t)
	prepare := func(o backend.Options) {
		t.Helper()
		if err := h.Do(func(ns.NetNS) error { _, _, err := newVXLAN(t, o).Prepare(context.Background(), self); return err }); err != nil {
			t.Fatal(err)
		}
	}
	prepare(backend.Options{VNI: 7, Port: 4789})
	first := device(t, h, "flatnet.7")
	// A restarted agent keeps the device (pods keep talking) and fixes
	// what can be fixed in place.
	h.Do(func(ns.NetNS) error { return netlink.LinkSetMTU(first, 1300) })
	prepare(backend.Options{VNI: 7, Port: 4789})
	again := device(t, h, "flatnet.7")
	if again.Index != first.Index || again.MTU != 1450 {
		t.Errorf("restart: ifindex %d -> %d, mtu %d: want the same device with MTU 1450", first.Index, again.Index, again.MTU)
	}
	// Another port cannot be changed in place: the device is recreated.
	prepare(backend.Options{VNI: 7, Port: 4790})
	moved := device(t, h, "flatnet.7")
	if moved.Index == first.Index || moved.Port != 4790 {
		t.Errorf("port change: ifindex %d -> %d, port %d: want a new device on 4790", first.Index, moved.Index, moved.Port)
	}
}

func TestEnsureDeviceBringsADeletedDeviceBack(t *testing.T) {
	h, self := node(t)
	v := newVXLAN(t, backend.Options{})
	err := h.Do(func(ns.NetNS) error {
		if _, _, err := v.Prepare(context.Background(), self); err != nil {
			return err
		}
		l, err := netlinksafe.LinkByName("flatnet.1")
		if err != nil {
			return err
		}
		if err := netlink.LinkDel(l); err != nil {
			return err
		}
		back, err := v.EnsureDevice()
		if err != nil {
			return err
		}
		// Plans made now name the new device.
		p, err := v.Plan(self, peer("n2", "10.99.2.12", "10.244.2.0/24", "vxlan"))
		if err != nil {
			return err
		}
		if p.Route.LinkIndex != back.Attrs().Index || p.Neigh.LinkIndex != back.Attrs().Index || p.FDB.LinkIndex != back.Attrs().Index {
			t.Errorf("plan names ifindex %d, device is %d", p.Route.LinkIndex, back.Attrs().Index)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func peer(name, ip, subnet, be string) datastore.Lease {
	l := datastore.Lease{Node: name, UnderlayIP: netip.MustParseAddr(ip), Subnet: netip.MustParsePrefix(subnet), Backend: be}
	if be != "host-gw" {
		l.BackendData = datastore.BackendData{VTEPMAC: vxlan.VTEPMAC(l.UnderlayIP).String(), VNI: 1, Port: 8472}
	}
	return l
}

func TestPlans(t *testing.T) {
	h, self := node(t)
	vx := newVXLAN(t, backend.Options{})
	au, err := backend.New(auto.Name, backend.Options{})
	if err != nil {
		t.Fatal(err)
	}
	var dev int
	err = h.Do(func(ns.NetNS) error {
		if _, _, err := au.Prepare(context.Background(), self); err != nil {
			return err
		}
		_, _, err := vx.Prepare(context.Background(), self)
		l, _ := netlinksafe.LinkByName("flatnet.1")
		dev = l.Attrs().Index
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	far := peer("n2", "10.99.2.12", "10.244.2.0/24", "vxlan")
	near := peer("n3", "10.99.1.13", "10.244.3.0/24", "auto")

	p, err := vx.Plan(self, far)
	if err != nil {
		t.Fatal(err)
	}
	rt := p.Route
	if p.Mode != backend.Overlay || rt.LinkIndex != dev || rt.Dst.String() != "10.244.2.0/24" || rt.Gw.String() != "10.244.2.0" ||
		rt.Src.String() != "10.244.1.1" || rt.Flags&int(netlink.FLAG_ONLINK) == 0 || rt.Protocol != backend.RouteProtocol {
		t.Errorf("route %+v", rt)
	}
	if n := p.Neigh; n.IP.String() != "10.244.2.0" || n.HardwareAddr.String() != "0e:fa:0a:63:02:0c" || n.State != netlink.NUD_PERMANENT {
		t.Errorf("neighbour %+v", n)
	}
	if f := p.FDB; f.IP.String() != "10.99.2.12" || f.HardwareAddr.String() != "0e:fa:0a:63:02:0c" || f.Flags != netlink.NTF_SELF {
		t.Errorf("fdb %+v", f)
	}

	// auto: the same overlay plan far away, a direct route nearby.
	if p, err := au.Plan(self, far); err != nil || p.Mode != backend.Overlay {
		t.Errorf("auto, other segment: %+v, %v", p, err)
	}
	p, err = au.Plan(self, near)
	if err != nil || p.Mode != backend.Direct || p.Route.LinkIndex != self.Underlay.Attrs().Index || p.Route.Gw.String() != "10.99.1.13" || p.FDB != nil {
		t.Errorf("auto, same segment: %+v, %v", p, err)
	}

	// Peers that cannot be reached over VXLAN say why.
	bad := map[string]datastore.Lease{
		"publishes no VTEP MAC": peer("n4", "10.99.2.14", "10.244.4.0/24", "host-gw"),
		"same --vxlan-vni":      func() datastore.Lease { l := far; l.BackendData.VNI = 2; return l }(),
		"bad VTEP MAC":          func() datastore.Lease { l := far; l.BackendData.VTEPMAC = "zz"; return l }(),
	}
	for want, l := range bad {
		for _, b := range []backend.Backend{vx, au} {
			if _, err := b.Plan(self, l); err == nil || !strings.Contains(err.Error(), want) {
				t.Errorf("%s: Plan(%+v) = %v, want an error saying %q", b.Name(), l, err, want)
			}
		}
	}
}

func TestBadOptions(t *testing.T) {
	for _, o := range []backend.Options{{VNI: 1 << 24}, {VNI: 10000000}, {Port: 70000}, {VNI: -1}} {
		if _, err := vxlan.New(o); err == nil {
			t.Errorf("%+v accepted", o)
		}
	}
}

func kernelReleaseForTest() string {
	b, _ := os.ReadFile("/proc/sys/kernel/osrelease")
	return strings.TrimSpace(string(b))
}

func TestChecksumOffloadPolicy(t *testing.T) {
	for _, tc := range []struct {
		policy string
		want   bool
	}{{"off", false}, {"on", true}} {
		h, self := node(t)
		_, _, on := prepare(t, h, self, backend.Options{ChecksumOffload: tc.policy})
		if on != tc.want {
			t.Errorf("--vxlan-checksum-offload %s: offload on = %v", tc.policy, on)
		}
	}
	if _, err := vxlan.New(backend.Options{ChecksumOffload: "maybe"}); err == nil {
		t.Error("policy \"maybe\" accepted")
	}
}

// prepare runs Prepare in h and reads back the device's checksum offload.
func prepare(t *testing.T, h ns.NetNS, self backend.Node, o backend.Options) (data datastore.BackendData, mtu int, csum bool) {
	t.Helper()
	v := newVXLAN(t, o)
	err := h.Do(func(ns.NetNS) (err error) {
		if data, mtu, err = v.Prepare(context.Background(), self); err != nil {
			return err
		}
		e, err := ethtool.NewEthtool()
		if err != nil {
			return err
		}
		defer e.Close()
		csum, err = vxlan.TxChecksumOffload(e, "flatnet.1")
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return data, mtu, csum
}
