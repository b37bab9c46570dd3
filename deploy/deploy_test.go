package deploy_test

import (
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/flatnet-io/flatnet/deploy"
	"github.com/flatnet-io/flatnet/pkg/agent"
	"github.com/flatnet-io/flatnet/pkg/backend"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
)

// manifest decodes deploy/flatnet.yaml into typed objects by kind.
func manifest(t *testing.T) map[string]any {
	t.Helper()
	objs, err := kubecluster.Decode(deploy.Manifest)
	if err != nil {
		t.Fatal(err)
	}
	typed := map[string]any{
		"Namespace": &corev1.Namespace{}, "ServiceAccount": &corev1.ServiceAccount{}, "ClusterRole": &rbacv1.ClusterRole{},
		"ClusterRoleBinding": &rbacv1.ClusterRoleBinding{}, "ConfigMap": &corev1.ConfigMap{}, "DaemonSet": &appsv1.DaemonSet{},
	}
	seen := map[string]bool{}
	for _, o := range objs {
		dst, ok := typed[o.GetKind()]
		if !ok || seen[o.GetKind()] {
			t.Fatalf("unexpected %s/%s in the manifest", o.GetKind(), o.GetName())
		}
		seen[o.GetKind()] = true
		if err := runtime.DefaultUnstructuredConverter.FromUnstructuredWithValidation(o.Object, dst, true); err != nil {
			t.Fatalf("%s/%s: %v", o.GetKind(), o.GetName(), err)
		}
	}
	if len(seen) != len(typed) {
		t.Fatalf("the manifest has %v, want all of %v", seen, typed)
	}
	return typed
}

// The ClusterRole is exactly what the kubernetes datastore uses.
func TestClusterRoleIsTheLeastTheAgentNeeds(t *testing.T) {
	m := manifest(t)
	role := m["ClusterRole"].(*rbacv1.ClusterRole)
	want := []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"nodes"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{""}, Resources: []string{"nodes/status"}, Verbs: []string{"patch"}},
	}
	if len(role.Rules) != len(want) {
		t.Fatalf("rules %+v, want %+v", role.Rules, want)
	}
	for i, r := range role.Rules {
		w := want[i]
		if !slices.Equal(r.APIGroups, w.APIGroups) || !slices.Equal(r.Resources, w.Resources) || !slices.Equal(r.Verbs, w.Verbs) ||
			len(r.ResourceNames) != 0 || len(r.NonResourceURLs) != 0 {
			t.Errorf("rule %d is %+v, want %+v", i, r, w)
		}
	}
	b := m["ClusterRoleBinding"].(*rbacv1.ClusterRoleBinding)
	if b.RoleRef.Name != role.Name || len(b.Subjects) != 1 || b.Subjects[0].Name != deploy.ServiceAccount || b.Subjects[0].Namespace != deploy.Namespace {
		t.Errorf("binding %+v", b)
	}
}

// The DaemonSet's command line plus the ConfigMap is a valid flatnetd
// configuration for the kubernetes datastore, every directory it writes
// is the same host directory, the probes hit its health port, and the
// plugin it installs is where the Dockerfile puts it.
func TestDaemonSetRunsAValidAgent(t *testing.T) {
	m := manifest(t)
	ds := m["DaemonSet"].(*appsv1.DaemonSet)
	cm := m["ConfigMap"].(*corev1.ConfigMap)
	pod := ds.Spec.Template.Spec
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers", len(pod.Containers))
	}
	c := pod.Containers[0]

	// The config file as the container sees it.
	mounts := map[string]corev1.VolumeMount{}
	for _, vm := range c.VolumeMounts {
		mounts[vm.MountPath] = vm
	}
	volumes := map[string]corev1.Volume{}
	for _, v := range pod.Volumes {
		volumes[v.Name] = v
	}
	dir := t.TempDir()
	var args []string
	for _, a := range append(c.Command[1:], c.Args...) {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			vm, ok := mounts[filepath.Dir(v)]
			if !ok || volumes[vm.Name].ConfigMap == nil || volumes[vm.Name].ConfigMap.Name != cm.Name {
				t.Fatalf("--config %s is not in a mount of ConfigMap %s", v, cm.Name)
			}
			a = "--config=" + filepath.Join(dir, filepath.Base(v))
			if err := os.WriteFile(filepath.Join(dir, filepath.Base(v)), []byte(cm.Data[filepath.Base(v)]), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		args = append(args, strings.ReplaceAll(a, "$(NODE_NAME)", "node-1"))
	}
	if c.Env[0].Name != "NODE_NAME" || c.Env[0].ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME is not the pod's node: %+v", c.Env)
	}
	cfg, err := agent.ParseFlags(args)
	if err != nil {
		t.Fatalf("flatnetd %v: %v", args, err)
	}
	if cfg.Datastore != "kubernetes" || cfg.NodeName != "node-1" || cfg.Kubeconfig != "" {
		t.Errorf("datastore %q, node %q, kubeconfig %q: want kubernetes with the in-cluster config", cfg.Datastore, cfg.NodeName, cfg.Kubeconfig)
	}
	if _, err := backend.New(cfg.Backend, backend.Options{VNI: cfg.VXLANVNI, Port: cfg.VXLANPort}); err != nil {
		t.Errorf("backend: %v", err)
	}
	for _, d := range []string{cfg.CNIBinDir, cfg.CNIConfDir, cfg.RunDir, cfg.StateDir} {
		vm, ok := mounts[d]
		hp := volumes[vm.Name].HostPath
		if !ok || vm.ReadOnly || hp == nil || hp.Path != d {
			t.Errorf("%s is not the host's %s, writable", d, d)
		}
	}

	_, port, _ := strings.Cut(cfg.Listen, ":")
	for name, p := range map[string]*corev1.Probe{"liveness": c.LivenessProbe, "readiness": c.ReadinessProbe} {
		want := map[string]string{"liveness": "/healthz", "readiness": "/readyz"}[name]
		if p == nil || p.HTTPGet == nil || p.HTTPGet.Path != want || strconv.Itoa(p.HTTPGet.Port.IntValue()) != port {
			t.Errorf("%s probe %+v, want GET %s on port %s", name, p, want, port)
		}
	}

	sc := c.SecurityContext
	if !pod.HostNetwork || pod.PriorityClassName != "system-node-critical" || ds.Spec.UpdateStrategy.Type != appsv1.RollingUpdateDaemonSetStrategyType {
		t.Errorf("hostNetwork %v, priority class %q, update strategy %q", pod.HostNetwork, pod.PriorityClassName, ds.Spec.UpdateStrategy.Type)
	}
	if len(pod.Tolerations) != 1 || pod.Tolerations[0].Operator != corev1.TolerationOpExists || pod.Tolerations[0].Key != "" {
		t.Errorf("tolerations %+v: want one that tolerates every taint", pod.Tolerations)
	}
	if sc == nil || sc.Privileged == nil || *sc.Privileged || !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN"}) ||
		!slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) {
		t.Errorf("security context %+v: want unprivileged with NET_ADMIN only", sc)
	}

	// The image has the plugin where --cni-bin-source says.
	df, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{c.Command[0], cfg.CNIBinSource} {
		if !regexp.MustCompile(`(?m)^COPY .* ` + regexp.QuoteMeta(f) + `$`).Match(df) {
			t.Errorf("the Dockerfile does not put %s into the image", f)
		}
	}
}
