package kube

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/flatnet-io/flatnet/pkg/cidr"
	"github.com/flatnet-io/flatnet/pkg/datastore"
)

// What a node publishes on its own Node object for its peers. Values are
// plain strings except BackendDataAnnotation, which is the JSON of
// datastore.BackendData.
const (
	AnnotationPrefix      = "flatnet.io/"
	UnderlayIPAnnotation  = AnnotationPrefix + "underlay-ip"
	BackendAnnotation     = AnnotationPrefix + "backend"
	BackendDataAnnotation = AnnotationPrefix + "backend-data"
)

// ReadyReason is the reason flatnet gives on the NetworkUnavailable=False
// condition of a node whose data plane is up.
const ReadyReason = "FlatnetReady"

// Why a Node yields no lease. Both are normal while a node joins.
var (
	errNoPodCIDR    = errors.New("no IPv4 podCIDR yet")
	errNotPublished = errors.New("no flatnet annotations yet")
)

// podSubnet is the Node's IPv4 pod CIDR (spec.podCIDRs holds one per IP
// family on dual-stack clusters; flatnet uses the IPv4 one).
func podSubnet(n *corev1.Node) (netip.Prefix, error) {
	cidrs := n.Spec.PodCIDRs
	if len(cidrs) == 0 && n.Spec.PodCIDR != "" {
		cidrs = []string{n.Spec.PodCIDR}
	}
	for _, s := range cidrs {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("podCIDR %q: %w", s, err)
		}
		if !p.Addr().Is4() {
			continue
		}
		if err := cidr.ValidateSubnet(p); err != nil {
			return netip.Prefix{}, fmt.Errorf("podCIDR %s: %w", p, err)
		}
		return p, nil
	}
	return netip.Prefix{}, errNoPodCIDR
}

// leaseOf reads a peer's lease from its Node: the subnet from spec, the
// rest from the annotations its agent published.
func leaseOf(n *corev1.Node) (datastore.Lease, error) {
	subnet, err := podSubnet(n)
	if err != nil {
		return datastore.Lease{}, err
	}
	a := n.Annotations
	ipStr, backend := a[UnderlayIPAnnotation], a[BackendAnnotation]
	if ipStr == "" && backend == "" {
		return datastore.Lease{}, errNotPublished
	}
	ip, err := netip.ParseAddr(ipStr)
	if err != nil {
		return datastore.Lease{}, fmt.Errorf("annotation %s: %w", UnderlayIPAnnotation, err)
	}
	if backend == "" {
		return datastore.Lease{}, fmt.Errorf("annotation %s is empty", BackendAnnotation)
	}
	var data datastore.BackendData
	if s := a[BackendDataAnnotation]; s != "" {
		if err := json.Unmarshal([]byte(s), &data); err != nil {
			return datastore.Lease{}, fmt.Errorf("annotation %s: %w", BackendDataAnnotation, err)
		}
	}
	return datastore.Lease{Node: n.Name, Subnet: subnet, UnderlayIP: ip, Backend: backend, BackendData: data}, nil
}

// annotationsOf are the annotations that publish self.
func annotationsOf(self datastore.NodeInfo) (map[string]string, error) {
	data, err := json.Marshal(self.BackendData)
	if err != nil {
		return nil, err
	}
	return map[string]string{
		UnderlayIPAnnotation:  self.UnderlayIP.Unmap().String(),
		BackendAnnotation:     self.Backend,
		BackendDataAnnotation: string(data),
	}, nil
}

// published reports whether n already carries what publishPatch would
// write: the same lease data and, if ready, the ready condition.
func published(n *corev1.Node, want datastore.Lease, ready bool) bool {
	got, err := leaseOf(n)
	if err != nil || got != want {
		return false
	}
	return !ready || networkAvailable(n)
}

// networkAvailable reports whether n has NetworkUnavailable=False.
func networkAvailable(n *corev1.Node) bool {
	for _, c := range n.Status.Conditions {
		if c.Type == corev1.NodeNetworkUnavailable {
			return c.Status == corev1.ConditionFalse
		}
	}
	return false
}

// publishPatch is a strategic merge patch for the Node's status
// subresource: the annotations and, once the data plane is up, the
// NetworkUnavailable=False condition (conditions merge by type, so no
// other condition is touched). The status subresource keeps spec but
// takes metadata changes, so RBAC needs only "patch nodes/status".
func publishPatch(self datastore.NodeInfo, ready bool, now time.Time) ([]byte, error) {
	ann, err := annotationsOf(self)
	if err != nil {
		return nil, err
	}
	type status struct {
		Conditions []corev1.NodeCondition `json:"conditions"`
	}
	patch := struct {
		Metadata map[string]any `json:"metadata"`
		Status   *status        `json:"status,omitempty"`
	}{Metadata: map[string]any{"annotations": ann}}
	if ready {
		t := metav1.NewTime(now)
		patch.Status = &status{Conditions: []corev1.NodeCondition{{
			Type:               corev1.NodeNetworkUnavailable,
			Status:             corev1.ConditionFalse,
			Reason:             ReadyReason,
			Message:            "flatnet has set up this node's pod network",
			LastHeartbeatTime:  t,
			LastTransitionTime: t,
		}}}
	}
	return json.Marshal(patch)
}
