package nsutil

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
)

func TestCreateDeleteAndStart(t *testing.T) {
	name := fmt.Sprintf("fnt-nsutil-%d", os.Getpid())
	h, err := Create(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { h.Close(); Delete(name) })
	if _, err := Create(name); err == nil {
		t.Fatal("second Create with the same name succeeded")
	}
	names, _ := List("fnt-nsutil-")
	if len(names) != 1 || names[0] != name {
		t.Fatalf("List = %v", names)
	}
	err = h.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if lo.Attrs().OperState != netlink.OperUnknown && lo.Attrs().Flags&1 == 0 {
			return fmt.Errorf("lo is down")
		}
		links, _ := netlink.LinkList()
		if len(links) != 1 {
			return fmt.Errorf("new namespace has links %v", links)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := SetSysctl(h, "net/ipv4/ip_forward", "1"); err != nil {
		t.Fatal(err)
	}
	// A child started in the namespace sees its sysctl, not the root's.
	cmd := exec.Command("cat", "/proc/sys/net/ipv4/ip_forward", "/proc/self/net/dev")
	out := &strings.Builder{}
	cmd.Stdout = out
	if err := Start(h, cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(out.String(), "1\n") || strings.Count(out.String(), ":") != 1 || !strings.Contains(out.String(), "lo:") {
		t.Fatalf("child output:\n%s", out)
	}
	if err := Delete(name); err != nil {
		t.Fatal(err)
	}
	if err := Delete(name); err != nil {
		t.Fatalf("second Delete: %v", err)
	}
	if _, err := os.Stat(Path(name)); !os.IsNotExist(err) {
		t.Fatal("netns file still there")
	}
}
