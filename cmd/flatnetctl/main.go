// Command flatnetctl runs and checks a flatnet lab: a multi-node cluster
// network built from network namespaces on one machine.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/flatnet-io/flatnet/pkg/etcdserver"
	"github.com/flatnet-io/flatnet/pkg/lab"
)

const usage = `usage: flatnetctl lab <command> [flags]

commands:
  up      build a lab: hub, internet host, etcd, N nodes running flatnetd, pods via libcni
  check   connectivity matrix; exit 1 on any failure
  status  nodes, pods and how each node reaches its peers [--json]
  down    remove everything of a lab (idempotent)

run "flatnetctl lab <command> -h" for its flags
`

func main() {
	if len(os.Args) < 3 || os.Args[1] != "lab" {
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	cmd, args := os.Args[2], os.Args[3:]
	var err error
	switch cmd {
	case "up":
		err = up(ctx, args)
	case "check":
		err = check(ctx, args)
	case "status":
		err = status(ctx, args)
	case "down":
		err = down(args)
	case "etcd":
		err = etcd(ctx, args)
	default:
		fmt.Fprint(os.Stderr, usage)
		os.Exit(2)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "flatnetctl lab %s: %v\n", cmd, err)
		os.Exit(1)
	}
}

func common(fs *flag.FlagSet) (name, root *string) {
	return fs.String("name", "demo", "lab name (1-10 lowercase letters or digits)"),
		fs.String("root", lab.DefaultRoot, "directory holding the labs' state")
}

func up(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	name, root := common(fs)
	o := lab.Options{Progress: os.Stdout}
	fs.IntVar(&o.Nodes, "nodes", 3, "number of nodes")
	fs.IntVar(&o.PodsPerNode, "pods-per-node", 2, "pods on each node")
	fs.StringVar(&o.Backend, "backend", "auto", "flatnetd backend: auto, vxlan or host-gw")
	fs.StringVar(&o.Topology, "topology", "flat", "flat (one switch) or racks (L2 segments joined by a router)")
	fs.IntVar(&o.Racks, "racks", 2, "number of racks with --topology racks")
	fs.StringVar(&o.BinDir, "bin-dir", "", "directory with flatnet, flatnetd, flatnetctl (default: next to this binary)")
	fs.DurationVar(&o.LeaseTTL, "lease-ttl", time.Minute, "agents' lease TTL")
	fs.DurationVar(&o.Resync, "resync", 5*time.Second, "agents' resync interval")
	fs.StringVar(&o.Datastore, "datastore", "etcd", "agents' datastore: etcd, or kubernetes (kube-apiserver + kube-controller-manager in the hub)")
	fs.BoolVar(&o.LeastPrivilege, "least-privilege", false, "run the agents as the DaemonSet does: CAP_NET_ADMIN only (as user nobody)")
	fs.StringVar(&o.KubeBinDir, "kube-bin-dir", os.Getenv("FLATNET_K8S_BIN"), "with --datastore kubernetes: directory of kube-apiserver and kube-controller-manager (`hack/k8s/build.sh control-plane` prints it; default $FLATNET_K8S_BIN)")
	fs.Parse(args)
	o.Name, o.Root = *name, *root
	s, err := lab.Up(ctx, o)
	if err != nil {
		return err
	}
	fmt.Println()
	s.Status(ctx).Print(os.Stdout)
	fmt.Printf("\nnext: flatnetctl lab check --name %s; flatnetctl lab down --name %s\n", s.Name, s.Name)
	return nil
}

func check(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("check", flag.ExitOnError)
	name, root := common(fs)
	fs.Parse(args)
	s, err := lab.Load(*root, *name)
	if err != nil {
		return err
	}
	rep, err := s.Check(ctx)
	if err != nil {
		return err
	}
	rep.Print(os.Stdout)
	if rep.Failed() > 0 {
		os.Exit(1)
	}
	return nil
}

func status(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("status", flag.ExitOnError)
	name, root := common(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	fs.Parse(args)
	s, err := lab.Load(*root, *name)
	if err != nil {
		return err
	}
	v := s.Status(ctx)
	if *asJSON {
		return v.PrintJSON(os.Stdout)
	}
	v.Print(os.Stdout)
	return nil
}

func down(args []string) error {
	fs := flag.NewFlagSet("down", flag.ExitOnError)
	name, root := common(fs)
	fs.Parse(args)
	if err := lab.Down(*root, *name); err != nil {
		return err
	}
	fmt.Printf("lab %s is down\n", *name)
	return nil
}

// etcd is the lab's embedded etcd process (started by `lab up` in the hub).
func etcd(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("etcd", flag.ExitOnError)
	dir := fs.String("dir", "", "data directory")
	client := fs.String("client-url", "", "client URL to listen on")
	peer := fs.String("peer-url", "", "peer URL to listen on")
	fs.Parse(args)
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	srv, err := etcdserver.Start(ctx, etcdserver.Config{Dir: *dir, ClientURL: *client, PeerURL: *peer, Logger: log})
	if err != nil {
		return err
	}
	log.Info("etcd serving", "url", srv.ClientURL())
	<-ctx.Done()
	return srv.Stop()
}
