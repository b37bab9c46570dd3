package lab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// Addresses of the lab's fixed hosts. Nothing here is routed outside the
// lab's own namespaces.
var (
	internetIP  = netip.MustParseAddr("198.18.0.2")
	internetGW  = netip.MustParseAddr("198.18.0.1")
	internetNet = netip.MustParsePrefix("198.18.0.0/24")
	underlayNet = netip.MustParsePrefix("10.99.0.0/16")
)

// segment is one L2 segment (a rack): a switch (a bridge in a namespace of
// its own) and the hub's interface on it, whose address is the segment's
// router.
type segment struct {
	router netip.Prefix // e.g. 10.99.1.1/24
}

// switchBridge is the bridge inside every switch namespace.
const switchBridge = "br0"

func segmentOf(rack int) segment {
	return segment{router: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(rack), 1}), 24)}
}

// routerPort is the hub's interface on a rack's switch.
func routerPort(rack int) string { return fmt.Sprintf("r%d", rack) }

// nodeIP is node i's underlay address in its rack.
func nodeIP(rack, i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 99, byte(rack), byte(10 + i)}), 24)
}

// buildHub creates the racks' switches and the hub, the router between
// them with the uplink to the internet host. The hub knows node addresses
// only, never pod subnets: pod traffic must be routed by the nodes
// themselves or encapsulated. Switches are namespaces of their own, linked
// to the hub by a veth: the hub routes out of plain interfaces, as a real
// router does (routing out of a bridge device made the kernel segment
// encapsulated GSO packets in software), and a router MAC never changes
// when nodes join or leave a switch.
func buildHub(hub, inet ns.NetNS, switches []ns.NetNS) error {
	// A router forwards by destination only: packets from pods to node
	// addresses (never masqueraded) pass it although it has no route back
	// to pod subnets, whatever rp_filter this machine's namespaces inherit.
	for key, v := range map[string]string{"net/ipv4/ip_forward": "1", "net/ipv4/conf/all/rp_filter": "0", "net/ipv4/conf/default/rp_filter": "0"} {
		if err := nsutil.SetSysctl(hub, key, v); err != nil {
			return err
		}
	}
	for i, sw := range switches {
		rack := i + 1
		err := sw.Do(func(ns.NetNS) error {
			br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: switchBridge, Flags: net.FlagUp, TxQLen: -1}}
			if err := netlink.LinkAdd(br); err != nil {
				return fmt.Errorf("switch of rack %d: %w", rack, err)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if err := connect(sw, "hub", netip.Prefix{}, switchBridge, hub, routerPort(rack), segmentOf(rack).router, nil); err != nil {
			return fmt.Errorf("router port of rack %d: %w", rack, err)
		}
	}
	return connect(hub, "inet", netip.PrefixFrom(internetGW, 24), "", inet, "eth0", netip.PrefixFrom(internetIP, 24),
		[]route{{dst: underlayNet, gw: internetGW}})
}

type route struct {
	dst netip.Prefix
	gw  netip.Addr
}

// connect makes a veth between two namespaces, addresses both ends (an
// invalid prefix leaves an end without address), optionally attaches the
// first end to a bridge, and adds routes on the second end.
func connect(a ns.NetNS, aName string, aAddr netip.Prefix, aBridge string, b ns.NetNS, bName string, bAddr netip.Prefix, bRoutes []route) error {
	err := a.Do(func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: aName, Flags: net.FlagUp, TxQLen: -1},
			PeerName:      bName,
			PeerNamespace: netlink.NsFd(int(b.Fd())),
			PeerTxQLen:    -1,
		}
		if aBridge != "" {
			br, err := netlinksafe.LinkByName(aBridge)
			if err != nil {
				return err
			}
			veth.MasterIndex = br.Attrs().Index
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("veth %s/%s: %w", aName, bName, err)
		}
		if aAddr.IsValid() {
			l, err := netlinksafe.LinkByName(aName)
			if err != nil {
				return err
			}
			return netlink.AddrAdd(l, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(aAddr)})
		}
		return nil
	})
	if err != nil {
		return err
	}
	return b.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(bName)
		if err != nil {
			return err
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(bAddr)}); err != nil {
			return err
		}
		if err := netlink.LinkSetUp(l); err != nil {
			return err
		}
		for _, r := range bRoutes {
			rt := &netlink.Route{LinkIndex: l.Attrs().Index, Dst: dataplane.PrefixToIPNet(r.dst), Gw: r.gw.AsSlice()}
			if err := netlink.RouteAdd(rt); err != nil {
				return fmt.Errorf("route %s via %s: %w", r.dst, r.gw, err)
			}
		}
		return nil
	})
}

// setUnderlay gives a node's eth0 a new address (in its rack's segment)
// in place of old, and its default route via the rack's router again:
// removing the last address took that route with it.
func setUnderlay(node ns.NetNS, rack int, old, addr netip.Prefix) error {
	if !segmentOf(rack).router.Masked().Contains(addr.Addr()) || addr.Bits() != 24 {
		return fmt.Errorf("%s is not an address in rack %d's segment %s", addr, rack, segmentOf(rack).router.Masked())
	}
	return node.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName("eth0")
		if err != nil {
			return err
		}
		if err := netlink.AddrDel(l, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(old)}); err != nil {
			return fmt.Errorf("remove %s: %w", old, err)
		}
		if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(addr)}); err != nil {
			return fmt.Errorf("add %s: %w", addr, err)
		}
		return netlink.RouteReplace(&netlink.Route{LinkIndex: l.Attrs().Index,
			Dst: dataplane.PrefixToIPNet(netip.MustParsePrefix("0.0.0.0/0")), Gw: segmentOf(rack).router.Addr().AsSlice()})
	})
}

// buildNode plugs a node into its rack's switch. Its default route goes to
// the hub, so traffic to the internet host leaves through the node's uplink
// (where flatnet masquerades it).
func buildNode(sw, node ns.NetNS, port string, rack int, addr netip.Prefix) error {
	return connect(sw, port, netip.Prefix{}, switchBridge, node, "eth0", addr,
		[]route{{dst: netip.MustParsePrefix("0.0.0.0/0"), gw: segmentOf(rack).router.Addr()}})
}
