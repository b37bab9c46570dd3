package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
)

var (
	subnet24 = netip.MustParsePrefix("10.244.1.0/24")
	gw24     = netip.MustParseAddr("10.244.1.1")
)

func key(i int) Key { return Key{ContainerID: fmt.Sprintf("c%03d", i), IfName: "eth0"} }

func TestAllocateDistinctSkipsReservedAndIsIdempotent(t *testing.T) {
	s, err := Open(t.TempDir(), "net1")
	if err != nil {
		t.Fatal(err)
	}
	a, err := s.Allocate(key(1), subnet24, gw24)
	if err != nil || a.String() != "10.244.1.2" {
		t.Fatalf("first allocation %s, %v", a, err)
	}
	again, err := s.Allocate(key(1), subnet24, gw24)
	if err != nil || again != a {
		t.Fatalf("retried ADD got %s, want %s (%v)", again, a, err)
	}
	b, _ := s.Allocate(key(2), subnet24, gw24)
	if b == a || b == gw24 {
		t.Fatalf("second allocation %s", b)
	}
	got, ok, err := s.Lookup(key(2))
	if !ok || err != nil || got != b {
		t.Fatalf("lookup %s %v %v", got, ok, err)
	}
}

func TestReleaseIsO1AndIdempotentAndRoundRobin(t *testing.T) {
	s, _ := Open(t.TempDir(), "net1")
	a, _ := s.Allocate(key(1), subnet24, gw24)
	ip, ok, err := s.Release(key(1))
	if err != nil || !ok || ip != a {
		t.Fatalf("release: %s %v %v", ip, ok, err)
	}
	if _, ok, err := s.Release(key(1)); ok || err != nil {
		t.Fatalf("second release: %v %v", ok, err)
	}
	if _, ok, err := s.Release(Key{"never", "eth0"}); ok || err != nil {
		t.Fatalf("release of unknown key: %v %v", ok, err)
	}
	// Round robin: the address just released is not handed out again at once.
	b, _ := s.Allocate(key(2), subnet24, gw24)
	if b == a {
		t.Fatalf("released address %s reused immediately", a)
	}
	entries, _ := os.ReadDir(s.Dir())
	for _, e := range entries {
		if e.Name() == "k:"+key(1).String() || e.Name() == "a:"+a.String() {
			t.Fatalf("record %s left after release", e.Name())
		}
	}
}

func TestExhaustionOfSlash29(t *testing.T) {
	s, _ := Open(t.TempDir(), "small")
	p := netip.MustParsePrefix("10.0.0.0/29")
	gw := netip.MustParseAddr("10.0.0.1")
	seen := map[netip.Addr]bool{}
	for i := 0; i < 5; i++ { // .2 .. .6
		ip, err := s.Allocate(key(i), p, gw)
		if err != nil {
			t.Fatalf("allocation %d: %v", i, err)
		}
		if seen[ip] || ip == gw || !p.Contains(ip) {
			t.Fatalf("bad address %s", ip)
		}
		seen[ip] = true
	}
	_, err := s.Allocate(key(99), p, gw)
	if !errors.Is(err, ErrExhausted) || err.Error() != "no free address in subnet 10.0.0.0/29" {
		t.Fatalf("want exhaustion naming the subnet, got %v", err)
	}
	if _, err := os.Lstat(filepath.Join(s.Dir(), "k:"+key(99).String())); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("failed allocation left a key record")
	}
}

func TestConcurrentAllocateNeverDoubleAssigns(t *testing.T) {
	dir := t.TempDir()
	const n = 200
	var wg sync.WaitGroup
	ips := make([]netip.Addr, n)
	errs := make([]error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			s, err := Open(dir, "net1") // separate handles, like separate plugin processes
			if err == nil {
				ips[i], err = s.Allocate(key(i), subnet24, gw24)
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	seen := map[netip.Addr]int{}
	for i, ip := range ips {
		if errs[i] != nil {
			t.Fatalf("allocate %d: %v", i, errs[i])
		}
		if j, dup := seen[ip]; dup {
			t.Fatalf("%s given to %d and %d", ip, i, j)
		}
		seen[ip] = i
	}
	s, _ := Open(dir, "net1")
	list, _ := s.List()
	if len(list) != n {
		t.Fatalf("list has %d reservations, want %d", len(list), n)
	}
}

func TestDanglingKeyFromCrashIsIgnoredAndPruned(t *testing.T) {
	s, _ := Open(t.TempDir(), "net1")
	// A crash between writing the key and the address record leaves this:
	if err := os.Symlink("10.244.1.9 "+key(7).String(), filepath.Join(s.Dir(), "k:"+key(7).String())); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := s.Lookup(key(7)); ok {
		t.Fatal("dangling key reported as a reservation")
	}
	if _, err := s.GC(func(Key) bool { return true }); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(filepath.Join(s.Dir(), "k:"+key(7).String())); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("dangling key not pruned by GC")
	}
}

func TestGCReleasesOnlyWhatIsNotKept(t *testing.T) {
	s, _ := Open(t.TempDir(), "net1")
	for i := 0; i < 4; i++ {
		s.Allocate(key(i), subnet24, gw24)
	}
	released, err := s.GC(func(k Key) bool { return k == key(0) || k == key(2) })
	if err != nil || len(released) != 2 {
		t.Fatalf("released %v, %v", released, err)
	}
	list, _ := s.List()
	if len(list) != 2 {
		t.Fatalf("left %v", list)
	}
	for _, r := range list {
		if r.Key != key(0) && r.Key != key(2) {
			t.Fatalf("kept the wrong reservation %v", r)
		}
	}
}

func TestAllocateMovesKeyToNewSubnet(t *testing.T) {
	s, _ := Open(t.TempDir(), "net1")
	old, _ := s.Allocate(key(1), subnet24, gw24)
	p2 := netip.MustParsePrefix("10.244.9.0/24")
	ip, err := s.Allocate(key(1), p2, netip.MustParseAddr("10.244.9.1"))
	if err != nil || !p2.Contains(ip) {
		t.Fatalf("got %s %v", ip, err)
	}
	if _, err := os.Lstat(filepath.Join(s.Dir(), "a:"+old.String())); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("old-subnet address not released")
	}
}

func TestReservationIsOneInodeUnderTwoNames(t *testing.T) {
	s, _ := Open(t.TempDir(), "net1")
	ip, err := s.Allocate(key(1), subnet24, gw24)
	if err != nil {
		t.Fatal(err)
	}
	a, err1 := os.Lstat(filepath.Join(s.Dir(), "a:"+ip.String()))
	k, err2 := os.Lstat(filepath.Join(s.Dir(), "k:"+key(1).String()))
	if err1 != nil || err2 != nil || !os.SameFile(a, k) || a.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("address and key records are not one symlink: %v %v", err1, err2)
	}
	// A key whose address name belongs to someone else is not a reservation.
	os.Remove(filepath.Join(s.Dir(), "a:"+ip.String()))
	os.Symlink(Reservation{Key: key(2), IP: ip}.record(), filepath.Join(s.Dir(), "a:"+ip.String()))
	if _, ok, _ := s.Lookup(key(1)); ok {
		t.Fatal("key reported as holding an address recorded for another attachment")
	}
}
