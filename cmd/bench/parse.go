package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
)

// iperfResult is what one iperf3 -J client run measured.
type iperfResult struct {
	Gbps        float64 // receiver side, all streams
	Retransmits int     // sender side
	// Bytes is every byte the client sent over the whole run, omitted
	// intervals (-O) included: the work the proxy's CPU is divided by.
	Bytes int64
}

// parseIperf3 reads iperf3 -J output. It takes the receiver's sum, which
// counts only bytes that arrived, and reports iperf3's own error field.
func parseIperf3(out []byte) (iperfResult, error) {
	var doc struct {
		Error     string `json:"error"`
		Intervals []struct {
			Sum struct {
				Bytes float64 `json:"bytes"`
			} `json:"sum"`
		} `json:"intervals"`
		End struct {
			SumSent struct {
				Bytes         float64 `json:"bytes"`
				BitsPerSecond float64 `json:"bits_per_second"`
				Retransmits   int     `json:"retransmits"`
			} `json:"sum_sent"`
			SumReceived struct {
				BitsPerSecond float64 `json:"bits_per_second"`
			} `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return iperfResult{}, fmt.Errorf("parsing iperf3 JSON: %w", err)
	}
	if doc.Error != "" {
		return iperfResult{}, fmt.Errorf("iperf3: %s", doc.Error)
	}
	bps := doc.End.SumReceived.BitsPerSecond
	if bps <= 0 {
		return iperfResult{}, errors.New("iperf3 JSON has no end.sum_received.bits_per_second")
	}
	// The intervals cover the whole run, the omitted ones too (the end sums
	// leave those out); without them fall back to the sent sum.
	var bytes float64
	for _, iv := range doc.Intervals {
		bytes += iv.Sum.Bytes
	}
	if bytes <= 0 {
		bytes = doc.End.SumSent.Bytes
	}
	return iperfResult{Gbps: bps / 1e9, Retransmits: doc.End.SumSent.Retransmits, Bytes: int64(bytes)}, nil
}

// wrkResult is what one wrk run measured.
type wrkResult struct {
	ReqPerSec float64
	P99       time.Duration // zero unless wrk ran with --latency
	Requests  int64
	Errors    int64 // socket errors (connect, read, write, timeout) + non-2xx/3xx
}

// parseWrk reads wrk's text report (with or without --latency).
func parseWrk(out []byte) (wrkResult, error) {
	var r wrkResult
	var haveRate bool
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	inDist := false
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		f := strings.Fields(line)
		switch {
		case strings.HasPrefix(line, "Latency Distribution"):
			inDist = true
		case inDist && len(f) == 2 && strings.HasSuffix(f[0], "%"):
			if f[0] == "99%" || f[0] == "99.000%" {
				d, err := parseWrkDuration(f[1])
				if err != nil {
					return r, fmt.Errorf("wrk p99 %q: %w", f[1], err)
				}
				r.P99 = d
			}
		case strings.HasPrefix(line, "Requests/sec:") && len(f) == 2:
			v, err := strconv.ParseFloat(f[1], 64)
			if err != nil {
				return r, fmt.Errorf("wrk Requests/sec %q: %w", f[1], err)
			}
			r.ReqPerSec, haveRate = v, true
		case len(f) >= 3 && f[1] == "requests" && f[2] == "in":
			inDist = false
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk request count %q: %w", f[0], err)
			}
			r.Requests = n
		case strings.HasPrefix(line, "Socket errors:"):
			// Socket errors: connect 0, read 12, write 0, timeout 0
			for _, part := range strings.Split(strings.TrimPrefix(line, "Socket errors:"), ",") {
				kv := strings.Fields(part)
				if len(kv) == 2 {
					n, err := strconv.ParseInt(kv[1], 10, 64)
					if err != nil {
						return r, fmt.Errorf("wrk socket errors %q: %w", part, err)
					}
					r.Errors += n
				}
			}
		case strings.HasPrefix(line, "Non-2xx or 3xx responses:") && len(f) == 5:
			n, err := strconv.ParseInt(f[4], 10, 64)
			if err != nil {
				return r, fmt.Errorf("wrk non-2xx %q: %w", f[4], err)
			}
			r.Errors += n
		}
	}
	if !haveRate {
		return r, errors.New("wrk output has no Requests/sec line")
	}
	return r, nil
}

// parseWrkDuration reads wrk's latency units: 812.00us, 1.20ms, 2.01s, 1.00m.
func parseWrkDuration(s string) (time.Duration, error) {
	// Longest suffixes first: "ms" must not read as "m" or "s".
	units := []struct {
		suffix string
		d      time.Duration
	}{{"us", time.Microsecond}, {"ms", time.Millisecond}, {"m", time.Minute}, {"s", time.Second}, {"h", time.Hour}}
	for _, u := range units {
		if num, ok := strings.CutSuffix(s, u.suffix); ok {
			v, err := strconv.ParseFloat(num, 64)
			if err != nil {
				return 0, err
			}
			return time.Duration(v * float64(u.d)), nil
		}
	}
	return 0, fmt.Errorf("unknown unit")
}

// parseVmRSS returns VmRSS in KiB from a /proc/PID/status text.
func parseVmRSS(status []byte) (int64, error) {
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			f := strings.Fields(rest)
			if len(f) != 2 || f[1] != "kB" {
				return 0, fmt.Errorf("unexpected VmRSS line %q", line)
			}
			return strconv.ParseInt(f[0], 10, 64)
		}
	}
	return 0, errors.New("no VmRSS line (process gone or a kernel thread)")
}

// parseSnmpForwarding reads the Ip lines of /proc/net/snmp (a header line
// of names, then one of values): whether forwarding is on (Forwarding 1;
// 2 is off) and the ForwDatagrams counter.
func parseSnmpForwarding(snmp []byte) (on bool, forwarded int64, err error) {
	var names []string
	for _, line := range strings.Split(string(snmp), "\n") {
		rest, ok := strings.CutPrefix(line, "Ip: ")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if names == nil {
			names = f
			continue
		}
		if len(f) != len(names) {
			return false, 0, errors.New("snmp: Ip header and values differ in length")
		}
		var haveOn, haveFwd bool
		for i, n := range names {
			switch n {
			case "Forwarding":
				on, haveOn = f[i] == "1", true
			case "ForwDatagrams":
				if forwarded, err = strconv.ParseInt(f[i], 10, 64); err != nil {
					return false, 0, fmt.Errorf("snmp ForwDatagrams: %w", err)
				}
				haveFwd = true
			}
		}
		if !haveOn || !haveFwd {
			return false, 0, errors.New("snmp: no Ip Forwarding or ForwDatagrams")
		}
		return on, forwarded, nil
	}
	return false, 0, errors.New("snmp: no Ip lines")
}
