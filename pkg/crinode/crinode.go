// Package crinode runs a real container runtime on a lab node, as on a
// Kubernetes node: a private containerd whose CRI plugin loads the node's
// CNI conflist and execs the node's plugins for every pod sandbox, driven
// with crictl. Several runtimes share one machine, so everything a runtime
// owns is under its own directory, in its own network namespace and its own
// cgroup parent, and Stop removes all of it, also after failures.
package crinode

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/mountns"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// Programs a runtime needs on the machine (Debian 12: apt containerd runc).
var Programs = []string{"containerd", "containerd-shim-runc-v2", "runc", "ctr"}

// LibCNICacheDir is where containerd's libcni caches ADD results. Unlike
// everything else it is not configurable in containerd 1.6, and is shared
// with every other libcni user on the machine.
const LibCNICacheDir = "/var/lib/cni/results"

// Config says where a runtime lives and what it runs.
type Config struct {
	// Name is unique among the runtimes on the machine; it is the pods'
	// cgroup parent, so stray cgroups can be found and removed.
	Name         string
	Dir          string // private root, state, socket, config, pod logs
	NetNS        string // path of the node's network namespace
	CNIConfDir   string
	CNIBinDir    string
	SandboxImage string // must be imported before the first pod
	CrictlBin    string // crictl binary
	// MountNS, if set, is a mount namespace (pkg/mountns) containerd runs
	// in, with the node's network namespace; CNIConfDir, CNIBinDir and
	// SandboxImage are then as seen inside it. Dir must be the same path
	// inside and outside.
	MountNS string
}

// Runtime is a running containerd.
type Runtime struct {
	Config
	cmd    *exec.Cmd
	exited chan struct{}
}

// Pod is a pod sandbox.
type Pod struct {
	Name string
	ID   string
	IP   netip.Addr
	PID  int           // the sandbox's pause process
	Took time.Duration // how long `crictl runp` took (CNI ADD included)
	conf string
}

// NetNS is the path of the pod's network namespace as seen from here.
func (p *Pod) NetNS() string { return fmt.Sprintf("/proc/%d/ns/net", p.PID) }

// Socket is containerd's CRI endpoint.
func (c Config) Socket() string     { return filepath.Join(c.Dir, "containerd.sock") }
func (c Config) stateDir() string   { return filepath.Join(c.Dir, "state") }
func (c Config) rootDir() string    { return filepath.Join(c.Dir, "root") }
func (c Config) crictlConf() string { return filepath.Join(c.Dir, "crictl.yaml") }

// PodNetNSDir holds the pods' network namespaces
// (netns_mounts_under_state_dir).
func (c Config) PodNetNSDir() string {
	return filepath.Join(c.stateDir(), "io.containerd.grpc.v1.cri", "netns")
}

// Log is containerd's log file.
func (c Config) Log() string { return filepath.Join(c.Dir, "containerd.log") }

// CgroupParent is the cgroup every pod of this runtime lives under.
func (c Config) CgroupParent() string { return "/" + c.Name }

// config is containerd's configuration. Two settings are required on
// machines like CI's: restrict_oom_score_adj (root there lacks
// CAP_SYS_RESOURCE, so runc cannot give the sandbox the CRI's -998 and
// fails with "can't get final child's PID from pipe") and
// netns_mounts_under_state_dir (pod namespaces stay under our state dir,
// not in the machine's /run/netns).
func (r *Runtime) config() string {
	q := func(s string) string { b, _ := json.Marshal(s); return string(b) } // TOML basic strings = JSON strings here
	return fmt.Sprintf(`version = 2
root = %s
state = %s
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = %s

[plugins."io.containerd.internal.v1.opt"]
  path = %s

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %s
  netns_mounts_under_state_dir = true
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

[plugins."io.containerd.grpc.v1.cri".cni]
  bin_dir = %s
  conf_dir = %s
  max_conf_num = 1

[plugins."io.containerd.grpc.v1.cri".containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
  Root = %s
`, q(r.rootDir()), q(r.stateDir()), q(r.Socket()), q(filepath.Join(r.Dir, "opt")), q(r.SandboxImage),
		q(r.CNIBinDir), q(r.CNIConfDir), q(filepath.Join(r.stateDir(), "runc")))
}

