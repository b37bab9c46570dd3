package datastore

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"
)

// Group runs a store's background goroutines (keepalives, watches) so that
// the store's Close can end them all and wait for them.
type Group struct {
	mu     sync.Mutex // guards closed and wg.Add
	closed bool
	wg     sync.WaitGroup
	stop   context.Context
	cancel context.CancelFunc
}

// NewGroup returns an open Group.
func NewGroup() *Group {
	g := &Group{}
	g.stop, g.cancel = context.WithCancel(context.Background())
	return g
}

// Stopped is a context that ends on Close.
func (g *Group) Stopped() context.Context { return g.stop }

// Go runs f in a goroutine with a context that ends with ctx or on Close.
func (g *Group) Go(ctx context.Context, f func(context.Context)) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return errors.New("datastore: store is closed")
	}
	ctx, cancel := context.WithCancel(ctx)
	stop := context.AfterFunc(g.stop, cancel)
	g.wg.Add(1)
	go func() {
		defer g.wg.Done()
		defer cancel()
		defer stop()
		f(ctx)
	}()
	return nil
}

// Close ends every goroutine's context and waits for them. It reports
// false if the Group was already closed.
func (g *Group) Close() bool {
	g.mu.Lock()
	already := g.closed
	g.closed = true
	g.mu.Unlock()
	if already {
		return false
	}
	g.cancel()
	g.wg.Wait()
	return true
}

// Sleep waits d with ±20% jitter (so retrying nodes spread out); false if
// ctx ended first.
func Sleep(ctx context.Context, d time.Duration) bool {
	d = time.Duration(float64(d) * (0.8 + 0.4*rand.Float64()))
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
