// Package cidr holds the IPv4 subnet rules shared by the plugin, the node
// state file and the agent's lease allocator.
package cidr

import (
	"errors"
	"fmt"
	"net/netip"
)

// ValidateSubnet accepts an IPv4 network address with room for a gateway
// and at least one pod (/30 or larger).
func ValidateSubnet(p netip.Prefix) error {
	if err := ValidateNetwork("subnet", p); err != nil {
		return err
	}
	if p.Bits() > 30 {
		return fmt.Errorf("subnet %s is too small: need /30 or larger", p)
	}
	return nil
}

// ValidateNetwork requires an IPv4 network address; what names the prefix
// in the error.
func ValidateNetwork(what string, p netip.Prefix) error {
	if !p.IsValid() {
		return fmt.Errorf("%s is missing or not a valid CIDR", what)
	}
	if !p.Addr().Is4() {
		return fmt.Errorf("%s %s: only IPv4 is supported", what, p)
	}
	if p.Masked() != p {
		return fmt.Errorf("%s %s is not a network address (did you mean %s?)", what, p, p.Masked())
	}
	return nil
}

// ValidateGateway requires a host address inside subnet.
func ValidateGateway(subnet netip.Prefix, gw netip.Addr) error {
	if !gw.IsValid() {
		return errors.New("gateway is missing")
	}
	if !subnet.Contains(gw) {
		return fmt.Errorf("gateway %s is outside subnet %s", gw, subnet)
	}
	if gw == subnet.Addr() || gw == Last(subnet) {
		return fmt.Errorf("gateway %s is the network or broadcast address of %s", gw, subnet)
	}
	return nil
}

// ValidateMTU accepts the range Linux accepts for IPv4 links.
func ValidateMTU(mtu int) error {
	if mtu < 576 || mtu > 65535 {
		return fmt.Errorf("mtu %d out of range [576, 65535]", mtu)
	}
	return nil
}

// FirstHost is the conventional gateway: the first address after the network address.
func FirstHost(p netip.Prefix) netip.Addr {
	return p.Masked().Addr().Next()
}

// Last is the broadcast address of an IPv4 prefix.
func Last(p netip.Prefix) netip.Addr {
	return FromUint32(ToUint32(p.Masked().Addr()) | uint32(uint64(1)<<(32-p.Bits())-1))
}

// Size is the number of addresses in an IPv4 prefix.
func Size(p netip.Prefix) uint64 { return uint64(1) << (32 - p.Bits()) }

// Nth returns the n-th address of p (0 = network address).
func Nth(p netip.Prefix, n uint64) netip.Addr {
	return FromUint32(ToUint32(p.Masked().Addr()) + uint32(n))
}

// Offset is the index of a in p (inverse of Nth).
func Offset(p netip.Prefix, a netip.Addr) uint64 {
	return uint64(ToUint32(a) - ToUint32(p.Masked().Addr()))
}

// ToUint32 converts an IPv4 address to its integer value.
func ToUint32(a netip.Addr) uint32 {
	b := a.As4()
	return uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
}

// FromUint32 converts an integer to an IPv4 address.
func FromUint32(v uint32) netip.Addr {
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}
