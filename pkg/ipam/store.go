// Package ipam hands out pod addresses from a node's subnet. It runs inside
// the CNI plugin process (no IPAM plugin exec) and keeps its state in a
// directory that survives crashes and restarts.
//
// Layout of a network's directory (<dataDir>/ipam/<network>/):
//
//	lock                      flock(2) taken around every change
//	last                      hint: last address handed out (round robin)
//	a:10.244.1.5 -> cid:eth0  address record: who holds this IP
//	k:cid:eth0   -> 10.244.1.5 key record: which IP this attachment holds
//
// Records are symlinks: symlink(2) creates name and content in one atomic
// step and fails with EEXIST if the name is taken, so an address can never be
// handed out twice and a crash never leaves half a record. The key record is
// what makes release O(1). A reservation exists only when both records agree;
// the key is written first and removed last, so a crash in between leaves at
// worst a dangling key, which is ignored and cleaned by the next release or GC.
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

// lookup returns the IP held by k, if both records agree. Caller holds the lock.
func (s *Store) lookup(k Key) (netip.Addr, bool, error) {
	target, err := os.Readlink(s.keyPath(k))
	if errors.Is(err, os.ErrNotExist) {
		return netip.Addr{}, false, nil
	}
	if err != nil {
		return netip.Addr{}, false, err
	}
	ip, err := netip.ParseAddr(target)
	if err != nil {
		return netip.Addr{}, false, nil // corrupt key: treat as absent
	}
	owner, err := os.Readlink(s.addrPath(ip))
	if err != nil || owner != k.String() {
		return ip, false, nil // dangling key
	}
	return ip, true, nil
}

// Lookup reports the address k holds.
func (s *Store) Lookup(k Key) (netip.Addr, bool, error) {
	unlock, err := s.lock()
	if err != nil {
		return netip.Addr{}, false, err
	}
	defer unlock()
	ip, ok, err := s.lookup(k)
	if !ok {
		ip = netip.Addr{}
	}
	return ip, ok, err
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

// Commit makes the store's changes durable (fsync of the directory). It is
// separate from Allocate so that callers can overlap it with other work,
// and it runs outside the lock so it never serialises other allocations.
func (s *Store) Commit() error { return fileutil.SyncDir(s.dir) }

func (s *Store) allocate(k Key, subnet netip.Prefix, gateway netip.Addr) (netip.Addr, error) {
	if ip, ok, err := s.lookup(k); err != nil {
		return netip.Addr{}, err
	} else if ok && subnet.Contains(ip) {
		return ip, nil
	} else if ok {
		s.release(k, ip) // held from an older subnet: give it back
	}
	size := cidr.Size(subnet)
	start := uint64(1)
	if last, err := os.Readlink(filepath.Join(s.dir, "last")); err == nil {
		if a, err := netip.ParseAddr(last); err == nil && subnet.Contains(a) {
			start = cidr.Offset(subnet, a) + 1
		}
	}
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
		// Key first, address second (see package comment).
		kp := s.keyPath(k)
		os.Remove(kp)
		if err := os.Symlink(ip.String(), kp); err != nil {
			return netip.Addr{}, fmt.Errorf("ipam: record %s: %w", k, err)
		}
		if err := os.Symlink(k.String(), s.addrPath(ip)); errors.Is(err, os.ErrExist) {
			continue
		} else if err != nil {
			os.Remove(kp)
			return netip.Addr{}, fmt.Errorf("ipam: record %s: %w", ip, err)
		}
		s.setLast(ip)
		return ip, nil
	}
	os.Remove(s.keyPath(k))
	return netip.Addr{}, fmt.Errorf("%w in subnet %s", ErrExhausted, subnet)
}

// setLast records the round-robin hint. It is only a hint: not fsynced.
func (s *Store) setLast(ip netip.Addr) {
	p := filepath.Join(s.dir, "last")
	tmp := p + ".tmp"
	os.Remove(tmp)
	if os.Symlink(ip.String(), tmp) == nil {
		os.Rename(tmp, p)
	}
}

// release removes k's records for ip. Caller holds the lock.
func (s *Store) release(k Key, ip netip.Addr) error {
	if owner, err := os.Readlink(s.addrPath(ip)); err == nil && owner == k.String() {
		if err := os.Remove(s.addrPath(ip)); err != nil && !errors.Is(err, os.ErrNotExist) {
			return err
		}
	}
	if err := os.Remove(s.keyPath(k)); err != nil && !errors.Is(err, os.ErrNotExist) {
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
	ip, ok, err := s.lookup(k)
	if err == nil && ip.IsValid() {
		err = s.release(k, ip)
	}
	unlock()
	if err != nil {
		return netip.Addr{}, false, fmt.Errorf("ipam release %s: %w", k, err)
	}
	if !ip.IsValid() {
		return ip, false, nil
	}
	return ip, ok, fileutil.SyncDir(s.dir)
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
		name, ok := strings.CutPrefix(e.Name(), "a:")
		if !ok {
			continue
		}
		ip, err := netip.ParseAddr(name)
		if err != nil {
			continue
		}
		owner, err := os.Readlink(filepath.Join(s.dir, e.Name()))
		if err != nil {
			continue
		}
		id, ifname, ok := strings.Cut(owner, ":")
		if !ok {
			continue
		}
		out = append(out, Reservation{Key: Key{ContainerID: id, IfName: ifname}, IP: ip})
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
		if err := s.release(r.Key, r.IP); err != nil {
			unlock()
			return released, err
		}
		released = append(released, r)
	}
	s.pruneDanglingKeys()
	unlock()
	return released, fileutil.SyncDir(s.dir)
}

func (s *Store) pruneDanglingKeys() {
	entries, _ := os.ReadDir(s.dir)
	for _, e := range entries {
		rest, ok := strings.CutPrefix(e.Name(), "k:")
		if !ok {
			continue
		}
		id, ifname, _ := strings.Cut(rest, ":")
		k := Key{ContainerID: id, IfName: ifname}
		if _, ok, err := s.lookup(k); err == nil && !ok {
			os.Remove(s.keyPath(k))
		}
	}
}
