package vxlan

import "testing"

func TestChecksumBugKernel(t *testing.T) {
	for release, want := range map[string]bool{
		"4.19.0-26-amd64": true, "5.4.0-150-generic": true, "5.6.19": true,
		"5.7.0": false, "5.10.0-28-amd64": false, "6.18.44": false, "garbage": true,
	} {
		if got := checksumBugKernel(release); got != want {
			t.Errorf("%s: %v, want %v", release, got, want)
		}
	}
}
