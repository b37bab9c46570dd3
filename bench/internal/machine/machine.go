// Package machine reports how busy the benchmark machine is, so that every
// figure can be printed with the load it was measured under.
package machine

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"time"
)

// LoadAvg is the 1, 5 and 15 minute load average, e.g. "0.52 0.61 0.70".
func LoadAvg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

// Busy is the share (0-100) of all CPUs' time that was not idle during d.
func Busy(d time.Duration) float64 {
	b0, t0 := cpuTimes()
	time.Sleep(d)
	b1, t1 := cpuTimes()
	if t1 == t0 {
		return 0
	}
	return 100 * (b1 - b0) / (t1 - t0)
}

// cpuTimes sums the first line of /proc/stat: busy and total jiffies.
func cpuTimes() (busy, total float64) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	if !sc.Scan() {
		return 0, 0
	}
	for i, v := range strings.Fields(sc.Text())[1:] {
		x, _ := strconv.ParseFloat(v, 64)
		total += x
		if i != 3 && i != 4 { // idle, iowait
			busy += x
		}
	}
	return busy, total
}
