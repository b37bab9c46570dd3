// Package nat programs flatnet's only address translation: masquerading pod
// traffic that leaves the cluster.
//
// The policy is "NAT only at the edge". A packet is masqueraded (its source
// rewritten to the address of the interface it leaves by) when, and only
// when, it comes from a pod (source in the cluster CIDR) and goes neither to
// a pod (destination in the cluster CIDR) nor to a node (destination in the
// set of node IPs). So pod-to-pod, pod-to-node (own and remote) and
// node-to-pod traffic keeps its addresses; unlike flannel (flannel issue 964)
// a pod talking to a remote node's IP is seen as itself.
//
// Everything lives in one nftables table per node, written in the kernel's
// own terms over netlink (github.com/google/nftables, no `nft` exec):
//
//	table ip flatnet {
//		set nodes { type ipv4_addr; elements = { <node IPs> } }
//		chain postrouting {
//			type nat hook postrouting priority srcnat;
//			ip saddr <cluster> ip daddr != <cluster> ip daddr != @nodes counter masquerade fully-random
//		}
//	}
package nat

import (
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/google/nftables/userdata"

	"github.com/flatnet-io/flatnet/pkg/cidr"
)

// Names of the kernel objects this package owns.
const (
	TableName = "flatnet"
	ChainName = "postrouting"
	SetName   = "nodes"
)

// ruleComment tags the masquerade rule (shown by `nft list ruleset`).
const ruleComment = "flatnet: masquerade pod traffic leaving the cluster"

// nodesSetID names the set inside one batch so the rule's lookup can refer to
// the set created in the same transaction. Why fixed: the library would
// otherwise allocate it from an unsynchronised package global (a data race
// between two Conns); the ID only has to be unique within a batch.
const nodesSetID = 1

// Rules is the desired masquerade policy of one node.
type Rules struct {
	ClusterCIDR netip.Prefix // all pod subnets
	NodeIPs     []netip.Addr // every node's underlay IP (self included): never masqueraded
}

// Validate reports why r cannot be programmed, or nil.
func (r Rules) Validate() error {
	c := r.ClusterCIDR
	if err := cidr.ValidateNetwork("cluster CIDR", c); err != nil {
		return fmt.Errorf("nat: %w", err)
	}
	if c.Bits() == 0 {
		// Why: with a /0 "daddr != cluster" never matches, so nothing would
		// ever be masqueraded; that is a configuration mistake, not a policy.
		return fmt.Errorf("nat: cluster CIDR %s covers every address", c)
	}
	if len(r.NodeIPs) == 0 {
		return errors.New("nat: no node IPs: the list must hold at least this node's underlay IP")
	}
	for i, ip := range r.NodeIPs {
		switch {
		case !ip.IsValid():
			return fmt.Errorf("nat: node IP #%d is missing or invalid", i)
		case !ip.Is4():
			// Is4 is false for IPv4-mapped IPv6 too: say which form is wanted.
			return fmt.Errorf("nat: node IP %s: only IPv4 is supported (write it as a plain IPv4 address)", ip)
		case ip.IsUnspecified() || ip.IsMulticast() || ip == netip.AddrFrom4([4]byte{255, 255, 255, 255}):
			return fmt.Errorf("nat: node IP %s is not a unicast address", ip)
		case c.Contains(ip):
			return fmt.Errorf("nat: node IP %s is inside the cluster CIDR %s: node underlay and pod addresses must not overlap", ip, c)
		}
	}
	return nil
}

// Table manages flatnet's table in one network namespace. Its methods may be
// called from several goroutines; each opens its own netlink socket.
type Table struct {
	netnsFd int
}

// New returns a Table for the namespace given by netnsFd: an open network
// namespace fd (> 0) that the caller keeps open while it uses the Table, or
// -1 for the namespace of the thread that calls the methods (the process's
// namespace, or the target namespace inside ns.NetNS.Do, which locks the
// thread).
func New(netnsFd int) *Table {
	return &Table{netnsFd: netnsFd}
}

