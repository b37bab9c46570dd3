package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// metrics are the agent's Prometheus metrics and health state.
type metrics struct {
	reg             *prometheus.Registry
	leaseHeldNow    func() bool
	leaseHeld       prometheus.GaugeFunc
	peers           prometheus.Gauge
	peersProgrammed prometheus.Gauge
	peersFailed     prometheus.Gauge
	reconcileDur    prometheus.Histogram
	reconcileErrs   prometheus.Counter
	changes         *prometheus.CounterVec
	installs        *prometheus.CounterVec

	mu       sync.Mutex
	ready    bool
	notReady string
	lastLoop time.Time
	status   Status
}

// Status is what /status reports: this node and how it reaches each peer.
type Status struct {
	Node       string       `json:"node"`
	Subnet     string       `json:"subnet"`
	UnderlayIP string       `json:"underlayIP"`
	Backend    string       `json:"backend"`
	Ready      bool         `json:"ready"`
	LeaseHeld  bool         `json:"leaseHeld"`
	Peers      []PeerStatus `json:"peers"`
}

// PeerStatus is one peer as this node sees it.
type PeerStatus struct {
	Node       string `json:"node"`
	Subnet     string `json:"subnet"`
	UnderlayIP string `json:"underlayIP"`
	Mode       string `json:"mode,omitempty"` // direct or overlay, when programmed
	Programmed bool   `json:"programmed"`
	Error      string `json:"error,omitempty"`
}

func (m *metrics) setStatus(s Status) {
	m.mu.Lock()
	m.status = s
	m.mu.Unlock()
}

func newMetrics(leaseHeld func() bool, masqueraded func() float64) *metrics {
	m := &metrics{reg: prometheus.NewRegistry(), notReady: "starting", lastLoop: time.Now(), leaseHeldNow: leaseHeld}
	f := prometheus.NewGaugeFunc
	m.leaseHeld = f(prometheus.GaugeOpts{Name: "flatnet_lease_held", Help: "1 while the datastore confirms this node's subnet lease."},
		func() float64 {
			if leaseHeld() {
				return 1
			}
			return 0
		})
	m.peers = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flatnet_peers", Help: "Peer nodes known from the datastore."})
	m.peersProgrammed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flatnet_peers_programmed", Help: "Peer nodes whose route (and overlay entries) are in the kernel."})
	m.peersFailed = prometheus.NewGauge(prometheus.GaugeOpts{Name: "flatnet_peers_failed", Help: "Peer nodes that could not be programmed (see logs)."})
	m.reconcileDur = prometheus.NewHistogram(prometheus.HistogramOpts{Name: "flatnet_reconcile_duration_seconds", Help: "Time of one full reconcile (routes, overlay entries, NAT).",
		Buckets: prometheus.ExponentialBuckets(0.0001, 2, 16)})
	m.reconcileErrs = prometheus.NewCounter(prometheus.CounterOpts{Name: "flatnet_reconcile_errors_total", Help: "Reconciles that failed or left a peer unprogrammed."})
	m.changes = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flatnet_reconcile_changes_total", Help: "Kernel objects changed by reconciles, by kind (route_set, route_del, neigh_set, fdb_set, ...)."}, []string{"kind"})
	m.installs = prometheus.NewCounterVec(prometheus.CounterOpts{Name: "flatnet_cni_installs_total", Help: "Times the CNI binary or conflist was (re)installed."}, []string{"file"})
	masq := prometheus.NewCounterFunc(prometheus.CounterOpts{Name: "flatnet_masqueraded_packets_total", Help: "Packets masqueraded at the edge (new connections leaving the cluster)."}, masqueraded)
	m.reg.MustRegister(m.leaseHeld, m.peers, m.peersProgrammed, m.peersFailed, m.reconcileDur, m.reconcileErrs, m.changes, m.installs, masq,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// setReady records whether the node can serve pods, and why not.
func (m *metrics) setReady(ok bool, why string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.ready, m.notReady = ok, why
}

// alive records that the main loop is turning.
func (m *metrics) alive() {
	m.mu.Lock()
	m.lastLoop = time.Now()
	m.mu.Unlock()
}

// serve runs /healthz (the agent loop is alive: restarting it would not
// help anything else), /readyz (lease held and node set up) and /metrics.
func (m *metrics) serve(ctx context.Context, addr string, stuckAfter time.Duration, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) {
		m.mu.Lock()
		since := time.Since(m.lastLoop)
		m.mu.Unlock()
		if since > stuckAfter {
			http.Error(w, fmt.Sprintf("agent loop stuck for %s", since.Round(time.Second)), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		m.mu.Lock()
		ok, why := m.ready, m.notReady
		m.mu.Unlock()
		if !ok {
			http.Error(w, "not ready: "+why, http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/status", func(w http.ResponseWriter, _ *http.Request) {
		m.mu.Lock()
		st := m.status
		st.Ready = m.ready
		m.mu.Unlock()
		st.LeaseHeld = m.leaseHeldNow()
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(st)
	})
	mux.Handle("/metrics", promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{}))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("--listen %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		<-ctx.Done()
		srv.Close()
	}()
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("health/metrics server stopped", "err", err)
		}
	}()
	log.Info("serving /healthz, /readyz and /metrics", "addr", ln.Addr().String())
	return nil
}
