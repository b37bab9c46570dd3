// Package agent is flatnetd, the node agent. Its data path reads top to
// bottom, one file per step:
//
//	config.go     what the operator asked for
//	agent.go      Run: lease -> node setup -> peer reconcile, forever
//	node.go       node setup: bridge, forwarding, node state, CNI files
//	underlay.go   which interface and address face the other nodes
//	metrics.go    /healthz, /readyz and Prometheus /metrics
package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/flatnet-io/flatnet/pkg/backend/auto"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
)

// Config is everything flatnetd can be told, by flags or a JSON file
// (flags win). Every path is configurable because several "nodes" may
// share one filesystem.
type Config struct {
	NodeName    string `json:"nodeName"`
	ClusterCIDR string `json:"clusterCIDR"`
	SubnetLen   int    `json:"subnetLen"`
	Backend     string `json:"backend"`
	VXLANVNI    int    `json:"vxlanVNI"`
	VXLANPort   int    `json:"vxlanPort"`
	// VXLANChecksumOffload: auto (off only on kernels < 5.7), on, off.
	VXLANChecksumOffload string `json:"vxlanChecksumOffload"`
	MTU                  int    `json:"mtu"`
	Iface                string `json:"iface"`
	Bridge               string `json:"bridge"`

	Datastore     string        `json:"datastore"`
	EtcdEndpoints string        `json:"etcdEndpoints"`
	EtcdPrefix    string        `json:"etcdPrefix"`
	LeaseTTL      time.Duration `json:"leaseTTL"`
	Kubeconfig    string        `json:"kubeconfig"`

	StateDir        string        `json:"stateDir"`
	RunDir          string        `json:"runDir"`
	CNIConfDir      string        `json:"cniConfDir"`
	CNIConfName     string        `json:"cniConfName"`
	CNIBinDir       string        `json:"cniBinDir"`
	CNIBinSource    string        `json:"cniBinSource"`
	CNINetworkName  string        `json:"cniNetworkName"`
	CNIVersion      string        `json:"cniVersion"`
	InstallInterval time.Duration `json:"installInterval"`

	ResyncInterval time.Duration `json:"resyncInterval"`
	Listen         string        `json:"listen"`
	LogLevel       string        `json:"logLevel"`
	LogFormat      string        `json:"logFormat"`
}

// Defaults are the production defaults.
func Defaults() Config {
	host, _ := os.Hostname()
	return Config{
		NodeName:             host,
		ClusterCIDR:          "10.244.0.0/16",
		SubnetLen:            24,
		Backend:              auto.Name,
		VXLANVNI:             vxlan.DefaultVNI,
		VXLANPort:            vxlan.DefaultPort,
		VXLANChecksumOffload: "auto",
		Bridge:               dataplane.DefaultBridge,
		Datastore:            "etcd",
		EtcdEndpoints:        "http://127.0.0.1:2379",
		EtcdPrefix:           "/flatnet",
		LeaseTTL:             10 * time.Minute,
		StateDir:             "/var/lib/flatnet",
		RunDir:               "/run/flatnet",
		CNIConfDir:           "/etc/cni/net.d",
		CNIConfName:          "10-flatnet.conflist",
		CNIBinDir:            "/opt/cni/bin",
		CNINetworkName:       "flatnet",
		CNIVersion:           "1.0.0", // containerd 1.6/1.7 reject 1.1.0 results; 1.1.0 adds GC and STATUS
		InstallInterval:      2 * time.Second,
		ResyncInterval:       10 * time.Second,
		Listen:               ":9645",
		LogLevel:             "info",
		LogFormat:            "text",
	}
}

