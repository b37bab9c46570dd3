package datastore

import "testing"

func TestSendLatestReplacesUnread(t *testing.T) {
	ch := make(chan int, 1)
	for i := range 3 {
		SendLatest(ch, i)
	}
	if got := <-ch; got != 2 {
		t.Fatalf("got %d, want the newest (2)", got)
	}
	select {
	case v := <-ch:
		t.Fatalf("stale value %d left in the channel", v)
	default:
	}
}