// CheckPrograms tells what is missing to run a runtime: the programs, the
// crictl binary and the CNI loopback plugin the CRI plugin execs for every
// pod.
func CheckPrograms(crictl, loopback string) error {
	var missing []string
	for _, p := range Programs {
		if _, err := exec.LookPath(p); err != nil {
			missing = append(missing, p)
		}
	}
	for _, f := range []string{crictl, loopback} {
		if st, err := os.Stat(f); err != nil || st.Mode()&0o111 == 0 {
			missing = append(missing, f)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("missing %s: run hack/cri/tools.sh (apt containerd runc busybox-static containernetworking-plugins, and crictl built into ~/.cache/flatnet/crictl)", strings.Join(missing, ", "))
	}
	return nil
}

// Start writes the runtime's config and starts containerd in the node's
// network namespace (and nothing else: it must see the machine's mounts,
// where runc finds the cgroup hierarchies), then waits for its socket.
func Start(ctx context.Context, cfg Config) (_ *Runtime, err error) {
	r := &Runtime{Config: cfg}
	if len(r.Socket())+len(".ttrpc") >= 108 {
		return nil, fmt.Errorf("runtime dir %s: too long for a unix socket path", r.Dir)
	}
	for _, d := range []string{r.rootDir(), r.stateDir(), filepath.Join(r.Dir, "pods")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, err
		}
	}
	if err := fileutil.WriteAtomic(filepath.Join(r.Dir, "config.toml"), []byte(r.config()), 0o644); err != nil {
		return nil, err
	}
	crictl := fmt.Sprintf("runtime-endpoint: unix://%s\nimage-endpoint: unix://%s\ntimeout: 120\n", r.Socket(), r.Socket())
	if err := fileutil.WriteAtomic(r.crictlConf(), []byte(crictl), 0o644); err != nil {
		return nil, err
	}
	logf, err := os.OpenFile(r.Log(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	h, err := ns.GetNS(cfg.NetNS)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	r.cmd = exec.Command("containerd", "--config", filepath.Join(r.Dir, "config.toml"))
	r.cmd.Stdout, r.cmd.Stderr = logf, logf
	r.cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	start := nsutil.Start
	if cfg.MountNS != "" {
		start = func(h ns.NetNS, cmd *exec.Cmd) error { return mountns.Start(cfg.MountNS, h, cmd) }
	}
	if err := start(h, r.cmd); err != nil {
		return nil, fmt.Errorf("start containerd in %s: %w", cfg.NetNS, err)
	}
	r.exited = make(chan struct{})
	go func() { r.cmd.Wait(); close(r.exited) }()
	defer func() {
		if err != nil {
			r.Stop()
		}
	}()
	err = r.poll(ctx, 30*time.Second, func() error {
		_, err := r.Crictl(ctx, "version")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("containerd %s: %w", r.Name, err)
	}
	return r, nil
}

// poll retries f until it succeeds, containerd exits, or timeout.
func (r *Runtime) poll(ctx context.Context, timeout time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-r.exited:
			return fmt.Errorf("containerd exited (%v); its log %s ends:\n%s", r.cmd.ProcessState, r.Log(), fileutil.Tail(r.Log(), 15))
		case <-ctx.Done():
			return fmt.Errorf("after %v: %w", timeout, err)
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Crictl runs crictl against this runtime and returns its stdout.
func (r *Runtime) Crictl(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, r.CrictlBin, append([]string{"--config", r.crictlConf()}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("crictl %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// Import loads an OCI image archive into the CRI plugin's namespace.
func (r *Runtime) Import(ctx context.Context, archive string) error {
	out, err := exec.CommandContext(ctx, "ctr", "--address", r.Socket(), "-n", "k8s.io", "images", "import", archive).CombinedOutput()
	if err != nil {
		return fmt.Errorf("ctr images import %s: %w: %s", archive, err, out)
	}
	return nil
}

// WaitNetworkReady waits until the CRI plugin has loaded a CNI config.
func (r *Runtime) WaitNetworkReady(ctx context.Context, timeout time.Duration) error {
	return r.poll(ctx, timeout, func() error {
		out, err := r.Crictl(ctx, "info")
		if err != nil {
			return err
		}
		var info struct {
			Status struct {
				Conditions []struct {
					Type    string `json:"type"`
					Status  bool   `json:"status"`
					Message string `json:"message"`
				} `json:"conditions"`
			} `json:"status"`
		}
		if err := json.Unmarshal(out, &info); err != nil {
			return err
		}
		for _, c := range info.Status.Conditions {
			if !c.Status {
				return fmt.Errorf("%s: %s", c.Type, c.Message)
			}
		}
		return nil
	})
}

func (r *Runtime) writeJSON(name string, v any) (string, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return "", err
	}
	p := filepath.Join(r.Dir, "pods", name+".json")
	return p, os.WriteFile(p, b, 0o644)
}

// RunPod creates and starts a pod sandbox (`crictl runp`: the CRI plugin
// calls CNI ADD) and reads back its IP and pause process.
func (r *Runtime) RunPod(ctx context.Context, name string) (*Pod, error) {
	p := &Pod{Name: name}
	var err error
	p.conf, err = r.writeJSON(name, map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "default", "uid": r.Name + "-" + name, "attempt": 0},
		"hostname":      name,
		"log_directory": filepath.Join(r.Dir, "pods", name),
		"linux": map[string]any{
			"cgroup_parent": r.CgroupParent(),
			// pod network and IPC, a PID namespace per container (the CRI's enum values)
			"security_context": map[string]any{"namespace_options": map[string]int{"network": 0, "pid": 1, "ipc": 0}},
		},
	})
	if err != nil {
		return nil, err
	}
	start := time.Now()
	out, err := r.Crictl(ctx, "runp", p.conf)
	p.Took = time.Since(start)
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w", name, err)
	}
	p.ID = strings.TrimSpace(string(out))
	var st struct {
		Status struct {
			State   string `json:"state"`
			Network struct {
				IP string `json:"ip"`
			} `json:"network"`
		} `json:"status"`
		Info struct {
			PID int `json:"pid"`
		} `json:"info"`
	}
	if err := r.inspect(ctx, &st, "inspectp", p.ID); err != nil {
		return p, err
	}
	if st.Status.State != "SANDBOX_READY" {
		return p, fmt.Errorf("pod %s is %s", name, st.Status.State)
	}
	p.PID = st.Info.PID
	if p.IP, err = netip.ParseAddr(st.Status.Network.IP); err != nil {
		return p, fmt.Errorf("pod %s: IP %q: %w", name, st.Status.Network.IP, err)
	}
	return p, nil
}

func (r *Runtime) inspect(ctx context.Context, v any, verb, id string) error {
	out, err := r.Crictl(ctx, verb, "-o", "json", id)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, v); err != nil {
		return fmt.Errorf("crictl %s %s: %w", verb, id, err)
	}
	return nil
}

// StopPod is `crictl stopp` (CNI DEL with the pod's namespace).
func (r *Runtime) StopPod(ctx context.Context, p *Pod) error {
	_, err := r.Crictl(ctx, "stopp", p.ID)
	return err
}

// RemovePod is `crictl rmp` (CNI DEL again, now without a namespace).
func (r *Runtime) RemovePod(ctx context.Context, p *Pod) error {
	_, err := r.Crictl(ctx, "rmp", p.ID)
	return err
}

// StartContainer creates and starts a container in pod p.
func (r *Runtime) StartContainer(ctx context.Context, p *Pod, name, image string, command []string) (string, error) {
	conf, err := r.writeJSON(p.Name+"-"+name, map[string]any{
		"metadata": map[string]any{"name": name},
		"image":    map[string]any{"image": image},
		"command":  command,
		"log_path": name + ".log",
		"linux":    map[string]any{},
	})
	if err != nil {
		return "", err
	}
	out, err := r.Crictl(ctx, "create", p.ID, conf, p.conf)
	if err != nil {
		return "", err
	}
	id := strings.TrimSpace(string(out))
	if _, err := r.Crictl(ctx, "start", id); err != nil {
		return id, err
	}
	return id, nil
}

// WaitExited waits until a container has exited and returns its exit code
// and output.
func (r *Runtime) WaitExited(ctx context.Context, id string, timeout time.Duration) (int, string, error) {
	var st struct {
		Status struct {
			State    string `json:"state"`
			ExitCode int    `json:"exitCode"`
		} `json:"status"`
	}
	err := r.poll(ctx, timeout, func() error {
		if err := r.inspect(ctx, &st, "inspect", id); err != nil {
			return err
		}
		if st.Status.State != "CONTAINER_EXITED" {
			return fmt.Errorf("container %s is %s", id, st.Status.State)
		}
		return nil
	})
	out, lerr := r.Crictl(ctx, "logs", id)
	return st.Status.ExitCode, string(out), errors.Join(err, lerr)
}

// ContainerRunning reports an error until the container runs.
func (r *Runtime) ContainerRunning(ctx context.Context, id string) error {
	var st struct {
		Status struct {
			State string `json:"state"`
		} `json:"status"`
	}
	if err := r.inspect(ctx, &st, "inspect", id); err != nil {
		return err
	}
	if st.Status.State != "CONTAINER_RUNNING" {
		return fmt.Errorf("container %s is %s", id, st.Status.State)
	}
	return nil
}
