// Command datapath measures the pod data path across nodes for every
// backend next to the raw underlay, in one run, targets alternating inside
// every repetition so that machine noise hits all alike:
//
//	raw           a veth between two namespaces: the ceiling
//	host-gw       lab, one switch, 2 nodes: pod -> pod on the other node
//	vxlan         the same lab shape, encapsulated
//	vxlan-csum-off the same pods with the VXLAN devices' tx checksum offload
//	              turned off: the price of the flannel issue 1279
//	              workaround, which flatnet applies only on kernels < 5.7
//	auto-direct   lab, 2 racks, 3 nodes: pod -> pod on a node of the same rack
//	auto-overlay  the same lab: pod -> pod in the other rack, through the router
//
// Tests: iperf3 TCP with 1 and 4 streams (-C cubic: the root namespace's
// default may be bbr, which child namespaces cannot change) and ping RTT.
//
//	make build && go run ./bench/datapath -reps 3 -duration 5
//
// Needs root, iperf3 and ping. Everything lives in namespaces named
// fnb<pid>-* and flab-b<pid><x>-*, removed on exit, failure and Ctrl-C.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/netlinksafe"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/safchain/ethtool"
	"github.com/vishvananda/netlink"

	"github.com/flatnet-io/flatnet/bench/internal/machine"
	"github.com/flatnet-io/flatnet/pkg/backend/vxlan"
	"github.com/flatnet-io/flatnet/pkg/dataplane"
	"github.com/flatnet-io/flatnet/pkg/lab"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

const iperfPort = 5201

var (
	pid     = os.Getpid()
	rawNS   = [2]string{fmt.Sprintf("fnb%d-a", pid), fmt.Sprintf("fnb%d-b", pid)}
	labRoot string

	mu     sync.Mutex
	labs   []string // names of the labs that are up
	procs  []*exec.Cmd
	closed bool
)

// target is one client -> server path.
type target struct {
	name, what         string
	client, server     string // namespace names
	serverIP           netip.Addr
	mtu                int
	tcp1, tcp4, rttMin []float64
	rttAvg             []float64
	busy               []float64
	before, after      func() error // around each measurement
}

