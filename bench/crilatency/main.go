// Command crilatency measures what a pod start costs through a real
// container runtime: `crictl runp` (sandbox created, CNI ADD done, pod
// Ready) against two containerd instances in one run, one whose CRI plugin
// loads the conflist flatnetd wrote on a lab node, one with the reference
// bridge + host-local plugins on the same subnet in a namespace of its own.
// Pods alternate between the two so machine noise hits both alike; then
// every pod is stopped (stopp) and removed (rmp).
//
//	make build && go run ./bench/crilatency -pods 20
//
// Needs what hack/cri/tools.sh installs. Everything lives in namespaces
// named flab-<name>-* and under a temp dir, removed on exit.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/flatnet-io/flatnet/pkg/crinode"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

type target struct {
	name       string
	rt         *crinode.Runtime
	runp, stop []time.Duration
	rm         []time.Duration
}

func main() {
	pods := flag.Int("pods", 20, "pods per runtime")
	binDir := flag.String("bin", "bin", "directory with flatnet, flatnetd and flatnetctl (make build)")
	refBin := flag.String("ref-bin", "/usr/lib/cni", "directory with the reference bridge, host-local and loopback plugins")
	flag.Parse()

	root, err := os.Getwd()
	if err != nil {
		log.Fatal(err)
	}
	abs, _ := filepath.Abs(*binDir)
	crictl, err := crinode.CrictlBin(root)
	if err != nil {
		log.Fatal(err)
	}
	if err := crinode.CheckPrograms(crictl, filepath.Join(*refBin, "loopback")); err != nil {
		log.Fatal(err)
	}
	work, err := os.MkdirTemp("", "fcrib")
	if err != nil {
		log.Fatal(err)
	}
	name := fmt.Sprintf("b%d", os.Getpid()%100000)
	var targets []*target
	cleanup := func() {
		for _, t := range targets {
			if err := t.rt.Stop(); err != nil {
				log.Printf("stop %s: %v", t.name, err)
			}
		}
		targets = nil
		if err := lab.Down(filepath.Join(work, "lab"), name); err != nil {
			log.Printf("lab down: %v", err)
		}
		os.RemoveAll(work)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() { <-sig; cleanup(); os.Exit(1) }()
	defer cleanup()
	fail := func(err error) {
		cleanup()
		log.Fatal(err)
	}

	ctx := context.Background()
	pause, err := crinode.BuildPauseImage(ctx, root, work)
	if err != nil {
		fail(err)
	}
	s, err := lab.Up(ctx, lab.Options{Name: name, Nodes: 1, Root: filepath.Join(work, "lab"), BinDir: abs, CNIVersion: "1.0.0", Progress: os.Stderr})
	if err != nil {
		fail(err)
	}
	n := s.Nodes[0]

	flat := crinode.OnLabNode(n, crictl)
	if err := crinode.LinkPlugins(flat.CNIBinDir, map[string]string{"flatnet": crinode.InstalledPlugin(n), "loopback": filepath.Join(*refBin, "loopback")}); err != nil {
		fail(err)
	}
	ref, err := reference(s, n, crictl, *refBin)
	if err != nil {
		fail(err)
	}
	for _, c := range []struct {
		name string
		cfg  crinode.Config
	}{{"flatnet", flat}, {"bridge+host-local", ref}} {
		rt, err := crinode.Start(ctx, c.cfg)
		if err != nil {
			fail(err)
		}
		targets = append(targets, &target{name: c.name, rt: rt})
		if err := rt.Import(ctx, pause); err != nil {
			fail(err)
		}
		if err := rt.WaitNetworkReady(ctx, 30*time.Second); err != nil {
			fail(err)
		}
	}

	var crictlRTT []time.Duration
	podsOf := map[*target][]*crinode.Pod{}
	for i := 0; i < *pods; i++ {
		for _, t := range targets {
			p, err := t.rt.RunPod(ctx, fmt.Sprintf("p%d", i))
			if err != nil {
				fail(fmt.Errorf("%s: %w", t.name, err))
			}
			if !n.Subnet.Contains(p.IP) {
				fail(fmt.Errorf("%s: pod at %s, outside %s", t.name, p.IP, n.Subnet))
			}
			t.runp = append(t.runp, p.Took)
			podsOf[t] = append(podsOf[t], p)
		}
		start := time.Now()
		if _, err := targets[0].rt.Crictl(ctx, "version"); err != nil {
			fail(err)
		}
		crictlRTT = append(crictlRTT, time.Since(start))
	}
	for i := 0; i < *pods; i++ {
		for _, t := range targets {
			p := podsOf[t][i]
			start := time.Now()
			if err := t.rt.StopPod(ctx, p); err != nil {
				fail(err)
			}
			t.stop = append(t.stop, time.Since(start))
			start = time.Now()
			if err := t.rt.RemovePod(ctx, p); err != nil {
				fail(err)
			}
			t.rm = append(t.rm, time.Since(start))
		}
	}

	fmt.Printf("CRI pod sandbox latency, %d pods per runtime, alternating; containerd %s, crictl round trip p50 %s\n\n",
		*pods, containerdVersion(), ms(pct(crictlRTT, 50)))
	w := tabwriter.NewWriter(os.Stdout, 2, 8, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "plugin\trunp p50\tvs reference\trunp p90\trunp min\trunp max\tstopp p50\trmp p50\t")
	anchor := pct(targets[len(targets)-1].runp, 50)
	for _, t := range targets {
		fmt.Fprintf(w, "%s\t%s\t%.2fx\t%s\t%s\t%s\t%s\t%s\t\n", t.name, ms(pct(t.runp, 50)), float64(pct(t.runp, 50))/float64(anchor),
			ms(pct(t.runp, 90)), ms(pct(t.runp, 0)), ms(pct(t.runp, 100)), ms(pct(t.stop, 50)), ms(pct(t.rm, 50)))
	}
	w.Flush()
}

// reference is a runtime in a namespace of its own (named like the lab's,
// so lab.Down removes it) with bridge + host-local on node n's subnet.
func reference(s *lab.State, n *lab.Node, crictl, refBin string) (crinode.Config, error) {
	nsName := lab.Prefix(s.Name) + "ref"
	h, err := nsutil.Create(nsName)
	if err != nil {
		return crinode.Config{}, err
	}
	h.Close()
	dir := filepath.Join(s.Dir, "ref")
	cfg := crinode.Config{Name: nsName, Dir: filepath.Join(dir, "cri"), NetNS: nsutil.Path(nsName),
		CNIConfDir: filepath.Join(dir, "net.d"), CNIBinDir: filepath.Join(dir, "cri", "cni-bin"),
		SandboxImage: crinode.PauseImage, CrictlBin: crictl}
	conf, err := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "refnet", "plugins": []any{map[string]any{
		"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
		"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": n.Subnet.String()}}},
			"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": filepath.Join(dir, "ipam")},
	}}})
	if err != nil {
		return cfg, err
	}
	if err := os.MkdirAll(cfg.CNIConfDir, 0o755); err != nil {
		return cfg, err
	}
	if err := os.WriteFile(filepath.Join(cfg.CNIConfDir, "10-refnet.conflist"), conf, 0o644); err != nil {
		return cfg, err
	}
	plugins := map[string]string{}
	for _, p := range []string{"bridge", "host-local", "loopback"} {
		plugins[p] = filepath.Join(refBin, p)
	}
	return cfg, crinode.LinkPlugins(cfg.CNIBinDir, plugins)
}

func containerdVersion() string {
	out, _ := exec.Command("containerd", "--version").Output()
	if f := strings.Fields(string(out)); len(f) >= 3 {
		return f[2]
	}
	return "?"
}

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := int(q / 100 * float64(len(s)-1))
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/float64(time.Millisecond)) }
