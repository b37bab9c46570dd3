// Package etcd keeps node subnet leases in etcd (v3 API).
//
// Key layout under Prefix (default "/flatnet"):
//
//	<prefix>/config                     {"clusterCIDR":"10.244.0.0/16","subnetLen":24}
//	<prefix>/subnets/10.244.3.0-24      the datastore.Lease JSON, attached to an etcd lease
//
// The config key is created by the first agent (in a transaction) and every
// later agent must agree with it. A subnet key exists while its owner keeps
// its etcd lease (TTL LeaseTTL) alive; every write is a transaction guarded
// by a compare, so two nodes can never hold the same subnet.
package etcd

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Config configures a Store.
type Config struct {
	// Endpoints are etcd client URLs, e.g. "http://10.0.0.1:2379".
	Endpoints []string
	// Prefix is the root of all flatnet keys (default "/flatnet").
	Prefix string
	// ClusterCIDR is the IPv4 range node subnets are cut from.
	ClusterCIDR netip.Prefix
	// SubnetLen is the prefix length of a node subnet (default 24).
	SubnetLen int
	// LeaseTTL is how long a subnet outlives its node's last keepalive
	// (default 10m, rounded up to whole seconds).
	LeaseTTL time.Duration
	// DialTimeout bounds each request to etcd (default 5s).
	DialTimeout time.Duration
	// Logger receives warnings about retries and lost leases (default slog.Default()).
	Logger *slog.Logger
	// Dial, if set, opens connections to etcd (e.g. from inside another
	// network namespace, as the lab's tools do).
	Dial func(ctx context.Context, addr string) (net.Conn, error)
}

// Defaults.
const (
	DefaultPrefix      = "/flatnet"
	DefaultSubnetLen   = 24
	DefaultLeaseTTL    = 10 * time.Minute
	DefaultDialTimeout = 5 * time.Second
)

// ErrConfigMismatch means etcd holds a cluster config (cluster CIDR, subnet
// length) that differs from this agent's. It is not retried.
var ErrConfigMismatch = errors.New("cluster config in etcd differs from this agent's")

// Store is a datastore.Datastore backed by etcd.
type Store struct {
	cfg        Config
	cli        *clientv3.Client
	log        *slog.Logger
	configKey  string
	subnetsKey string // "<prefix>/subnets/"
	ttlSeconds int64
	nSubnets   uint64

	// Timing knobs; tests shorten them.
	opTimeout  time.Duration // per request
	minBackoff time.Duration
	maxBackoff time.Duration
	probeEvery time.Duration // how often the claim is confirmed

	held       atomic.Bool
	configOK   atomic.Bool
	registered atomic.Bool

	bg *datastore.Group
}

var _ datastore.Datastore = (*Store)(nil)

// New validates cfg and creates a client. It does not wait for etcd: an
// unreachable etcd shows up (and is retried) in Register and Watch.
func New(cfg Config) (*Store, error) {
	if cfg.Prefix == "" {
		cfg.Prefix = DefaultPrefix
	}
	cfg.Prefix = strings.TrimRight(cfg.Prefix, "/")
	if cfg.SubnetLen == 0 {
		cfg.SubnetLen = DefaultSubnetLen
	}
	if cfg.LeaseTTL == 0 {
		cfg.LeaseTTL = DefaultLeaseTTL
	}
	if cfg.DialTimeout == 0 {
		cfg.DialTimeout = DefaultDialTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if err := validate(cfg); err != nil {
		return nil, err
	}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		Logger:               zap.NewNop(), // we log what matters ourselves
		// Reconnect quickly after an etcd outage (gRPC's default backs off up to 2 minutes).
		DialOptions: dialOptions(cfg),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", cfg.Endpoints, err)
	}
	s := &Store{
		cfg:        cfg,
		cli:        cli,
		log:        cfg.Logger.With("datastore", "etcd"),
		configKey:  cfg.Prefix + "/config",
		subnetsKey: cfg.Prefix + "/subnets/",
		ttlSeconds: int64((cfg.LeaseTTL + time.Second - 1) / time.Second),
		nSubnets:   uint64(1) << (cfg.SubnetLen - cfg.ClusterCIDR.Bits()),
		opTimeout:  cfg.DialTimeout,
		minBackoff: 500 * time.Millisecond,
		// After an outage etcd gives every lease its full TTL again; retrying
		// at least every TTL/4 re-establishes the claim inside that window.
		maxBackoff: max(500*time.Millisecond, min(10*time.Second, cfg.LeaseTTL/4)),
		probeEvery: min(cfg.LeaseTTL/3, 5*time.Second),
	}
	s.bg = datastore.NewGroup()
	return s, nil
}