func main() {
	reps := flag.Int("reps", 3, "repetitions (targets alternate inside each)")
	dur := flag.Int("duration", 5, "seconds per iperf3 test")
	binDir := flag.String("bin", "bin", "directory with flatnet, flatnetd, flatnetctl (make build)")
	flag.Parse()
	for _, tool := range []string{"iperf3", "ping"} {
		if _, err := exec.LookPath(tool); err != nil {
			log.Fatalf("%s not found (apt install iperf3 iputils-ping)", tool)
		}
	}
	bin, _ := filepath.Abs(*binDir)
	var err error
	if labRoot, err = os.MkdirTemp("", "fnb-datapath-"); err != nil {
		log.Fatal(err)
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() { <-sig; cleanup(); os.Exit(1) }()
	defer cleanup()

	targets, err := build(bin)
	if err != nil {
		cleanup()
		log.Fatal(err)
	}
	for _, t := range targets {
		if err := startServer(t.server); err != nil {
			cleanup()
			log.Fatalf("%s: %v", t.name, err)
		}
	}
	for r := 1; r <= *reps; r++ {
		for _, t := range targets {
			busy := machine.Busy(time.Second)
			fmt.Fprintf(os.Stderr, "rep %d/%d %-12s (machine busy before: %.0f%%)\n", r, *reps, t.name, busy)
			if err := measure(t, *dur, busy); err != nil {
				cleanup()
				log.Fatalf("%s: %v", t.name, err)
			}
		}
	}
	report(targets, *reps, *dur)
}

// build makes the raw veth pair and the three labs.
func build(bin string) ([]*target, error) {
	a, b := netip.MustParsePrefix("10.200.0.1/24"), netip.MustParsePrefix("10.200.0.2/24")
	if err := rawPair(a, b); err != nil {
		return nil, fmt.Errorf("raw veth: %w", err)
	}
	targets := []*target{{name: "raw", what: "veth between two namespaces", client: rawNS[0], server: rawNS[1], serverIP: b.Addr(), mtu: 1500}}
	type pair struct{ name, what, from, to string }
	labsToBuild := []struct {
		suffix string
		o      lab.Options
		pairs  []pair
	}{
		{"h", lab.Options{Nodes: 2, Backend: "host-gw"}, []pair{{"host-gw", "pod n1 -> pod n2, one switch", "n1", "n2"}}},
		{"v", lab.Options{Nodes: 2, Backend: "vxlan", Resync: time.Hour}, []pair{
			{"vxlan", "pod n1 -> pod n2, one switch, encapsulated", "n1", "n2"},
			{"vxlan-csum-off", "the same, tx checksum offload off (the issue 1279 workaround)", "n1", "n2"},
		}},
		{"a", lab.Options{Nodes: 3, Backend: "auto", Topology: "racks", Racks: 2}, []pair{
			{"auto-direct", "pod n1 -> pod n3, same rack", "n1", "n3"},
			{"auto-overlay", "pod n1 -> pod n2, other rack via router", "n1", "n2"},
		}},
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	for _, l := range labsToBuild {
		o := l.o
		o.Name, o.Root, o.BinDir, o.PodsPerNode = fmt.Sprintf("b%d%s", pid%100000, l.suffix), labRoot, bin, 1
		mu.Lock()
		labs = append(labs, o.Name)
		mu.Unlock()
		fmt.Fprintf(os.Stderr, "lab %s: %d nodes, backend %s ...\n", o.Name, o.Nodes, o.Backend)
		s, err := lab.Up(ctx, o)
		if err != nil {
			return nil, err
		}
		for _, p := range l.pairs {
			from, to := s.PodsOf(p.from)[0], s.PodsOf(p.to)[0]
			t := &target{name: p.name, what: p.what, client: from.NetNS, server: to.NetNS, serverIP: to.IP}
			if t.mtu, err = linkMTU(from.NetNS, "eth0"); err != nil {
				return nil, err
			}
			if p.name == "vxlan-csum-off" {
				// The agents' resync is an hour away: nothing turns it back
				// on during the measurement.
				nodes := []string{s.Nodes[0].NetNS, s.Nodes[1].NetNS}
				t.before = func() error { return setTxChecksum(nodes, false) }
				t.after = func() error { return setTxChecksum(nodes, true) }
			}
			targets = append(targets, t)
		}
	}
	return targets, nil
}

func rawPair(a, b netip.Prefix) error {
	ha, err := nsutil.Create(rawNS[0])
	if err != nil {
		return err
	}
	defer ha.Close()
	hb, err := nsutil.Create(rawNS[1])
	if err != nil {
		return err
	}
	defer hb.Close()
	for i, h := range []ns.NetNS{ha, hb} {
		addr := []netip.Prefix{a, b}[i]
		err := h.Do(func(ns.NetNS) error {
			if i == 0 {
				veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0", TxQLen: -1}, PeerName: "eth0",
					PeerNamespace: netlink.NsFd(int(hb.Fd())), PeerTxQLen: -1}
				if err := netlink.LinkAdd(veth); err != nil {
					return err
				}
			}
			l, err := netlinksafe.LinkByName("eth0")
			if err != nil {
				return err
			}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: dataplane.PrefixToIPNet(addr)}); err != nil {
				return err
			}
			return netlink.LinkSetUp(l)
		})
		if err != nil {
			return err
		}
	}
	return nil
}

func linkMTU(nsName, name string) (int, error) {
	h, err := ns.GetNS(nsutil.Path(nsName))
	if err != nil {
		return 0, err
	}
	defer h.Close()
	var mtu int
	err = h.Do(func(ns.NetNS) error {
		l, err := netlinksafe.LinkByName(name)
		if err == nil {
			mtu = l.Attrs().MTU
		}
		return err
	})
	return mtu, err
}

// inNS prepares a command to run inside a namespace.
func inNS(nsName string, argv ...string) (*exec.Cmd, ns.NetNS, error) {
	h, err := ns.GetNS(nsutil.Path(nsName))
	if err != nil {
		return nil, nil, err
	}
	return exec.Command(argv[0], argv[1:]...), h, nil
}

