package lab

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"

	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/nsutil"
	"github.com/flatnet-io/flatnet/pkg/probe"
)

// Probe is one cell of the connectivity matrix.
type Probe struct {
	From, To   string
	Kind       string // pod-pod, pod-node, node-pod, pod-internet, registry
	Want       netip.Addr
	Seen       netip.Addr
	Err        string
	OK         bool
	wantReason string
}

// Report is the result of a check.
type Report struct {
	Probes []*Probe
	Notes  []string // explanations from the agents for failures
}

// Failed counts failed probes.
func (r *Report) Failed() int {
	n := 0
	for _, p := range r.Probes {
		if !p.OK {
			n++
		}
	}
	return n
}

type endpoint struct {
	name string
	h    ns.NetNS
	addr string // whoami server address
}

// Check runs the connectivity matrix: every pod to every pod (TCP, the
// receiver sees the sender's pod IP), pod to own and remote nodes (source
// = pod IP: no NAT), node to pod (source = the node's own address), pod to
// the internet host (source = the node's IP: masquerade), and the
// registry example. It never changes the lab.
func (s *State) Check(ctx context.Context) (*Report, error) {
	var closers []io.Closer
	defer func() {
		for _, c := range closers {
			c.Close()
		}
	}()
	open := func(nsName string) (ns.NetNS, error) {
		h, err := ns.GetNS(nsutil.Path(nsName))
		if err == nil {
			closers = append(closers, h)
		}
		return h, err
	}
	serve := func(name, nsName string, ip netip.Addr) (*endpoint, error) {
		h, err := open(nsName)
		if err != nil {
			return nil, err
		}
		ln, err := probe.Listen(h, net.JoinHostPort(ip.String(), "0"))
		if err != nil {
			return nil, fmt.Errorf("listen in %s on %s: %w", name, ip, err)
		}
		closers = append(closers, ln)
		go probe.ServeWhoAmI(ln)
		return &endpoint{name: name, h: h, addr: ln.Addr().String()}, nil
	}
	pods := map[string]*endpoint{}
	nodes := map[string]*endpoint{}
	for _, p := range s.Pods {
		e, err := serve(p.Name, p.NetNS, p.IP)
		if err != nil {
			return nil, err
		}
		pods[p.Name] = e
	}
	for _, n := range s.Nodes {
		e, err := serve(n.Name, n.NetNS, n.UnderlayIP)
		if err != nil {
			return nil, err
		}
		nodes[n.Name] = e
	}
	inet, err := serve("internet", s.Internet.NetNS, s.Internet.IP)
	if err != nil {
		return nil, err
	}
	nodeOf := map[string]*Node{}
	for _, n := range s.Nodes {
		nodeOf[n.Name] = n
	}

	type job struct {
		p    *Probe
		from ns.NetNS
		addr string
	}
	var jobs []job
	add := func(kind string, from *endpoint, to *endpoint, want netip.Addr, why string) {
		jobs = append(jobs, job{p: &Probe{From: from.name, To: to.name, Kind: kind, Want: want, wantReason: why}, from: from.h, addr: to.addr})
	}
	for _, src := range s.Pods {
		from := pods[src.Name]
		for _, dst := range s.Pods {
			if dst != src {
				add("pod-pod", from, pods[dst.Name], src.IP, "the sender's pod IP")
			}
		}
		for _, n := range s.Nodes {
			add("pod-node", from, nodes[n.Name], src.IP, "the pod IP (no NAT to nodes)")
		}
		add("pod-internet", from, inet, nodeOf[src.Node].UnderlayIP, "the node's IP (masquerade at the edge)")
	}
	modes := s.peerModes(ctx)
	for _, n := range s.Nodes {
		for _, dst := range s.Pods {
			want, why := n.UnderlayIP, "the node's own address"
			switch {
			case dst.Node == n.Name:
				want = cidr.FirstHost(n.Subnet) // own pods are reached from the bridge
			case modes[n.Name][dst.Node] == string(backend.Overlay):
				want, why = cidr.FirstHost(n.Subnet), "the node's pod gateway address, which it sends into the overlay from so that replies come back through it"
			}
			add("node-pod", nodes[n.Name], pods[dst.Name], want, why)
		}
	}

	rep := &Report{}
	var mu sync.Mutex
	work := make(chan job)
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				pctx, cancel := context.WithTimeout(ctx, 3*time.Second)
				seen, _, err := probe.WhoAmI(pctx, j.from, j.addr)
				cancel()
				j.p.Seen = seen
				switch {
				case err != nil:
					j.p.Err = err.Error()
				case seen != j.p.Want:
					j.p.Err = fmt.Sprintf("receiver saw %s, want %s (%s)", seen, j.p.Want, j.p.wantReason)
				default:
					j.p.OK = true
				}
				mu.Lock()
				rep.Probes = append(rep.Probes, j.p)
				mu.Unlock()
			}
		}()
	}
	for _, j := range jobs {
		work <- j
	}
	close(work)
	wg.Wait()
	if reg := s.registryProbe(ctx, pods); reg != nil {
		rep.Probes = append(rep.Probes, reg)
	}
	sort.SliceStable(rep.Probes, func(i, j int) bool {
		a, b := rep.Probes[i], rep.Probes[j]
		if a.Kind != b.Kind {
			return a.Kind < b.Kind
		}
		if a.From != b.From {
			return a.From < b.From
		}
		return a.To < b.To
	})
	if rep.Failed() > 0 {
		rep.Notes = s.explain(ctx)
	}
	return rep, nil
}

