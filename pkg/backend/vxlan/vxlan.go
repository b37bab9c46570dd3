// Package vxlan reaches peers through a VXLAN overlay: pod packets travel
// inside UDP between the nodes' underlay addresses, so nodes may sit on
// different L2 segments behind routers that know nothing of pod subnets.
//
// Per node there is one device, flatnet.<VNI>: no learning, bound to the
// underlay link, local IP = the underlay IP, MAC derived from that IP, MTU
// = underlay MTU - Overhead. Per peer, pkg/reconcile programs three things
// from Plan: a route to the peer's subnet via the peer's VTEP address (the
// network address of its subnet, as in flannel) onlink on the device, a
// permanent neighbour entry VTEP address -> peer VTEP MAC, and an FDB entry
// peer VTEP MAC -> peer underlay IP. Nothing is learnt from traffic, so
// nothing is ever flooded.
package vxlan

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strconv"
	"sync"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/safchain/ethtool"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Name of this backend.
const Name = "vxlan"

// Defaults of --vxlan-vni and --vxlan-port. 8472 is the port the Linux
// kernel used before IANA assigned 4789, and the one flannel uses, so a
// firewall opened for flannel lets flatnet through too.
const (
	DefaultVNI  = 1
	DefaultPort = 8472
)

func init() {
	backend.Register(Name, func(o backend.Options) (backend.Backend, error) { return New(o) })
}

// Overhead is what encapsulation adds to a pod packet: outer IP header (20
// bytes on an IPv4 underlay, 40 on IPv6) + UDP (8) + VXLAN (8) + the inner
// Ethernet header (14).
func Overhead(underlay netip.Addr) int {
	if underlay.Unmap().Is4() {
		return 50
	}
	return 70
}

// VTEPMAC is a node's VTEP MAC, derived from its underlay IP: 0e:fa +
// the IPv4 address (a hash of an IPv6 one). 0e is a locally administered
// unicast prefix distinct from the pods' 0a:58. Derived, not random, it is
// the same after an agent restart or a reboot, so peers' entries stay
// valid; it changes only with the underlay IP, which peers learn from the
// same lease update.
func VTEPMAC(underlay netip.Addr) net.HardwareAddr {
	b := underlay.Unmap().AsSlice()
	if len(b) != 4 {
		sum := sha256.Sum256(b)
		b = sum[:4]
	}
	return net.HardwareAddr{0x0e, 0xfa, b[0], b[1], b[2], b[3]}
}

// VTEPAddr is a node's VTEP address: the network address of its pod
// subnet. It is only a next hop that the neighbour entry maps to the VTEP
// MAC; no packet carries it, so it needs no interface.
func VTEPAddr(subnet netip.Prefix) netip.Addr { return subnet.Masked().Addr() }

// DeviceName is the VXLAN device of a VNI.
func DeviceName(vni int) string { return "flatnet." + strconv.Itoa(vni) }

// VXLAN is the vxlan backend. Prepare records the node; EnsureDevice can
// then recreate the device at any time.
type VXLAN struct {
	vni, port int
	csum      bool // tx checksum offload wanted on the device

	mu    sync.Mutex
	self  backend.Node
	index int // the device's ifindex as last ensured
}

// Validate says whether a VNI and UDP port can be used; the agent calls it
// on its flags too, so a bad value is a config error, not a start failure.
func Validate(vni, port int) error {
	if vni < 1 || vni > 1<<24-1 {
		return fmt.Errorf("VXLAN VNI %d: want 1-16777215", vni)
	}
	if len(DeviceName(vni)) >= unix.IFNAMSIZ {
		return fmt.Errorf("VXLAN VNI %d: the device name %s would be longer than 15 characters; use a VNI below 10000000", vni, DeviceName(vni))
	}
	if port < 1 || port > 65535 {
		return fmt.Errorf("VXLAN port %d: want 1-65535", port)
	}
	return nil
}

// New validates the options; zero values take the defaults.
func New(o backend.Options) (*VXLAN, error) {
	v := &VXLAN{vni: o.VNI, port: o.Port}
	if v.vni == 0 {
		v.vni = DefaultVNI
	}
	if v.port == 0 {
		v.port = DefaultPort
	}
	if err := Validate(v.vni, v.port); err != nil {
		return nil, err
	}
	switch o.ChecksumOffload {
	case "", "auto":
		v.csum = ChecksumOffloadByDefault()
	case "on":
		v.csum = true
	case "off":
		v.csum = false
	default:
		return nil, fmt.Errorf("VXLAN checksum offload %q: want auto, on or off", o.ChecksumOffload)
	}
	return v, nil
}

