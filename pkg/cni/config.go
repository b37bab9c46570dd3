// Package cni is the flatnet CNI plugin: ADD, DEL, CHECK, GC and STATUS for
// pods attached to the node bridge, with addresses from the in-process IPAM.
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"path/filepath"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/nodestate"
)

// Defaults for the conflist keys.
const (
	DefaultDataDir = "/var/lib/flatnet"
	DefaultMTU     = 1500
)

// NetConf is the plugin's entry in a conflist. Every key is optional; see
// the README for what each one does.
type NetConf struct {
	types.NetConf

	// Subnet is the node's pod CIDR. Without it the node state file
	// written by flatnetd is the source of subnet, gateway and MTU.
	Subnet        string `json:"subnet,omitempty"`
	Gateway       string `json:"gateway,omitempty"`
	Bridge        string `json:"bridge,omitempty"`
	DataDir       string `json:"dataDir,omitempty"`
	MTU           int    `json:"mtu,omitempty"`
	NodeStateFile string `json:"nodeStateFile,omitempty"`

	ValidAttachments []types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`
}

// Network is the resolved node network an ADD attaches to.
type Network struct {
	Subnet  netip.Prefix
	Gateway netip.Addr
	MTU     int
}

// GatewayPrefix is the bridge address: gateway with the subnet length.
func (n Network) GatewayPrefix() netip.Prefix {
	return netip.PrefixFrom(n.Gateway, n.Subnet.Bits())
}

// ParseConfig decodes and validates the config a runtime sends on stdin.
// Undecodable JSON is CNI code 6, a decodable but wrong config is code 7.
func ParseConfig(data []byte) (*NetConf, error) {
	conf := &NetConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot decode network config", err.Error())
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "cannot decode prevResult", err.Error())
		}
	}
	if conf.Bridge == "" {
		conf.Bridge = dataplane.DefaultBridge
	}
	if conf.DataDir == "" {
		conf.DataDir = DefaultDataDir
	}
	if conf.NodeStateFile == "" {
		conf.NodeStateFile = nodestate.DefaultPath
	}
	if err := conf.validate(); err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "invalid network config", err.Error())
	}
	return conf, nil
}

func (c *NetConf) validate() error {
	if c.Name == "" {
		return errors.New(`"name" is missing`)
	}
	if err := validIfName(c.Bridge); err != nil {
		return fmt.Errorf("bridge: %w", err)
	}
	for key, p := range map[string]string{"dataDir": c.DataDir, "nodeStateFile": c.NodeStateFile} {
		if !filepath.IsAbs(p) {
			return fmt.Errorf("%s %q must be an absolute path", key, p)
		}
	}
	if c.MTU != 0 {
		if err := cidr.ValidateMTU(c.MTU); err != nil {
			return err
		}
	}
	if c.Subnet == "" {
		if c.Gateway != "" {
			return errors.New(`"gateway" needs "subnet"`)
		}
		return nil
	}
	_, err := c.staticNetwork()
	return err
}

// staticNetwork is the network given by the subnet/gateway/mtu keys.
func (c *NetConf) staticNetwork() (Network, error) {
	subnet, err := netip.ParsePrefix(c.Subnet)
	if err != nil {
		return Network{}, fmt.Errorf("subnet %q: %w", c.Subnet, err)
	}
	if err := cidr.ValidateSubnet(subnet); err != nil {
		return Network{}, err
	}
	gw := cidr.FirstHost(subnet)
	if c.Gateway != "" {
		if gw, err = netip.ParseAddr(c.Gateway); err != nil {
			return Network{}, fmt.Errorf("gateway %q: %w", c.Gateway, err)
		}
	}
	if err := cidr.ValidateGateway(subnet, gw); err != nil {
		return Network{}, err
	}
	mtu := c.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	return Network{Subnet: subnet, Gateway: gw, MTU: mtu}, nil
}

// errNoSubnet means neither the config nor a node state file gives a subnet.
var errNoSubnet = errors.New("no pod subnet")

// ResolveNetwork returns the network from the config keys or, without a
// "subnet" key, from the node state file. The "mtu" key overrides the
// node state's MTU.
func (c *NetConf) ResolveNetwork() (Network, error) {
	if c.Subnet != "" {
		return c.staticNetwork()
	}
	st, err := nodestate.Read(c.NodeStateFile)
	if errors.Is(err, nodestate.ErrNotFound) {
		return Network{}, fmt.Errorf(`%w: the config has no "subnet" and %s does not exist yet (is flatnetd running on this node?)`, errNoSubnet, c.NodeStateFile)
	}
	if err != nil {
		return Network{}, fmt.Errorf("%w: %v", errNoSubnet, err)
	}
	n := Network{Subnet: st.Subnet, Gateway: st.Gateway, MTU: st.MTU}
	if c.MTU != 0 {
		n.MTU = c.MTU
	}
	if n.MTU == 0 {
		n.MTU = DefaultMTU
	}
	return n, nil
}

// validIfName applies the kernel's rules for interface names.
func validIfName(name string) error {
	if name == "" || len(name) > 15 || name == "." || name == ".." {
		return fmt.Errorf("%q is not a valid interface name (1-15 characters)", name)
	}
	for _, r := range name {
		if r == '/' || r == ':' || r <= ' ' || r > '~' {
			return fmt.Errorf("%q is not a valid interface name", name)
		}
	}
	return nil
}
