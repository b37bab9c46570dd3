package ociimage

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// readTar maps entry names to headers and contents.
func readTar(t *testing.T, b []byte) (names []string, hdr map[string]*tar.Header, data map[string][]byte) {
	t.Helper()
	hdr, data = map[string]*tar.Header{}, map[string][]byte{}
	tr := tar.NewReader(bytes.NewReader(b))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return names, hdr, data
		}
		if err != nil {
			t.Fatal(err)
		}
		c, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		names = append(names, h.Name)
		hdr[h.Name], data[h.Name] = h, c
	}
}

// blob reads a blob of the layout and checks that its name is its digest.
func blob(t *testing.T, data map[string][]byte, d descriptor) []byte {
	t.Helper()
	b, ok := data["blobs/sha256/"+strings.TrimPrefix(d.Digest, "sha256:")]
	if !ok {
		t.Fatalf("blob %s missing", d.Digest)
	}
	if got := fmt.Sprintf("sha256:%x", sha256.Sum256(b)); got != d.Digest || len(b) != d.Size {
		t.Fatalf("blob %s: digest %s size %d, descriptor says size %d", d.Digest, got, len(b), d.Size)
	}
	return b
}

func TestArchiveIsAValidLayoutWithTheImageName(t *testing.T) {
	img := Image{
		Name:       "localhost/flatnet/test:v1",
		Entrypoint: []string{"/bin/app"},
		Cmd:        []string{"--serve"},
		Env:        []string{"A=1", "PATH=/bin"},
		WorkingDir: "/srv",
		Files: []File{
			Regular("/bin/app", 0o755, []byte("#!/bin/sh\n")),
			Symlink("/bin/sh", "app"),
			Regular("/srv/www/cgi-bin/x", 0o700, []byte("x")),
			Dir("/tmp", 0o777|fs.ModeSticky),
		},
	}
	var out bytes.Buffer
	digest, err := Write(&out, img)
	if err != nil {
		t.Fatal(err)
	}
	names, _, data := readTar(t, out.Bytes())
	if names[0] != "oci-layout" || names[1] != "index.json" {
		t.Fatalf("archive starts with %v", names[:2])
	}
	var index struct{ Manifests []descriptor }
	if err := json.Unmarshal(data["index.json"], &index); err != nil {
		t.Fatal(err)
	}
	if len(index.Manifests) != 1 {
		t.Fatalf("%d manifests", len(index.Manifests))
	}
	m := index.Manifests[0]
	if m.Digest != digest || m.Annotations["io.containerd.image.name"] != img.Name || m.Annotations["org.opencontainers.image.ref.name"] != img.Name {
		t.Fatalf("index entry %+v, want digest %s and name %s", m, digest, img.Name)
	}
	var man struct {
		Config descriptor
		Layers []descriptor
	}
	if err := json.Unmarshal(blob(t, data, m), &man); err != nil {
		t.Fatal(err)
	}
	var cfg imageConfig
	if err := json.Unmarshal(blob(t, data, man.Config), &cfg); err != nil {
		t.Fatal(err)
	}
	if len(man.Layers) != 1 || len(cfg.RootFS.DiffIDs) != 1 || cfg.RootFS.DiffIDs[0] != man.Layers[0].Digest {
		t.Fatalf("layers %v, diff IDs %v", man.Layers, cfg.RootFS.DiffIDs)
	}
	c := cfg.Config
	if c.Entrypoint[0] != "/bin/app" || c.Cmd[0] != "--serve" || len(c.Env) != 2 || c.WorkingDir != "/srv" || cfg.OS != "linux" {
		t.Fatalf("image config %+v", cfg)
	}

	lnames, lhdr, ldata := readTar(t, blob(t, data, man.Layers[0]))
	want := []string{"bin/", "bin/app", "bin/sh", "srv/", "srv/www/", "srv/www/cgi-bin/", "srv/www/cgi-bin/x", "tmp/"}
	if strings.Join(lnames, " ") != strings.Join(want, " ") {
		t.Fatalf("layer entries %v, want %v (parents first)", lnames, want)
	}
	if h := lhdr["bin/sh"]; h.Typeflag != tar.TypeSymlink || h.Linkname != "app" {
		t.Fatalf("bin/sh: %+v", h)
	}
	if h := lhdr["srv/www/cgi-bin/x"]; h.Mode != 0o700 || string(ldata["srv/www/cgi-bin/x"]) != "x" || h.Uid != 0 || !h.ModTime.Equal(lhdr["bin/"].ModTime) {
		t.Fatalf("srv/www/cgi-bin/x: %+v", h)
	}
	if h := lhdr["tmp/"]; h.Mode != 0o1777 {
		t.Fatalf("tmp mode %o, want 1777", h.Mode)
	}

	var again bytes.Buffer
	if d, _ := Write(&again, img); d != digest || !bytes.Equal(again.Bytes(), out.Bytes()) {
		t.Fatalf("second write differs: %s vs %s", d, digest)
	}
}

