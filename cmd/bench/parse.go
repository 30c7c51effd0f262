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

// iperfUDPResult is what one iperf3 -u -J client run measured, on the
// receiver's side (the server's figures, which the client's JSON carries
// in end.sum_received).
type iperfUDPResult struct {
	Gbps     float64 // delivered
	LossPct  float64 // datagrams the receiver found missing, of those sent
	Bytes    int64   // delivered bytes: the work the proxy's CPU is divided by
	Packets  int64   // datagrams the receiver expected (sent)
	SentGbps float64 // the sender's rate, for the note
}

// parseIperf3UDP reads iperf3 -u -J output (3.12: end.sum_sent and
// end.sum_received, the latter from the server). A run in which nothing
// arrived is an error: the path is broken, not slow.
func parseIperf3UDP(out []byte) (iperfUDPResult, error) {
	type sum struct {
		Bytes         float64 `json:"bytes"`
		BitsPerSecond float64 `json:"bits_per_second"`
		Packets       int64   `json:"packets"`
		LostPercent   float64 `json:"lost_percent"`
	}
	var doc struct {
		Error string `json:"error"`
		End   struct {
			SumSent     *sum `json:"sum_sent"`
			SumReceived *sum `json:"sum_received"`
		} `json:"end"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		return iperfUDPResult{}, fmt.Errorf("parsing iperf3 JSON: %w", err)
	}
	if doc.Error != "" {
		return iperfUDPResult{}, fmt.Errorf("iperf3: %s", doc.Error)
	}
	rcv := doc.End.SumReceived
	if rcv == nil {
		return iperfUDPResult{}, errors.New("iperf3 JSON has no end.sum_received (iperf3 older than 3.10?)")
	}
	if rcv.BitsPerSecond <= 0 || rcv.Bytes <= 0 {
		return iperfUDPResult{}, fmt.Errorf("iperf3: the server received nothing (%d datagrams sent): the path is broken, not slow", rcv.Packets)
	}
	r := iperfUDPResult{Gbps: rcv.BitsPerSecond / 1e9, LossPct: rcv.LostPercent, Bytes: int64(rcv.Bytes), Packets: rcv.Packets}
	if s := doc.End.SumSent; s != nil {
		r.SentGbps = s.BitsPerSecond / 1e9
	}
	return r, nil
}

// floodResult is what the bench's UDP load generator (-udp-flood) reports
// on stdout when its time is up.
type floodResult struct {
	Sent       int64   `json:"sent"`    // datagrams the kernel accepted
	Seconds    float64 `json:"seconds"` // how long it sent
	Flows      int     `json:"flows"`
	Size       int     `json:"size"`
	Errors     int64   `json:"errors"` // failed sendmmsg calls (ECONNREFUSED after an ICMP error, ENOBUFS)
	FirstError string  `json:"first_error,omitempty"`
}

// sinkResult is what the bench's UDP sink (-udp-sink) reports on stdout
// when it is stopped.
type sinkResult struct {
	Datagrams int64 `json:"datagrams"`
	Bytes     int64 `json:"bytes"`
}

// lastJSONLine unmarshals the last line of out that is a JSON object into
// v: the helpers print "listening" when ready and their figures last.
func lastJSONLine(out []byte, v any) error {
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		l := strings.TrimSpace(lines[i])
		if strings.HasPrefix(l, "{") {
			return json.Unmarshal([]byte(l), v)
		}
	}
	return fmt.Errorf("no JSON line in %q", tail(out, 200))
}

// udpDelivery is the udp-64 figures from what the flood sent and the sink
// counted: datagrams delivered per second of sending, and the loss in
// percent of what was sent (never negative).
func udpDelivery(f floodResult, s sinkResult) (perSec, lossPct float64, err error) {
	if f.Seconds <= 0 || f.Sent <= 0 {
		return 0, 0, fmt.Errorf("the flood sent nothing (%d datagrams in %.2fs, %d errors, first: %s)", f.Sent, f.Seconds, f.Errors, f.FirstError)
	}
	if s.Datagrams <= 0 {
		return 0, 0, fmt.Errorf("the sink counted nothing of %d datagrams sent: the path is broken, not slow", f.Sent)
	}
	perSec = float64(s.Datagrams) / f.Seconds
	lossPct = max(0, 100*(1-float64(s.Datagrams)/float64(f.Sent)))
	return perSec, lossPct, nil
}

// gwRewrites is what `ghostwire status --json` says of the invisible
// mode's rewriting (issue 15): whether the owned netdev table has any
// counted rule, and how many of the box's own frames its bridge-egress
// chain rewrote toward each side (the "to client ipv4/ipv6" and "to
// server ipv4/ipv6" rules' packet counters).
type gwRewrites struct {
	Netdev             bool
	ToClient, ToServer uint64
}

// parseStatusRewrites reads gwRewrites from `ghostwire status --json`
// output. The document may follow other lines (the bench reads stdout
// and stderr together): it starts at the first line that opens a JSON
// object.
func parseStatusRewrites(out []byte) (gwRewrites, error) {
	var r gwRewrites
	s := string(out)
	start := strings.Index(s, "{")
	if start < 0 {
		return r, fmt.Errorf("no JSON document in ghostwire status --json's output: %q", tail(out, 200))
	}
	var doc struct {
		Mode  string `json:"mode"`
		Rules []struct {
			Table   string `json:"Table"`
			Rule    string `json:"Rule"`
			Packets uint64 `json:"Packets"`
		} `json:"rules"`
	}
	if err := json.NewDecoder(strings.NewReader(s[start:])).Decode(&doc); err != nil {
		return r, fmt.Errorf("parsing ghostwire status --json: %w", err)
	}
	if doc.Mode == "" {
		return r, errors.New("ghostwire status --json has no mode")
	}
	for _, rc := range doc.Rules {
		if rc.Table != "netdev" {
			continue
		}
		r.Netdev = true
		switch {
		case strings.HasPrefix(rc.Rule, "to client "):
			r.ToClient += rc.Packets
		case strings.HasPrefix(rc.Rule, "to server "):
			r.ToServer += rc.Packets
		}
	}
	return r, nil
}
