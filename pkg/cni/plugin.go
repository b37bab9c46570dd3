package cni

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/ipam"
)

// Plugin-specific CNI error codes (the spec reserves 100+ for plugins).
const (
	// ErrSubnetExhausted: every address of the node's pod subnet is taken.
	ErrSubnetExhausted uint = 100
	// ErrCheckFailed: CHECK found the attachment differs from what ADD made.
	ErrCheckFailed uint = 101
)

// SupportedVersions are the CNI spec versions the plugin speaks.
var SupportedVersions = version.PluginSupports("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

// Funcs wires the plugin into skel.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: Add, Del: Del, Check: Check, GC: GC, Status: Status}
}

// attachment is what ADD and CHECK both start from: the config, the
// node's network and the pod's namespace.
func attachment(args *skel.CmdArgs, conf *NetConf) (Network, ns.NetNS, error) {
	network, err := conf.ResolveNetwork()
	if err != nil {
		return Network{}, nil, types.NewError(types.ErrTryAgainLater, "node network not ready", err.Error())
	}
	podNS, err := openNetNS(args.Netns)
	return network, podNS, err
}

// Add attaches the pod: bridge, address, veth, pod configuration.
func Add(args *skel.CmdArgs) (err error) {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	network, podNS, err := attachment(args, conf)
	if err != nil {
		return err
	}
	defer podNS.Close()

	bridge, err := dataplane.EnsureBridge(conf.Bridge, network.GatewayPrefix(), network.MTU)
	if err != nil {
		return err
	}
	store, err := ipam.Open(conf.DataDir, conf.Name)
	if err != nil {
		return err
	}
	key := ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	ip, err := store.Allocate(key, network.Subnet, network.Gateway)
	if errors.Is(err, ipam.ErrExhausted) {
		return types.NewError(ErrSubnetExhausted, "pod subnet exhausted", err.Error())
	}
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			store.Release(key)
		}
	}()
	// Durable before anyone learns the address.
	if err := store.Commit(); err != nil {
		return fmt.Errorf("ipam: %w", err)
	}
	if err := injectFailure(args, "ipam"); err != nil {
		return err
	}
	hostName := dataplane.HostVethName(args.ContainerID, args.IfName)
	podAddr := netip.PrefixFrom(ip, network.Subnet.Bits())
	att, err := dataplane.AddPodLink(dataplane.PodLink{
		NetNS: podNS, IfName: args.IfName, HostName: hostName, Bridge: bridge,
		MTU: network.MTU, Addr: podAddr, Gateway: network.Gateway,
	})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			dataplane.DelHostVeth(hostName)
		}
	}()
	if err := injectFailure(args, "veth"); err != nil {
		return err
	}

	// The result reports the route AddPodLink installed, from its one definition.
	defaultRoute := dataplane.PodDefaultRoute(att.PodIndex, network.Gateway)
	result := &current.Result{
		CNIVersion: current.ImplementedSpecVersion,
		Interfaces: []*current.Interface{
			{Name: conf.Bridge, Mac: bridge.Attrs().HardwareAddr.String()},
			{Name: hostName, Mac: att.HostMAC.String()},
			{Name: args.IfName, Mac: att.PodMAC.String(), Sandbox: args.Netns},
		},
		IPs: []*current.IPConfig{{
			Interface: current.Int(2),
			Address:   *dataplane.PrefixToIPNet(podAddr),
			Gateway:   network.Gateway.AsSlice(),
		}},
		Routes: []*types.Route{{Dst: *defaultRoute.Dst, GW: defaultRoute.Gw}},
	}
	return types.PrintResult(result, conf.CNIVersion)
}

// Del detaches the pod. It succeeds when there is nothing to remove, when
// called twice, when the netns is gone and when CNI_NETNS is empty: the
// host-side veth name and the IPAM key both derive from (container ID,
// ifname), so DEL never needs the pod's namespace.
func Del(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	// Veth first: the address is free for reuse only once no pod uses it.
	if err := dataplane.DelHostVeth(dataplane.HostVethName(args.ContainerID, args.IfName)); err != nil {
		return err
	}
	store, err := ipam.Open(conf.DataDir, conf.Name)
	if err != nil {
		return err
	}
	_, _, err = store.Release(ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName})
	return err
}

// Check verifies that the attachment is still what ADD made.
func Check(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if conf.PrevResult == nil {
		return types.NewError(types.ErrInvalidNetworkConfig, "CHECK needs a prevResult", "")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "cannot convert prevResult", err.Error())
	}
	network, podNS, err := attachment(args, conf)
	if err != nil {
		return err
	}
	defer podNS.Close()
	store, err := ipam.Open(conf.DataDir, conf.Name)
	if err != nil {
		return err
	}
	if err := check(args, conf, network, prev, podNS, store); err != nil {
		return types.NewError(ErrCheckFailed, "CHECK failed", err.Error())
	}
	return nil
}