func dialOptions(cfg Config) []grpc.DialOption {
	opts := []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
		Backoff:           backoff.Config{BaseDelay: 250 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
		MinConnectTimeout: cfg.DialTimeout,
	})}
	if cfg.Dial != nil {
		opts = append(opts, grpc.WithContextDialer(cfg.Dial))
	}
	return opts
}

func validate(cfg Config) error {
	if len(cfg.Endpoints) == 0 || slices.Contains(cfg.Endpoints, "") {
		return fmt.Errorf("etcd datastore: no endpoints (got %q)", cfg.Endpoints)
	}
	c := cfg.ClusterCIDR
	if err := cidr.ValidateNetwork("cluster CIDR", c); err != nil {
		return fmt.Errorf("etcd datastore: %w", err)
	}
	if cfg.SubnetLen <= c.Bits() || cfg.SubnetLen > 30 {
		return fmt.Errorf("etcd datastore: subnet length /%d does not fit cluster CIDR %s: need /%d to /30",
			cfg.SubnetLen, c, c.Bits()+1)
	}
	if cfg.SubnetLen-c.Bits() > 24 {
		return fmt.Errorf("etcd datastore: cluster CIDR %s with /%d subnets is more than 2^24 subnets", c, cfg.SubnetLen)
	}
	if cfg.LeaseTTL < time.Second {
		return fmt.Errorf("etcd datastore: lease TTL %s is shorter than 1s", cfg.LeaseTTL)
	}
	if cfg.DialTimeout < 0 {
		return fmt.Errorf("etcd datastore: negative dial timeout %s", cfg.DialTimeout)
	}
	return nil
}

// Close stops the keepalive and watch goroutines, waits for them and
// closes the client. It does not revoke the lease: a restarted agent gets
// its subnet back, and the key expires if the node never returns.
func (s *Store) Close() error {
	if !s.bg.Close() {
		return nil
	}
	s.held.Store(false)
	return s.cli.Close()
}

// LeaseHeld reports whether the node's claim is currently confirmed by etcd.
func (s *Store) LeaseHeld() bool { return s.held.Load() }

// ---- keys and values ----

// Key is the etcd key that holds the lease of subnet p.
func (s *Store) Key(p netip.Prefix) string { return s.key(p) }

// Client is the store's etcd client (for tools that inspect or edit keys).
func (s *Store) Client() *clientv3.Client { return s.cli }

func (s *Store) key(p netip.Prefix) string {
	return s.subnetsKey + p.Addr().String() + "-" + strconv.Itoa(p.Bits())
}

// parseKey returns the subnet a key names, if it is a well-formed key for
// a subnet of this cluster.
func (s *Store) parseKey(k string) (netip.Prefix, error) {
	name, ok := strings.CutPrefix(k, s.subnetsKey)
	if !ok {
		return netip.Prefix{}, errors.New("not under " + s.subnetsKey)
	}
	a, l, ok := strings.Cut(name, "-")
	if !ok {
		return netip.Prefix{}, errors.New("want <a.b.c.d>-<len>")
	}
	addr, err := netip.ParseAddr(a)
	if err != nil {
		return netip.Prefix{}, err
	}
	bits, err := strconv.Atoi(l)
	if err != nil {
		return netip.Prefix{}, err
	}
	p, err := addr.Prefix(bits)
	if err != nil {
		return netip.Prefix{}, err
	}
	if err := cidr.ValidateSubnet(p); err != nil {
		return netip.Prefix{}, err
	}
	if s.key(p) != k {
		return netip.Prefix{}, errors.New("not in canonical form")
	}
	if bits != s.cfg.SubnetLen || !s.cfg.ClusterCIDR.Contains(addr) {
		return netip.Prefix{}, fmt.Errorf("subnet %s is not a /%d of cluster CIDR %s", p, s.cfg.SubnetLen, s.cfg.ClusterCIDR)
	}
	return p, nil
}

