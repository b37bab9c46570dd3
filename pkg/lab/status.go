package lab

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// StatusView is `lab status --json`.
type StatusView struct {
	Name     string       `json:"name"`
	Backend  string       `json:"backend"`
	Topology string       `json:"topology"`
	EtcdURL  string       `json:"etcdURL"`
	Internet Host         `json:"internet"`
	Nodes    []NodeStatus `json:"nodes"`
	Pods     []*Pod       `json:"pods"`

	APIServer string `json:"apiServer,omitempty"` // the lab's Kubernetes API (datastore kubernetes)
}

// NodeStatus is a node with what its agent reports.
type NodeStatus struct {
	Name       string   `json:"name"`
	NetNS      string   `json:"netns"`
	Rack       int      `json:"rack"`
	UnderlayIP string   `json:"underlayIP"`
	Subnet     string   `json:"subnet"`
	Agent      string   `json:"agent"` // ready, not ready, down
	Direct     []string `json:"direct"`
	Overlay    []string `json:"overlay"`
	Unreached  []string `json:"unreached"`
}

// Status collects the view, asking each agent.
func (s *State) Status(ctx context.Context) *StatusView {
	v := &StatusView{Name: s.Name, Backend: s.Backend, Topology: s.Topology, EtcdURL: s.EtcdURL, Internet: s.Internet, Pods: s.Pods}
	if s.Kube != nil {
		v.APIServer = s.Kube.URL
	}
	for _, n := range s.Nodes {
		ns := NodeStatus{Name: n.Name, NetNS: n.NetNS, Rack: n.Rack, UnderlayIP: n.UnderlayIP.String(), Subnet: n.Subnet.String(), Agent: "down"}
		if st, err := s.AgentStatus(ctx, n); err == nil {
			ns.Agent = "not ready"
			if st.Ready {
				ns.Agent = "ready"
			}
			ns.Subnet = st.Subnet
			for _, p := range st.Peers {
				switch {
				case !p.Programmed:
					ns.Unreached = append(ns.Unreached, p.Node)
				case p.Mode == "overlay":
					ns.Overlay = append(ns.Overlay, p.Node)
				default:
					ns.Direct = append(ns.Direct, p.Node)
				}
			}
		}
		v.Nodes = append(v.Nodes, ns)
	}
	return v
}

// PrintJSON writes the view as JSON.
func (v *StatusView) PrintJSON(w io.Writer) error {
	e := json.NewEncoder(w)
	e.SetIndent("", "  ")
	return e.Encode(v)
}

// Print writes the view as tables.
func (v *StatusView) Print(w io.Writer) {
	fmt.Fprintf(w, "lab %s: backend %s, topology %s, etcd %s, internet host %s (%s)\n", v.Name, v.Backend, v.Topology, v.EtcdURL, v.Internet.IP, v.Internet.NetNS)
	if v.APIServer != "" {
		fmt.Fprintf(w, "datastore kubernetes: API server %s (from the hub namespace)\n", v.APIServer)
	}
	fmt.Fprintln(w)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tNETNS\tRACK\tUNDERLAY IP\tPOD SUBNET\tAGENT\tDIRECT\tOVERLAY\tUNREACHED")
	for _, n := range v.Nodes {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, n.NetNS, n.Rack, n.UnderlayIP, n.Subnet, n.Agent,
			list(n.Direct), list(n.Overlay), list(n.Unreached))
	}
	tw.Flush()
	fmt.Fprintln(w)
	tw = tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "POD\tNODE\tNETNS\tIP")
	for _, p := range v.Pods {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", p.Name, p.Node, p.NetNS, p.IP)
	}
	tw.Flush()
}

func list(s []string) string {
	if len(s) == 0 {
		return "-"
	}
	return strings.Join(s, ",")
}
