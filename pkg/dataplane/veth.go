package dataplane

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// HostVethPrefix starts the name of every host-side veth flatnet makes, so
// that GC can tell its own ports from anything else on the bridge.
const HostVethPrefix = "flat"

// HostVethName is the stable host-side name of an attachment: the same
// (container ID, ifname) always maps to the same name, so DEL and GC find it
// without any stored state.
func HostVethName(containerID, ifName string) string {
	sum := sha256.Sum256([]byte(containerID + "\x00" + ifName))
	return HostVethPrefix + hex.EncodeToString(sum[:])[:11]
}

// PodLink describes one pod attachment to the node bridge.
type PodLink struct {
	NetNS    ns.NetNS     // the pod's network namespace
	IfName   string       // name inside the pod, e.g. eth0
	HostName string       // host-side veth name (HostVethName)
	Bridge   netlink.Link // node bridge
	MTU      int
	Addr     netip.Prefix // pod address with the subnet length, e.g. 10.244.1.5/24
	Gateway  netip.Addr   // the bridge address: the pod's default route
}

// Attached is what AddPodLink made, for the CNI result.
type Attached struct {
	HostMAC  net.HardwareAddr
	PodMAC   net.HardwareAddr
	PodIndex int
}

// AddPodLink creates the veth pair with the pod end already inside the pod
// namespace (one netlink request, no move), attaches the host end to the
// bridge with hairpin on, and configures the pod end: IPv6 DAD off, address,
// up, default route via the gateway. On error it removes what it made.
func AddPodLink(p PodLink) (_ *Attached, err error) {
	veth := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{
			Name:         p.HostName,
			MTU:          p.MTU,
			Flags:        net.FlagUp,
			TxQLen:       -1,
			HardwareAddr: randomMAC(), // chosen here so no lookup is needed to report it
			MasterIndex:  p.Bridge.Attrs().Index,
		},
		PeerName:         p.IfName,
		PeerHardwareAddr: MACFromIP(p.Addr.Addr()),
		PeerNamespace:    netlink.NsFd(int(p.NetNS.Fd())),
		PeerTxQLen:       -1,
	}
	err = netlink.LinkAdd(veth)
	if errors.Is(err, unix.EEXIST) {
		// A leftover of an earlier, interrupted attempt has our name (it is
		// ours: the name derives from container ID and ifname), or the pod
		// already has an interface of that name.
		if derr := DelHostVeth(p.HostName); derr != nil {
			return nil, derr
		}
		err = netlink.LinkAdd(veth)
	}
	if err != nil {
		if veth.Attrs().Index != 0 {
			DelHostVeth(p.HostName) // created, but not attached to the bridge
		}
		return nil, fmt.Errorf("create veth %s/%s: %w", p.HostName, p.IfName, err)
	}
	defer func() {
		if err != nil {
			DelHostVeth(p.HostName)
		}
	}()
	if err := netlink.LinkSetHairpin(veth, true); err != nil {
		return nil, fmt.Errorf("hairpin on %s: %w", p.HostName, err)
	}
	out := &Attached{HostMAC: veth.HardwareAddr, PodMAC: veth.PeerHardwareAddr}
	err = p.NetNS.Do(func(ns.NetNS) error {
		// Before the link goes up, so the link-local address never waits for DAD.
		if err := disableDAD(p.IfName); err != nil {
			return err
		}
		pod, err := netlinksafe.LinkByName(p.IfName)
		if err != nil {
			return err
		}
		out.PodIndex = pod.Attrs().Index
		if err := netlink.AddrAdd(pod, &netlink.Addr{IPNet: PrefixToIPNet(p.Addr)}); err != nil {
			return fmt.Errorf("add %s to %s: %w", p.Addr, p.IfName, err)
		}
		if err := netlink.LinkSetUp(pod); err != nil {
			return fmt.Errorf("set %s up: %w", p.IfName, err)
		}
		return netlink.RouteAdd(PodDefaultRoute(pod.Attrs().Index, p.Gateway))
	})
	if err != nil {
		return nil, fmt.Errorf("configure %s in %s: %w", p.IfName, p.NetNS.Path(), err)
	}
	return out, nil
}

// PodDefaultRoute is the only route a pod needs: everything goes to the
// node bridge, which routes it (same node, peer nodes, the edge).
func PodDefaultRoute(linkIndex int, gw netip.Addr) *netlink.Route {
	return &netlink.Route{
		LinkIndex: linkIndex,
		Dst:       &net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)},
		Gw:        gw.AsSlice(),
	}
}

func disableDAD(ifName string) error {
	for _, key := range []string{"accept_dad"} {
		err := os.WriteFile("/proc/sys/net/ipv6/conf/"+ifName+"/"+key, []byte("0"), 0o644)
		if err != nil && !errors.Is(err, os.ErrNotExist) { // no IPv6 in this pod: nothing to disable
			return fmt.Errorf("disable IPv6 DAD on %s: %w", ifName, err)
		}
	}
	return nil
}

// DelHostVeth removes a host-side veth (and with it the pod end). A missing
// link is not an error.
func DelHostVeth(name string) error {
	link, err := netlinksafe.LinkByName(name)
	if err != nil {
		var notFound netlink.LinkNotFoundError
		if errors.As(err, &notFound) {
			return nil
		}
		return err
	}
	if err := netlink.LinkDel(link); err != nil && !errors.Is(err, unix.ENODEV) {
		return fmt.Errorf("delete %s: %w", name, err)
	}
	return nil
}

// randomMAC is a random locally administered unicast MAC.
func randomMAC() net.HardwareAddr {
	m := make(net.HardwareAddr, 6)
	rand.Read(m)
	m[0] = m[0]&0xfe | 0x02
	return m
}
