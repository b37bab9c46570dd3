// Package kube keeps flatnet's node data in the Kubernetes API, on the
// Node objects themselves:
//
//   - a node's pod subnet is its Node's spec.podCIDR(s), allocated by
//     kube-controller-manager (--allocate-node-cidrs); the agent never picks one;
//   - the agent publishes what peers need as annotations on its own Node
//     (flatnet.io/underlay-ip, flatnet.io/backend, flatnet.io/backend-data),
//     and sets the condition NetworkUnavailable=False once its data plane is up
//     (MarkReady), both with one patch of the nodes/status subresource;
//   - peers come from a Node informer: every add, update and delete recomputes
//     the whole set, the same level-triggered snapshots as the etcd store.
//
// RBAC: nodes get, list, watch; nodes/status patch (deploy/flatnet.yaml).
package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// Config configures a Store.
type Config struct {
	// Kubeconfig is a kubeconfig file; empty means in-cluster config (the
	// DaemonSet's service account). REST, if set, is used instead of both.
	Kubeconfig string
	REST       *rest.Config
	// ClusterCIDR is the pod network of the whole cluster: it must match
	// kube-controller-manager's --cluster-cidr, so every podCIDR is inside.
	ClusterCIDR netip.Prefix
	// ConfirmEvery is how often the node's own data is read back from the
	// API (LeaseHeld) and repaired if it went missing (default 10s).
	ConfirmEvery time.Duration
	// Logger (default slog.Default()).
	Logger *slog.Logger
}

// DefaultConfirmEvery is Config.ConfirmEvery's default.
const DefaultConfirmEvery = 10 * time.Second

// ErrOutsideClusterCIDR means the Node's podCIDR is not inside the agent's
// cluster CIDR: flatnet's and kube-controller-manager's settings differ.
var ErrOutsideClusterCIDR = errors.New("podCIDR is outside the cluster CIDR")

// Store is a datastore.Datastore backed by the Kubernetes API.
type Store struct {
	cfg      Config
	client   kubernetes.Interface
	log      *slog.Logger
	informer cache.SharedIndexInformer
	nodes    corelisters.NodeLister
	factory  informers.SharedInformerFactory

	// Timing knobs; tests shorten them.
	minBackoff, maxBackoff time.Duration

	held       atomic.Bool
	ready      atomic.Bool // MarkReady was called: the condition is published too
	registered atomic.Bool
	kick       chan struct{} // asks the keeper to publish now (MarkReady)

	mu    sync.Mutex // guards self, lease
	self  datastore.NodeInfo
	lease datastore.Lease

	startOnce sync.Once
	bg        *datastore.Group
}

var _ datastore.Datastore = (*Store)(nil)

// New builds the client and the Node informer. It does not contact the
// API: an unreachable or forbidding API shows up (and is retried) in
// Register and Watch.
func New(cfg Config) (*Store, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ConfirmEvery == 0 {
		cfg.ConfirmEvery = DefaultConfirmEvery
	}
	if err := cidr.ValidateNetwork("cluster CIDR", cfg.ClusterCIDR); err != nil {
		return nil, fmt.Errorf("kubernetes datastore: %w", err)
	}
	rc := cfg.REST
	if rc == nil {
		var err error
		// An empty path falls back to the in-cluster config.
		if rc, err = clientcmd.BuildConfigFromFlags("", cfg.Kubeconfig); err != nil {
			return nil, fmt.Errorf("kubernetes datastore: client config (kubeconfig %q): %w", cfg.Kubeconfig, err)
		}
	}
	rc = rest.CopyConfig(rc)
	rc.UserAgent = "flatnetd"
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes datastore: %w", err)
	}
	s := &Store{
		cfg:        cfg,
		client:     client,
		log:        cfg.Logger.With("datastore", "kubernetes"),
		minBackoff: 500 * time.Millisecond,
		maxBackoff: 10 * time.Second,
		kick:       make(chan struct{}, 1),
	}
	s.bg = datastore.NewGroup()
	// Resync 0: the agent has its own resync; the informer only reports changes.
	s.factory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(trimNode))
	s.informer = s.factory.Core().V1().Nodes().Informer()
	s.nodes = s.factory.Core().V1().Nodes().Lister()
	err = s.informer.SetWatchErrorHandlerWithContext(func(_ context.Context, _ *cache.Reflector, err error) {
		if s.bg.Stopped().Err() == nil {
			s.log.Warn("cannot list or watch Nodes; retrying (check the API server address and the RBAC rules in deploy/flatnet.yaml)", "err", err)
		}
	})
	if err != nil {
		return nil, err
	}
	return s, nil
}

