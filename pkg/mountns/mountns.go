// Package mountns makes persistent private mount namespaces, one per lab
// node, in which chosen host paths are the node's own directories and
// chosen files (e.g. under /proc/sys) are replaced by files the caller
// writes, and starts processes in such a namespace together with a network
// namespace. A namespace is kept alive by a bind mount of its nsfs file, the
// way `ip netns` keeps network namespaces, so several processes started at
// different times share it, and it vanishes with all its mounts when the
// bind mount and its last process are gone.
//
// Propagation: the namespace starts as a slave of the host's mounts (an
// unmount on the host, e.g. `ip netns del`, reaches it), and nothing
// mounted inside ever propagates back. Paths that do not exist on the host
// are not created there: their nearest existing ancestor is overlaid inside
// the namespace with a private upper layer (host mounts below it and the
// caller's Keep paths are bound back, so they stay the host's).
package mountns

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// The threads that enter a namespace here are locked and never unlocked,
// so Go discards them. Except the main thread: Go parks it for good
// instead, and a process whose main thread is in a node's namespace shows
// as a process in it (and keeps it alive). Locking the main goroutine to
// the main thread keeps every other goroutine, ours included, off it.
func init() { runtime.LockOSThread() }

// Spec says what a new mount namespace looks like.
type Spec struct {
	// Binds maps a host path (a directory) to the directory that appears
	// there inside the namespace.
	Binds map[string]string
	// Files maps a host file to content that appears there, read-only,
	// inside the namespace (e.g. "/proc/sys/kernel/panic": "10\n"). The
	// content is written under Scratch.
	Files map[string]string
	// Keep are host paths (the caller's own directories) that must stay the
	// host's even if an ancestor of theirs gets overlaid.
	Keep []string
	// Scratch is a directory for the namespace's own files; inside the
	// namespace a tmpfs is mounted on it.
	Scratch string
}

// Create makes a mount namespace as spec says and pins it at path (a file
// that must not exist yet; its directory is made a private mount, as nsfs
// files cannot be bound onto shared mounts).
func Create(path string, spec Spec) error {
	if err := privateDir(filepath.Dir(path)); err != nil {
		return err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o444)
	if err != nil {
		return fmt.Errorf("mount namespace %s: %w", path, err)
	}
	f.Close()
	if err := os.MkdirAll(spec.Scratch, 0o700); err != nil {
		os.Remove(path)
		return err
	}
	type made struct {
		tid int
		err error
	}
	ready, pinned := make(chan made), make(chan struct{})
	go func() {
		// This thread ends up in the new namespace: never unlock it, so the
		// runtime discards the thread when the goroutine returns.
		runtime.LockOSThread()
		err := unix.Unshare(unix.CLONE_NEWNS)
		if err == nil {
			err = spec.build()
		}
		ready <- made{unix.Gettid(), err}
		<-pinned
	}()
	m := <-ready
	if m.err == nil {
		// Bind from the host's side: the thread's nsfs file is reachable
		// through /proc while it waits.
		src := fmt.Sprintf("/proc/%d/task/%d/ns/mnt", os.Getpid(), m.tid)
		if err := unix.Mount(src, path, "", unix.MS_BIND, ""); err != nil {
			m.err = fmt.Errorf("pin mount namespace at %s: %w", path, err)
		}
	}
	close(pinned)
	if m.err != nil {
		os.Remove(path)
		return fmt.Errorf("mount namespace %s: %w", path, m.err)
	}
	return nil
}

// privateDir makes dir a private mount point of its own (a bind mount onto
// itself), once.
func privateDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if isMountPoint(dir) {
		return nil
	}
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("bind %s onto itself: %w", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make %s private: %w", dir, err)
	}
	return nil
}

// build runs in the new namespace, on a thread of its own.
func (s Spec) build() error {
	// Nothing mounted here may reach the host; host unmounts still reach
	// us. /proc is private: files bound over /proc/sys stay ours.
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_SLAVE, ""); err != nil {
		return fmt.Errorf("make / a slave: %w", err)
	}
	if err := unix.Mount("", "/proc", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make /proc private: %w", err)
	}
	if err := unix.Mount("tmpfs", s.Scratch, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, "mode=0700"); err != nil {
		return fmt.Errorf("tmpfs on %s: %w", s.Scratch, err)
	}
	shadowed := map[string]bool{}
	hosts := make([]string, 0, len(s.Binds))
	for h := range s.Binds {
		hosts = append(hosts, h)
	}
	sort.Strings(hosts)
	for i, h := range hosts {
		if _, err := os.Stat(h); errors.Is(err, os.ErrNotExist) {
			a := existingAncestor(h)
			if !shadowed[a] {
				if err := s.shadow(a, filepath.Join(s.Scratch, "shadow"+strconv.Itoa(i))); err != nil {
					return err
				}
				shadowed[a] = true
			}
			// Inside the overlay: this directory exists only here.
			if err := os.MkdirAll(h, 0o755); err != nil {
				return err
			}
		}
		if err := unix.Mount(s.Binds[h], h, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s on %s: %w", s.Binds[h], h, err)
		}
	}
	i := 0
	for dst, content := range s.Files {
		i++
		src := filepath.Join(s.Scratch, "file"+strconv.Itoa(i))
		if err := os.WriteFile(src, []byte(content), 0o444); err != nil {
			return err
		}
		if err := unix.Mount(src, dst, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("bind a file over %s: %w", dst, err)
		}
		if err := unix.Mount("", dst, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
			return fmt.Errorf("make %s read-only: %w", dst, err)
		}
	}
	return nil
}