func startServer(nsName string) error {
	cmd, h, err := inNS(nsName, "iperf3", "-s", "-p", strconv.Itoa(iperfPort))
	if err != nil {
		return err
	}
	defer h.Close()
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nsutil.Start(h, cmd); err != nil {
		return err
	}
	mu.Lock()
	procs = append(procs, cmd)
	mu.Unlock()
	go cmd.Wait()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		c, err := probe.Dial(ctx, h, net.JoinHostPort("127.0.0.1", strconv.Itoa(iperfPort)))
		cancel()
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("iperf3 server in %s: %w", nsName, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// run runs a client command in a namespace and returns its stdout.
func run(nsName string, argv ...string) ([]byte, error) {
	cmd, h, err := inNS(nsName, argv...)
	if err != nil {
		return nil, err
	}
	defer h.Close()
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := nsutil.Start(h, cmd); err != nil {
		return nil, err
	}
	if err := cmd.Wait(); err != nil {
		return out.Bytes(), fmt.Errorf("%s: %v: %s%s", argv[0], err, errb.String(), tailOf(out.String()))
	}
	return out.Bytes(), nil
}

func tailOf(s string) string {
	if len(s) > 300 {
		return s[len(s)-300:]
	}
	return s
}

// setTxChecksum turns tx checksum offload of the nodes' VXLAN devices on or off.
func setTxChecksum(nodes []string, on bool) error {
	for _, n := range nodes {
		h, err := ns.GetNS(nsutil.Path(n))
		if err != nil {
			return err
		}
		err = h.Do(func(ns.NetNS) error {
			e, err := ethtool.NewEthtool()
			if err != nil {
				return err
			}
			defer e.Close()
			return e.Change(vxlan.DeviceName(vxlan.DefaultVNI), map[string]bool{vxlan.TxChecksumFeature: on})
		})
		h.Close()
		if err != nil {
			return fmt.Errorf("%s: tx checksum offload %v: %w", n, on, err)
		}
	}
	return nil
}

func measure(t *target, dur int, busy float64) (err error) {
	t.busy = append(t.busy, busy)
	if t.before != nil {
		if err := t.before(); err != nil {
			return err
		}
		defer func() {
			if aerr := t.after(); err == nil {
				err = aerr
			}
		}()
	}
	for _, streams := range []int{1, 4} {
		out, err := run(t.client, "iperf3", "-c", t.serverIP.String(), "-p", strconv.Itoa(iperfPort),
			"-t", strconv.Itoa(dur), "-P", strconv.Itoa(streams), "-C", "cubic", "-J")
		if err != nil {
			return err
		}
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
			Error string `json:"error"`
		}
		if err := json.Unmarshal(out, &r); err != nil || r.Error != "" || r.End.SumReceived.BitsPerSecond == 0 {
			return fmt.Errorf("iperf3 -P %d: %v %s", streams, err, r.Error)
		}
		gbps := r.End.SumReceived.BitsPerSecond / 1e9
		if streams == 1 {
			t.tcp1 = append(t.tcp1, gbps)
		} else {
			t.tcp4 = append(t.tcp4, gbps)
		}
	}
	out, err := run(t.client, "ping", "-c", "200", "-i", "0.005", "-q", t.serverIP.String())
	if err != nil {
		return err
	}
	m := regexp.MustCompile(`= ([0-9.]+)/([0-9.]+)/`).FindSubmatch(out)
	if m == nil {
		return fmt.Errorf("ping: no rtt in %q", out)
	}
	mn, _ := strconv.ParseFloat(string(m[1]), 64)
	avg, _ := strconv.ParseFloat(string(m[2]), 64)
	t.rttMin = append(t.rttMin, mn*1000)
	t.rttAvg = append(t.rttAvg, avg*1000)
	return nil
}

func mean(xs []float64) float64 {
	s := 0.0
	for _, x := range xs {
		s += x
	}
	return s / float64(len(xs))
}

func spread(xs []float64, format string) string {
	lo, hi := xs[0], xs[0]
	for _, x := range xs {
		lo, hi = min(lo, x), max(hi, x)
	}
	return fmt.Sprintf(format+" ("+format+"-"+format+")", mean(xs), lo, hi)
}

func report(targets []*target, reps, dur int) {
	raw := targets[0]
	fmt.Printf("\ndata path, %d reps x %ds per iperf3 test, %d CPUs, load average %s\n", reps, dur, runtime.NumCPU(), machine.LoadAvg())
	fmt.Println("mean (min-max); ratios are of means, to the raw veth")
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "target\tpath\tMTU\tTCP x1 Gbit/s\tx1 ratio\tTCP x4 Gbit/s\tx4 ratio\tping min us\tping avg us\tbusy before %")
	for _, t := range targets {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%.2f\t%s\t%.2f\t%s\t%s\t%.0f\n", t.name, t.what, t.mtu,
			spread(t.tcp1, "%.1f"), mean(t.tcp1)/mean(raw.tcp1), spread(t.tcp4, "%.1f"), mean(t.tcp4)/mean(raw.tcp4),
			spread(t.rttMin, "%.0f"), spread(t.rttAvg, "%.0f"), mean(t.busy))
	}
	tw.Flush()
}

// cleanup stops the iperf3 servers and removes every lab and namespace
// this run made. Safe to call twice.
func cleanup() {
	mu.Lock()
	defer mu.Unlock()
	if closed {
		return
	}
	closed = true
	for _, c := range procs {
		if c.Process != nil {
			c.Process.Kill()
		}
	}
	for _, name := range labs {
		if err := lab.Down(labRoot, name); err != nil {
			log.Printf("lab %s down: %v", name, err)
		}
	}
	for _, n := range rawNS {
		nsutil.Delete(n)
	}
	if labRoot != "" {
		os.RemoveAll(labRoot)
	}
}
