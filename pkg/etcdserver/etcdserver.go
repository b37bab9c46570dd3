// Package etcdserver runs a single-member etcd inside the process, for the
// lab and for tests. It is a thin wrapper over go.etcd.io/etcd/server/v3/embed
// with fast raft timings (10 ms ticks, 100 ms election) and quiet logging.
// Starting again with the same Dir keeps the data.
package etcdserver

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/url"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
)

// Config describes one embedded etcd member.
type Config struct {
	// Dir is the data directory (required). Reusing it restarts the member
	// with its data.
	Dir string
	// ClientURL and PeerURL are http URLs to listen on, e.g.
	// "http://127.0.0.1:2379". Empty: a free loopback port is chosen.
	ClientURL string
	PeerURL   string
	// Logger receives etcd's errors (not its chatty info and warnings,
	// nor anything logged while stopping); nil discards them.
	Logger *slog.Logger
	// UnsafeNoFsync skips fsync: faster, but a machine crash may lose
	// data. Fine for tests.
	UnsafeNoFsync bool
}

// Server is a running embedded etcd.
type Server struct {
	e         *embed.Etcd
	clientURL url.URL
	peerURL   url.URL
	stopping  *atomic.Bool
	grpcMu    sync.Mutex
	grpc      []*grpc.Server
	stopOnce  sync.Once
	stopErr   error
}

// Start starts the member and waits until it serves clients (or ctx ends).
func Start(ctx context.Context, c Config) (*Server, error) {
	if c.Dir == "" {
		return nil, errors.New("etcdserver: Dir is required")
	}
	// Ports picked here may be taken by someone else before etcd binds
	// them: pick again a few times. Explicit URLs are tried once.
	auto := c.ClientURL == "" || c.PeerURL == ""
	for attempt := 0; ; attempt++ {
		s, err := start(ctx, c)
		if err == nil || !auto || attempt == 4 || !errors.Is(err, syscall.EADDRINUSE) {
			return s, err
		}
	}
}

func start(ctx context.Context, c Config) (*Server, error) {
	cu, err := urlOrFree(c.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("etcdserver: client URL: %w", err)
	}
	pu, err := urlOrFree(c.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("etcdserver: peer URL: %w", err)
	}

	cfg := embed.NewConfig()
	cfg.Name = "flatnet"
	cfg.Dir = c.Dir
	cfg.TickMs = 10
	cfg.ElectionMs = 100
	cfg.UnsafeNoFsync = c.UnsafeNoFsync
	cfg.ListenClientUrls = []url.URL{cu}
	cfg.AdvertiseClientUrls = []url.URL{cu}
	cfg.ListenPeerUrls = []url.URL{pu}
	cfg.AdvertisePeerUrls = []url.URL{pu}
	cfg.InitialCluster = cfg.InitialClusterFromName(cfg.Name)
	stopping := new(atomic.Bool)
	cfg.Logger = "zap"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(zapLogger(c.Logger, stopping))

	s := &Server{clientURL: cu, peerURL: pu, stopping: stopping}
	cfg.ServiceRegister = func(gs *grpc.Server) {
		s.grpcMu.Lock()
		defer s.grpcMu.Unlock()
		s.grpc = append(s.grpc, gs)
	}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcdserver: start in %s: %w", c.Dir, err)
	}
	s.e = e
	select {
	case <-e.Server.ReadyNotify():
		return s, nil
	case err := <-e.Err():
		s.Stop()
		return nil, fmt.Errorf("etcdserver: start in %s: %w", c.Dir, err)
	case <-ctx.Done():
		s.Stop()
		return nil, fmt.Errorf("etcdserver: waiting for etcd to become ready: %w", ctx.Err())
	}
}

// ClientURL is the URL clients connect to, e.g. "http://127.0.0.1:40123".
func (s *Server) ClientURL() string { return s.clientURL.String() }

// PeerURL is the raft peer URL.
func (s *Server) PeerURL() string { return s.peerURL.String() }

// Stop shuts the member down and returns once its client and peer ports
// can be bound again. Client connections are cut at once, like a crash as
// clients see it (a graceful stop would wait 5s for their watch and
// keepalive streams); the data on disk is consistent. Calling it again is
// a no-op.
func (s *Server) Stop() error {
	s.stopOnce.Do(func() {
		s.stopping.Store(true) // shutdown errors ("use of closed network connection") are noise
		s.grpcMu.Lock()
		for _, gs := range s.grpc {
			gs.Stop()
		}
		s.grpcMu.Unlock()
		s.e.Close()
		<-s.e.Server.StopNotify()
		s.stopErr = errors.Join(waitFree(s.clientURL.Host), waitFree(s.peerURL.Host))
	})
	return s.stopErr
}

// FreeURL returns "http://127.0.0.1:<port>" with a port that was free when
// it was chosen.
func FreeURL() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return "http://" + l.Addr().String(), nil
}

func urlOrFree(s string) (url.URL, error) {
	if s == "" {
		var err error
		if s, err = FreeURL(); err != nil {
			return url.URL{}, err
		}
	}
	u, err := url.Parse(s)
	if err != nil {
		return url.URL{}, err
	}
	if u.Scheme != "http" || u.Port() == "" {
		return url.URL{}, fmt.Errorf("%q: want http://host:port", s)
	}
	return *u, nil
}

// waitFree polls until host:port can be bound (the listener is closed).
func waitFree(hostport string) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, err := net.Listen("tcp", hostport)
		if err == nil {
			return l.Close()
		}
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return fmt.Errorf("etcdserver: port %s still busy after stop: %w", hostport, err)
		}
		time.Sleep(10 * time.Millisecond) // polling a socket, not synchronising goroutines
	}
}

// zapLogger forwards etcd's errors to l (nothing if l is nil or once
// stopping is set).
func zapLogger(l *slog.Logger, stopping *atomic.Bool) *zap.Logger {
	if l == nil {
		return zap.NewNop()
	}
	return zap.New(&slogCore{h: l.Handler(), stopping: stopping})
}

type slogCore struct {
	h        slog.Handler
	stopping *atomic.Bool
	attrs    []slog.Attr
}

func (c *slogCore) Enabled(l zapcore.Level) bool { return l >= zapcore.ErrorLevel }

func (c *slogCore) With(fs []zapcore.Field) zapcore.Core {
	return &slogCore{h: c.h, stopping: c.stopping, attrs: append(c.attrs[:len(c.attrs):len(c.attrs)], toAttrs(fs)...)}
}

func (c *slogCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if c.Enabled(e.Level) && !c.stopping.Load() {
		return ce.AddCore(e, c)
	}
	return ce
}

func (c *slogCore) Write(e zapcore.Entry, fs []zapcore.Field) error {
	r := slog.NewRecord(e.Time, slog.LevelError, "etcd: "+e.Message, 0)
	r.AddAttrs(c.attrs...)
	r.AddAttrs(toAttrs(fs)...)
	return c.h.Handle(context.Background(), r)
}

func (c *slogCore) Sync() error { return nil }

func toAttrs(fs []zapcore.Field) []slog.Attr {
	enc := zapcore.NewMapObjectEncoder()
	for _, f := range fs {
		f.AddTo(enc)
	}
	out := make([]slog.Attr, 0, len(enc.Fields))
	for _, k := range slices.Sorted(maps.Keys(enc.Fields)) {
		out = append(out, slog.Any(k, enc.Fields[k]))
	}
	return out
}