func existingAncestor(p string) string {
	for {
		p = filepath.Dir(p)
		if _, err := os.Stat(p); err == nil || p == "/" {
			return p
		}
	}
}

// shadow overlays dir with a private upper layer under work, so new
// entries can be made in it without touching the host; the host mounts
// below dir and the Keep paths inside it are bound back on top.
func (s Spec) shadow(dir, work string) error {
	lower, upper, wd := filepath.Join(work, "lower"), filepath.Join(work, "upper"), filepath.Join(work, "work")
	for _, d := range []string{lower, upper, wd} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	// A copy of dir with everything mounted below it, to bind back from.
	if err := unix.Mount(dir, lower, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("bind %s: %w", dir, err)
	}
	below, err := mountsBelow(lower)
	if err != nil {
		return err
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, wd)
	if err := unix.Mount("overlay", dir, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay on %s: %w", dir, err)
	}
	back := below
	for _, k := range s.Keep {
		if rel, err := filepath.Rel(dir, k); err == nil && !strings.HasPrefix(rel, "..") && rel != "." {
			back = append(back, rel)
		}
	}
	sort.Strings(back) // parents first
	for _, rel := range back {
		if err := unix.Mount(filepath.Join(lower, rel), filepath.Join(dir, rel), "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
			return fmt.Errorf("bind %s back: %w", filepath.Join(dir, rel), err)
		}
	}
	return unix.Unmount(lower, unix.MNT_DETACH)
}

// mountsBelow lists the mount points strictly below dir, relative to it,
// outermost only (a recursive bind brings the rest).
func mountsBelow(dir string) ([]string, error) {
	points, err := Points()
	if err != nil {
		return nil, err
	}
	var out []string
	prefix := dir + "/"
	for _, p := range points {
		if !strings.HasPrefix(p, prefix) {
			continue
		}
		rel := strings.TrimPrefix(p, prefix)
		nested := false
		for _, o := range out {
			if strings.HasPrefix(rel, o+"/") || rel == o {
				nested = true
			}
		}
		if !nested {
			out = append(out, rel)
		}
	}
	return out, nil
}

// Points lists the calling thread's mount points (those of its mount
// namespace), parents before children.
func Points() ([]string, error) {
	f, err := os.Open(fmt.Sprintf("/proc/self/task/%d/mountinfo", unix.Gettid()))
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) > 4 {
			out = append(out, unescape(fields[4]))
		}
	}
	sort.Strings(out)
	return out, sc.Err()
}

func isMountPoint(dir string) bool {
	points, err := Points()
	if err != nil {
		return false
	}
	clean := filepath.Clean(dir)
	for _, p := range points {
		if p == clean {
			return true
		}
	}
	return false
}

// unescape undoes mountinfo's octal escapes (\040 for a space).
func unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// enter moves the calling (locked) thread into the mount namespace at
// path and, if netns is not nil, into netns.
func enter(path string, netns ns.NetNS) error {
	// setns into a mount namespace needs a thread that shares no
	// filesystem attributes (root, cwd) with the others.
	if err := unix.Unshare(unix.CLONE_FS); err != nil {
		return fmt.Errorf("unshare fs: %w", err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	if err := unix.Setns(fd, unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("enter mount namespace %s: %w", path, err)
	}
	if netns != nil {
		return netns.Set()
	}
	return nil
}

// Do runs f on a thread inside the mount namespace at path (and netns, if
// not nil). The thread is discarded afterwards.
func Do(path string, netns ns.NetNS, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread's namespaces changed for good
		if err := enter(path, netns); err != nil {
			errc <- err
			return
		}
		errc <- f()
	}()
	return <-errc
}

// Start starts cmd inside the mount namespace at path and netns: the child
// is forked from a thread that entered both.
func Start(path string, netns ns.NetNS, cmd *exec.Cmd) error {
	return Do(path, netns, cmd.Start)
}

// Processes lists the PIDs whose mount namespace is the one at path.
func Processes(path string) ([]int, error) {
	var want unix.Stat_t
	if err := unix.Stat(path, &want); err != nil {
		return nil, err
	}
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil, err
	}
	var out []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/proc", e.Name(), "ns", "mnt"), &st) == nil && st.Ino == want.Ino && st.Dev == want.Dev {
			out = append(out, pid)
		}
	}
	return out, nil
}

// Delete unpins the namespace at path: it vanishes, with every mount in
// it, once no process is left in it. A missing path is not an error.
func Delete(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil && err != unix.EINVAL && err != unix.ENOENT {
		return fmt.Errorf("unmount %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// ReleaseDir undoes Create's private bind mount of dir (once every
// namespace pinned in it is deleted).
func ReleaseDir(dir string) error {
	if !isMountPoint(dir) {
		return nil
	}
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("unmount %s: %w", dir, err)
	}
	return nil
}
