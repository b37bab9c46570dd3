package agent

import (
	"fmt"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
)

// detectUnderlay finds the interface facing the other nodes: --iface, or
// the one holding the IPv4 default route; its first global IPv4 address is
// the node's underlay IP.
func detectUnderlay(name, nodeName string) (backend.Node, error) {
	var link netlink.Link
	var err error
	if name != "" {
		if link, err = netlinksafe.LinkByName(name); err != nil {
			return backend.Node{}, fmt.Errorf("--iface %s: %w", name, err)
		}
	} else {
		routes, err := netlinksafe.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Dst: nil}, netlink.RT_FILTER_DST)
		if err != nil {
			return backend.Node{}, err
		}
		for _, r := range routes {
			if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
				if link, err = netlink.LinkByIndex(r.LinkIndex); err == nil {
					break
				}
			}
		}
		if link == nil {
			return backend.Node{}, fmt.Errorf("no IPv4 default route to find the underlay interface: pass --iface")
		}
	}
	addrs, err := netlinksafe.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return backend.Node{}, err
	}
	n := backend.Node{Name: nodeName, Underlay: link}
	for _, a := range addrs {
		if a.Scope != int(netlink.SCOPE_UNIVERSE) {
			continue
		}
		p := dataplane.IPNetToPrefix(a.IPNet)
		n.Underlays = append(n.Underlays, p.Masked())
		if !n.UnderlayIP.IsValid() {
			n.UnderlayIP = p.Addr()
		}
	}
	if !n.UnderlayIP.IsValid() {
		return backend.Node{}, fmt.Errorf("underlay interface %s has no global IPv4 address", link.Attrs().Name)
	}
	return n, nil
}