// parseKV decodes a subnet key and its lease; the key decides the subnet.
func (s *Store) parseKV(kv *mvccpb.KeyValue) (datastore.Lease, error) {
	p, err := s.parseKey(string(kv.Key))
	if err != nil {
		return datastore.Lease{}, err
	}
	var l datastore.Lease
	if err := json.Unmarshal(kv.Value, &l); err != nil {
		return datastore.Lease{}, fmt.Errorf("value: %w", err)
	}
	if l.Subnet != p {
		return datastore.Lease{}, fmt.Errorf("value names subnet %s", l.Subnet)
	}
	if l.Node == "" {
		return datastore.Lease{}, errors.New("value has no node name")
	}
	return l, nil
}

// subnet i (0-based) of the cluster CIDR.
func (s *Store) subnet(i uint64) netip.Prefix {
	return netip.PrefixFrom(cidr.Nth(s.cfg.ClusterCIDR, i<<(32-s.cfg.SubnetLen)), s.cfg.SubnetLen)
}

type clusterConfig struct {
	ClusterCIDR netip.Prefix `json:"clusterCIDR"`
	SubnetLen   int          `json:"subnetLen"`
}

// ---- errors and retries ----

// permanentError is not retried.
type permanentError struct{ error }

func (e permanentError) Unwrap() error { return e.error }

func (s *Store) etcdErr(ctx context.Context, what string, err error) error {
	if errors.Is(err, context.DeadlineExceeded) && ctx.Err() == nil {
		return fmt.Errorf("etcd %s: %s: no answer within %s (is etcd reachable?): %w",
			strings.Join(s.cfg.Endpoints, ","), what, s.opTimeout, err)
	}
	return fmt.Errorf("etcd %s: %s: %w", strings.Join(s.cfg.Endpoints, ","), what, err)
}

func (s *Store) nextBackoff(d time.Duration) time.Duration { return min(2*d, s.maxBackoff) }

// ---- Register ----

// claim is what this node currently holds.
type claim struct {
	lease   datastore.Lease
	key     string
	leaseID clientv3.LeaseID
}

// Register claims a subnet (the node's own key if it still exists, else
// PreferredSubnet if free, else the lowest free one), retrying with capped
// back-off while etcd is unreachable or the cluster CIDR is full, and then
// keeps the claim alive until ctx ends. It may succeed once per Store.
func (s *Store) Register(ctx context.Context, self datastore.NodeInfo) (datastore.Lease, error) {
	if err := self.Validate(); err != nil {
		return datastore.Lease{}, fmt.Errorf("etcd datastore: %w", err)
	}
	if !s.registered.CompareAndSwap(false, true) {
		return datastore.Lease{}, errors.New("etcd datastore: Register called twice on one Store")
	}
	keepCtx := ctx // the keepalive lives as long as the caller's ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.bg.Stopped(), cancel)()

	log := s.log.With("node", self.Name)
	var lastErr error
	bo := s.minBackoff
	for attempt := 1; ; attempt++ {
		c, err := s.claimOnce(ctx, self)
		if err == nil {
			log.Info("claimed pod subnet", "subnet", c.lease.Subnet, "key", c.key, "ttl", s.cfg.LeaseTTL)
			s.held.Store(true)
			if err := s.bg.Go(keepCtx, func(ctx context.Context) { s.maintain(ctx, self, c) }); err != nil {
				s.held.Store(false)
				s.registered.Store(false)
				return datastore.Lease{}, err
			}
			return c.lease, nil
		}
		var perm permanentError
		if errors.As(err, &perm) {
			s.registered.Store(false)
			return datastore.Lease{}, perm.error
		}
		if ctx.Err() != nil && lastErr != nil {
			err = lastErr // the attempt was cut short; the previous one says why we were still trying
		}
		lastErr = err
		if ctx.Err() == nil {
			log.Warn("cannot claim a pod subnet yet; will retry", "attempt", attempt, "retryIn", bo, "err", err)
		}
		if ctx.Err() != nil || !datastore.Sleep(ctx, bo) {
			s.registered.Store(false)
			return datastore.Lease{}, fmt.Errorf("node %q: no pod subnet after %d attempts (%w): %w",
				self.Name, attempt, context.Cause(ctx), lastErr)
		}
		bo = s.nextBackoff(bo)
	}
}

