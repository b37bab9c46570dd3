// Command cnilatency measures the CNI control path of flatnet next to the
// reference plugins (bridge + host-local, with and without ipMasq), in one
// run, through libcni exactly as a runtime calls plugins: ADD and DEL
// latency for N pods one at a time, and pods/s for N pods at P in parallel.
// Targets alternate inside every repetition so machine noise hits all alike.
//
//	go run ./bench/cnilatency -pods 200 -parallel 32 -reps 3
//
// Everything happens in network namespaces named fnb<pid>-*, removed on exit.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/cniruntime"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

type target struct {
	name   string
	binDir string
	plugin map[string]any
}

var prefix = fmt.Sprintf("fnb%d-", os.Getpid())

func main() {
	pods := flag.Int("pods", 200, "pods per scenario")
	parallel := flag.Int("parallel", 32, "concurrent callers in the parallel scenario")
	reps := flag.Int("reps", 3, "repetitions (targets alternate inside each)")
	flatnetBin := flag.String("flatnet-bin", "bin", "directory with the flatnet binary")
	refBin := flag.String("ref-bin", "/usr/lib/cni", "directory with the reference bridge and host-local plugins")
	skipMasq := flag.Bool("skip-ref-masq", false, "leave out the reference with ipMasq (needs iptables)")
	flag.Parse()

	abs, _ := filepath.Abs(*flatnetBin)
	targets := []target{
		{"flatnet", abs, map[string]any{"type": "flatnet", "subnet": "10.99.0.0/16", "bridge": "fnb0"}},
		{"ref-nomasq", *refBin, refPlugin(false)},
	}
	if !*skipMasq {
		targets = append(targets, target{"ref-masq", *refBin, refPlugin(true)})
	}
	for _, t := range targets {
		if _, err := os.Stat(filepath.Join(t.binDir, t.plugin["type"].(string))); err != nil {
			log.Fatalf("%s: %v (build flatnet with `make build`; install containernetworking-plugins for the reference)", t.name, err)
		}
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() { <-sig; cleanup(); os.Exit(1) }()
	defer cleanup()

	res := map[string]*samples{}
	for _, t := range targets {
		res[t.name] = &samples{}
	}
	for r := 0; r < *reps; r++ {
		for _, t := range targets {
			fmt.Fprintf(os.Stderr, "rep %d/%d %s ...\n", r+1, *reps, t.name)
			if err := runOnce(t, *pods, *parallel, res[t.name]); err != nil {
				cleanup()
				log.Fatalf("%s: %v", t.name, err)
			}
		}
	}
	report(targets, res, *pods, *parallel, *reps)
}

func refPlugin(masq bool) map[string]any {
	return map[string]any{
		"type": "bridge", "bridge": "fnb0", "isGateway": true, "ipMasq": masq, "hairpinMode": true,
		"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": "10.99.0.0/16"}}},
			"routes": []map[string]string{{"dst": "0.0.0.0/0"}}},
	}
}

type samples struct {
	addSerial, delSerial   []time.Duration
	addParWall, delParWall []time.Duration
	addPar, delPar         []time.Duration
}

func runOnce(t target, n, p int, s *samples) error {
	work, err := os.MkdirTemp("", "fnb-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(work)
	node, err := nsutil.Create(prefix + "node")
	if err != nil {
		return err
	}
	defer func() { node.Close(); nsutil.Delete(prefix + "node") }()
	plugin := map[string]any{}
	for k, v := range t.plugin {
		plugin[k] = v
	}
	if plugin["type"] == "flatnet" {
		plugin["dataDir"] = filepath.Join(work, "data")
	} else {
		plugin["ipam"].(map[string]any)["dataDir"] = filepath.Join(work, "data")
	}
	conf, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "fnbnet", "plugins": []any{plugin}})
	rt, err := cniruntime.New(conf, []string{t.binDir}, filepath.Join(work, "cache"), node)
	if err != nil {
		return err
	}
	podNS := make([]ns.NetNS, n)
	for i := range podNS {
		if podNS[i], err = nsutil.Create(fmt.Sprintf("%spod%d", prefix, i)); err != nil {
			return err
		}
	}
	defer func() {
		for i, h := range podNS {
			if h != nil {
				h.Close()
				nsutil.Delete(fmt.Sprintf("%spod%d", prefix, i))
			}
		}
	}()
	att := func(round, i int) cniruntime.Attachment {
		return cniruntime.Attachment{ContainerID: fmt.Sprintf("bench-%d-%d", round, i), NetNS: podNS[i].Path(), IfName: "eth0"}
	}
	ctx := context.Background()
	for round, par := range []int{1, p} {
		ips := make([]string, n)
		addLat, addWall, err := runOps(n, par, func(i int) error {
			r, err := rt.Add(ctx, att(round, i))
			if err == nil {
				cr, _ := current.NewResultFromResult(r)
				ips[i] = cr.IPs[0].Address.IP.String()
			}
			return err
		})
		if err != nil {
			return fmt.Errorf("ADD: %w", err)
		}
		if d := distinct(ips); d != n {
			return fmt.Errorf("%d distinct addresses for %d pods", d, n)
		}
		delLat, delWall, err := runOps(n, par, func(i int) error { return rt.Del(ctx, att(round, i)) })
		if err != nil {
			return fmt.Errorf("DEL: %w", err)
		}
		if left := leftovers(node, filepath.Join(work, "data")); left != "" {
			return fmt.Errorf("left behind after DEL: %s", left)
		}
		if par == 1 {
			s.addSerial = append(s.addSerial, addLat...)
			s.delSerial = append(s.delSerial, delLat...)
		} else {
			s.addPar = append(s.addPar, addLat...)
			s.delPar = append(s.delPar, delLat...)
			s.addParWall = append(s.addParWall, addWall)
			s.delParWall = append(s.delParWall, delWall)
		}
	}
	return nil
}