func (t *Table) conn() (*nftables.Conn, error) {
	if t.netnsFd < 0 {
		// The library's "no namespace" is 0: open the socket on this thread.
		return nftables.New()
	}
	return nftables.New(nftables.WithNetNSFd(t.netnsFd))
}

func table() *nftables.Table {
	return &nftables.Table{Name: TableName, Family: nftables.TableFamilyIPv4}
}

func chain(tb *nftables.Table) *nftables.Chain {
	return &nftables.Chain{
		Name:     ChainName,
		Table:    tb,
		Type:     nftables.ChainTypeNAT,
		Hooknum:  nftables.ChainHookPostrouting,
		Priority: nftables.ChainPriorityNATSource,
	}
}

// Sync makes the kernel table exactly match r. It replaces the whole table in
// one netlink batch (add table; delete table; add table, set, chain, rule),
// which the kernel commits atomically: packets and readers see either the old
// table or the new one, never a gap, even when the table did not exist yet
// (the first "add" makes the "delete" valid). Rebuilding instead of diffing
// makes Sync idempotent and repairs any drift (table deleted, rules flushed or
// edited by hand) without having to understand the drift.
//
// The masquerade counter is carried over into the new rule, so the metric
// built on Masqueraded does not restart at zero on every Sync (packets counted
// between the read and the commit are lost; a missing table restarts at 0).
// Established connections are unaffected: their NAT binding lives in
// conntrack, not in the rule.
func (t *Table) Sync(r Rules) error {
	if err := r.Validate(); err != nil {
		return err
	}
	var carried expr.Counter
	if c, err := t.counter(); err == nil {
		carried = c
	}
	cc, tb, err := t.batchWithoutTable()
	if err != nil {
		return err
	}
	cc.AddTable(tb)

	nodes := &nftables.Set{
		Table:        tb,
		ID:           nodesSetID,
		Name:         SetName,
		KeyType:      nftables.TypeIPAddr,
		KeyByteOrder: binaryutil.BigEndian,
		Comment:      "underlay IPs of every node: never masqueraded",
	}
	if err := cc.AddSet(nodes, setElements(r.NodeIPs)); err != nil {
		return fmt.Errorf("nat: build set %s: %w", SetName, err)
	}
	ch := cc.AddChain(chain(tb))

	cluster := r.ClusterCIDR
	exprs := []expr.Any{
		// ip saddr <cluster>. Why the whole cluster CIDR and not this node's
		// pod subnet: any pod's traffic that leaves the cluster through this
		// node needs a return path, and the rule must not change when the
		// node's lease does.
		loadIPv4(12),
		maskPrefix(cluster),
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: cluster.Addr().AsSlice()},
		// ip daddr != <cluster>: pod to pod (same node or any other) keeps
		// its addresses; pod subnets are routed, never translated.
		loadIPv4(16),
		maskPrefix(cluster),
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: cluster.Addr().AsSlice()},
		// ip daddr != @nodes: pod to any node keeps the pod's address (the
		// flannel#964 mistake). Own node traffic is delivered locally and
		// never reaches postrouting, but listing every node keeps the rule
		// independent of which node it runs on.
		loadIPv4(16),
		&expr.Lookup{SourceRegister: 1, SetName: SetName, SetID: nodesSetID, Invert: true},
		&expr.Counter{Packets: carried.Packets, Bytes: carried.Bytes},
		// fully-random: source ports from the whole range, picked at random,
		// so many pods behind one node IP do not collide on ports (the
		// conntrack insert race seen with sequential allocation).
		&expr.Masq{FullyRandom: true},
	}
	cc.AddRule(&nftables.Rule{
		Table:    tb,
		Chain:    ch,
		Exprs:    exprs,
		UserData: userdata.AppendString(nil, userdata.TypeComment, ruleComment),
	})
	if err := cc.Flush(); err != nil {
		return fmt.Errorf("nat: replace table ip %s: %w", TableName, err)
	}
	return nil
}