// ensureConfig creates <prefix>/config if absent, else checks it matches.
func (s *Store) ensureConfig(ctx context.Context) error {
	if s.configOK.Load() {
		return nil
	}
	want := clusterConfig{ClusterCIDR: s.cfg.ClusterCIDR, SubnetLen: s.cfg.SubnetLen}
	b, err := json.Marshal(want)
	if err != nil {
		return err
	}
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	resp, err := s.cli.Txn(octx).
		If(clientv3.Compare(clientv3.CreateRevision(s.configKey), "=", 0)).
		Then(clientv3.OpPut(s.configKey, string(b))).
		Else(clientv3.OpGet(s.configKey)).
		Commit()
	if err != nil {
		return s.etcdErr(ctx, "create or read "+s.configKey, err)
	}
	if resp.Succeeded {
		s.log.Info("initialised cluster config", "key", s.configKey, "clusterCIDR", want.ClusterCIDR, "subnetLen", want.SubnetLen)
		s.configOK.Store(true)
		return nil
	}
	kvs := resp.Responses[0].GetResponseRange().GetKvs()
	if len(kvs) == 0 { // deleted between the compare and the get of one txn: impossible, but retry
		return fmt.Errorf("etcd key %s vanished; retrying", s.configKey)
	}
	var got clusterConfig
	if err := json.Unmarshal(kvs[0].Value, &got); err != nil {
		return permanentError{fmt.Errorf("%w: etcd key %s holds %q, which is not a cluster config: %v",
			ErrConfigMismatch, s.configKey, kvs[0].Value, err)}
	}
	if got != want {
		return permanentError{fmt.Errorf("%w: etcd key %s says clusterCIDR=%s subnetLen=%d, "+
			"but this agent is configured with clusterCIDR=%s subnetLen=%d; "+
			"make the agent's configuration match (all nodes must agree)",
			ErrConfigMismatch, s.configKey, got.ClusterCIDR, got.SubnetLen, want.ClusterCIDR, want.SubnetLen)}
	}
	s.configOK.Store(true)
	return nil
}

