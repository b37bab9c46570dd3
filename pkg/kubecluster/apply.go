package kubecluster

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
	sigsyaml "sigs.k8s.io/yaml"
)

// FieldManager owns what Apply writes.
const FieldManager = "flatnet"

// Apply server-side applies every object of a multi-document YAML
// manifest, in order, like `kubectl apply --server-side`. With dryRun the
// server validates and admits each object but stores nothing. It returns
// "Kind/name" of each object applied.
func Apply(ctx context.Context, cfg *rest.Config, manifest []byte, dryRun bool) ([]string, error) {
	objs, err := Decode(manifest)
	if err != nil {
		return nil, err
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return nil, err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	opts := metav1.ApplyOptions{FieldManager: FieldManager, Force: true}
	if dryRun {
		opts.DryRun = []string{metav1.DryRunAll}
	}
	var done []string
	for _, o := range objs {
		gvk := o.GroupVersionKind()
		name := gvk.Kind + "/" + o.GetName()
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return done, fmt.Errorf("%s: %w", name, err)
		}
		var r dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if ns := o.GetNamespace(); ns != "" {
			r = dyn.Resource(m.Resource).Namespace(ns)
		}
		if _, err := r.Apply(ctx, o.GetName(), o, opts); err != nil {
			return done, fmt.Errorf("apply %s: %w", name, err)
		}
		done = append(done, name)
	}
	return done, nil
}

// Decode splits a multi-document YAML manifest into objects.
func Decode(manifest []byte) ([]*unstructured.Unstructured, error) {
	r := yaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(manifest)))
	var out []*unstructured.Unstructured
	for i := 1; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		js, err := sigsyaml.YAMLToJSON(doc)
		if err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		if len(bytes.TrimSpace(js)) == 0 || string(js) == "null" {
			continue // only comments, or an empty document
		}
		o := &unstructured.Unstructured{}
		if err := o.UnmarshalJSON(js); err != nil {
			return nil, fmt.Errorf("manifest document %d: %w", i, err)
		}
		if o.GetName() == "" {
			return nil, fmt.Errorf("manifest document %d (%s) has no name", i, o.GetKind())
		}
		out = append(out, o)
	}
}
