// Package nsutil creates and removes named network namespaces the way
// `ip netns add/del` does (a bind mount under /run/netns), so that the
// test beds and the lab can be inspected with `ip netns exec`, and runs
// work inside them.
package nsutil

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// RunDir is where named namespaces live (same place as iproute2).
const RunDir = "/run/netns"

// Path is the bind-mount path of the named namespace.
func Path(name string) string { return filepath.Join(RunDir, name) }

// Create makes a new named network namespace with loopback up. It fails if
// the name is taken.
func Create(name string) (ns.NetNS, error) {
	if name == "" || strings.ContainsAny(name, "/\x00") {
		return nil, fmt.Errorf("invalid netns name %q", name)
	}
	if err := ensureRunDir(); err != nil {
		return nil, err
	}
	p := Path(name)
	f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	f.Close()
	errc := make(chan error, 1)
	go func() {
		// This thread ends up in the new namespace; never unlock it, so the
		// runtime discards the thread when the goroutine exits.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			errc <- fmt.Errorf("unshare: %w", err)
			return
		}
		self := fmt.Sprintf("/proc/%d/task/%d/ns/net", os.Getpid(), unix.Gettid())
		if err := unix.Mount(self, p, "none", unix.MS_BIND, ""); err != nil {
			errc <- fmt.Errorf("bind mount %s: %w", p, err)
			return
		}
		errc <- nil
	}()
	if err := <-errc; err != nil {
		os.Remove(p)
		return nil, fmt.Errorf("create netns %s: %w", name, err)
	}
	h, err := ns.GetNS(p)
	if err != nil {
		Delete(name)
		return nil, err
	}
	if err := h.Do(func(ns.NetNS) error { return linkUpLoopback() }); err != nil {
		h.Close()
		Delete(name)
		return nil, err
	}
	return h, nil
}

// ensureRunDir makes /run/netns a shared mount point, as iproute2 does, so
// that namespace mounts propagate into mount namespaces created later.
func ensureRunDir() error {
	if err := os.MkdirAll(RunDir, 0o755); err != nil {
		return err
	}
	err := unix.Mount("", RunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == unix.EINVAL {
		if err = unix.Mount(RunDir, RunDir, "none", unix.MS_BIND|unix.MS_REC, ""); err == nil {
			err = unix.Mount("", RunDir, "none", unix.MS_SHARED|unix.MS_REC, "")
		}
	}
	if err != nil {
		return fmt.Errorf("make %s a shared mount: %w", RunDir, err)
	}
	return nil
}

// Delete removes a named namespace. The namespace itself lives on while
// processes or open handles still use it. Deleting a missing name is not an
// error.
func Delete(name string) error {
	p := Path(name)
	if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", p, err)
	}
	if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// List returns the names of namespaces starting with prefix.
func List(prefix string) ([]string, error) {
	entries, err := os.ReadDir(RunDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, e.Name())
		}
	}
	return out, nil
}

// SetSysctl writes a /proc/sys value as seen from inside netns h, e.g.
// SetSysctl(h, "net/ipv4/ip_forward", "1"). New namespaces here may inherit
// the root namespace's values, so every node sets what it relies on.
func SetSysctl(h ns.NetNS, key, value string) error {
	return h.Do(func(ns.NetNS) error { return WriteSysctl(key, value) })
}

// WriteSysctl writes a /proc/sys value in the calling thread's namespace.
// A value that is already set is not written again: containers usually
// see /proc/sys read-only, and the agent must still start there when the
// node already forwards.
func WriteSysctl(key, value string) error {
	p := filepath.Join("/proc/sys", key)
	if cur, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(cur)) == value {
		return nil
	}
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", key, value, err)
	}
	return nil
}

// Start starts cmd with its network namespace set to h. The child is
// forked from a thread locked into h, so it inherits that namespace and
// nothing else changes for the rest of this process.
func Start(h ns.NetNS, cmd *exec.Cmd) error {
	return h.Do(func(ns.NetNS) error { return cmd.Start() })
}

func linkUpLoopback() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}
