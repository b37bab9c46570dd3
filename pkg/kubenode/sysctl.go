package kubenode

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/flatnet-io/flatnet/pkg/mountns"
)

// KubeletSysctls are the machine-wide sysctls kubelet v1.37 checks at start
// and, unless protectKernelDefaults is set, writes: setupKernelTunables in
// k8s.io/kubernetes/pkg/kubelet/cm/container_manager_linux.go, values from
// k8s.io/component-helpers/node/util/sysctl.
var KubeletSysctls = map[string]string{
	"vm/overcommit_memory":      "1",
	"vm/panic_on_oom":           "0",
	"kernel/panic":              "10",
	"kernel/panic_on_oops":      "1",
	"kernel/keys/root_maxkeys":  "1000000",
	"kernel/keys/root_maxbytes": "25000000",
}

// watched are the machine-wide values a node must leave alone: kubelet's,
// and the conntrack table size kube-proxy would raise (its settings here
// say not to).
func watched() []string {
	var out []string
	for k := range KubeletSysctls {
		out = append(out, filepath.Join("/proc/sys", k))
	}
	out = append(out, "/proc/sys/net/netfilter/nf_conntrack_max", "/sys/module/nf_conntrack/parameters/hashsize")
	sort.Strings(out)
	return out
}

// Guard holds the machine's values of the watched sysctls from before any
// node started, and checks they never change.
type Guard struct {
	before map[string]string
}

// NewGuard reads the machine's values now.
func NewGuard() (*Guard, error) {
	v, err := readAll(watched())
	if err != nil {
		return nil, fmt.Errorf("reading the machine's sysctls: %w", err)
	}
	return &Guard{before: v}, nil
}

func readAll(paths []string) (map[string]string, error) {
	out := map[string]string{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			return nil, err
		}
		out[p] = strings.TrimSpace(string(b))
	}
	return out, nil
}

// Check fails if any watched value of the machine differs from before.
func (g *Guard) Check() error {
	if g == nil {
		return nil
	}
	now, err := readAll(watched())
	if err != nil {
		return err
	}
	var changed []string
	for _, p := range watched() {
		if now[p] != g.before[p] {
			changed = append(changed, fmt.Sprintf("%s %s -> %s", p, g.before[p], now[p]))
		}
	}
	if len(changed) > 0 {
		return fmt.Errorf("machine-wide sysctls changed: %s", strings.Join(changed, ", "))
	}
	return nil
}

// CheckNode establishes that a kubelet in the mount namespace at mnt can
// start without writing a machine-wide sysctl: it sees exactly the values
// it wants there, and the machine's values are still the ones from before.
// Anything else is an error, and the kubelet must not be started.
func (g *Guard) CheckNode(mnt string) error {
	var inside map[string]string
	err := mountns.Do(mnt, nil, func() error {
		var err error
		inside, err = readAll(watched())
		return err
	})
	if err != nil {
		return fmt.Errorf("refusing to start kubelet: cannot read the sysctls inside %s: %w", mnt, err)
	}
	for k, want := range KubeletSysctls {
		if got := inside[filepath.Join("/proc/sys", k)]; got != want {
			return fmt.Errorf("refusing to start kubelet: inside %s, /proc/sys/%s is %s, not the %s kubelet expects: "+
				"it would write the machine's value (or refuse to start)", mnt, k, got, want)
		}
	}
	if err := g.Check(); err != nil {
		return fmt.Errorf("refusing to start kubelet: %w", err)
	}
	return nil
}

// String shows the machine's values from before, for the run's output.
func (g *Guard) String() string {
	return formatValues(g.before)
}

func formatSysctls(m map[string]string) string {
	full := map[string]string{}
	for k, v := range m {
		full[filepath.Join("/proc/sys", k)] = v
	}
	return formatValues(full)
}

func formatValues(m map[string]string) string {
	var keys []string
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var parts []string
	for _, k := range keys {
		name := strings.TrimPrefix(k, "/proc/sys/")
		name = strings.TrimPrefix(name, "/sys/module/")
		parts = append(parts, strings.ReplaceAll(name, "/", ".")+"="+m[k])
	}
	return strings.Join(parts, " ")
}