// trimNode drops what flatnet never reads from the cached Nodes (image
// lists and managed fields are most of a Node's size).
func trimNode(obj any) (any, error) {
	if n, ok := obj.(*corev1.Node); ok {
		n.ManagedFields = nil
		n.Status.Images = nil
	}
	return obj, nil
}

// Close stops the informer and the keeper and waits for them. The Node's
// annotations and condition stay: a restarted agent finds them.
func (s *Store) Close() error {
	if s.bg.Close() {
		s.factory.Shutdown()
		s.held.Store(false)
	}
	return nil
}

// LeaseHeld reports whether the API last confirmed this node's podCIDR
// and published data.
func (s *Store) LeaseHeld() bool { return s.held.Load() }

// startInformer starts the Node informer once.
func (s *Store) startInformer() { s.startOnce.Do(func() { s.factory.Start(s.bg.Stopped().Done()) }) }

// onChange calls f after every informer event for which match is true,
// until the returned function is called.
func (s *Store) onChange(match func(*corev1.Node) bool, f func()) (func(), error) {
	check := func(obj any) {
		if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = tomb.Obj
		}
		if n, ok := obj.(*corev1.Node); !ok || match(n) {
			f()
		}
	}
	reg, err := s.informer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    check,
		UpdateFunc: func(_, obj any) { check(obj) },
		DeleteFunc: check,
	})
	if err != nil {
		return nil, err
	}
	return func() { _ = s.informer.RemoveEventHandler(reg) }, nil
}

func signal(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

// waitSynced waits for the informer's first list; false if ctx ended.
func (s *Store) waitSynced(ctx context.Context) bool {
	return cache.WaitForCacheSync(ctx.Done(), s.informer.HasSynced)
}

// ---- Register ----

// Register waits until the node's Node object exists and has a podCIDR
// (driven by informer events, saying in the log what it waits for),
// publishes the node's annotations, and keeps them published until ctx
// ends. PreferredSubnet is only compared: the podCIDR is the API's choice.
// Errors are returned for a podCIDR outside the cluster CIDR and when ctx
// ends first.
func (s *Store) Register(ctx context.Context, self datastore.NodeInfo) (datastore.Lease, error) {
	if err := self.Validate(); err != nil {
		return datastore.Lease{}, fmt.Errorf("kubernetes datastore: %w", err)
	}
	if !s.registered.CompareAndSwap(false, true) {
		return datastore.Lease{}, errors.New("kubernetes datastore: Register called twice on one Store")
	}
	keepCtx := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(s.bg.Stopped(), cancel)()
	log := s.log.With("node", self.Name)

	subnet, err := s.waitPodCIDR(ctx, log, self.Name)
	if err != nil {
		s.registered.Store(false)
		return datastore.Lease{}, err
	}
	if p := self.PreferredSubnet; p.IsValid() && p != subnet {
		log.Warn("the Node's podCIDR differs from the subnet this node had before (was the Node re-created?)",
			"podCIDR", subnet, "before", p)
	}
	lease := self.Lease(subnet)
	s.mu.Lock()
	s.self, s.lease = self, lease
	s.mu.Unlock()

	bo := s.minBackoff
	for attempt := 1; ; attempt++ {
		err := s.publish(ctx)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			s.registered.Store(false)
			return datastore.Lease{}, fmt.Errorf("node %q: cannot publish its annotations (%w): %w", self.Name, context.Cause(ctx), err)
		}
		log.Warn("cannot publish this node's annotations yet; will retry", "attempt", attempt, "retryIn", bo, "err", err)
		if !datastore.Sleep(ctx, bo) {
			continue // the next attempt fails fast and returns
		}
		bo = min(2*bo, s.maxBackoff)
	}
	s.held.Store(true)
	log.Info("holding the Node's podCIDR; annotations published", "subnet", subnet, "underlayIP", lease.UnderlayIP, "backend", lease.Backend)
	if err := s.bg.Go(keepCtx, s.keep); err != nil {
		s.held.Store(false)
		s.registered.Store(false)
		return datastore.Lease{}, err
	}
	return lease, nil
}

