package proxy

import (
	"errors"
	"fmt"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"golang.org/x/sys/unix"
)

// offloader moves an established connection's bytes kernel to kernel: both
// sockets go into a sockhash keyed by socket cookie, and an sk_skb verdict
// program sends what each one receives straight to the other's send queue.
// Neither the bytes nor the wake-ups reach this process; it only hears of
// FINs and resets.
type offloader struct {
	peers *ebpf.Map     // socket cookie -> the other socket of its pair
	prog  *ebpf.Program // the verdict program, attached to peers
}

// offloadSlots bounds the sockhash (two entries per connection). A full map
// only means new connections are relayed in user space.
const offloadSlots = 1 << 16

func newOffloader() (*offloader, error) {
	peers, err := ebpf.NewMap(&ebpf.MapSpec{
		Name:       "gw_peers",
		Type:       ebpf.SockHash,
		KeySize:    8,
		ValueSize:  8,
		MaxEntries: offloadSlots,
	})
	if err != nil {
		return nil, fmt.Errorf("creating sockhash: %w", err)
	}
	prog, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Name:         "gw_redirect",
		Type:         ebpf.SkSKB,
		AttachType:   ebpf.AttachSkSKBVerdict,
		License:      "Dual MIT/GPL",
		Instructions: redirectToPeer(peers.FD()),
	})
	if err != nil {
		peers.Close()
		return nil, fmt.Errorf("loading sk_skb verdict program: %w", err)
	}
	if err := link.RawAttachProgram(link.RawAttachProgramOptions{
		Target: peers.FD(), Program: prog, Attach: ebpf.AttachSkSKBVerdict,
	}); err != nil {
		prog.Close()
		peers.Close()
		return nil, fmt.Errorf("attaching verdict program to sockhash: %w", err)
	}
	return &offloader{peers: peers, prog: prog}, nil
}

// redirectToPeer is, in C:
//
//	if (skb->len == 0)
//		return SK_DROP;  // a bare FIN: nothing to forward
//	__u64 key = bpf_get_socket_cookie(skb);
//	bpf_sk_redirect_hash(skb, &peers, &key, 0);  // to the peer's egress
//	return SK_PASS;  // without a peer: kept on this socket, never dropped
//
// The empty skb of a bare FIN must not be redirected: the kernel's send
// loop takes "sent 0 bytes" for a broken pipe and sets EPIPE on the peer,
// which would then look reset. The FIN itself is relayed by the proxy, once
// the bytes before it have all reached the peer's send queue.
func redirectToPeer(peersFD int) asm.Instructions {
	const (
		skDrop = 0
		skPass = 1
	)
	return asm.Instructions{
		asm.LoadMem(asm.R2, asm.R1, 0, asm.Word), // skb->len
		asm.JNE.Imm(asm.R2, 0, "data"),
		asm.Mov.Imm(asm.R0, skDrop),
		asm.Return(),
		asm.Mov.Reg(asm.R6, asm.R1).WithSymbol("data"),
		asm.FnGetSocketCookie.Call(),
		asm.StoreMem(asm.RFP, -8, asm.R0, asm.DWord),
		asm.Mov.Reg(asm.R1, asm.R6),
		asm.LoadMapPtr(asm.R2, peersFD),
		asm.Mov.Reg(asm.R3, asm.RFP),
		asm.Add.Imm(asm.R3, -8),
		asm.Mov.Imm(asm.R4, 0), // flags 0: the peer's egress, not its ingress
		asm.FnSkRedirectHash.Call(),
		asm.Mov.Imm(asm.R0, skPass),
		asm.Return(),
	}
}

// pair makes a and b (connected TCP sockets) forward to each other. Bytes
// that arrived before the call are forwarded too, in order: they sit in the
// receive queue, held back by a high SO_RCVLOWAT, until both sockets are in
// the map; lowering it then hands them to the verdict program ahead of
// anything newer. On error neither socket stays in the map.
func (o *offloader) pair(a, b int) error {
	ca, err := unix.GetsockoptUint64(a, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return fmt.Errorf("reading SO_COOKIE: %w", err)
	}
	cb, err := unix.GetsockoptUint64(b, unix.SOL_SOCKET, unix.SO_COOKIE)
	if err != nil {
		return fmt.Errorf("reading SO_COOKIE: %w", err)
	}
	// Hold back data_ready (and so the verdict) while the pair is half in
	// the map: the first socket in would otherwise have nowhere to send.
	for _, fd := range []int{a, b} {
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, holdBack); err != nil {
			return fmt.Errorf("setting SO_RCVLOWAT: %w", err)
		}
	}
	release := func() error {
		var errs []error
		for _, fd := range []int{a, b} {
			if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVLOWAT, 1); err != nil {
				errs = append(errs, fmt.Errorf("setting SO_RCVLOWAT: %w", err))
			}
		}
		return errors.Join(errs...)
	}
	if err := o.peers.Update(ca, uint64(b), ebpf.UpdateNoExist); err != nil {
		return errors.Join(fmt.Errorf("adding socket to sockhash: %w", err), release())
	}
	if err := o.peers.Update(cb, uint64(a), ebpf.UpdateNoExist); err != nil {
		o.peers.Delete(ca)
		return errors.Join(fmt.Errorf("adding socket to sockhash: %w", err), release())
	}
	// Lowering SO_RCVLOWAT runs data_ready: queued bytes go to the peer now.
	return release()
}

// holdBack is an SO_RCVLOWAT no burst during set-up reaches (the kernel caps
// it at half of tcp_rmem's maximum).
const holdBack = 1 << 30

func (o *offloader) close() {
	// Closing the map drops every socket's link to the program; the
	// sockets themselves are the connections' to close.
	o.prog.Close()
	o.peers.Close()
}
