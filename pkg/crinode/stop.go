package crinode

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/flatnet-io/flatnet/pkg/mountns"
	"github.com/flatnet-io/flatnet/pkg/procutil"

	"golang.org/x/sys/unix"
)

// Stop removes every pod the usual way (stopp, rmp: CNI DEL), stops
// containerd, then removes whatever a failure may have left: shims and pod
// processes, mounts under Dir, the pods' cgroups and libcni cache entries
// of this runtime's sandboxes. It may be called more than once.
func (r *Runtime) Stop() error {
	var errs []error
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ids := r.sandboxIDs()
	if r.cmd != nil && !r.hasExited() {
		out, err := r.Crictl(ctx, "pods", "-q")
		if err != nil {
			errs = append(errs, err)
		}
		for _, id := range strings.Fields(string(out)) {
			if _, err := r.Crictl(ctx, "stopp", id); err != nil {
				errs = append(errs, err)
			}
			if _, err := r.Crictl(ctx, "rmp", "-f", id); err != nil {
				errs = append(errs, err)
			}
		}
		procutil.Stop(r.cmd.Process, r.exited, 15*time.Second)
	}
	return errors.Join(append(errs, r.removeLeftovers(ids))...)
}

// RemoveLeftovers removes what a runtime on c that is gone (its
// containerd killed, e.g. with a crashed test) may have left: shims and
// pod processes, mounts under Dir, the pods' cgroups, libcni cache
// entries.
func (c Config) RemoveLeftovers() error {
	return c.removeLeftovers(c.sandboxIDs())
}

func (r Config) removeLeftovers(ids []string) error {
	var errs []error
	// Shims survive containerd by design (a restarted containerd adopts
	// them); ours are the ones talking to our socket.
	for _, pid := range processes(func(pid int, cmdline string) bool {
		return strings.Contains(cmdline, "containerd-shim") && strings.Contains(cmdline, r.Socket())
	}) {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	errs = append(errs, r.removeCgroups(), unmountUnder(r.Dir))
	for _, id := range ids {
		// libcni names entries <network>-<containerID>-<ifname>.
		left, _ := filepath.Glob(filepath.Join(LibCNICacheDir, "*-"+id+"-*"))
		for _, f := range left {
			os.Remove(f)
		}
	}
	return errors.Join(errs...)
}

func (r *Runtime) hasExited() bool {
	select {
	case <-r.exited:
		return true
	default:
		return false
	}
}

// sandboxIDs lists the sandboxes containerd knows, from its root dir (it
// may have crashed).
func (r Config) sandboxIDs() []string {
	entries, _ := os.ReadDir(filepath.Join(r.rootDir(), "io.containerd.grpc.v1.cri", "sandboxes"))
	var ids []string
	for _, e := range entries {
		ids = append(ids, e.Name())
	}
	return ids
}

// processes lists the PIDs whose command line matches.
func processes(match func(pid int, cmdline string) bool) []int {
	entries, _ := os.ReadDir("/proc")
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err == nil && match(pid, strings.ReplaceAll(string(b), "\x00", " ")) {
			out = append(out, pid)
		}
	}
	return out
}

// cgroupDirs are the runtime's cgroup parent in every hierarchy (cgroup v1
// controllers, the v1+v2 hybrid's unified tree, or a pure v2 mount).
func (r Config) cgroupDirs() []string {
	dirs, _ := filepath.Glob(filepath.Join("/sys/fs/cgroup", "*", r.Name))
	if st, err := os.Stat(filepath.Join("/sys/fs/cgroup", r.Name)); err == nil && st.IsDir() {
		dirs = append(dirs, filepath.Join("/sys/fs/cgroup", r.Name))
	}
	return dirs
}

// removeCgroups kills what still runs in the pods' cgroups and removes
// them, innermost first.
func (r Config) removeCgroups() error {
	var last error
	deadline := time.Now().Add(10 * time.Second)
	for {
		var tree []string
		for _, d := range r.cgroupDirs() {
			filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
				if err == nil && e.IsDir() {
					tree = append(tree, p)
				}
				return nil
			})
		}
		if len(tree) == 0 {
			return nil
		}
		sort.Slice(tree, func(i, j int) bool { return len(tree[i]) > len(tree[j]) })
		last = nil
		for _, d := range tree {
			procs, _ := os.ReadFile(filepath.Join(d, "cgroup.procs"))
			for _, f := range strings.Fields(string(procs)) {
				if pid, err := strconv.Atoi(f); err == nil {
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
			if err := os.Remove(d); err != nil && !errors.Is(err, fs.ErrNotExist) {
				last = err
			}
		}
		if last == nil {
			continue // check that nothing was created meanwhile
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cgroups of %s: %w", r.Name, last)
		}
		time.Sleep(50 * time.Millisecond) // killed processes take a moment to leave
	}
}

// unmountUnder detaches every mount below dir (overlay rootfs, pod
// namespace and shm bind mounts), innermost first.
func unmountUnder(dir string) error {
	all, err := mountns.Points()
	if err != nil {
		return err
	}
	prefix := filepath.Clean(dir) + "/"
	var points []string
	for _, p := range all {
		if strings.HasPrefix(p, prefix) {
			points = append(points, p)
		}
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	var errs []error
	for _, p := range points {
		if err := unix.Unmount(p, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
			errs = append(errs, fmt.Errorf("unmount %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}
