package agent

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/datastore"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/nodestate"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// setupNode prepares everything pods on this node need once the lease is
// known: the bridge with the gateway, forwarding and the node state file
// the plugin reads (the plugin binary and conflist do not depend on the
// lease: the installer keeps them, before and after). It only adds or
// corrects, never tears down, so it is safe on restart with pods running.
func setupNode(cfg Config, lease datastore.Lease, mtu int, log *slog.Logger) error {
	cluster := netip.MustParsePrefix(cfg.ClusterCIDR)
	gw := netip.PrefixFrom(cidr.FirstHost(lease.Subnet), lease.Subnet.Bits())
	br, err := dataplane.EnsureBridge(cfg.Bridge, gw, mtu)
	if err != nil {
		return err
	}
	if err := pruneBridgeAddrs(br, gw, cluster, log); err != nil {
		return err
	}
	// New namespaces may start with forwarding off; pods need it on.
	if err := nsutil.WriteSysctl("net/ipv4/ip_forward", "1"); err != nil {
		return err
	}
	st := &nodestate.State{NodeName: cfg.NodeName, Subnet: lease.Subnet, Gateway: gw.Addr(), MTU: mtu, ClusterCIDR: cluster}
	if err := writeIfChanged(cfg.NodeStatePath(), st); err != nil {
		return fmt.Errorf("node state: %w", err)
	}
	return nil
}

// pruneBridgeAddrs removes addresses of an older subnet of this cluster
// from the bridge (a node that got a new subnet), so that the plugin never
// finds the bridge with two gateways.
func pruneBridgeAddrs(br netlink.Link, keep, cluster netip.Prefix, log *slog.Logger) error {
	addrs, err := netlinksafe.AddrList(br, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if p := dataplane.IPNetToPrefix(a.IPNet); cluster.Contains(p.Addr()) && p != keep {
			if err := netlink.AddrDel(br, &a); err != nil {
				return fmt.Errorf("remove stale bridge address %s: %w", a.IPNet, err)
			}
			log.Warn("removed stale bridge address from an earlier subnet", "addr", a.IPNet.String())
		}
	}
	return nil
}

func writeIfChanged(path string, st *nodestate.State) error {
	if cur, err := nodestate.Read(path); err == nil && *cur == *st {
		return nil
	}
	return nodestate.Write(path, st)
}

// installer keeps the plugin binary and the conflist in place: a package
// upgrade that wipes /opt/cni/bin or the conf dir is repaired within one
// install interval (flannel only installs from an init container).
type installer struct {
	confPath string
	conf     []byte
	binSrc   string
	binDst   string
	binHash  [32]byte
	binSeen  binStat // stat of binDst when it last matched binHash
}

type binStat struct {
	ino, size uint64
	mtime     int64
}

func statOf(path string) (binStat, bool) {
	var st syscall.Stat_t
	if syscall.Stat(path, &st) != nil {
		return binStat{}, false
	}
	return binStat{ino: st.Ino, size: uint64(st.Size), mtime: st.Mtim.Nano()}, true
}

func newInstaller(cfg Config) (*installer, error) {
	src := cfg.CNIBinSource
	if src == "" {
		self, err := os.Executable()
		if err != nil {
			return nil, err
		}
		src = filepath.Join(filepath.Dir(self), "flatnet")
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return nil, fmt.Errorf("CNI plugin binary to install: %w (set --cni-bin-source)", err)
	}
	conf, err := conflist(cfg)
	if err != nil {
		return nil, err
	}
	return &installer{
		confPath: filepath.Join(cfg.CNIConfDir, cfg.CNIConfName),
		conf:     conf,
		binSrc:   src,
		binDst:   filepath.Join(cfg.CNIBinDir, "flatnet"),
		binHash:  sha256.Sum256(b),
	}, nil
}

// conflist is the CNI config the runtime loads: the plugin finds subnet,
// gateway and MTU in the node state file, so this never changes with the
// lease and the runtime never sees a half-configured node.
func conflist(cfg Config) ([]byte, error) {
	b, err := json.MarshalIndent(map[string]any{
		"cniVersion": cfg.CNIVersion,
		"name":       cfg.CNINetworkName,
		"plugins": []any{map[string]any{
			"type":          "flatnet",
			"bridge":        cfg.Bridge,
			"dataDir":       cfg.StateDir,
			"nodeStateFile": cfg.NodeStatePath(),
		}},
	}, "", "  ")
	return append(b, '\n'), err
}

// Ensure reinstalls whatever is missing or differs. It returns what it
// (re)installed.
func (i *installer) Ensure() ([]string, error) {
	var done []string
	if cur, err := os.ReadFile(i.confPath); err != nil || !bytes.Equal(cur, i.conf) {
		if err := fileutil.WriteAtomic(i.confPath, i.conf, 0o644); err != nil {
			return done, fmt.Errorf("install %s: %w", i.confPath, err)
		}
		done = append(done, i.confPath)
	}
	if !i.binCurrent() {
		b, err := os.ReadFile(i.binSrc)
		if err != nil {
			return done, err
		}
		if err := fileutil.WriteAtomic(i.binDst, b, 0o755); err != nil {
			return done, fmt.Errorf("install %s: %w", i.binDst, err)
		}
		done = append(done, i.binDst)
	}
	return done, nil
}

// binCurrent hashes the installed binary only when its inode, size or
// mtime changed since it last matched, so the periodic check is cheap.
func (i *installer) binCurrent() bool {
	st, ok := statOf(i.binDst)
	if !ok {
		return false
	}
	if st == i.binSeen {
		return true
	}
	f, err := os.Open(i.binDst)
	if err != nil {
		return false
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return false
	}
	if !bytes.Equal(h.Sum(nil), i.binHash[:]) {
		return false
	}
	i.binSeen = st
	return true
}

// savedLease is the node's last lease, kept in the state dir so that a
// restarted agent asks for the same subnet first.
type savedLease struct {
	Subnet netip.Prefix `json:"subnet"`
}

func loadLease(stateDir string) netip.Prefix {
	b, err := os.ReadFile(filepath.Join(stateDir, "lease.json"))
	if err != nil {
		return netip.Prefix{}
	}
	var s savedLease
	if json.Unmarshal(b, &s) != nil {
		return netip.Prefix{}
	}
	return s.Subnet
}

func saveLease(stateDir string, subnet netip.Prefix) error {
	b, _ := json.Marshal(savedLease{Subnet: subnet})
	return fileutil.WriteAtomic(filepath.Join(stateDir, "lease.json"), b, 0o644)
}
