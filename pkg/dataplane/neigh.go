package dataplane

import (
	"errors"

	"github.com/vishvananda/netlink"
)

// NeighList lists a link's neighbour (or, with AF_BRIDGE, FDB) entries,
// retrying a dump the kernel interrupted because the table changed
// meanwhile: netlinksafe has no wrapper for it.
func NeighList(linkIndex, family int) ([]netlink.Neigh, error) {
	var err error
	for range 5 {
		var out []netlink.Neigh
		out, err = netlink.NeighList(linkIndex, family)
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return out, err
		}
	}
	return nil, err
}