func runOps(n, par int, op func(i int) error) ([]time.Duration, time.Duration, error) {
	lat := make([]time.Duration, n)
	jobs := make(chan int)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var firstErr error
	start := time.Now()
	for w := 0; w < par; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range jobs {
				t0 := time.Now()
				err := op(i)
				lat[i] = time.Since(t0)
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = fmt.Errorf("pod %d: %w", i, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := 0; i < n; i++ {
		jobs <- i
	}
	close(jobs)
	wg.Wait()
	return lat, time.Since(start), firstErr
}

func distinct(ips []string) int {
	m := map[string]bool{}
	for _, ip := range ips {
		m[ip] = true
	}
	return len(m)
}

// leftovers reports veths in the node or address records still on disk.
func leftovers(node ns.NetNS, dataDir string) string {
	var out []string
	node.Do(func(ns.NetNS) error {
		links, _ := netlinksafe.LinkList()
		for _, l := range links {
			if l.Type() == "veth" {
				out = append(out, "veth "+l.Attrs().Name)
			}
		}
		return nil
	})
	filepath.Walk(dataDir, func(p string, info os.FileInfo, err error) error {
		if err == nil && !info.IsDir() {
			b := filepath.Base(p)
			if strings.HasPrefix(b, "a:") || strings.HasPrefix(b, "10.") {
				out = append(out, "ipam: "+b)
			}
		}
		return nil
	})
	return strings.Join(out, ", ")
}

func pct(d []time.Duration, q float64) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := int(q*float64(len(s))+0.999999) - 1
	if i < 0 {
		i = 0
	}
	return s[i]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.2f", float64(d.Microseconds())/1000) }

func podsPerSec(n int, walls []time.Duration) float64 {
	var sum time.Duration
	for _, w := range walls {
		sum += w
	}
	return float64(n*len(walls)) / sum.Seconds()
}

func report(targets []target, res map[string]*samples, n, p, reps int) {
	fmt.Printf("\nCNI control path, %d pods, serial and %d in parallel, %d reps, via libcni (ms; pods/s)\n\n", n, p, reps)
	w := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(w, "target\tADD p50\tADD p99\tDEL p50\tDEL p99\tADD pods/s @P\tDEL pods/s @P\tADD p99 @P\t")
	for _, t := range targets {
		s := res[t.name]
		fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\t%.0f\t%.0f\t%s\t\n", t.name,
			ms(pct(s.addSerial, .5)), ms(pct(s.addSerial, .99)), ms(pct(s.delSerial, .5)), ms(pct(s.delSerial, .99)),
			podsPerSec(n, s.addParWall), podsPerSec(n, s.delParWall), ms(pct(s.addPar, .99)))
	}
	w.Flush()
	f := res["flatnet"]
	fmt.Println()
	for _, t := range targets[1:] {
		r := res[t.name]
		fmt.Printf("flatnet vs %-10s  ADD p50 %.2fx  DEL p50 %.2fx  ADD pods/s %.1fx  DEL pods/s %.1fx\n", t.name,
			float64(pct(f.addSerial, .5))/float64(pct(r.addSerial, .5)),
			float64(pct(f.delSerial, .5))/float64(pct(r.delSerial, .5)),
			podsPerSec(n, f.addParWall)/podsPerSec(n, r.addParWall),
			podsPerSec(n, f.delParWall)/podsPerSec(n, r.delParWall))
	}
}

func cleanup() {
	names, _ := nsutil.List(prefix)
	for _, n := range names {
		nsutil.Delete(n)
	}
}
