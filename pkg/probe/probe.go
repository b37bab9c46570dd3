// Package probe checks what matters in a flat pod network: that a TCP
// connection gets through, and which source address the receiver saw.
// Sockets are opened inside a network namespace from this process (a socket
// stays in the namespace it was created in), so one process can test any
// pair of pods, nodes or hosts without running helpers inside them.
package probe

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
)

// Listen opens a TCP listener inside h.
func Listen(h ns.NetNS, addr string) (net.Listener, error) {
	var ln net.Listener
	err := h.Do(func(ns.NetNS) (err error) {
		ln, err = net.Listen("tcp4", addr)
		return err
	})
	return ln, err
}

// Dial connects from inside h. The socket is created in h; the connect
// itself may complete on any thread.
func Dial(ctx context.Context, h ns.NetNS, addr string) (net.Conn, error) {
	var c net.Conn
	err := h.Do(func(ns.NetNS) (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	return c, err
}

// ServeWhoAmI answers every connection with the address it came from
// ("1.2.3.4:5678\n") and closes it, until ln is closed.
func ServeWhoAmI(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			c.SetDeadline(time.Now().Add(5 * time.Second))
			fmt.Fprintf(c, "%s\n", c.RemoteAddr())
		}()
	}
}

// WhoAmI connects from h to a ServeWhoAmI server and returns the source
// address the server saw, and the one this side used.
func WhoAmI(ctx context.Context, h ns.NetNS, addr string) (seen, local netip.Addr, err error) {
	c, err := Dial(ctx, h, addr)
	if err != nil {
		return seen, local, err
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return seen, local, fmt.Errorf("read from %s: %w", addr, err)
	}
	ap, err := netip.ParseAddrPort(strings.TrimSpace(line))
	if err != nil {
		return seen, local, fmt.Errorf("bad answer %q: %w", line, err)
	}
	return ap.Addr().Unmap(), c.LocalAddr().(*net.TCPAddr).AddrPort().Addr().Unmap(), nil
}

// ExpectSource connects from h to addr and fails unless the server saw want.
func ExpectSource(ctx context.Context, h ns.NetNS, addr string, want netip.Addr) error {
	seen, _, err := WhoAmI(ctx, h, addr)
	if err != nil {
		return err
	}
	if seen != want {
		return fmt.Errorf("server %s saw source %s, want %s", addr, seen, want)
	}
	return nil
}
