package lab

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// ownerDir holds one file per namespace a lab made, and per container
// directory (its overlay root mounted inside), naming the process that
// made it. Close removes them, but a process that is killed (a test
// binary past its -timeout, a SIGKILL, a panic in another goroutine)
// never gets there: the next namespace made on the machine removes those
// whose owner is gone (sweepOrphans).
const ownerDir = "/run/ghostwire-lab"

// containerRecord is a record's name for a container directory (namespace
// records are named by the namespace).
func containerRecord(dir string) string { return "container-" + filepath.Base(dir) }

// processStart is a process's start time in clock ticks since boot
// (/proc/PID/stat field 22): with the PID, it names the process even after
// its PID is reused.
func processStart(pid int) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return "", err
	}
	// The command name (field 2) may hold spaces and parentheses: count
	// from the last ')'.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return "", fmt.Errorf("parsing /proc/%d/stat", pid)
	}
	return f[19], nil // field 22 is the 20th after the command name
}

// recordOwner notes that this process owns namespace name or, with dir
// set, the container directory dir (record name containerRecord(dir)).
func recordOwner(name, dir string) error {
	start, err := processStart(os.Getpid())
	if err != nil {
		return fmt.Errorf("recording the owner of namespace %s: %w", name, err)
	}
	if err := os.MkdirAll(ownerDir, 0o755); err != nil {
		return fmt.Errorf("recording the owner of namespace %s: %w", name, err)
	}
	owner := fmt.Sprintf("%d %s\n", os.Getpid(), start)
	if dir != "" {
		owner += "dir " + dir + "\n"
	}
	if err := os.WriteFile(filepath.Join(ownerDir, name), []byte(owner), 0o644); err != nil {
		return fmt.Errorf("recording the owner of namespace %s: %w", name, err)
	}
	return nil
}

// forgetOwner removes name's owner record; a missing one is fine.
func forgetOwner(name string) error {
	if err := os.Remove(filepath.Join(ownerDir, name)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing the owner record of namespace %s: %w", name, err)
	}
	return nil
}

// ownerAlive reports whether the process a record names still runs. A
// record that cannot be read is not an owner's.
func ownerAlive(record string) bool {
	first, _, _ := strings.Cut(record, "\n")
	f := strings.Fields(first)
	if len(f) != 2 {
		return false
	}
	pid, err := strconv.Atoi(f[0])
	if err != nil {
		return false
	}
	start, err := processStart(pid)
	return err == nil && start == f[1]
}

// sweepOrphans deletes the namespaces and container directories whose
// owner process is gone (a namespace's links go with it; the processes a
// lab starts, containers included, die with their owner, Pdeathsig), and
// returns their record names. Namespaces and directories without a
// record, made by anything else, are never touched.
func sweepOrphans() ([]string, error) {
	entries, err := os.ReadDir(ownerDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	} else if err != nil {
		return nil, fmt.Errorf("listing lab owners: %w", err)
	}
	var swept []string
	var errs []error
	for _, e := range entries {
		b, err := os.ReadFile(filepath.Join(ownerDir, e.Name()))
		if errors.Is(err, os.ErrNotExist) {
			continue // its owner closed it meanwhile
		} else if err != nil {
			errs = append(errs, err)
			continue
		}
		if ownerAlive(string(b)) {
			continue
		}
		_, dirLine, _ := strings.Cut(string(b), "\n")
		if dir, ok := strings.CutPrefix(strings.TrimSpace(dirLine), "dir "); ok {
			err = removeContainerDir(dir)
			err = errors.Join(err, forgetOwner(e.Name()))
		} else {
			err = deleteNS(&NS{Name: e.Name()})
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		swept = append(swept, e.Name())
	}
	return swept, errors.Join(errs...)
}
