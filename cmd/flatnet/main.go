// Command flatnet is the CNI plugin a container runtime execs for every pod.
package main

import (
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/flatnet-io/flatnet/pkg/cni"
)

func main() {
	// One short-lived command per process with a tiny heap: garbage
	// collection would only cost time.
	debug.SetGCPercent(-1)
	skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, "flatnet: pods on the node bridge, one flat NAT-less network (https://github.com/flatnet-io/flatnet)")
}