func (v *VXLAN) Name() string { return Name }

// DeviceName is this backend's device.
func (v *VXLAN) DeviceName() string { return DeviceName(v.vni) }

// PodMTU is the underlay MTU less the encapsulation.
func PodMTU(self backend.Node) int {
	return self.Underlay.Attrs().MTU - Overhead(self.UnderlayIP)
}

// Prepare creates or adopts the device and returns what peers need to
// reach this node (VTEP MAC, VNI, port) and the pod MTU.
func (v *VXLAN) Prepare(_ context.Context, self backend.Node) (datastore.BackendData, int, error) {
	v.mu.Lock()
	v.self = self
	v.mu.Unlock()
	if _, err := v.EnsureDevice(); err != nil {
		return datastore.BackendData{}, 0, err
	}
	return datastore.BackendData{VTEPMAC: VTEPMAC(self.UnderlayIP).String(), VNI: v.vni, Port: v.port}, PodMTU(self), nil
}

// EnsureDevice makes the device match the node Prepare was given and
// returns it: an existing compatible device is adopted (pods keep talking
// across agent restarts), a missing one created, and one whose VNI, port,
// local IP, underlay link or learning differ (which the kernel cannot
// change in place) is recreated. The reconciler calls it before every sync,
// so a deleted device comes back with the next sync.
func (v *VXLAN) EnsureDevice() (netlink.Link, error) {
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.self.Underlay == nil {
		return nil, errors.New("vxlan: EnsureDevice before Prepare")
	}
	want := &netlink.Vxlan{
		LinkAttrs: netlink.LinkAttrs{
			Name:         v.DeviceName(),
			MTU:          PodMTU(v.self),
			HardwareAddr: VTEPMAC(v.self.UnderlayIP),
			TxQLen:       -1,
		},
		VxlanId:      v.vni,
		VtepDevIndex: v.self.Underlay.Attrs().Index,
		SrcAddr:      v.self.UnderlayIP.AsSlice(),
		Port:         v.port,
		Learning:     false,
	}
	link, err := netlinksafe.LinkByName(want.Name)
	var notFound netlink.LinkNotFoundError
	switch {
	case errors.As(err, &notFound):
		link = nil
	case err != nil:
		return nil, fmt.Errorf("%s: %w", want.Name, err)
	case !compatible(link, want):
		if err := netlink.LinkDel(link); err != nil {
			return nil, fmt.Errorf("delete incompatible %s: %w", want.Name, err)
		}
		link = nil
	}
	if link == nil {
		if err := netlink.LinkAdd(want); err != nil {
			return nil, fmt.Errorf("create %s (VNI %d, port %d, local %s, dev %s): %w",
				want.Name, v.vni, v.port, v.self.UnderlayIP, v.self.Underlay.Attrs().Name, err)
		}
		if link, err = netlinksafe.LinkByName(want.Name); err != nil {
			return nil, err
		}
	}
	if a := link.Attrs(); a.HardwareAddr.String() != want.HardwareAddr.String() {
		if err := netlink.LinkSetHardwareAddr(link, want.HardwareAddr); err != nil {
			return nil, fmt.Errorf("%s mac %s: %w", want.Name, want.HardwareAddr, err)
		}
	}
	if link.Attrs().MTU != want.MTU {
		if err := netlink.LinkSetMTU(link, want.MTU); err != nil {
			return nil, fmt.Errorf("%s mtu %d: %w", want.Name, want.MTU, err)
		}
	}
	if err := setTxChecksumOffload(want.Name, v.csum); err != nil {
		return nil, err
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("%s up: %w", want.Name, err)
		}
	}
	v.index = link.Attrs().Index
	return link, nil
}

func compatible(l netlink.Link, want *netlink.Vxlan) bool {
	vx, ok := l.(*netlink.Vxlan)
	return ok && vx.VxlanId == want.VxlanId && vx.Port == want.Port && vx.SrcAddr.Equal(want.SrcAddr) &&
		vx.VtepDevIndex == want.VtepDevIndex && !vx.Learning
}

// TxChecksumFeature is the offload setTxChecksumOffload controls.
const TxChecksumFeature = "tx-checksum-ip-generic"

