// Package deploy holds flatnet's Kubernetes manifest, embedded so that the
// lab and the tests apply exactly the file users apply.
package deploy

import _ "embed"

// Manifest is deploy/flatnet.yaml.
//
//go:embed flatnet.yaml
var Manifest []byte

// Names in the manifest that the lab and the tests refer to.
const (
	Namespace      = "flatnet-system"
	ServiceAccount = "flatnet"
	DaemonSet      = "flatnet"
)
