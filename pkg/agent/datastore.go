package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"k8s.io/klog/v2"

	"github.com/flatnet-io/flatnet/pkg/datastore"
	etcdstore "github.com/flatnet-io/flatnet/pkg/datastore/etcd"
	kubestore "github.com/flatnet-io/flatnet/pkg/datastore/kube"
)

// readyReporter is implemented by stores that tell the rest of the
// cluster when this node's data plane is up (the Kubernetes store sets the
// Node's NetworkUnavailable=False condition). The agent calls MarkReady
// after its first successful sync; the store keeps it published.
type readyReporter interface {
	MarkReady(ctx context.Context) error
}

// openDatastore connects to the configured store.
func openDatastore(cfg Config, log *slog.Logger) (datastore.Datastore, error) {
	switch cfg.Datastore {
	case "etcd":
		return etcdstore.New(etcdstore.Config{
			Endpoints:   strings.Split(cfg.EtcdEndpoints, ","),
			Prefix:      cfg.EtcdPrefix,
			ClusterCIDR: netip.MustParsePrefix(cfg.ClusterCIDR),
			SubnetLen:   cfg.SubnetLen,
			LeaseTTL:    cfg.LeaseTTL,
			Logger:      log,
		})
	case "kubernetes":
		klog.SetSlogLogger(log) // client-go's own messages in the agent's log format
		return kubestore.New(kubestore.Config{
			Kubeconfig:  cfg.Kubeconfig,
			ClusterCIDR: netip.MustParsePrefix(cfg.ClusterCIDR),
			Logger:      log,
		})
	default:
		return nil, fmt.Errorf("datastore %q is not supported yet", cfg.Datastore)
	}
}
