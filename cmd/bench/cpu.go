package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// atClkTck is AT_CLKTCK in the ELF auxiliary vector (<elf.h>): the kernel
// passes every process the unit of /proc's times, which is what
// sysconf(_SC_CLK_TCK) returns in C.
const atClkTck = 17

// clkTck is the unit of utime and stime in /proc/PID/stat (USER_HZ, 100 on
// every Linux build in practice), read once from the auxiliary vector;
// clkTckFromAuxv is false if it could not be read and 100 is assumed.
var clkTck, clkTckFromAuxv = readClkTck()

func readClkTck() (int64, bool) {
	auxv, err := unix.Auxv()
	if err != nil {
		return 100, false
	}
	return clkTckOf(auxv)
}

// clkTckOf finds AT_CLKTCK in an auxiliary vector; 100 and false if absent.
func clkTckOf(auxv [][2]uintptr) (int64, bool) {
	for _, kv := range auxv {
		if kv[0] == atClkTck && kv[1] > 0 {
			return int64(kv[1]), true
		}
	}
	return 100, false
}

func clkTckNote() string {
	if clkTckFromAuxv {
		return fmt.Sprintf("clock tick 1/%d s from AT_CLKTCK", clkTck)
	}
	return "clock tick assumed 1/100 s (AT_CLKTCK unreadable)"
}

// procStat is what the bench reads from one /proc/PID/stat.
type procStat struct {
	pid, ppid int
	ticks     int64 // utime + stime
}

// parseProcStat reads pid, ppid and utime+stime from a /proc/PID/stat text.
func parseProcStat(stat []byte) (procStat, error) {
	s := string(stat)
	open := strings.IndexByte(s, '(')
	// comm may hold spaces and parentheses: fields restart after the last ')'.
	i := strings.LastIndexByte(s, ')')
	if open < 0 || i < open {
		return procStat{}, errors.New("malformed stat: no (comm)")
	}
	pid, err := strconv.Atoi(strings.TrimSpace(s[:open]))
	if err != nil {
		return procStat{}, fmt.Errorf("stat pid: %w", err)
	}
	f := strings.Fields(s[i+1:])
	// after ')': state(3) ppid(4) ... utime(14) stime(15): indexes 1, 11, 12 here.
	if len(f) < 13 {
		return procStat{}, errors.New("malformed stat: too few fields")
	}
	ppid, err := strconv.Atoi(f[1])
	if err != nil {
		return procStat{}, fmt.Errorf("stat ppid: %w", err)
	}
	u, err := strconv.ParseInt(f[11], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("stat utime: %w", err)
	}
	st, err := strconv.ParseInt(f[12], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("stat stime: %w", err)
	}
	return procStat{pid: pid, ppid: ppid, ticks: u + st}, nil
}

// treeTicks sums the ticks of root and all its descendants in procs (a
// process's own line covers all its threads). ok is false if root is not
// in procs.
func treeTicks(procs []procStat, root int) (ticks int64, ok bool) {
	children := map[int][]int{}
	byPID := map[int]procStat{}
	for _, p := range procs {
		byPID[p.pid] = p
		children[p.ppid] = append(children[p.ppid], p.pid)
	}
	if _, ok := byPID[root]; !ok {
		return 0, false
	}
	seen := map[int]bool{}
	stack := []int{root}
	for len(stack) > 0 {
		pid := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if seen[pid] {
			continue
		}
		seen[pid] = true
		ticks += byPID[pid].ticks
		stack = append(stack, children[pid]...)
	}
	return ticks, true
}

// procTreeCPU is the CPU ticks of pid and its live descendants: HAProxy's
// processes (a master-worker setup forks; `-db` runs one process, all of
// whose threads its stat line covers) or `ghostwire run`.
func procTreeCPU(pid int) (int64, error) {
	paths, err := filepath.Glob("/proc/[0-9]*/stat")
	if err != nil {
		return 0, err
	}
	var procs []procStat
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			continue // exited meanwhile
		}
		if s, err := parseProcStat(b); err == nil {
			procs = append(procs, s)
		}
	}
	t, ok := treeTicks(procs, pid)
	if !ok {
		return 0, fmt.Errorf("pid %d is gone", pid)
	}
	return t, nil
}