// claimOnce is one attempt: list, pick, claim in a transaction; re-list
// after a lost race.
func (s *Store) claimOnce(ctx context.Context, self datastore.NodeInfo) (c claim, err error) {
	if err := s.ensureConfig(ctx); err != nil {
		return claim{}, err
	}
	var leaseID clientv3.LeaseID // granted once a candidate exists; revoked if unused
	defer func() {
		if err != nil && leaseID != 0 {
			s.revoke(ctx, leaseID)
		}
	}()
	pref := self.PreferredSubnet
	if pref.IsValid() {
		if _, perr := s.parseKey(s.key(pref)); perr != nil {
			s.log.Warn("ignoring preferred subnet", "node", self.Name, "subnet", pref, "err", perr)
			pref = netip.Prefix{}
		}
	}
	for race := 0; race < 100; race++ {
		octx, cancel := context.WithTimeout(ctx, s.opTimeout)
		resp, err := s.cli.Get(octx, s.subnetsKey, clientv3.WithPrefix())
		cancel()
		if err != nil {
			return claim{}, s.etcdErr(ctx, "list subnets", err)
		}
		taken := make(map[netip.Prefix]bool, len(resp.Kvs))
		var own *mvccpb.KeyValue
		var ownSubnet netip.Prefix
		for _, kv := range resp.Kvs {
			p, err := s.parseKey(string(kv.Key))
			if err != nil {
				continue // not a subnet of this cluster: Watch logs it
			}
			taken[p] = true
			var l datastore.Lease
			if json.Unmarshal(kv.Value, &l) == nil && l.Node == self.Name && (own == nil || p == pref) {
				own, ownSubnet = kv, p
			}
		}

		var p netip.Prefix
		var cmp clientv3.Cmp
		switch {
		case own != nil: // ours from before (a restart): take it over with a new lease and new info
			p, cmp = ownSubnet, clientv3.Compare(clientv3.ModRevision(string(own.Key)), "=", own.ModRevision)
		case pref.IsValid() && !taken[pref]:
			p, cmp = pref, clientv3.Compare(clientv3.CreateRevision(s.key(pref)), "=", 0)
		default:
			for i := range s.nSubnets {
				if q := s.subnet(i); !taken[q] {
					p = q
					break
				}
			}
			if !p.IsValid() {
				return claim{}, fmt.Errorf("%w: all %d /%d subnets of %s are leased",
					datastore.ErrExhausted, s.nSubnets, s.cfg.SubnetLen, s.cfg.ClusterCIDR)
			}
			cmp = clientv3.Compare(clientv3.CreateRevision(s.key(p)), "=", 0)
		}

		if leaseID == 0 {
			if leaseID, err = s.grant(ctx); err != nil {
				return claim{}, err
			}
		}
		c := claim{lease: self.Lease(p), key: s.key(p), leaseID: leaseID}
		ok, err := s.put(ctx, c, cmp)
		if err != nil {
			return claim{}, err
		}
		if ok {
			return c, nil
		}
		s.log.Debug("lost a race for a subnet; re-listing", "node", self.Name, "subnet", p)
	}
	return claim{}, errors.New("lost 100 races for a subnet in a row; backing off")
}

func (s *Store) grant(ctx context.Context) (clientv3.LeaseID, error) {
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	g, err := s.cli.Grant(octx, s.ttlSeconds)
	if err != nil {
		return 0, s.etcdErr(ctx, "grant lease", err)
	}
	return g.ID, nil
}

// revoke is best effort: an unused lease expires on its own anyway.
func (s *Store) revoke(ctx context.Context, id clientv3.LeaseID) {
	octx, cancel := context.WithTimeout(context.WithoutCancel(ctx), min(s.opTimeout, time.Second))
	defer cancel()
	_, _ = s.cli.Revoke(octx, id)
}

// put writes c under the compare; false if the compare failed.
func (s *Store) put(ctx context.Context, c claim, cmp clientv3.Cmp) (bool, error) {
	b, err := json.Marshal(c.lease)
	if err != nil {
		return false, err
	}
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	defer cancel()
	resp, err := s.cli.Txn(octx).If(cmp).Then(clientv3.OpPut(c.key, string(b), clientv3.WithLease(c.leaseID))).Commit()
	if err != nil {
		return false, s.etcdErr(ctx, "claim "+c.key, err)
	}
	return resp.Succeeded, nil
}

// ---- keeping the claim ----

