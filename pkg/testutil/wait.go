package testutil

import (
	"testing"
	"time"
)

// WaitFor polls cond until it holds. After timeout the test fails, naming
// what it waited for and adding what explain says then (a log tail, the
// last value seen), if given. Tests poll an observable condition this way
// instead of sleeping.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool, explain ...func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			msg := "timed out after " + timeout.String() + " waiting for " + what
			for _, e := range explain {
				msg += "\n" + e()
			}
			t.Fatal(msg)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
