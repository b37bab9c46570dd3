// Package ociimage writes container images without a registry or a build
// engine: a single-layer OCI image layout packed as one tar archive, which
// `ctr -n k8s.io images import` loads under the image's name. The output is
// reproducible (sorted entries, owner root, mtime 0), so the same files give
// the same digests.
package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"debug/elf"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

// Media types of the OCI image spec.
const (
	mediaManifest = "application/vnd.oci.image.manifest.v1+json"
	mediaConfig   = "application/vnd.oci.image.config.v1+json"
	mediaLayer    = "application/vnd.oci.image.layer.v1.tar"
)

// Image is what goes into an archive.
type Image struct {
	Name       string   // full reference, e.g. localhost/flatnet/pause:v1
	Entrypoint []string // image config, as in a Dockerfile
	Cmd        []string
	Env        []string // KEY=value
	WorkingDir string
	Files      []File // the layer; parent directories are added as needed
}

// File is one entry of the layer.
type File struct {
	Path string      // absolute path inside the image
	Mode fs.FileMode // permission bits, plus fs.ModeDir or fs.ModeSymlink for those
	Data []byte      // content of a regular file
	Link string      // target of a symlink
}

// Regular is a file with the given content.
func Regular(p string, perm fs.FileMode, data []byte) File {
	return File{Path: p, Mode: perm.Perm(), Data: data}
}

// Dir is an empty directory; perm may include fs.ModeSticky.
func Dir(p string, perm fs.FileMode) File {
	return File{Path: p, Mode: fs.ModeDir | perm&(fs.ModePerm|fs.ModeSticky)}
}

// Symlink is a symbolic link to target.
func Symlink(p, target string) File {
	return File{Path: p, Mode: fs.ModeSymlink | 0o777, Link: target}
}

// FromHost copies a host file (content and permissions, following
// symlinks) to path p in the image.
func FromHost(src, p string) (File, error) {
	st, err := os.Stat(src)
	if err != nil {
		return File{}, err
	}
	if !st.Mode().IsRegular() {
		return File{}, fmt.Errorf("%s: not a regular file", src)
	}
	b, err := os.ReadFile(src)
	if err != nil {
		return File{}, err
	}
	return Regular(p, st.Mode(), b), nil
}

// Tree copies a host directory to dir in the image, keeping symlinks as
// symlinks.
func Tree(src, dir string) ([]File, error) {
	var out []File
	err := filepath.WalkDir(src, func(hostPath string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, hostPath)
		if err != nil {
			return err
		}
		p := path.Join(dir, filepath.ToSlash(rel))
		switch {
		case d.IsDir():
			info, err := d.Info()
			if err != nil {
				return err
			}
			out = append(out, Dir(p, info.Mode()))
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(hostPath)
			if err != nil {
				return err
			}
			out = append(out, Symlink(p, target))
		case d.Type().IsRegular():
			f, err := FromHost(hostPath, p)
			if err != nil {
				return err
			}
			out = append(out, f)
		default:
			return fmt.Errorf("%s: unsupported file type %v", hostPath, d.Type())
		}
		return nil
	})
	return out, err
}

// Busybox is a busybox userland from a static busybox binary (Debian's
// busybox-static): /bin/busybox, a symlink per applet in /bin, a root user
// and a world-writable /tmp.
func Busybox(busybox string) ([]File, error) {
	bin, err := FromHost(busybox, "/bin/busybox")
	if err != nil {
		return nil, err
	}
	list, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("%s --list: %w", busybox, err)
	}
	files := []File{bin,
		Regular("/etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/sh\n")),
		Regular("/etc/group", 0o644, []byte("root:x:0:\n")),
		Dir("/tmp", 0o777|fs.ModeSticky), Dir("/root", 0o700)}
	for _, applet := range strings.Fields(string(list)) {
		if applet != "busybox" && !strings.Contains(applet, "/") {
			files = append(files, Symlink("/bin/"+applet, "busybox"))
		}
	}
	return files, nil
}

// WriteFile writes img as an archive at dst and returns the manifest
// digest.
func WriteFile(dst string, img Image) (string, error) {
	f, err := os.Create(dst)
	if err != nil {
		return "", err
	}
	digest, err := Write(f, img)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(dst)
	}
	return digest, err
}

// descriptor points at a blob.
type descriptor struct {
	MediaType   string            `json:"mediaType"`
	Digest      string            `json:"digest"`
	Size        int               `json:"size"`
	Platform    *platform         `json:"platform,omitempty"`
	Annotations map[string]string `json:"annotations,omitempty"`
}

type platform struct {
	Architecture string `json:"architecture"`
	OS           string `json:"os"`
}

type imageConfig struct {
	platform
	Config struct {
		Entrypoint []string `json:"Entrypoint,omitempty"`
		Cmd        []string `json:"Cmd,omitempty"`
		Env        []string `json:"Env,omitempty"`
		WorkingDir string   `json:"WorkingDir,omitempty"`
	} `json:"config"`
	RootFS struct {
		Type    string   `json:"type"`
		DiffIDs []string `json:"diff_ids"`
	} `json:"rootfs"`
}

