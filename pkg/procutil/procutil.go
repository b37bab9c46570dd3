// Package procutil holds the one way flatnet's tools stop a child process.
package procutil

import (
	"os"
	"syscall"
	"time"
)

// Stop sends p SIGTERM and, if it has not exited after grace, SIGKILL.
// done must close once the process has been reaped (its Wait returned).
func Stop(p *os.Process, done <-chan struct{}, grace time.Duration) {
	p.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(grace):
		p.Kill()
		<-done
	}
}