// setElements returns the node IPs sorted and without duplicates (the kernel
// rejects a batch that adds one element twice).
func setElements(ips []netip.Addr) []nftables.SetElement {
	sorted := slices.Clone(ips)
	slices.SortFunc(sorted, netip.Addr.Compare)
	sorted = slices.Compact(sorted)
	out := make([]nftables.SetElement, len(sorted))
	for i, ip := range sorted {
		out[i] = nftables.SetElement{Key: ip.AsSlice()}
	}
	return out
}

// loadIPv4 loads the 4 bytes at offset of the IPv4 header (12 = saddr,
// 16 = daddr) into register 1.
func loadIPv4(offset uint32) *expr.Payload {
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: offset, Len: 4}
}

// maskPrefix keeps the network part of register 1 (what nft emits for a
// prefix match).
func maskPrefix(p netip.Prefix) *expr.Bitwise {
	mask := netip.PrefixFrom(netip.AddrFrom4([4]byte{255, 255, 255, 255}), p.Bits()).Masked().Addr().AsSlice()
	return &expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: mask, Xor: make([]byte, 4)}
}

// Delete removes the table. A missing table is not an error.
func (t *Table) Delete() error {
	cc, _, err := t.batchWithoutTable()
	if err != nil {
		return err
	}
	if err := cc.Flush(); err != nil {
		return fmt.Errorf("nat: delete table ip %s: %w", TableName, err)
	}
	return nil
}

// batchWithoutTable starts a batch that removes the table whether or not
// it exists: adding it first makes the delete valid either way. Sync adds
// the new table to the same batch, so the kernel swaps old for new in one
// atomic step.
func (t *Table) batchWithoutTable() (*nftables.Conn, *nftables.Table, error) {
	cc, err := t.conn()
	if err != nil {
		return nil, nil, fmt.Errorf("nat: netlink: %w", err)
	}
	tb := table()
	cc.AddTable(tb)
	cc.DelTable(tb)
	return cc, tb, nil
}

// Masqueraded returns the packet counter of the masquerade rule. Only the
// first packet of each connection traverses a nat chain, so this counts
// masqueraded connections (flows), not all their packets. When the table or
// the rule is missing the error wraps fs.ErrNotExist.
func (t *Table) Masqueraded() (packets uint64, err error) {
	c, err := t.counter()
	return c.Packets, err
}

func (t *Table) counter() (expr.Counter, error) {
	cc, err := t.conn()
	if err != nil {
		return expr.Counter{}, fmt.Errorf("nat: netlink: %w", err)
	}
	tb := table()
	// GetRules flattens its errors to text, so ask for the table first to
	// tell "absent" from a real failure.
	tables, err := cc.ListTablesOfFamily(nftables.TableFamilyIPv4)
	if err != nil {
		return expr.Counter{}, fmt.Errorf("nat: list tables: %w", err)
	}
	if !slices.ContainsFunc(tables, func(x *nftables.Table) bool { return x.Name == TableName }) {
		return expr.Counter{}, fmt.Errorf("nat: table ip %s: %w", TableName, fs.ErrNotExist)
	}
	rules, err := cc.GetRules(tb, &nftables.Chain{Name: ChainName, Table: tb})
	if err != nil {
		return expr.Counter{}, fmt.Errorf("nat: list rules of ip %s %s: %w", TableName, ChainName, err)
	}
	for _, r := range rules {
		if !slices.ContainsFunc(r.Exprs, func(e expr.Any) bool { _, ok := e.(*expr.Masq); return ok }) {
			continue
		}
		for _, e := range r.Exprs {
			if c, ok := e.(*expr.Counter); ok {
				return *c, nil
			}
		}
	}
	return expr.Counter{}, fmt.Errorf("nat: no counted masquerade rule in ip %s %s: %w", TableName, ChainName, fs.ErrNotExist)
}
