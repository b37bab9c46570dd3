package mountns_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/flatnet-io/flatnet/pkg/mountns"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

// A path that does not exist on this machine, below one that does
// (/run), and one below a parent that does not exist either.
const (
	missingUnderRun = "/run/flatnet-mountns-test"
	missingDeep     = "/opt/flatnet-mountns-test/bin"
	sysctl          = "/proc/sys/kernel/panic"
)

func read(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

func TestNodePathsAndFilesNeverTouchTheHost(t *testing.T) {
	testutil.RequireRoot(t)
	for _, p := range []string{missingUnderRun, filepath.Dir(missingDeep)} {
		if _, err := os.Stat(p); err == nil {
			t.Fatalf("%s exists on this machine: the test needs it absent", p)
		}
	}
	dir := t.TempDir()
	pin := filepath.Join(dir, "pins", "node")
	nodeRun, nodeBin := filepath.Join(dir, "node-run"), filepath.Join(dir, "node-bin")
	for _, d := range []string{nodeRun, nodeBin} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(nodeBin, "plugin"), []byte("node's"), 0o644); err != nil {
		t.Fatal(err)
	}
	hostPanic := read(t, sysctl)
	fake := "4242"
	if hostPanic == fake {
		fake = "4343"
	}
	err := mountns.Create(pin, mountns.Spec{
		Binds:   map[string]string{missingUnderRun: nodeRun, missingDeep: nodeBin},
		Files:   map[string]string{sysctl: fake + "\n"},
		Keep:    []string{dir},
		Scratch: filepath.Join(dir, "scratch"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		mountns.Delete(pin)
		mountns.ReleaseDir(filepath.Dir(pin))
	})

	// Inside: the node's directories at the host paths, the file's
	// content over the sysctl (read-only), and the caller's dir as on the
	// host.
	err = mountns.Do(pin, nil, func() error {
		if got := read(t, filepath.Join(missingDeep, "plugin")); got != "node's" {
			t.Errorf("inside, %s/plugin = %q", missingDeep, got)
		}
		if err := os.WriteFile(filepath.Join(missingUnderRun, "state"), []byte("x"), 0o644); err != nil {
			t.Errorf("writing the node's %s: %v", missingUnderRun, err)
		}
		if err := os.WriteFile("/run/flatnet-mountns-test-upper", []byte("x"), 0o644); err != nil {
			t.Errorf("writing into the overlaid /run: %v", err)
		}
		if got := read(t, sysctl); got != fake {
			t.Errorf("inside, %s = %s, want %s", sysctl, got, fake)
		}
		if err := os.WriteFile(sysctl, []byte("7"), 0o644); err == nil {
			t.Errorf("writing %s inside succeeded; want a read-only file", sysctl)
		}
		if err := os.WriteFile(filepath.Join(dir, "kept"), []byte("x"), 0o644); err != nil {
			t.Errorf("writing the kept dir: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// A process started in it sees the same.
	cmd := exec.Command("cat", sysctl)
	var out strings.Builder
	cmd.Stdout = &out
	if err := mountns.Start(pin, nil, cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil || strings.TrimSpace(out.String()) != fake {
		t.Errorf("a process in the namespace read %q (%v), want %s", out.String(), err, fake)
	}
	if pids, err := mountns.Processes(pin); err != nil || len(pids) != 0 {
		t.Errorf("processes in the namespace after they exited: %v %v", pids, err)
	}

	// Outside: nothing changed but the node's own directories and the
	// kept dir.
	for _, p := range []string{missingUnderRun, filepath.Dir(missingDeep), "/run/flatnet-mountns-test-upper"} {
		if _, err := os.Stat(p); err == nil {
			t.Errorf("%s appeared on the host", p)
		}
	}
	if got := read(t, sysctl); got != hostPanic {
		t.Errorf("host %s = %s, was %s", sysctl, got, hostPanic)
	}
	if got := read(t, filepath.Join(nodeRun, "state")); got != "x" {
		t.Errorf("the node's write did not land in its directory")
	}
	if _, err := os.Stat(filepath.Join(dir, "kept")); err != nil {
		t.Errorf("the write to the kept dir did not land on the host: %v", err)
	}
	points, _ := mountns.Points()
	for _, p := range points {
		if strings.HasPrefix(p, filepath.Join(dir, "scratch")) || p == missingUnderRun || p == sysctl {
			t.Errorf("mount %s visible on the host", p)
		}
	}

	// Deleted: gone once unpinned.
	if err := mountns.Delete(pin); err != nil {
		t.Fatal(err)
	}
	testutil.WaitFor(t, 5*time.Second, pin+" to go", func() bool {
		_, err := os.Stat(pin)
		return os.IsNotExist(err)
	})
}
