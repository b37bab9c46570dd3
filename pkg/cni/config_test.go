package cni

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/flatnet-io/flatnet/pkg/cidr"
)

func TestParseConfigDefaults(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","type":"flatnet","subnet":"10.244.3.0/24"}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Bridge != "flatnet0" || c.DataDir != "/var/lib/flatnet" || c.NodeStateFile != "/run/flatnet/node.json" {
		t.Fatalf("defaults: %+v", c)
	}
	n, err := c.ResolveNetwork()
	if err != nil || n.Gateway.String() != "10.244.3.1" || n.MTU != 1500 || n.GatewayPrefix().String() != "10.244.3.1/24" {
		t.Fatalf("network %+v %v", n, err)
	}
}

func seeds() []string {
	return []string{
		`{"cniVersion":"1.1.0","name":"n","type":"flatnet","subnet":"10.244.3.0/24"}`,
		`{"cniVersion":"1.0.0","name":"n","type":"flatnet","subnet":"10.0.0.0/29","gateway":"10.0.0.6","mtu":1450,"bridge":"br0","dataDir":"/tmp/x"}`,
		`{"cniVersion":"1.1.0","name":"n","type":"flatnet","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`,
		`{"cniVersion":"0.4.0","name":"n","type":"flatnet","subnet":"10.0.0.0/24","prevResult":{"cniVersion":"0.4.0","ips":[{"version":"4","address":"10.0.0.2/24"}]}}`,
		`{"name":"n","subnet":"10.0.0.0/33"}`,
		`{"name":"n","subnet":"10.0.0.0/24","gateway":"10.0.1.1"}`,
		`{"name":"n","mtu":"x"}`,
		`[]`, `{`, ``,
	}
}

// FuzzParseConfig: any input either parses into a config whose network is
// usable, or fails with code 6 (undecodable) or 7 (invalid), never a panic.
func FuzzParseConfig(f *testing.F) {
	for _, s := range seeds() {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			var e *types.Error
			if !errors.As(err, &e) || (e.Code != types.ErrDecodingFailure && e.Code != types.ErrInvalidNetworkConfig) {
				t.Fatalf("error without code 6/7: %#v", err)
			}
			return
		}
		if c.Subnet == "" {
			return
		}
		n, err := c.ResolveNetwork()
		if err != nil {
			t.Fatalf("validated config does not resolve: %v", err)
		}
		if cidr.ValidateSubnet(n.Subnet) != nil || cidr.ValidateGateway(n.Subnet, n.Gateway) != nil || cidr.ValidateMTU(n.MTU) != nil {
			t.Fatalf("invalid network accepted: %+v", n)
		}
		if !n.GatewayPrefix().Contains(netip.Addr(n.Gateway)) {
			t.Fatalf("gateway prefix %s", n.GatewayPrefix())
		}
	})
}
