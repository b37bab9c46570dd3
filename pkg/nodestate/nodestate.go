// Package nodestate defines the node state file: the contract between the
// node agent (flatnetd), which writes it once it holds a lease, and the CNI
// plugin, which reads it on every ADD when its config has no "subnet".
//
// Format (JSON, version 1):
//
//	{"version":1,"nodeName":"n1","subnet":"10.244.1.0/24","gateway":"10.244.1.1",
//	 "mtu":1450,"clusterCIDR":"10.244.0.0/16"}
package nodestate

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/fileutil"
)

// DefaultPath is where flatnetd writes the state and the plugin looks for it.
const DefaultPath = "/run/flatnet/node.json"

// Version is the format version this code writes and accepts.
const Version = 1

// State is what a pod on this node needs to know about the node network.
type State struct {
	Version     int          `json:"version"`
	NodeName    string       `json:"nodeName,omitempty"`
	Subnet      netip.Prefix `json:"subnet"`
	Gateway     netip.Addr   `json:"gateway"`
	MTU         int          `json:"mtu"`
	ClusterCIDR netip.Prefix `json:"clusterCIDR"`
}

// Validate checks the invariants both sides rely on.
func (s *State) Validate() error {
	if s.Version != Version {
		return fmt.Errorf("node state version %d, want %d", s.Version, Version)
	}
	if err := cidr.ValidateSubnet(s.Subnet); err != nil {
		return err
	}
	if err := cidr.ValidateGateway(s.Subnet, s.Gateway); err != nil {
		return err
	}
	if s.MTU != 0 {
		if err := cidr.ValidateMTU(s.MTU); err != nil {
			return err
		}
	}
	if s.ClusterCIDR.IsValid() && !s.ClusterCIDR.Contains(s.Subnet.Addr()) {
		return fmt.Errorf("subnet %s is outside cluster CIDR %s", s.Subnet, s.ClusterCIDR)
	}
	return nil
}

// ErrNotFound reports that no agent has written the state yet.
var ErrNotFound = errors.New("node state file not found")

// Read loads and validates the state file. A missing file is ErrNotFound.
func Read(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s", ErrNotFound, path)
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("node state %s: %w", path, err)
	}
	if err := s.Validate(); err != nil {
		return nil, fmt.Errorf("node state %s: %w", path, err)
	}
	return &s, nil
}

// Write validates s and replaces the file atomically.
func Write(path string, s *State) error {
	if s.Version == 0 {
		s.Version = Version
	}
	if err := s.Validate(); err != nil {
		return err
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return fileutil.WriteAtomic(path, append(b, '\n'), 0o644)
}
