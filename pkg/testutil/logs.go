package testutil

import (
	"context"
	"fmt"
	"log/slog"
	"strings"
	"sync"
	"testing"
)

// Logs records what a component logs through slog, for tests that assert
// on log lines; a failed test prints them all.
type Logs struct {
	mu   sync.Mutex
	recs []string
	lvls []slog.Level
}

// NewLogs returns an empty recorder that dumps itself if t fails.
func NewLogs(t testing.TB) *Logs {
	l := &Logs{}
	t.Cleanup(func() {
		if t.Failed() {
			l.mu.Lock()
			defer l.mu.Unlock()
			for i, r := range l.recs {
				t.Logf("log %s: %s", l.lvls[i], r)
			}
		}
	})
	return l
}

// Logger logs into the recorder.
func (l *Logs) Logger() *slog.Logger { return slog.New(logHandler{l: l}) }

// Count is the number of records at lvl that contain all of subs.
func (l *Logs) Count(lvl slog.Level, subs ...string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
next:
	for i, r := range l.recs {
		if l.lvls[i] != lvl {
			continue
		}
		for _, s := range subs {
			if !strings.Contains(r, s) {
				continue next
			}
		}
		n++
	}
	return n
}

type logHandler struct {
	l     *Logs
	attrs []slog.Attr
}

func (h logHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h logHandler) WithGroup(string) slog.Handler            { return h }
func (h logHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return logHandler{l: h.l, attrs: append(h.attrs[:len(h.attrs):len(h.attrs)], as...)}
}

func (h logHandler) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	b.WriteString(r.Message)
	for _, a := range h.attrs {
		fmt.Fprintf(&b, " %s", a)
	}
	r.Attrs(func(a slog.Attr) bool { fmt.Fprintf(&b, " %s", a); return true })
	h.l.mu.Lock()
	defer h.l.mu.Unlock()
	h.l.recs = append(h.l.recs, b.String())
	h.l.lvls = append(h.l.lvls, r.Level)
	return nil
}
