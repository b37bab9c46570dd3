package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"

	"github.com/flatnet-io/flatnet/pkg/datastore"
	etcdstore "github.com/flatnet-io/flatnet/pkg/datastore/etcd"
)

// openDatastore connects to the configured store.
func openDatastore(ctx context.Context, cfg Config, log *slog.Logger) (datastore.Datastore, error) {
	switch cfg.Datastore {
	case "etcd":
		return etcdstore.New(ctx, etcdstore.Config{
			Endpoints:   strings.Split(cfg.EtcdEndpoints, ","),
			Prefix:      cfg.EtcdPrefix,
			ClusterCIDR: netip.MustParsePrefix(cfg.ClusterCIDR),
			SubnetLen:   cfg.SubnetLen,
			LeaseTTL:    cfg.LeaseTTL,
			Logger:      log,
		})
	default:
		return nil, fmt.Errorf("datastore %q is not supported yet", cfg.Datastore)
	}
}