// maintain keeps c alive until ctx ends, re-establishing it after the
// keepalive stream ends.
func (s *Store) maintain(ctx context.Context, self datastore.NodeInfo, c claim) {
	defer s.held.Store(false)
	log := s.log.With("node", self.Name, "subnet", c.lease.Subnet)
	for {
		s.keep(ctx, log, c)
		s.held.Store(false)
		if ctx.Err() != nil {
			return // do not revoke: a restarted agent takes its key back
		}
		bo := s.minBackoff
		var lastTaker string
		for {
			nc, err := s.reclaim(ctx, self, c)
			if err == nil {
				c = nc
				s.held.Store(true)
				log.Info("subnet lease re-established")
				break
			}
			var taken takenError
			switch {
			case ctx.Err() != nil:
				return
			case errors.As(err, &taken):
				if taken.node != lastTaker {
					log.Error("another node now holds this node's subnet (our lease expired while we could not renew it); "+
						"not touching it, LeaseHeld stays false; restart the agent to claim a new subnet",
						"holder", taken.node, "key", c.key)
					lastTaker = taken.node
				}
			default:
				log.Warn("cannot re-establish subnet lease yet; will retry", "retryIn", bo, "err", err)
			}
			if !datastore.Sleep(ctx, bo) {
				return
			}
			bo = s.nextBackoff(bo)
		}
	}
}

// keep runs the keepalive stream and confirms the key every probeEvery;
// it returns (with held false) when the stream ends, the key is lost, or
// ctx ends.
func (s *Store) keep(ctx context.Context, log *slog.Logger, c claim) {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	ch, err := s.cli.KeepAlive(kctx, c.leaseID)
	if err != nil {
		log.Warn("cannot start lease keepalive", "err", err)
		return
	}
	t := time.NewTicker(s.probeEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-ch:
			if !ok {
				if ctx.Err() == nil {
					log.Warn("lease keepalive ended (lease expired or etcd unreachable for longer than its TTL); re-establishing")
				}
				return
			}
		case <-t.C:
			lost, err := s.probe(ctx, c)
			switch {
			case err != nil:
				if s.held.Swap(false) {
					log.Warn("etcd unreachable; the subnet lease is unconfirmed until it returns", "err", err)
				}
			case lost != "":
				log.Warn("subnet key lost; re-establishing", "why", lost)
				s.revoke(ctx, c.leaseID)
				return
			default:
				if !s.held.Swap(true) {
					log.Info("etcd reachable again; subnet lease confirmed")
				}
			}
		}
	}
}

// probe reads the node's key: err if etcd did not answer, lost non-empty
// if the key is gone or belongs to another node.
func (s *Store) probe(ctx context.Context, c claim) (lost string, err error) {
	octx, cancel := context.WithTimeout(ctx, min(s.opTimeout, s.probeEvery))
	defer cancel()
	resp, err := s.cli.Get(octx, c.key)
	if err != nil {
		return "", err
	}
	if len(resp.Kvs) == 0 {
		return "key " + c.key + " was deleted", nil
	}
	var l datastore.Lease
	if err := json.Unmarshal(resp.Kvs[0].Value, &l); err != nil || l.Node != c.lease.Node {
		return fmt.Sprintf("key %s now holds %q", c.key, resp.Kvs[0].Value), nil
	}
	// Same node name under another lease: another instance of this node
	// (a restart) took over; it is still this node's subnet.
	return "", nil
}

type takenError struct{ node string }

func (e takenError) Error() string { return "subnet is held by node " + e.node }

// reclaim re-grants and re-puts the node's key if it is absent or still
// this node's.
func (s *Store) reclaim(ctx context.Context, self datastore.NodeInfo, old claim) (claim, error) {
	octx, cancel := context.WithTimeout(ctx, s.opTimeout)
	resp, err := s.cli.Get(octx, old.key)
	cancel()
	if err != nil {
		return claim{}, s.etcdErr(ctx, "read "+old.key, err)
	}
	cmp := clientv3.Compare(clientv3.CreateRevision(old.key), "=", 0)
	if len(resp.Kvs) > 0 {
		var l datastore.Lease
		if err := json.Unmarshal(resp.Kvs[0].Value, &l); err != nil || l.Node != self.Name {
			return claim{}, takenError{node: l.Node}
		}
		cmp = clientv3.Compare(clientv3.ModRevision(old.key), "=", resp.Kvs[0].ModRevision)
	}
	id, err := s.grant(ctx)
	if err != nil {
		return claim{}, err
	}
	c := claim{lease: old.lease, key: old.key, leaseID: id}
	ok, err := s.put(ctx, c, cmp)
	if err != nil || !ok {
		s.revoke(ctx, id)
		if err == nil {
			err = errors.New("key " + old.key + " changed while re-establishing; retrying")
		}
		return claim{}, err
	}
	return c, nil
}

