// Package cniruntime drives CNI plugins through libcni the way a container
// runtime does, with the plugin processes started inside a node's network
// namespace. The lab and the tests use it; nothing here knows flatnet.
package cniruntime

import (
	"context"
	"os"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	"github.com/containernetworking/plugins/pkg/ns"
)

// Runtime is one node's view of one network list.
type Runtime struct {
	CNI    *libcni.CNIConfig
	List   *libcni.NetworkConfigList
	NodeNS ns.NetNS // plugins run here (the node's host namespace)
}

// New loads a conflist. binDirs is CNI_PATH; cacheDir is where libcni keeps
// its result cache (separate per node when nodes share a filesystem).
func New(conflist []byte, binDirs []string, cacheDir string, nodeNS ns.NetNS) (*Runtime, error) {
	list, err := libcni.ConfListFromBytes(conflist)
	if err != nil {
		return nil, err
	}
	// An explicit exec: libcni creates its default lazily, which races when
	// one CNIConfig serves concurrent calls.
	exec := &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}, PluginDecoder: version.PluginDecoder{}}
	return &Runtime{CNI: libcni.NewCNIConfigWithCacheDir(binDirs, cacheDir, exec), List: list, NodeNS: nodeNS}, nil
}

// Attachment names one pod interface.
type Attachment struct {
	ContainerID string
	NetNS       string // path; empty on the runtime's second DEL
	IfName      string
	Args        [][2]string
}

func (a Attachment) rt() *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: a.ContainerID, NetNS: a.NetNS, IfName: a.IfName, Args: a.Args}
}

// in runs f on a thread inside the node namespace, so the plugin processes
// libcni forks from it start there.
func (r *Runtime) in(f func() error) error {
	return r.NodeNS.Do(func(ns.NetNS) error { return f() })
}

// Add is CNI ADD.
func (r *Runtime) Add(ctx context.Context, a Attachment) (res types.Result, err error) {
	err = r.in(func() error {
		res, err = r.CNI.AddNetworkList(ctx, r.List, a.rt())
		return err
	})
	return res, err
}

// Del is CNI DEL.
func (r *Runtime) Del(ctx context.Context, a Attachment) error {
	return r.in(func() error { return r.CNI.DelNetworkList(ctx, r.List, a.rt()) })
}

// Check is CNI CHECK (libcni supplies the cached prevResult).
func (r *Runtime) Check(ctx context.Context, a Attachment) error {
	return r.in(func() error { return r.CNI.CheckNetworkList(ctx, r.List, a.rt()) })
}

// GC is CNI GC with the attachments the runtime still knows.
func (r *Runtime) GC(ctx context.Context, valid []types.GCAttachment) error {
	return r.in(func() error {
		return r.CNI.GCNetworkList(ctx, r.List, &libcni.GCArgs{ValidAttachments: valid})
	})
}

// Status is CNI STATUS.
func (r *Runtime) Status(ctx context.Context) error {
	return r.in(func() error { return r.CNI.GetStatusNetworkList(ctx, r.List) })
}
