// Package labtest brings a lab up for one test and always takes it down.
package labtest

import (
	"context"
	"fmt"
	"os"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flatnet-io/flatnet/pkg/fileutil"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/testutil"
)

var seq atomic.Int32

// Up builds the lab o describes; Name, Root and BinDir default to a name
// unique to this test process, a temp dir and freshly built binaries. When
// the test ends the lab goes down (after showing the agents' and etcd's
// last log lines if the test failed), and no namespace of it may be left.
func Up(t *testing.T, o lab.Options) *lab.State {
	t.Helper()
	testutil.RequireRoot(t)
	if o.Name == "" {
		// Lab names are at most 10 lowercase letters or digits.
		o.Name = fmt.Sprintf("t%05d", os.Getpid()%100000) + strconv.FormatInt(int64(seq.Add(1)), 36)
	}
	if o.Root == "" {
		o.Root = t.TempDir()
	}
	if o.BinDir == "" {
		o.BinDir = testutil.Binaries(t)
	}
	if testing.Verbose() {
		o.Progress = os.Stdout
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	t.Cleanup(func() {
		if t.Failed() {
			DumpLogs(t, o.Root, o.Name)
		}
		if err := lab.Down(o.Root, o.Name); err != nil {
			t.Errorf("lab down: %v", err)
		}
		if left, _ := nsutil.List(lab.Prefix(o.Name)); len(left) > 0 {
			t.Errorf("lab down left namespaces: %v", left)
		}
	})
	s, err := lab.Up(ctx, o)
	if err != nil {
		t.Fatalf("lab up: %v", err)
	}
	return s
}

// DumpLogs shows the last log lines of the agents, etcd and the
// Kubernetes control plane (if any).
func DumpLogs(t *testing.T, root, name string) {
	s, err := lab.Load(root, name)
	if err != nil {
		return
	}
	logs := []string{s.Etcd.Log}
	if s.Kube != nil {
		logs = append(logs, s.Kube.APIServer.Log, s.Kube.ControllerManager.Log)
		if s.Kube.Scheduler.Log != "" {
			logs = append(logs, s.Kube.Scheduler.Log)
		}
	}
	for _, n := range s.Nodes {
		logs = append(logs, n.Agent.Log)
	}
	for _, l := range logs {
		t.Logf("---- %s\n%s", l, fileutil.Tail(l, 25))
	}
}