func check(args *skel.CmdArgs, conf *NetConf, network Network, prev *current.Result, podNS ns.NetNS, store *ipam.Store) error {
	key := ipam.Key{ContainerID: args.ContainerID, IfName: args.IfName}
	ip, ok, err := store.Lookup(key)
	if err != nil {
		return err
	}
	if !ok {
		return fmt.Errorf("no address reservation for container %s interface %s", args.ContainerID, args.IfName)
	}
	want := netip.PrefixFrom(ip, network.Subnet.Bits())
	if !slices.ContainsFunc(prev.IPs, func(c *current.IPConfig) bool { return c.Address.String() == want.String() }) {
		return fmt.Errorf("reservation %s is not in prevResult", want)
	}
	bridge, err := netlinksafe.LinkByName(conf.Bridge)
	if err != nil {
		return fmt.Errorf("bridge %s: %w", conf.Bridge, err)
	}
	if err := hasAddr(bridge, network.GatewayPrefix()); err != nil {
		return err
	}
	hostName := dataplane.HostVethName(args.ContainerID, args.IfName)
	host, err := netlinksafe.LinkByName(hostName)
	if err != nil {
		return fmt.Errorf("host veth %s: %w", hostName, err)
	}
	if host.Attrs().MasterIndex != bridge.Attrs().Index {
		return fmt.Errorf("host veth %s is not attached to bridge %s", hostName, conf.Bridge)
	}
	if host.Attrs().Flags&net.FlagUp == 0 {
		return fmt.Errorf("host veth %s is down", hostName)
	}
	return podNS.Do(func(ns.NetNS) error {
		pod, err := netlinksafe.LinkByName(args.IfName)
		if err != nil {
			return fmt.Errorf("interface %s in %s: %w", args.IfName, args.Netns, err)
		}
		if pod.Attrs().ParentIndex != host.Attrs().Index {
			return fmt.Errorf("interface %s is not the peer of host veth %s", args.IfName, hostName)
		}
		if pod.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("interface %s is down", args.IfName)
		}
		if err := hasAddr(pod, want); err != nil {
			return err
		}
		routes, err := netlinksafe.RouteList(pod, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		for _, r := range routes {
			if (r.Dst == nil || r.Dst.String() == "0.0.0.0/0") && r.Gw.Equal(network.Gateway.AsSlice()) {
				return nil
			}
		}
		return fmt.Errorf("no default route via %s on %s", network.Gateway, args.IfName)
	})
}

func hasAddr(link netlink.Link, want netip.Prefix) error {
	addrs, err := netlinksafe.AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if a.IPNet.String() == want.String() {
			return nil
		}
	}
	return fmt.Errorf("%s does not have address %s", link.Attrs().Name, want)
}

// GC releases every reservation (and its host veth) that is not in
// cni.dev/valid-attachments, and removes flatnet veths on the bridge that
// belong to no valid attachment.
func GC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	valid := map[ipam.Key]bool{}
	validVeths := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[ipam.Key{ContainerID: a.ContainerID, IfName: a.IfName}] = true
		validVeths[dataplane.HostVethName(a.ContainerID, a.IfName)] = true
	}
	store, err := ipam.Open(conf.DataDir, conf.Name)
	if err != nil {
		return err
	}
	released, err := store.GC(func(k ipam.Key) bool { return valid[k] })
	if err != nil {
		return err
	}
	var errs []error
	for _, r := range released {
		errs = append(errs, dataplane.DelHostVeth(dataplane.HostVethName(r.Key.ContainerID, r.Key.IfName)))
	}
	bridge, err := netlinksafe.LinkByName(conf.Bridge)
	if err != nil {
		return errors.Join(errs...) // no bridge: no ports to sweep
	}
	links, err := netlinksafe.LinkList()
	if err != nil {
		return errors.Join(append(errs, err)...)
	}
	for _, l := range links {
		name := l.Attrs().Name
		if l.Type() == "veth" && l.Attrs().MasterIndex == bridge.Attrs().Index &&
			strings.HasPrefix(name, dataplane.HostVethPrefix) && !validVeths[name] {
			errs = append(errs, dataplane.DelHostVeth(name))
		}
	}
	return errors.Join(errs...)
}

// Status reports whether an ADD could succeed now: code 50 while there is no
// pod subnet (no "subnet" key and no node state from flatnetd yet).
func Status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if _, err := conf.ResolveNetwork(); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "flatnet cannot serve ADD", err.Error())
	}
	if _, err := ipam.Open(conf.DataDir, conf.Name); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "flatnet cannot serve ADD", err.Error())
	}
	return nil
}

// openNetNS opens CNI_NETNS; a bad path is an invalid environment (code 4).
func openNetNS(path string) (ns.NetNS, error) {
	h, err := ns.GetNS(path)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_NETNS is not a usable network namespace", err.Error())
	}
	self, err := ns.GetCurrentNS()
	if err == nil {
		defer self.Close()
		if sameNS(self, h) {
			h.Close()
			return nil, types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_NETNS is the plugin's own network namespace", path)
		}
	}
	return h, nil
}

// injectFailure fails an ADD on purpose after the named stage when CNI_ARGS
// has FLATNET_FAIL_AFTER=<stage>. Tests use it to prove that a failed ADD
// leaves nothing behind, the way the reference bridge plugin's tests do.
func injectFailure(args *skel.CmdArgs, stage string) error {
	for _, kv := range strings.Split(args.Args, ";") {
		if kv == "FLATNET_FAIL_AFTER="+stage {
			return fmt.Errorf("injected failure after %s", stage)
		}
	}
	return nil
}
