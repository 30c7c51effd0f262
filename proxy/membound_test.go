package proxy

import (
	"os"
	"path/filepath"
	"testing"
)

func TestConnMemoryBound(t *testing.T) {
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "net/ipv4"), 0o755)
	os.WriteFile(filepath.Join(root, "net/ipv4/tcp_rmem"), []byte("4096\t131072\t6291456\n"), 0o644)
	os.WriteFile(filepath.Join(root, "net/ipv4/tcp_wmem"), []byte("4096\t16384\t4194304\n"), 0o644)
	got, err := ConnMemoryBound(root, 0)
	if err != nil {
		t.Fatal(err)
	}
	// 2 × (6 MiB + 4 MiB) + 2 × 1 MiB + 2 × 16 KiB
	if want := int64(2*(6291456+4194304) + 2<<20 + 2*16<<10); got != want {
		t.Errorf("ConnMemoryBound(autotuned) = %d, want %d", got, want)
	}
	// A fixed receive buffer replaces tcp_rmem: 2 × (2 × 1 MiB + 4 MiB) + ...
	if got, err := ConnMemoryBound(root, 1<<20); err != nil || got != int64(2*(2<<20+4194304)+2<<20+2*16<<10) {
		t.Errorf("ConnMemoryBound(1 MiB) = %d, %v", got, err)
	}
	os.WriteFile(filepath.Join(root, "net/ipv4/tcp_wmem"), []byte("4096 16384\n"), 0o644)
	if _, err := ConnMemoryBound(root, 0); err == nil {
		t.Error("a two-field tcp_wmem was accepted")
	}
}