// checksumBugKernel reports kernels older than 5.7. Why it matters: there,
// a VXLAN packet whose outer UDP header is rewritten by NAT on its way out
// (kube-proxy masquerading with --random-fully) leaves with a bad checksum
// when the device offloads checksums, and the receiver drops it;
// connections hang for ~63 s of SYN retries (flannel issue 1279,
// calico issue 3145; fixed by kernel commit ea64d8d6c675 in 5.7). Turning
// the offload off costs a lot (no checksum offload means no TSO: about 5x
// less TCP throughput on this machine), so flatnet does it only where the
// bug exists, as Calico does, and --vxlan-checksum-offload overrides it.
func checksumBugKernel(release string) bool {
	var major, minor int
	if _, err := fmt.Sscanf(release, "%d.%d", &major, &minor); err != nil {
		return true // unknown: be safe
	}
	return major < 5 || major == 5 && minor < 7
}

// ChecksumOffloadByDefault is what the "auto" policy chooses on this kernel.
func ChecksumOffloadByDefault() bool { return !checksumBugKernel(kernelRelease()) }

func kernelRelease() string {
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}

// setTxChecksumOffload turns the device's tx checksum offload on or off
// (via the ethtool ioctl), and checks that the kernel took it.
func setTxChecksumOffload(dev string, want bool) error {
	e, err := ethtool.NewEthtool()
	if err != nil {
		return fmt.Errorf("ethtool: %w", err)
	}
	defer e.Close()
	on, err := TxChecksumOffload(e, dev)
	if err != nil || on == want {
		return err
	}
	if err := e.Change(dev, map[string]bool{TxChecksumFeature: want}); err != nil {
		return fmt.Errorf("set %s=%v on %s: %w", TxChecksumFeature, want, dev, err)
	}
	if on, err = TxChecksumOffload(e, dev); err == nil && on != want {
		err = fmt.Errorf("%s on %s is still %v", TxChecksumFeature, dev, on)
	}
	return err
}

// TxChecksumOffload reports whether dev has tx checksum offload on.
func TxChecksumOffload(e *ethtool.Ethtool, dev string) (bool, error) {
	f, err := e.Features(dev)
	if err != nil {
		return false, fmt.Errorf("ethtool features of %s: %w", dev, err)
	}
	return f[TxChecksumFeature], nil
}

// Plan reaches peer through the device: route, neighbour and FDB entry.
// Traffic this node itself sends to the peer's pods leaves from the pod
// gateway address (the bridge's), so replies come back through the tunnel
// too instead of via the underlay routers with a pod source address.
func (v *VXLAN) Plan(self backend.Node, peer datastore.Lease) (backend.Plan, error) {
	d := peer.BackendData
	if d.VTEPMAC == "" {
		return backend.Plan{}, fmt.Errorf("peer %s (%s) runs backend %q and publishes no VTEP MAC, so it has no VXLAN device to send to: run every node with --backend vxlan or auto",
			peer.Node, peer.UnderlayIP, peer.Backend)
	}
	mac, err := net.ParseMAC(d.VTEPMAC)
	if err != nil {
		return backend.Plan{}, fmt.Errorf("peer %s publishes a bad VTEP MAC %q: %w", peer.Node, d.VTEPMAC, err)
	}
	if d.VNI != v.vni || d.Port != v.port {
		return backend.Plan{}, fmt.Errorf("peer %s uses VXLAN VNI %d port %d, this node VNI %d port %d: every node needs the same --vxlan-vni and --vxlan-port",
			peer.Node, d.VNI, d.Port, v.vni, v.port)
	}
	v.mu.Lock()
	idx := v.index
	v.mu.Unlock()
	if idx == 0 {
		return backend.Plan{}, errors.New("vxlan: Plan before the device exists")
	}
	vtep := VTEPAddr(peer.Subnet).AsSlice()
	rt := netlink.Route{
		LinkIndex: idx,
		Dst:       dataplane.PrefixToIPNet(peer.Subnet.Masked()),
		Gw:        vtep,
		Flags:     int(netlink.FLAG_ONLINK),
		Protocol:  backend.RouteProtocol,
	}
	if self.Subnet.IsValid() {
		rt.Src = cidr.FirstHost(self.Subnet).AsSlice()
	}
	return backend.Plan{
		Peer:  peer.Node,
		Mode:  backend.Overlay,
		Route: rt,
		Neigh: &netlink.Neigh{LinkIndex: idx, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
			IP: vtep, HardwareAddr: mac},
		FDB: &netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT,
			IP: peer.UnderlayIP.AsSlice(), HardwareAddr: mac},
	}, nil
}