// ---- Watch ----

// Watch sends the complete set of leases now and after every change. The
// channel holds one snapshot; a newer one replaces an unread one. While
// etcd is unreachable nothing is sent. The channel is closed when ctx ends.
func (s *Store) Watch(ctx context.Context) (<-chan []datastore.Lease, error) {
	out := make(chan []datastore.Lease, 1)
	if err := s.bg.Go(ctx, func(ctx context.Context) {
		defer close(out)
		s.watch(ctx, out)
	}); err != nil {
		return nil, err
	}
	return out, nil
}

func (s *Store) watch(ctx context.Context, out chan []datastore.Lease) {
	var sent []datastore.Lease
	sentAny := false
	offer := func(m map[string]datastore.Lease) {
		snap := snapshot(m)
		if sentAny && slices.Equal(snap, sent) {
			return
		}
		sent, sentAny = snap, true
		datastore.SendLatest(out, snap)
	}
	bad := map[string]bool{} // keys already logged as unparsable
	parse := func(kv *mvccpb.KeyValue) (datastore.Lease, bool) {
		l, err := s.parseKV(kv)
		if err != nil {
			if k := string(kv.Key) + "@" + strconv.FormatInt(kv.ModRevision, 10); !bad[k] {
				bad[k] = true
				s.log.Warn("ignoring malformed lease key", "key", string(kv.Key), "err", err)
			}
			return datastore.Lease{}, false
		}
		return l, true
	}

	bo := s.minBackoff
	failing := false
	for ctx.Err() == nil {
		octx, cancel := context.WithTimeout(ctx, s.opTimeout)
		resp, err := s.cli.Get(octx, s.subnetsKey, clientv3.WithPrefix())
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			if !failing {
				s.log.Warn("cannot list leases; keeping the last known set until etcd answers", "err", s.etcdErr(ctx, "list", err))
				failing = true
			}
			if !datastore.Sleep(ctx, bo) {
				return
			}
			bo = s.nextBackoff(bo)
			continue
		}
		if failing {
			s.log.Info("listing leases again")
			failing = false
		}
		bo = s.minBackoff
		m := make(map[string]datastore.Lease, len(resp.Kvs))
		for _, kv := range resp.Kvs {
			if l, ok := parse(kv); ok {
				m[string(kv.Key)] = l
			}
		}
		offer(m)

		wctx, wcancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
		wch := s.cli.Watch(wctx, s.subnetsKey, clientv3.WithPrefix(), clientv3.WithRev(resp.Header.Revision+1))
		for wr := range wch {
			if err := wr.Err(); err != nil {
				if ctx.Err() == nil {
					s.log.Warn("lease watch interrupted; re-listing", "err", err)
				}
				break
			}
			changed := false
			for _, ev := range wr.Events {
				k := string(ev.Kv.Key)
				switch ev.Type {
				case clientv3.EventTypeDelete:
					if _, ok := m[k]; ok {
						delete(m, k)
						changed = true
					}
				case clientv3.EventTypePut:
					if l, ok := parse(ev.Kv); ok {
						m[k] = l
						changed = true
					} else if _, ok := m[k]; ok {
						delete(m, k)
						changed = true
					}
				}
			}
			if changed {
				offer(m)
			}
		}
		wcancel()
		if ctx.Err() == nil && !datastore.Sleep(ctx, s.minBackoff) {
			return
		}
	}
}

func snapshot(m map[string]datastore.Lease) []datastore.Lease {
	out := make([]datastore.Lease, 0, len(m))
	for _, l := range m {
		out = append(out, l)
	}
	datastore.SortLeases(out)
	return out
}