func TestBadFilesAreRejected(t *testing.T) {
	cases := map[string][]File{
		"absolute path":    {Regular("etc/passwd", 0o644, nil)},
		"given twice":      {Regular("/a", 0o644, nil), Regular("/a/", 0o644, nil)},
		"not a directory":  {Regular("/a", 0o644, nil), Regular("/a/b", 0o644, nil)},
		"has no target":    {Symlink("/a", "")},
		"unsupported mode": {{Path: "/dev/null", Mode: fs.ModeDevice}},
	}
	for want, files := range cases {
		_, err := Write(io.Discard, Image{Name: "x", Files: files})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%v: error %v, want it to mention %q", files, err, want)
		}
	}
	if _, err := Write(io.Discard, Image{}); err == nil {
		t.Error("an image without a name was written")
	}
}

func TestTreeKeepsSymlinksAndModes(t *testing.T) {
	src := t.TempDir()
	os.MkdirAll(filepath.Join(src, "d"), 0o750)
	os.WriteFile(filepath.Join(src, "d", "run"), []byte("go"), 0o755)
	os.Symlink("d/run", filepath.Join(src, "link"))
	files, err := Tree(src, "/opt/x")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]File{}
	for _, f := range files {
		got[f.Path] = f
	}
	if f := got["/opt/x/d/run"]; string(f.Data) != "go" || f.Mode != 0o755 {
		t.Errorf("d/run: %+v", f)
	}
	if f := got["/opt/x/link"]; f.Mode&fs.ModeSymlink == 0 || f.Link != "d/run" {
		t.Errorf("link: %+v", f)
	}
	if f := got["/opt/x/d"]; !f.Mode.IsDir() || f.Mode.Perm() != 0o750 {
		t.Errorf("d: %+v", f)
	}
}

func TestWithLibsBringsInterpreterAndLibraries(t *testing.T) {
	// dash is essential on Debian and links libc only.
	files, err := WithLibs("/bin/dash", "/bin/sh")
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]bool{}
	for _, f := range files {
		if got[f.Path] {
			t.Errorf("%s twice", f.Path)
		}
		got[f.Path] = true
		if !f.Mode.IsRegular() || len(f.Data) == 0 {
			t.Errorf("%s: not a regular file with content", f.Path)
		}
	}
	var libc, interp bool
	for p := range got {
		libc = libc || strings.HasSuffix(p, "/libc.so.6")
		interp = interp || strings.Contains(p, "/ld-linux")
	}
	if !got["/bin/sh"] || !libc || !interp {
		t.Errorf("files %v: want /bin/sh, libc.so.6 and the loader", got)
	}
	if _, err := WithLibs("/etc/passwd", "/x"); err == nil {
		t.Error("a file that is not ELF was accepted")
	}
}
