package crinode

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/flatnet-io/flatnet/pkg/ociimage"
)

// The images runtimes here use, imported from archives (no registry).
const (
	PauseImage   = "localhost/flatnet/pause:v1"
	BusyboxImage = "localhost/flatnet/busybox:v1"
)

// BuildPauseImage builds hack/pause of the module at moduleRoot (static)
// and packs it as PauseImage into dir; it returns the archive.
func BuildPauseImage(ctx context.Context, moduleRoot, dir string) (string, error) {
	bin := filepath.Join(dir, "pause")
	build := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "./hack/pause")
	build.Dir = moduleRoot
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./hack/pause: %w\n%s", err, out)
	}
	pause, err := ociimage.FromHost(bin, "/pause")
	if err != nil {
		return "", err
	}
	archive := filepath.Join(dir, "pause.tar")
	_, err = ociimage.WriteFile(archive, ociimage.Image{Name: PauseImage, Entrypoint: []string{"/pause"}, Files: []ociimage.File{pause}})
	return archive, err
}

// BuildBusyboxImage packs a static busybox and extra files as BusyboxImage
// into dir; it returns the archive.
func BuildBusyboxImage(dir, busybox string, extra ...ociimage.File) (string, error) {
	bb, err := ociimage.Busybox(busybox)
	if err != nil {
		return "", err
	}
	archive := filepath.Join(dir, "busybox.tar")
	_, err = ociimage.WriteFile(archive, ociimage.Image{Name: BusyboxImage, Cmd: []string{"/bin/sh"},
		Env: []string{"PATH=/bin"}, Files: append(bb, extra...)})
	return archive, err
}