// waitPodCIDR returns the Node's podCIDR once it has one, woken by
// informer events for that Node; it logs what it is waiting for when that
// changes and every 30s.
func (s *Store) waitPodCIDR(ctx context.Context, log *slog.Logger, name string) (netip.Prefix, error) {
	changed := make(chan struct{}, 1)
	done, err := s.onChange(func(n *corev1.Node) bool { return n.Name == name }, func() { signal(changed) })
	if err != nil {
		return netip.Prefix{}, err
	}
	defer done()
	s.startInformer()
	if !s.waitSynced(ctx) {
		return netip.Prefix{}, fmt.Errorf("node %q: no Node list from the API server (%w)", name, context.Cause(ctx))
	}
	remind := time.NewTicker(30 * time.Second)
	defer remind.Stop()
	start, said := time.Now(), ""
	for {
		var why string
		n, err := s.nodes.Get(name)
		switch {
		case apierrors.IsNotFound(err):
			why = "no Node object with this name yet; waiting for it (the kubelet registers it; --node-name must be the Node's name)"
		case err != nil:
			return netip.Prefix{}, err
		default:
			p, err := podSubnet(n)
			switch {
			case errors.Is(err, errNoPodCIDR):
				why = "the Node has no IPv4 podCIDR yet; waiting for kube-controller-manager (--allocate-node-cidrs) to assign one"
			case err != nil:
				return netip.Prefix{}, fmt.Errorf("node %q: %w", name, err)
			case !s.cfg.ClusterCIDR.Contains(p.Addr()) || p.Bits() < s.cfg.ClusterCIDR.Bits():
				return netip.Prefix{}, fmt.Errorf("node %q: %w: podCIDR %s, cluster CIDR %s: "+
					"flatnet's cluster CIDR must be kube-controller-manager's --cluster-cidr",
					name, ErrOutsideClusterCIDR, p, s.cfg.ClusterCIDR)
			default:
				return p, nil
			}
		}
		if why != said {
			log.Info(why)
			said = why
		}
		select {
		case <-changed:
		case <-remind.C:
			log.Info("still waiting: "+why, "for", time.Since(start).Round(time.Second))
		case <-ctx.Done():
			return netip.Prefix{}, fmt.Errorf("node %q: %s (%w)", name, why, context.Cause(ctx))
		}
	}
}

// publish patches the Node with this node's annotations (and the ready
// condition after MarkReady).
func (s *Store) publish(ctx context.Context) error {
	s.mu.Lock()
	self := s.self
	s.mu.Unlock()
	patch, err := publishPatch(self, s.ready.Load(), time.Now())
	if err != nil {
		return err
	}
	_, err = s.client.CoreV1().Nodes().Patch(ctx, self.Name, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status")
	return err
}

// MarkReady publishes NetworkUnavailable=False on the Node: the agent
// calls it once the data plane is up. The keeper republishes it if it goes
// missing, so an error here is only worth a log line.
func (s *Store) MarkReady(ctx context.Context) error {
	s.ready.Store(true)
	if err := s.publish(ctx); err != nil {
		signal(s.kick)
		return fmt.Errorf("kubernetes datastore: set NetworkUnavailable=False: %w", err)
	}
	return nil
}

// keep confirms the node's data every ConfirmEvery (or when asked) until
// ctx ends, republishing what went missing.
func (s *Store) keep(ctx context.Context) {
	defer s.held.Store(false)
	s.mu.Lock()
	log := s.log.With("node", s.self.Name, "subnet", s.lease.Subnet)
	s.mu.Unlock()
	t := time.NewTicker(s.cfg.ConfirmEvery)
	defer t.Stop()
	lastProblem := ""
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-s.kick:
		}
		problem := s.confirm(ctx)
		s.held.Store(problem == "")
		switch {
		case ctx.Err() != nil:
			return
		case problem != "" && problem != lastProblem:
			log.Warn("this node's data is not confirmed by the API: " + problem)
		case problem == "" && lastProblem != "":
			log.Info("this node's data is confirmed by the API again")
		}
		lastProblem = problem
	}
}

