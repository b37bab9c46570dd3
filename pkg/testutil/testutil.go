// Package testutil is shared by tests that need real network namespaces
// and the real flatnet binaries. Every namespace it makes is named
// "fnt<pid>-...", removed by t.Cleanup, and swept on the next run if a
// crashed test process left it behind.
package testutil

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// NSPrefix starts every namespace name made by tests.
const NSPrefix = "fnt"

var (
	nsSeq     atomic.Int64
	sweepOnce sync.Once
)

// RequireRoot fails (never skips) a test that cannot run without root.
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Fatal("this test needs root: it builds real network namespaces")
	}
}

// NewNS creates a named network namespace (loopback up) that is deleted
// when the test ends.
func NewNS(t testing.TB, role string) ns.NetNS {
	t.Helper()
	RequireRoot(t)
	sweepOnce.Do(sweepStale)
	name := fmt.Sprintf("%s%d-%d-%s", NSPrefix, os.Getpid(), nsSeq.Add(1), role)
	h, err := nsutil.Create(name)
	if err != nil {
		t.Fatalf("create netns %s: %v", name, err)
	}
	t.Cleanup(func() {
		h.Close()
		if err := nsutil.Delete(name); err != nil {
			t.Errorf("delete netns %s: %v", name, err)
		}
	})
	return h
}

// sweepStale deletes test namespaces whose creating process is gone.
func sweepStale() {
	names, _ := nsutil.List(NSPrefix)
	for _, n := range names {
		pidStr, _, _ := strings.Cut(strings.TrimPrefix(n, NSPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if err != nil {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			nsutil.Delete(n)
		}
	}
}

// ModuleRoot is the repository root (the directory of go.mod).
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := ModuleRootDir()
	if err != nil {
		t.Fatal(err)
	}
	return dir
}

// ModuleRootDir is ModuleRoot for callers without a test (TestMain).
func ModuleRootDir() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out))), nil
}

var (
	buildOnce sync.Once
	buildDir  string
	buildErr  error
)

// Binaries builds ./cmd/... once per test process and returns the
// directory holding flatnet, flatnetd and flatnetctl.
func Binaries(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		root := ModuleRoot(t)
		// Named by PID, so the next test process can remove what this one
		// leaves (the binaries outlive the tests that use them).
		sweepStaleBinaries()
		buildDir = filepath.Join(os.TempDir(), fmt.Sprintf("%s%d", binDirPrefix, os.Getpid()))
		if buildErr = os.MkdirAll(buildDir, 0o755); buildErr != nil {
			return
		}
		// Lab agents may run as an unprivileged user (lab.Options.LeastPrivilege).
		if buildErr = os.Chmod(buildDir, 0o755); buildErr != nil {
			return
		}
		cmd := exec.Command("go", "build", "-o", buildDir+"/", "./cmd/...")
		cmd.Dir = root
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			buildErr = fmt.Errorf("go build ./cmd/...: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return buildDir
}

const binDirPrefix = "flatnet-test-bin-"

// sweepStaleBinaries removes binary dirs of test processes that are gone.
func sweepStaleBinaries() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), binDirPrefix+"*"))
	for _, d := range dirs {
		pid, err := strconv.Atoi(strings.TrimPrefix(filepath.Base(d), binDirPrefix))
		if err != nil || pid == os.Getpid() {
			continue
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			os.RemoveAll(d)
		}
	}
}

// ProcessesUnder maps the PIDs of the processes whose command line names
// a path below dir to their command lines.
func ProcessesUnder(dir string) map[int]string {
	out := map[int]string{}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, _ := os.ReadFile(p)
		if strings.Contains(string(b), dir+"/") {
			pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(p)))
			out[pid] = strings.ReplaceAll(string(b), "\x00", " ")
		}
	}
	return out
}

// AssertNoProcessUnder fails t for every process whose command line names
// a path below dir: what a test started there must be gone.
func AssertNoProcessUnder(t testing.TB, dir string) {
	t.Helper()
	for pid, cmd := range ProcessesUnder(dir) {
		t.Errorf("process left: %d: %s", pid, cmd)
	}
}
