package k8s_test

import (
	"encoding/xml"
	"fmt"
	"os"
	"regexp"
	"sort"
	"strings"
	"time"
)

// The upstream specs this cluster runs: pod-to-pod and node-to-pod
// connectivity, which is what a pod network provides. suiteServices adds
// the Service checks through kube-proxy (which runs on every node).
var (
	focusPods = []string{
		`Networking Granular Checks: Pods should function for (intra|node)-pod communication: (http|udp)`,
		`NoSNAT Should be able to send traffic between Pods without SNAT`,
		`Connectivity Pod Lifecycle should be able to connect (from a Pod|to other Pod from a terminating Pod)`,
	}
	focusServices = []string{
		`Networking Granular Checks: Services`,
		`Networking should check kube-proxy urls`,
		`Services should preserve source pod IP for traffic thru service cluster IP`,
	}
	// Never run, whatever the focus: a spec that contacts an address
	// outside the cluster (this machine may only talk to its own
	// namespaces), and kinds of spec this cluster cannot serve.
	skip = `Internet connection|\[Feature:|SCTP|IPv6|DualStack|\[Slow\]|\[Serial\]|\[Disruptive\]`
)

// focus is e2e.test's --ginkgo.focus for a suite.
func focus(withServices bool) string {
	f := focusPods
	if withServices {
		f = append(append([]string{}, focusPods...), focusServices...)
	}
	return `\[sig-network\] (` + strings.Join(f, "|") + `)`
}

// notRunReasons say why a sig-network spec did not run here, first match.
var notRunReasons = []struct {
	re     *regexp.Regexp
	reason string
}{
	{regexp.MustCompile(`Internet connection|Networking-IPv4|Networking-IPv6`), "contacts an address outside the cluster: never run on this machine"},
	{regexp.MustCompile(`DNS|hairpin back to themselves`), "needs cluster DNS, also to reach a Service by its name (this cluster runs no CoreDNS)"},
	{regexp.MustCompile(`NetworkPolicy|Netpol`), "NetworkPolicy: flatnet implements none"},
	{regexp.MustCompile(`HostPort`), "hostPort needs the portmap plugin, which flatnet's conflist does not chain"},
	{regexp.MustCompile(`SCTP`), "SCTP: not set up here"},
	{regexp.MustCompile(`IPv6|DualStack`), "IPv6/dual-stack: the cluster is IPv4-only"},
	{regexp.MustCompile(`LoadBalancer|Ingress|ESIPP|Cloud`), "cloud load balancers / ingress: none here"},
	{regexp.MustCompile(`\[Feature:`), "a [Feature:...] spec, outside the default and conformance sets"},
	{regexp.MustCompile(`\[Slow\]|\[Serial\]|\[Disruptive\]`), "[Slow]/[Serial]/[Disruptive]: outside this run's budget"},
	{regexp.MustCompile(`Proxy version v1 (A set of valid|should proxy through a service and a pod)`), "the API server proxies to pods: the control plane's namespace has no route to pod subnets, by the lab's design"},
	{regexp.MustCompile(`Services|Service |Conntrack|KubeProxy|kube-proxy|Traffic Distribution|Topology Hints|Connectivity Pod Lifecycle should be able to have zero downtime`), "Service proxying (kube-proxy), not the pod network: not selected"},
	{regexp.MustCompile(`Endpoint|ServiceCIDR|API Server|unchanging, static URL`), "API objects and controllers only, no pod traffic: not selected"},
	{regexp.MustCompile(``), "not a pod-to-pod or node-to-pod connectivity test: not selected"},
}

// spec is one testcase of e2e.test's JUnit report.
type spec struct {
	Name    string  `xml:"name,attr"`
	Status  string  `xml:"status,attr"`
	Time    float64 `xml:"time,attr"`
	Failure *struct {
		Message string `xml:"message,attr"`
	} `xml:"failure"`
}

type junit struct {
	Suites []struct {
		Cases []spec `xml:"testcase"`
	} `xml:"testsuite"`
}

// readReport reads the sig-network specs of a JUnit report.
func readReport(path string) ([]spec, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var j junit
	if err := xml.Unmarshal(b, &j); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	var out []spec
	for _, s := range j.Suites {
		for _, c := range s.Cases {
			if strings.HasPrefix(c.Name, "[It] [sig-network] ") {
				c.Name = strings.TrimPrefix(c.Name, "[It] ")
				out = append(out, c)
			}
		}
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Name < out[k].Name })
	return out, nil
}

func reasonNotRun(name string) string {
	for _, r := range notRunReasons {
		if r.re.MatchString(name) {
			return r.reason
		}
	}
	return ""
}

// summary is the run's record: what ran and its result, and every other
// sig-network spec grouped by why it did not run.
func summary(specs []spec, header string, took time.Duration) (text string, ran, passed int, failed []string) {
	var b strings.Builder
	fmt.Fprintf(&b, "# e2e-k8s: upstream sig-network e2e on flatnet\n\n%s\n\n", header)
	byReason := map[string][]string{}
	var rows []string
	for _, s := range specs {
		switch s.Status {
		case "skipped":
			r := reasonNotRun(s.Name)
			byReason[r] = append(byReason[r], s.Name)
		default:
			ran++
			if s.Status == "passed" {
				passed++
			} else {
				msg := ""
				if s.Failure != nil {
					msg = s.Failure.Message
					if len(msg) > 300 {
						msg = msg[:300] + "..."
					}
				}
				failed = append(failed, s.Name+": "+s.Status+" "+msg)
			}
			rows = append(rows, fmt.Sprintf("| %s | %s | %.0f s |", s.Name, s.Status, s.Time))
		}
	}
	fmt.Fprintf(&b, "Ran %d sig-network specs: %d passed, %d failed (e2e.test took %s). %d other sig-network specs did not run.\n\n",
		ran, passed, len(failed), took.Round(time.Second), len(specs)-ran)
	fmt.Fprintf(&b, "| spec | result | time |\n|---|---|---|\n%s\n", strings.Join(rows, "\n"))
	fmt.Fprintf(&b, "\n## Not run, and why\n")
	for _, r := range notRunReasons {
		names := byReason[r.reason]
		if len(names) == 0 {
			continue
		}
		fmt.Fprintf(&b, "\n%s (%d):\n", r.reason, len(names))
		for _, n := range names {
			fmt.Fprintf(&b, "- %s\n", n)
		}
	}
	return b.String(), ran, passed, failed
}