// confirm reads the Node back and republishes the annotations or the
// condition if they are missing (e.g. the Node was re-created by the
// kubelet). It returns what is wrong, or "".
func (s *Store) confirm(ctx context.Context) string {
	s.mu.Lock()
	self, lease := s.self, s.lease
	s.mu.Unlock()
	octx, cancel := context.WithTimeout(ctx, s.cfg.ConfirmEvery)
	defer cancel()
	// ResourceVersion "0": the API server answers from its watch cache,
	// so a cluster of agents confirming every few seconds costs etcd nothing.
	n, err := s.client.CoreV1().Nodes().Get(octx, self.Name, metav1.GetOptions{ResourceVersion: "0"})
	switch {
	case apierrors.IsNotFound(err):
		return "the Node object was deleted"
	case err != nil:
		return "cannot read the Node: " + err.Error()
	}
	if p, err := podSubnet(n); err != nil || p != lease.Subnet {
		return fmt.Sprintf("the Node's podCIDR is now %v (%v), not this agent's %s: restart the agent to use the new one",
			p, err, lease.Subnet)
	}
	if published(n, lease, s.ready.Load()) {
		return ""
	}
	if err := s.publish(octx); err != nil {
		return "cannot republish this node's annotations: " + err.Error()
	}
	s.log.Info("republished this node's annotations and condition", "node", self.Name)
	return ""
}

// ---- Watch ----

// Watch sends the complete set of leases once the informer has listed the
// Nodes, and again after every Node change that alters it. Nodes without
// a podCIDR or without flatnet's annotations (their agent has not
// started) are not in it. The channel holds one snapshot; a newer one
// replaces an unread one. It is closed when ctx ends.
func (s *Store) Watch(ctx context.Context) (<-chan []datastore.Lease, error) {
	out := make(chan []datastore.Lease, 1)
	changed := make(chan struct{}, 1)
	done, err := s.onChange(func(*corev1.Node) bool { return true }, func() { signal(changed) })
	if err != nil {
		return nil, err
	}
	if err := s.bg.Go(ctx, func(ctx context.Context) {
		defer close(out)
		defer done()
		s.startInformer()
		if !s.waitSynced(ctx) {
			return
		}
		var sent []datastore.Lease
		bad := map[string]bool{} // name@resourceVersion already logged as malformed
		for first := true; ; first = false {
			snap := s.snapshot(bad)
			if first || !slices.Equal(snap, sent) {
				sent = snap
				datastore.SendLatest(out, snap)
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return
			}
		}
	}); err != nil {
		done()
		return nil, err
	}
	return out, nil
}

// snapshot is the set of leases in the informer's cache.
func (s *Store) snapshot(bad map[string]bool) []datastore.Lease {
	nodes, _ := s.nodes.List(labels.Everything()) // a cache read: never fails
	out := make([]datastore.Lease, 0, len(nodes))
	for _, n := range nodes {
		l, err := leaseOf(n)
		if err == nil && !s.cfg.ClusterCIDR.Contains(l.Subnet.Addr()) {
			err = fmt.Errorf("%w: podCIDR %s, cluster CIDR %s", ErrOutsideClusterCIDR, l.Subnet, s.cfg.ClusterCIDR)
		}
		if err != nil {
			if k := n.Name + "@" + n.ResourceVersion; !errors.Is(err, errNoPodCIDR) && !errors.Is(err, errNotPublished) && !bad[k] {
				bad[k] = true
				s.log.Warn("ignoring a Node whose flatnet data is malformed", "peer", n.Name, "err", err)
			}
			continue
		}
		out = append(out, l)
	}
	datastore.SortLeases(out)
	return out
}