// peerModes asks every agent how it reaches each peer: node -> peer ->
// "direct" or "overlay" (missing when the agent does not answer).
func (s *State) peerModes(ctx context.Context) map[string]map[string]string {
	out := map[string]map[string]string{}
	for _, n := range s.Nodes {
		out[n.Name] = map[string]string{}
		if st, err := s.AgentStatus(ctx, n); err == nil {
			for _, p := range st.Peers {
				out[n.Name][p.Node] = p.Mode
			}
		}
	}
	return out
}

// registryProbe is the seed's example: a registry on a pod of one node; a
// pod on another node says "I am at <ip>:<port>"; the registry checks that
// the registration came from that IP, then connects back to it and gets an
// answer.
func (s *State) registryProbe(ctx context.Context, pods map[string]*endpoint) *Probe {
	var regPod, clientPod *Pod
	for _, p := range s.Pods {
		if regPod == nil {
			regPod = p
		} else if clientPod == nil && p.Node != regPod.Node {
			clientPod = p
		}
	}
	if regPod == nil || clientPod == nil {
		return nil
	}
	pr := &Probe{From: clientPod.Name, To: regPod.Name, Kind: "registry", Want: clientPod.IP}
	fail := func(format string, a ...any) *Probe { pr.Err = fmt.Sprintf(format, a...); return pr }
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()

	reg, cli := pods[regPod.Name], pods[clientPod.Name]
	regLn, err := probe.Listen(reg.h, net.JoinHostPort(regPod.IP.String(), "0"))
	if err != nil {
		return fail("registry listen: %v", err)
	}
	defer regLn.Close()
	cbLn, err := probe.Listen(cli.h, net.JoinHostPort(clientPod.IP.String(), "0"))
	if err != nil {
		return fail("callback listen: %v", err)
	}
	defer cbLn.Close()
	go func() { // the client's callback service
		c, err := cbLn.Accept()
		if err == nil {
			fmt.Fprintf(c, "update received by %s\n", clientPod.Name)
			c.Close()
		}
	}()
	result := make(chan error, 1)
	go func() { // the registry
		c, err := regLn.Accept()
		if err != nil {
			result <- err
			return
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			result <- fmt.Errorf("registry read: %w", err)
			return
		}
		claimed, err := netip.ParseAddrPort(strings.TrimSpace(strings.TrimPrefix(line, "I am at ")))
		if err != nil {
			result <- fmt.Errorf("registry: bad registration %q", line)
			return
		}
		from := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		pr.Seen = from
		if from != claimed.Addr() {
			result <- fmt.Errorf("registration claims %s but came from %s", claimed.Addr(), from)
			return
		}
		back, err := probe.Dial(ctx, reg.h, claimed.String())
		if err != nil {
			result <- fmt.Errorf("registry cannot call back %s: %w", claimed, err)
			return
		}
		defer back.Close()
		back.SetDeadline(time.Now().Add(3 * time.Second))
		answer, err := bufio.NewReader(back).ReadString('\n')
		if err != nil || !strings.HasPrefix(answer, "update received") {
			result <- fmt.Errorf("call back to %s: answer %q, %v", claimed, answer, err)
			return
		}
		fmt.Fprintf(c, "registered\n")
		result <- nil
	}()
	c, err := probe.Dial(ctx, cli.h, regLn.Addr().String())
	if err != nil {
		return fail("register with %s: %v", regLn.Addr(), err)
	}
	defer c.Close()
	fmt.Fprintf(c, "I am at %s\n", cbLn.Addr())
	select {
	case err := <-result:
		if err != nil {
			return fail("%v", err)
		}
	case <-ctx.Done():
		return fail("registry: %v", ctx.Err())
	}
	pr.OK = true
	return pr
}

