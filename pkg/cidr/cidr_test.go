package cidr

import (
	"net/netip"
	"strings"
	"testing"
)

func TestSubnetMath(t *testing.T) {
	p := netip.MustParsePrefix("10.244.1.0/24")
	if got := FirstHost(p); got.String() != "10.244.1.1" {
		t.Fatal(got)
	}
	if got := Last(p); got.String() != "10.244.1.255" {
		t.Fatal(got)
	}
	if Size(p) != 256 || Nth(p, 5).String() != "10.244.1.5" || Offset(p, Nth(p, 77)) != 77 {
		t.Fatal("size/nth/offset")
	}
	if Last(netip.MustParsePrefix("0.0.0.0/0")).String() != "255.255.255.255" {
		t.Fatal("last of /0")
	}
}

func TestValidate(t *testing.T) {
	bad := map[string]string{
		"10.244.1.5/24": "not a network address",
		"10.244.1.0/31": "too small",
		"fd00::/64":     "only IPv4",
	}
	for in, want := range bad {
		err := ValidateSubnet(netip.MustParsePrefix(in))
		if err == nil || !contains(err.Error(), want) {
			t.Errorf("%s: got %v, want %q", in, err, want)
		}
	}
	p := netip.MustParsePrefix("10.0.0.0/29")
	for _, gw := range []string{"10.0.0.0", "10.0.0.7", "10.0.1.1"} {
		if ValidateGateway(p, netip.MustParseAddr(gw)) == nil {
			t.Errorf("gateway %s accepted", gw)
		}
	}
	if ValidateGateway(p, netip.MustParseAddr("10.0.0.1")) != nil || ValidateMTU(1500) != nil || ValidateMTU(70000) == nil {
		t.Fatal("valid input rejected or invalid accepted")
	}
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }
