// Package ipam hands out pod addresses from a node's subnet. It runs inside
// the CNI plugin process (no IPAM plugin exec) and keeps its state in a
// directory that survives crashes and restarts.
//
// Layout of a network's directory (<dataDir>/ipam/<network>/):
//
//	lock                        flock(2) taken around every change
//	last                        hint: last address handed out (round robin)
//	k:cid:eth0   -> "10.244.1.5 cid:eth0"   key record
//	a:10.244.1.5 -> (hard link to the same symlink)  address record
//
// A reservation is one symlink whose content names both the address and the
// attachment, reachable under two names: by key (O(1) release) and by
// address (uniqueness). symlink(2) creates name and content in one atomic
// step, and link(2) fails with EEXIST if the address name is taken, so an
// address can never be handed out twice and a crash never leaves half a
// record. The key name is made first and removed last, so a crash in between
// leaves at worst a dangling key, which is ignored and cleaned by the next
// release or GC. One inode per reservation matters: creating inodes is the
// most expensive filesystem step of an ADD on ext4.
package ipam

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
)

// Key identifies one attachment, as the CNI spec does.
type Key struct {
	ContainerID string
	IfName      string
}

func (k Key) String() string { return k.ContainerID + ":" + k.IfName }

// Reservation is one address held by one attachment.
type Reservation struct {
	Key Key
	IP  netip.Addr
}

// record is the content both names of a reservation point to.
func (r Reservation) record() string { return r.IP.String() + " " + r.Key.String() }

func parseRecord(s string) (Reservation, bool) {
	ipStr, key, ok := strings.Cut(s, " ")
	if !ok {
		return Reservation{}, false
	}
	ip, err := netip.ParseAddr(ipStr)
	id, ifname, ok := strings.Cut(key, ":")
	if err != nil || !ok {
		return Reservation{}, false
	}
	return Reservation{Key: Key{ContainerID: id, IfName: ifname}, IP: ip}, true
}

// ErrExhausted means every host address of the subnet is taken.
var ErrExhausted = errors.New("no free address")

// Store is the address store of one network on this node.
type Store struct {
	dir string
}

// Open creates the store directory if needed.
func Open(dataDir, network string) (*Store, error) {
	if network == "" || strings.ContainsAny(network, "/\x00") || network == "." || network == ".." {
		return nil, fmt.Errorf("invalid network name %q", network)
	}
	dir := filepath.Join(dataDir, "ipam", network)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("ipam store: %w", err)
	}
	return &Store{dir: dir}, nil
}

// Dir is the directory holding the records.
func (s *Store) Dir() string { return s.dir }

func (s *Store) addrPath(ip netip.Addr) string { return filepath.Join(s.dir, "a:"+ip.String()) }
func (s *Store) keyPath(k Key) string          { return filepath.Join(s.dir, "k:"+k.String()) }

// lock serialises all changes of this network on this node (across
// processes: every ADD/DEL/GC is its own plugin process).
func (s *Store) lock() (unlock func(), err error) {
	f, err := os.OpenFile(filepath.Join(s.dir, "lock"), os.O_CREATE|os.O_RDWR|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("ipam lock: %w", err)
	}
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX)
		if err != unix.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("ipam lock: %w", err)
	}
	return func() { f.Close() }, nil // close releases the flock
}

// lookup returns k's reservation. ok is false for a missing or dangling key
// (its address record is gone or is someone else's); r.IP is still set for
// a dangling key. Caller holds the lock.
func (s *Store) lookup(k Key) (r Reservation, ok bool, err error) {
	content, err := os.Readlink(s.keyPath(k))
	if errors.Is(err, os.ErrNotExist) {
		return Reservation{}, false, nil
	}
	if err != nil {
		return Reservation{}, false, err
	}
	r, valid := parseRecord(content)
	if !valid || r.Key != k {
		return Reservation{}, false, nil // corrupt key: treat as absent
	}
	owner, err := os.Readlink(s.addrPath(r.IP))
	return r, err == nil && owner == content, nil
}

// Lookup reports the address k holds.
func (s *Store) Lookup(k Key) (netip.Addr, bool, error) {
	unlock, err := s.lock()
	if err != nil {
		return netip.Addr{}, false, err
	}
	defer unlock()
	r, ok, err := s.lookup(k)
	if !ok {
		return netip.Addr{}, false, err
	}
	return r.IP, true, err
}

// Allocate gives k an address from subnet, skipping the network, gateway and
// broadcast addresses. If k already holds an address in subnet (a retried
// ADD) that address is returned. The reservation is visible to every other
// caller at once; it is durable after Commit, which the caller must see
// succeed before it reports the address to anyone.
func (s *Store) Allocate(k Key, subnet netip.Prefix, gateway netip.Addr) (netip.Addr, error) {
	unlock, err := s.lock()
	if err != nil {
		return netip.Addr{}, err
	}
	defer unlock()
	return s.allocate(k, subnet, gateway)
}

// Commit makes the store's changes durable (fsync of the directory). It
// runs outside the lock so it never serialises other allocations.
func (s *Store) Commit() error { return fileutil.SyncDir(s.dir) }

