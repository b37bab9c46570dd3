package fileutil

import (
	"os"
	"strings"
)

// Tail is the last n lines of a (log) file, for error messages; a file
// that cannot be read gives "".
func Tail(path string, n int) string {
	b, _ := os.ReadFile(path)
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}
