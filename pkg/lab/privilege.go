package lab

import (
	"io/fs"
	"os"
	"path/filepath"
	"syscall"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/flatnet-io/flatnet/pkg/nsutil"
)

// nobody is the unprivileged user least-privilege agents run as.
const nobody = 65534

// leastPrivilege prepares node n for an agent with the DaemonSet's
// privileges (capabilities NET_ADMIN only, /proc/sys read-only) and
// returns the process attributes that give it exactly that. The
// container's root-without-capabilities owns the host directories it
// writes; here the user nobody owns the node's directory instead, and
// cannot write /proc/sys. The node itself must forward, as
// deploy/flatnet.yaml requires of every node.
func leastPrivilege(n *Node) (syscall.SysProcAttr, error) {
	h, err := ns.GetNS(nsutil.Path(n.NetNS))
	if err != nil {
		return syscall.SysProcAttr{}, err
	}
	err = nsutil.SetSysctl(h, "net/ipv4/ip_forward", "1")
	h.Close()
	if err != nil {
		return syscall.SysProcAttr{}, err
	}
	if err := os.MkdirAll(n.Dir, 0o755); err != nil {
		return syscall.SysProcAttr{}, err
	}
	err = filepath.WalkDir(n.Dir, func(p string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, nobody, nobody)
	})
	if err != nil {
		return syscall.SysProcAttr{}, err
	}
	return syscall.SysProcAttr{
		Credential:  &syscall.Credential{Uid: nobody, Gid: nobody},
		AmbientCaps: []uintptr{unix.CAP_NET_ADMIN},
	}, nil
}
