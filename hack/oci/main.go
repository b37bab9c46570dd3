// Command oci packs files into a single-layer OCI image archive that
// `ctr -n k8s.io images import` loads, with no registry and no build engine.
//
//	go run ./hack/oci -o pause.tar -name localhost/flatnet/pause:v1 \
//	    -entrypoint /pause -file bin/pause:/pause
//	go run ./hack/oci -o busybox.tar -name localhost/flatnet/busybox:v1 \
//	    -busybox /bin/busybox -cmd /bin/sh -env PATH=/bin
//
// -entrypoint and -cmd take one word or a JSON array ('["/bin/sh","-c","..."]').
// -file, -tree, -symlink, -dir and -env repeat. It prints the manifest digest.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"

	"github.com/flatnet-io/flatnet/pkg/ociimage"
)

// list is a repeatable flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

// argv is a flag holding one word or a JSON array of words.
type argv []string

func (a *argv) String() string { return strings.Join(*a, " ") }
func (a *argv) Set(v string) error {
	if strings.HasPrefix(strings.TrimSpace(v), "[") {
		return json.Unmarshal([]byte(v), (*[]string)(a))
	}
	*a = []string{v}
	return nil
}

func main() {
	var img ociimage.Image
	var files, trees, links, dirs list
	out := flag.String("o", "", "output archive (required)")
	flag.StringVar(&img.Name, "name", "", "image reference, e.g. localhost/flatnet/pause:v1 (required)")
	flag.Var((*argv)(&img.Entrypoint), "entrypoint", "entrypoint: a word or a JSON array")
	flag.Var((*argv)(&img.Cmd), "cmd", "default arguments: a word or a JSON array")
	flag.Var((*list)(&img.Env), "env", "KEY=value (repeat)")
	flag.StringVar(&img.WorkingDir, "workdir", "", "working directory")
	flag.Var(&files, "file", "HOSTFILE:/path/in/image (repeat)")
	flag.Var(&trees, "tree", "HOSTDIR:/dir/in/image, copied recursively, symlinks kept (repeat)")
	flag.Var(&links, "symlink", "/path/in/image:TARGET (repeat)")
	flag.Var(&dirs, "dir", "/empty/dir/in/image (repeat)")
	busybox := flag.String("busybox", "", "a static busybox binary: add it as /bin/busybox with its applet links")
	flag.Parse()
	if *out == "" || img.Name == "" || flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if err := collect(&img, files, trees, links, dirs, *busybox); err != nil {
		fmt.Fprintln(os.Stderr, "oci:", err)
		os.Exit(1)
	}
	digest, err := ociimage.WriteFile(*out, img)
	if err != nil {
		fmt.Fprintln(os.Stderr, "oci:", err)
		os.Exit(1)
	}
	fmt.Println(digest)
}

func collect(img *ociimage.Image, files, trees, links, dirs list, busybox string) error {
	pair := func(flagName, v string) (string, string, error) {
		a, b, ok := strings.Cut(v, ":")
		if !ok || a == "" || b == "" {
			return "", "", fmt.Errorf("-%s %q: want A:B", flagName, v)
		}
		return a, b, nil
	}
	for _, v := range files {
		src, dst, err := pair("file", v)
		if err != nil {
			return err
		}
		f, err := ociimage.FromHost(src, dst)
		if err != nil {
			return err
		}
		img.Files = append(img.Files, f)
	}
	for _, v := range trees {
		src, dst, err := pair("tree", v)
		if err != nil {
			return err
		}
		tree, err := ociimage.Tree(src, dst)
		if err != nil {
			return err
		}
		img.Files = append(img.Files, tree...)
	}
	for _, v := range links {
		p, target, err := pair("symlink", v)
		if err != nil {
			return err
		}
		img.Files = append(img.Files, ociimage.Symlink(p, target))
	}
	for _, d := range dirs {
		img.Files = append(img.Files, ociimage.Dir(d, 0o755))
	}
	if busybox != "" {
		bb, err := ociimage.Busybox(busybox)
		if err != nil {
			return err
		}
		img.Files = append(img.Files, bb...)
	}
	return nil
}
