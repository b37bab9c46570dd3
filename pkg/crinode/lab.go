package crinode

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// LoopbackPlugin is the reference loopback plugin (Debian's
// containernetworking-plugins), which the CRI plugin execs for every pod.
const LoopbackPlugin = "/usr/lib/cni/loopback"

// OnLabNode is a runtime in lab node n: in the node's namespace, loading
// the conflist n's flatnetd writes, its pods under a cgroup parent named
// like the node's namespace. Its CNI bin dir is its own (see LinkPlugins).
func OnLabNode(n *lab.Node, crictl string) Config {
	dir := filepath.Join(n.Dir, "cri")
	return Config{
		Name: n.NetNS, Dir: dir, NetNS: nsutil.Path(n.NetNS),
		CNIConfDir: filepath.Join(n.Dir, "net.d"), CNIBinDir: filepath.Join(dir, "cni-bin"),
		SandboxImage: PauseImage, CrictlBin: crictl,
	}
}

// InstalledPlugin is the flatnet binary n's flatnetd installed.
func InstalledPlugin(n *lab.Node) string { return filepath.Join(n.Dir, "bin", "flatnet") }

// LinkPlugins fills a CNI bin dir with symlinks, name -> path.
func LinkPlugins(binDir string, plugins map[string]string) error {
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	for name, target := range plugins {
		if err := os.Symlink(target, filepath.Join(binDir, name)); err != nil {
			return err
		}
	}
	return nil
}

// CrictlBin is $CRICTL, else the crictl hack/cri/tools.sh builds into its
// cache (which may not exist yet: CheckPrograms says so).
func CrictlBin(moduleRoot string) (string, error) {
	if p := os.Getenv("CRICTL"); p != "" {
		return p, nil
	}
	out, err := exec.Command(filepath.Join(moduleRoot, "hack/cri/tools.sh"), "--print-dir").Output()
	if err != nil {
		return "", fmt.Errorf("hack/cri/tools.sh --print-dir: %w", err)
	}
	return filepath.Join(strings.TrimSpace(string(out)), "crictl"), nil
}