// ParseFlags fills a Config from defaults, then an optional --config JSON
// file, then the flags given on the command line (flags win).
func ParseFlags(args []string) (Config, error) {
	c := Defaults()
	file := configFileArg(args)
	if file != "" {
		b, err := os.ReadFile(file)
		if err != nil {
			return c, err
		}
		dec := json.NewDecoder(bytes.NewReader(b))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&c); err != nil {
			return c, fmt.Errorf("config file %s: %w", file, err)
		}
	}
	fs := flag.NewFlagSet("flatnetd", flag.ContinueOnError)
	fs.String("config", file, "JSON config file (keys as in the README); flags override it")
	fs.StringVar(&c.NodeName, "node-name", c.NodeName, "this node's name")
	fs.StringVar(&c.ClusterCIDR, "cluster-cidr", c.ClusterCIDR, "pod network of the whole cluster")
	fs.IntVar(&c.SubnetLen, "subnet-len", c.SubnetLen, "prefix length of each node's pod subnet")
	fs.StringVar(&c.Backend, "backend", c.Backend, "how peers are reached: auto (direct route to peers on this segment, VXLAN to the others), vxlan or host-gw")
	fs.IntVar(&c.VXLANVNI, "vxlan-vni", c.VXLANVNI, "VXLAN network identifier")
	fs.IntVar(&c.VXLANPort, "vxlan-port", c.VXLANPort, "VXLAN UDP port")
	fs.StringVar(&c.VXLANChecksumOffload, "vxlan-checksum-offload", c.VXLANChecksumOffload, "tx checksum offload on the VXLAN device: auto (off only on kernels < 5.7, which corrupt NATed VXLAN checksums), on, off")
	fs.IntVar(&c.MTU, "mtu", c.MTU, "pod MTU (0: underlay MTU minus the backend's overhead)")
	fs.StringVar(&c.Iface, "iface", c.Iface, "underlay interface (default: the one holding the default route)")
	fs.StringVar(&c.Bridge, "bridge", c.Bridge, "node bridge name")
	fs.StringVar(&c.Datastore, "datastore", c.Datastore, "where leases live: etcd or kubernetes")
	fs.StringVar(&c.EtcdEndpoints, "etcd-endpoints", c.EtcdEndpoints, "comma-separated etcd client URLs")
	fs.StringVar(&c.EtcdPrefix, "etcd-prefix", c.EtcdPrefix, "etcd key prefix")
	fs.DurationVar(&c.LeaseTTL, "lease-ttl", c.LeaseTTL, "how long a lease outlives a node that stopped renewing it")
	fs.StringVar(&c.Kubeconfig, "kubeconfig", c.Kubeconfig, "kubeconfig for --datastore kubernetes (default: in-cluster)")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "persistent state: the node's lease and the plugin's IPAM")
	fs.StringVar(&c.RunDir, "run-dir", c.RunDir, "runtime state: the node state file for the plugin")
	fs.StringVar(&c.CNIConfDir, "cni-conf-dir", c.CNIConfDir, "where the runtime reads CNI configs")
	fs.StringVar(&c.CNIConfName, "cni-conf-name", c.CNIConfName, "file name of flatnet's conflist")
	fs.StringVar(&c.CNIBinDir, "cni-bin-dir", c.CNIBinDir, "where the runtime finds CNI plugins")
	fs.StringVar(&c.CNIBinSource, "cni-bin-source", c.CNIBinSource, "flatnet plugin binary to install (default: next to flatnetd)")
	fs.StringVar(&c.CNINetworkName, "cni-network-name", c.CNINetworkName, "network name in the conflist")
	fs.StringVar(&c.CNIVersion, "cni-version", c.CNIVersion, "cniVersion of the conflist")
	fs.DurationVar(&c.InstallInterval, "install-interval", c.InstallInterval, "how often the CNI binary and conflist are checked and reinstalled")
	fs.DurationVar(&c.ResyncInterval, "resync-interval", c.ResyncInterval, "full reconcile period (events trigger it sooner)")
	fs.StringVar(&c.Listen, "listen", c.Listen, "address for /healthz, /readyz and /metrics (empty: off)")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", c.LogFormat, "text or json")
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	return c, c.Validate()
}

// configFileArg finds --config before the other flags are parsed, so the
// file's values become the flags' defaults.
func configFileArg(args []string) string {
	for i, a := range args {
		for _, name := range []string{"-config", "--config"} {
			if a == name && i+1 < len(args) {
				return args[i+1]
			}
			if v, ok := strings.CutPrefix(a, name+"="); ok {
				return v
			}
		}
	}
	return ""
}

// Validate rejects configs the agent could never work with, with messages
// that name the bad value.
func (c Config) Validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("--node-name is empty"))
	}
	if p, err := netip.ParsePrefix(c.ClusterCIDR); err != nil {
		errs = append(errs, fmt.Errorf("--cluster-cidr %q: %v", c.ClusterCIDR, err))
	} else if err := cidr.ValidateSubnet(p); err != nil {
		errs = append(errs, fmt.Errorf("--cluster-cidr: %v", err))
	} else if c.SubnetLen <= p.Bits() || c.SubnetLen > 30 {
		errs = append(errs, fmt.Errorf("--subnet-len %d must be longer than the cluster CIDR's /%d and at most 30", c.SubnetLen, p.Bits()))
	}
	if c.MTU != 0 {
		if err := cidr.ValidateMTU(c.MTU); err != nil {
			errs = append(errs, fmt.Errorf("--mtu: %v", err))
		}
	}
	switch c.Datastore {
	case "etcd":
		if c.EtcdEndpoints == "" {
			errs = append(errs, errors.New("--etcd-endpoints is empty"))
		}
	case "kubernetes":
	default:
		errs = append(errs, fmt.Errorf("--datastore %q: want etcd or kubernetes", c.Datastore))
	}
	for flagName, p := range map[string]string{"state-dir": c.StateDir, "run-dir": c.RunDir, "cni-conf-dir": c.CNIConfDir, "cni-bin-dir": c.CNIBinDir} {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("--%s %q must be an absolute path", flagName, p))
		}
	}
	if c.ResyncInterval <= 0 || c.InstallInterval <= 0 || c.LeaseTTL < 2*time.Second {
		errs = append(errs, errors.New("--resync-interval and --install-interval must be positive, --lease-ttl at least 2s"))
	}
	if o := c.VXLANChecksumOffload; o != "auto" && o != "on" && o != "off" {
		errs = append(errs, fmt.Errorf("--vxlan-checksum-offload %q: want auto, on or off", o))
	}
	if err := vxlan.Validate(c.VXLANVNI, c.VXLANPort); err != nil {
		errs = append(errs, fmt.Errorf("--vxlan-vni / --vxlan-port: %w", err))
	}
	return errors.Join(errs...)
}

// NodeStatePath is where the plugin finds this node's state.
func (c Config) NodeStatePath() string { return filepath.Join(c.RunDir, "node.json") }

// NewLogger builds the agent's structured logger.
func NewLogger(w io.Writer, level, format string) *slog.Logger {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		lv = slog.LevelInfo
	}
	opts := &slog.HandlerOptions{Level: lv}
	if format == "json" {
		return slog.New(slog.NewJSONHandler(w, opts))
	}
	return slog.New(slog.NewTextHandler(w, opts))
}