// explain collects what the agents say about peers they cannot reach.
func (s *State) explain(ctx context.Context) []string {
	var notes []string
	for _, n := range s.Nodes {
		st, err := s.AgentStatus(ctx, n)
		if err != nil {
			notes = append(notes, fmt.Sprintf("%s: agent not answering: %v", n.Name, err))
			continue
		}
		for _, p := range st.Peers {
			if p.Error != "" {
				notes = append(notes, fmt.Sprintf("%s cannot reach %s: %s", n.Name, p.Node, p.Error))
			}
		}
	}
	return notes
}

// Print writes the matrix (rows: sources, columns: destinations) and every
// failure with its reason.
func (r *Report) Print(w io.Writer) {
	var cols, rows []string
	seenCol, seenRow := map[string]bool{}, map[string]bool{}
	cell := map[[2]string]string{}
	for _, p := range r.Probes {
		if p.Kind == "registry" {
			continue
		}
		if !seenRow[p.From] {
			seenRow[p.From] = true
			rows = append(rows, p.From)
		}
		if !seenCol[p.To] {
			seenCol[p.To] = true
			cols = append(cols, p.To)
		}
		mark := "ok"
		if !p.OK {
			mark = "FAIL"
		}
		cell[[2]string{p.From, p.To}] = mark
	}
	sortNames(rows)
	sortNames(cols)
	tw := tabwriter.NewWriter(w, 0, 0, 1, ' ', 0)
	fmt.Fprintf(tw, "from \\ to\t%s\t\n", strings.Join(cols, "\t"))
	for _, row := range rows {
		var marks []string
		for _, col := range cols {
			m, ok := cell[[2]string{row, col}]
			if !ok {
				m = "-"
			}
			marks = append(marks, m)
		}
		fmt.Fprintf(tw, "%s\t%s\t\n", row, strings.Join(marks, "\t"))
	}
	tw.Flush()
	fmt.Fprintln(w)
	kinds := map[string][2]int{}
	var order []string
	for _, p := range r.Probes {
		k := kinds[p.Kind]
		if k == [2]int{} {
			order = append(order, p.Kind)
		}
		k[1]++
		if p.OK {
			k[0]++
		}
		kinds[p.Kind] = k
	}
	for _, k := range order {
		fmt.Fprintf(w, "%-13s %d/%d passed\n", k, kinds[k][0], kinds[k][1])
	}
	for _, p := range r.Probes {
		if p.Kind == "registry" && p.OK {
			fmt.Fprintf(w, "registry: %s registered from %s and was called back\n", p.From, p.Seen)
		}
	}
	if r.Failed() == 0 {
		fmt.Fprintf(w, "\nall %d probes passed: pod IPs are kept end to end, masquerade only at the edge\n", len(r.Probes))
		return
	}
	fmt.Fprintf(w, "\n%d of %d probes FAILED:\n", r.Failed(), len(r.Probes))
	for _, p := range r.Probes {
		if !p.OK {
			fmt.Fprintf(w, "  %-12s %s -> %s: %s\n", p.Kind, p.From, p.To, p.Err)
		}
	}
	if len(r.Notes) > 0 {
		fmt.Fprintln(w, "what the agents say:")
		for _, n := range r.Notes {
			fmt.Fprintf(w, "  %s\n", n)
		}
	}
}

// sortNames orders n1-p1 < n1-p2 < n2 ... < internet naturally enough.
func sortNames(s []string) {
	sort.SliceStable(s, func(i, j int) bool {
		if (s[i] == "internet") != (s[j] == "internet") {
			return s[j] == "internet"
		}
		if len(s[i]) != len(s[j]) && strings.Count(s[i], "-") == strings.Count(s[j], "-") {
			return len(s[i]) < len(s[j])
		}
		return s[i] < s[j]
	})
}
