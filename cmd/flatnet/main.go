// Command flatnet is the CNI plugin a container runtime execs for every pod.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/flatnet-io/flatnet/pkg/cni"
)

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, "flatnet: pods on the node bridge, one flat NAT-less network (https://github.com/flatnet-io/flatnet)")
}
