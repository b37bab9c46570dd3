package k8s_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/flatnet-io/flatnet/deploy"
	"github.com/flatnet-io/flatnet/pkg/crinode"
	"github.com/flatnet-io/flatnet/pkg/kubecluster"
	"github.com/flatnet-io/flatnet/pkg/ociimage"
)

// The names e2e.test v1.37.2 runs its images under
// (test/utils/image/manifest.go); imported under exactly these names, a
// pull is never attempted (IfNotPresent).
const (
	agnhostImage = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
	busyboxImage = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
	pauseImage   = "registry.k8s.io/pause:3.10.2"
)

// manifestImage is the image deploy/flatnet.yaml's DaemonSet runs.
func manifestImage() (string, error) {
	objs, err := kubecluster.Decode(deploy.Manifest)
	if err != nil {
		return "", err
	}
	for _, o := range objs {
		if o.GetKind() != "DaemonSet" {
			continue
		}
		var ds appsv1.DaemonSet
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &ds); err != nil {
			return "", err
		}
		return ds.Spec.Template.Spec.Containers[0].Image, nil
	}
	return "", fmt.Errorf("deploy/flatnet.yaml has no DaemonSet")
}

// buildImages packs every image the cluster runs into dir and returns the
// archives:
//   - flatnet's, from bin/flatnetd and bin/flatnet in the Dockerfile's
//     layout, under the manifest's own image name (what `docker build -t`
//     of the README gives), so deploy/flatnet.yaml applies unchanged;
//   - the pause image (containerd's sandbox image, and e2e's pause);
//   - agnhost: the agnhost binary built from the module proxy, busybox,
//     Debian's curl with its libraries, OpenBSD nc and dash as /bin/sh
//     (e2e runs `echo hostName | nc -w 1 -u ...` through /bin/sh, and
//     busybox's ash would run its own nc, which has no -u);
//   - e2e's busybox.
func buildImages(ctx context.Context, root, binDir, k8sBin, ncDir, dir string) ([]string, error) {
	var archives []string
	add := func(img ociimage.Image) error {
		a := filepath.Join(dir, fmt.Sprintf("image%d.tar", len(archives)))
		_, err := ociimage.WriteFile(a, img)
		archives = append(archives, a)
		return err
	}
	flatnetName, err := manifestImage()
	if err != nil {
		return nil, err
	}
	var flatnet []ociimage.File
	for _, b := range []string{"flatnetd", "flatnet"} {
		f, err := ociimage.FromHost(filepath.Join(binDir, b), "/"+b)
		if err != nil {
			return nil, err
		}
		flatnet = append(flatnet, f)
	}
	if err := add(ociimage.Image{Name: flatnetName, Entrypoint: []string{"/flatnetd"}, Files: flatnet}); err != nil {
		return nil, err
	}

	pause, err := crinode.BuildPauseImage(ctx, root, dir)
	if err != nil {
		return nil, err
	}
	archives = append(archives, pause)
	pauseBin, err := ociimage.FromHost(filepath.Join(dir, "pause"), "/pause")
	if err != nil {
		return nil, err
	}
	if err := add(ociimage.Image{Name: pauseImage, Entrypoint: []string{"/pause"}, Files: []ociimage.File{pauseBin}}); err != nil {
		return nil, err
	}

	bb, err := ociimage.Busybox(busyboxBin)
	if err != nil {
		return nil, err
	}
	if err := add(ociimage.Image{Name: busyboxImage, Cmd: []string{"sh"}, Env: []string{"PATH=/bin"}, Files: bb}); err != nil {
		return nil, err
	}

	agn, err := ociimage.FromHost(filepath.Join(k8sBin, "agnhost"), "/agnhost")
	if err != nil {
		return nil, err
	}
	files := map[string]ociimage.File{}
	for _, f := range bb {
		if f.Path != "/bin/sh" && f.Path != "/bin/nc" {
			files[f.Path] = f
		}
	}
	files[agn.Path] = agn
	for _, b := range []struct{ src, dst string }{
		{"/usr/bin/curl", "/usr/bin/curl"},
		{filepath.Join(ncDir, "bin", "nc.openbsd"), "/usr/bin/nc"},
		{"/bin/dash", "/bin/sh"},
	} {
		withLibs, err := ociimage.WithLibs(b.src, b.dst)
		if err != nil {
			return nil, err
		}
		for _, f := range withLibs {
			files[f.Path] = f // libraries shared by the three once
		}
	}
	var agnhost []ociimage.File
	for _, f := range files {
		agnhost = append(agnhost, f)
	}
	err = add(ociimage.Image{Name: agnhostImage, Entrypoint: []string{"/agnhost"}, Cmd: []string{"pause"},
		Env: []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}, Files: agnhost})
	if err != nil {
		return nil, err
	}
	for _, a := range archives {
		if _, err := os.Stat(a); err != nil {
			return nil, err
		}
	}
	return archives, nil
}