func (s *Store) allocate(k Key, subnet netip.Prefix, gateway netip.Addr) (netip.Addr, error) {
	if r, ok, err := s.lookup(k); err != nil {
		return netip.Addr{}, err
	} else if ok && subnet.Contains(r.IP) {
		return r.IP, nil
	} else if ok {
		s.release(r) // held from an older subnet: give it back
	}
	size := cidr.Size(subnet)
	start := uint64(1)
	if a, ok := s.last(); ok && subnet.Contains(a) {
		start = cidr.Offset(subnet, a) + 1
	}
	kp := s.keyPath(k)
	for i := uint64(0); i < size; i++ {
		off := (start + i) % size
		if off == 0 || off == size-1 {
			continue // network and broadcast
		}
		ip := cidr.Nth(subnet, off)
		if ip == gateway {
			continue
		}
		if _, err := os.Lstat(s.addrPath(ip)); err == nil {
			continue
		}
		// Key name first, address name second (see package comment).
		os.Remove(kp)
		if err := os.Symlink(Reservation{Key: k, IP: ip}.record(), kp); err != nil {
			return netip.Addr{}, fmt.Errorf("ipam: record %s: %w", k, err)
		}
		if err := os.Link(kp, s.addrPath(ip)); errors.Is(err, os.ErrExist) {
			continue
		} else if err != nil {
			os.Remove(kp)
			return netip.Addr{}, fmt.Errorf("ipam: record %s: %w", ip, err)
		}
		s.setLast(ip)
		return ip, nil
	}
	os.Remove(kp)
	return netip.Addr{}, fmt.Errorf("%w in subnet %s", ErrExhausted, subnet)
}

// last reads the round-robin hint.
func (s *Store) last() (netip.Addr, bool) {
	b, err := os.ReadFile(filepath.Join(s.dir, "last"))
	if err != nil {
		return netip.Addr{}, false
	}
	a, err := netip.ParseAddr(strings.TrimSpace(string(b)))
	return a, err == nil
}

// setLast records the round-robin hint in place (no new inode, no fsync:
// it is only a hint, and a torn write just restarts the scan).
func (s *Store) setLast(ip netip.Addr) {
	f, err := os.OpenFile(filepath.Join(s.dir, "last"), os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return
	}
	fmt.Fprintf(f, "%-15s\n", ip) // fixed width: overwrites a longer previous value
	f.Close()
}

// release removes r's names. Caller holds the lock.
func (s *Store) release(r Reservation) error {
	if owner, err := os.Readlink(s.addrPath(r.IP)); err == nil && owner == r.record() {
		if err := os.Remove(s.addrPath(r.IP)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := os.Remove(s.keyPath(r.Key)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// Release frees whatever k holds. Releasing nothing is not an error.
func (s *Store) Release(k Key) (netip.Addr, bool, error) {
	unlock, err := s.lock()
	if err != nil {
		return netip.Addr{}, false, err
	}
	r, ok, err := s.lookup(k)
	if err == nil && r.IP.IsValid() {
		err = s.release(r)
	}
	unlock()
	if err != nil {
		return netip.Addr{}, false, fmt.Errorf("ipam release %s: %w", k, err)
	}
	if !r.IP.IsValid() {
		return netip.Addr{}, false, nil
	}
	if !ok {
		return netip.Addr{}, false, s.Commit() // only a dangling key went
	}
	return r.IP, true, s.Commit()
}

// List returns every reservation.
func (s *Store) List() ([]Reservation, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	return s.list()
}

func (s *Store) list() ([]Reservation, error) {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return nil, err
	}
	var out []Reservation
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "a:") {
			continue
		}
		content, err := os.Readlink(filepath.Join(s.dir, e.Name()))
		if err != nil {
			continue
		}
		if r, ok := parseRecord(content); ok && "a:"+r.IP.String() == e.Name() {
			out = append(out, r)
		}
	}
	return out, nil
}

// GC releases every reservation for which keep returns false, and removes
// key records that have no matching address record. It returns what it
// released.
func (s *Store) GC(keep func(Key) bool) ([]Reservation, error) {
	unlock, err := s.lock()
	if err != nil {
		return nil, err
	}
	res, err := s.list()
	if err != nil {
		unlock()
		return nil, err
	}
	var released []Reservation
	for _, r := range res {
		if keep(r.Key) {
			continue
		}
		if err := s.release(r); err != nil {
			unlock()
			return released, err
		}
		released = append(released, r)
	}
	s.pruneDanglingKeys()
	unlock()
	return released, s.Commit()
}

func (s *Store) pruneDanglingKeys() {
	entries, _ := os.ReadDir(s.dir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), "k:") {
			continue
		}
		content, err := os.Readlink(filepath.Join(s.dir, e.Name()))
		r, valid := parseRecord(content)
		if err != nil || !valid || "k:"+r.Key.String() != e.Name() {
			os.Remove(filepath.Join(s.dir, e.Name()))
			continue
		}
		if _, ok, err := s.lookup(r.Key); err == nil && !ok {
			os.Remove(s.keyPath(r.Key))
		}
	}
}
