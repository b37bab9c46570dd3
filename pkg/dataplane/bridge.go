// Package dataplane makes the kernel objects of a node's pod network: the
// node bridge (the pods' gateway) and each pod's veth pair. The plugin and
// the agent both call it, so a bridge looks the same whoever made it first.
package dataplane

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// DefaultBridge is the bridge name when the config names none.
const DefaultBridge = "flatnet0"

// MACFromIP derives a locally administered MAC from an IPv4 address
// (0a:58:a.b.c.d, the convention kubenet and OVN-Kubernetes use). A pod that
// gets a recycled IP gets the same MAC, so neighbour caches stay right, and
// the bridge MAC never changes as ports come and go.
func MACFromIP(ip netip.Addr) net.HardwareAddr {
	a := ip.As4()
	return net.HardwareAddr{0x0a, 0x58, a[0], a[1], a[2], a[3]}
}

// EnsureBridge makes sure the bridge exists, is up, has the gateway address
// (gateway/subnet bits) and the MTU. It is safe to call concurrently from
// many plugin processes at node boot: losing a create race is fine.
func EnsureBridge(name string, gateway netip.Prefix, mtu int) (netlink.Link, error) {
	link, err := netlinksafe.LinkByName(name)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if !errors.As(err, &notFound) {
			return nil, fmt.Errorf("bridge %s: %w", name, err)
		}
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{
			Name:         name,
			MTU:          mtu,
			HardwareAddr: MACFromIP(gateway.Addr()),
			Flags:        net.FlagUp,
			TxQLen:       -1,
		}}
		if err := netlink.LinkAdd(br); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("create bridge %s: %w", name, err)
		}
		if link, err = netlinksafe.LinkByName(name); err != nil {
			return nil, fmt.Errorf("bridge %s: %w", name, err)
		}
	}
	if _, ok := link.(*netlink.Bridge); !ok {
		return nil, fmt.Errorf("%s exists and is a %s, not a bridge", name, link.Type())
	}
	if mtu > 0 && link.Attrs().MTU != mtu {
		if err := netlink.LinkSetMTU(link, mtu); err != nil {
			return nil, fmt.Errorf("bridge %s mtu %d: %w", name, mtu, err)
		}
	}
	if err := ensureAddr(link, gateway); err != nil {
		return nil, err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("bridge %s up: %w", name, err)
		}
	}
	return link, nil
}

func ensureAddr(link netlink.Link, p netip.Prefix) error {
	addrs, err := netlinksafe.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list addresses of %s: %w", link.Attrs().Name, err)
	}
	for _, a := range addrs {
		if IPNetToPrefix(a.IPNet) == p {
			return nil
		}
	}
	err = netlink.AddrAdd(link, &netlink.Addr{IPNet: PrefixToIPNet(p)})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("add %s to %s: %w", p, link.Attrs().Name, err)
	}
	return nil
}

// PrefixToIPNet converts an address-with-length (10.244.1.1/24) keeping the
// host bits, as netlink wants for interface addresses.
func PrefixToIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// IPNetToPrefix is the inverse of PrefixToIPNet: an interface address as
// netlink lists it, host bits kept (a 4-in-6 form comes back as IPv4).
func IPNetToPrefix(n *net.IPNet) netip.Prefix {
	ip, _ := netip.AddrFromSlice(n.IP)
	ones, _ := n.Mask.Size()
	return netip.PrefixFrom(ip.Unmap(), ones)
}