// Write writes img as an OCI image layout tar archive to w and returns the
// manifest digest.
func Write(w io.Writer, img Image) (string, error) {
	if img.Name == "" {
		return "", errors.New("image name missing")
	}
	layer, err := layerTar(img.Files)
	if err != nil {
		return "", fmt.Errorf("image %s: %w", img.Name, err)
	}
	blobs := map[string][]byte{}
	put := func(b []byte, mediaType string) descriptor {
		d := fmt.Sprintf("sha256:%x", sha256.Sum256(b))
		blobs[d] = b
		return descriptor{MediaType: mediaType, Digest: d, Size: len(b)}
	}
	plat := platform{Architecture: runtime.GOARCH, OS: "linux"}
	layerDesc := put(layer, mediaLayer)

	var cfg imageConfig
	cfg.platform = plat
	cfg.Config.Entrypoint, cfg.Config.Cmd, cfg.Config.Env, cfg.Config.WorkingDir = img.Entrypoint, img.Cmd, img.Env, img.WorkingDir
	cfg.RootFS.Type, cfg.RootFS.DiffIDs = "layers", []string{layerDesc.Digest} // uncompressed: digest = diff ID
	cfgJSON, err := json.Marshal(cfg)
	if err != nil {
		return "", err
	}
	manifest, err := json.Marshal(map[string]any{
		"schemaVersion": 2, "mediaType": mediaManifest,
		"config": put(cfgJSON, mediaConfig), "layers": []descriptor{layerDesc},
	})
	if err != nil {
		return "", err
	}
	manDesc := put(manifest, mediaManifest)
	manDesc.Platform = &plat
	// containerd names the imported image after the first annotation; the
	// second is the OCI spec's own.
	manDesc.Annotations = map[string]string{"io.containerd.image.name": img.Name, "org.opencontainers.image.ref.name": img.Name}
	index, err := json.Marshal(map[string]any{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": []descriptor{manDesc}})
	if err != nil {
		return "", err
	}

	tw := tar.NewWriter(w)
	add := func(name string, b []byte) error {
		if err := tw.WriteHeader(&tar.Header{Name: name, Mode: 0o644, Size: int64(len(b)), Typeflag: tar.TypeReg, ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		_, err := tw.Write(b)
		return err
	}
	if err := add("oci-layout", []byte(`{"imageLayoutVersion":"1.0.0"}`)); err != nil {
		return "", err
	}
	if err := add("index.json", index); err != nil {
		return "", err
	}
	digests := make([]string, 0, len(blobs))
	for d := range blobs {
		digests = append(digests, d)
	}
	sort.Strings(digests)
	for _, d := range digests {
		if err := add("blobs/sha256/"+strings.TrimPrefix(d, "sha256:"), blobs[d]); err != nil {
			return "", err
		}
	}
	return manDesc.Digest, tw.Close()
}

// layerTar packs the files, sorted, each parent directory before its
// children.
func layerTar(files []File) ([]byte, error) {
	entries := map[string]File{}
	for _, f := range files {
		p := path.Clean(f.Path)
		if !path.IsAbs(f.Path) || p == "/" {
			return nil, fmt.Errorf("file path %q: want an absolute path below /", f.Path)
		}
		if _, dup := entries[p]; dup {
			return nil, fmt.Errorf("file %s given twice", p)
		}
		f.Path = p
		entries[p] = f
	}
	for p := range entries {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			if e, ok := entries[d]; ok {
				if !e.Mode.IsDir() {
					return nil, fmt.Errorf("%s is inside %s, which is not a directory", p, d)
				}
				continue
			}
			entries[d] = Dir(d, 0o755)
		}
	}
	names := make([]string, 0, len(entries))
	for p := range entries {
		names = append(names, p)
	}
	sort.Strings(names) // "/a" < "/a/b": parents first
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range names {
		f := entries[p]
		h := &tar.Header{Name: strings.TrimPrefix(p, "/"), Mode: int64(f.Mode.Perm()), ModTime: time.Unix(0, 0)}
		if f.Mode&fs.ModeSticky != 0 {
			h.Mode |= 0o1000
		}
		switch {
		case f.Mode.IsDir():
			h.Typeflag, h.Name = tar.TypeDir, h.Name+"/"
		case f.Mode&fs.ModeSymlink != 0:
			if f.Link == "" {
				return nil, fmt.Errorf("symlink %s has no target", p)
			}
			h.Typeflag, h.Linkname = tar.TypeSymlink, f.Link
		case f.Mode.IsRegular():
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.Data))
		default:
			return nil, fmt.Errorf("%s: unsupported mode %v", p, f.Mode)
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(f.Data); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// libDirs are where the dynamic loader looks for shared libraries on
// Debian (multiarch first), in its order.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib"}

// WithLibs copies a dynamically linked host binary to path p in the image
// together with its program interpreter and every shared library it needs,
// transitively, each at the path the loader finds it on the host (so the
// libraries must be installed there).
func WithLibs(src, p string) ([]File, error) {
	bin, err := FromHost(src, p)
	if err != nil {
		return nil, err
	}
	out := []File{bin}
	seen := map[string]bool{}
	queue := []string{src}
	for len(queue) > 0 {
		f, err := elf.Open(queue[0])
		if err != nil {
			return nil, err
		}
		queue = queue[1:]
		needed, err := f.ImportedLibraries()
		var deps []string
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				b := make([]byte, prog.Filesz)
				if _, err := prog.ReadAt(b, 0); err == nil {
					deps = append(deps, strings.TrimRight(string(b), "\x00"))
				}
			}
		}
		f.Close()
		if err != nil {
			return nil, err
		}
		for _, lib := range needed {
			found := ""
			for _, d := range libDirs {
				if _, err := os.Stat(filepath.Join(d, lib)); err == nil {
					found = filepath.Join(d, lib)
					break
				}
			}
			if found == "" {
				return nil, fmt.Errorf("%s needs %s, which is in none of %v (install the package that has it)", src, lib, libDirs)
			}
			deps = append(deps, found)
		}
		for _, d := range deps {
			if seen[d] {
				continue
			}
			seen[d] = true
			lib, err := FromHost(d, d)
			if err != nil {
				return nil, err
			}
			out = append(out, lib)
			queue = append(queue, d)
		}
	}
	return out, nil
}
