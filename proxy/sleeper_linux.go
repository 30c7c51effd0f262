package proxy

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// sleeper parks idle relay directions outside the Go scheduler. A parked
// goroutine costs its stack (2 KiB at least) for as long as its connection
// is idle; an fd in an epoll set costs nothing in this process. So a
// direction idle for a while registers its socket here and its goroutine
// exits; when the socket becomes readable (data, FIN or error) the loop
// starts a fresh goroutine to carry on.
type sleeper struct {
	epfd, wake int // epoll instance; eventfd that ends the loop

	mu      sync.Mutex
	next    uint64
	waiting map[uint64]func() // id -> resume
	closed  bool
	done    chan struct{}
}

// Event masks for park.
const (
	readable   = unix.EPOLLIN | unix.EPOLLRDHUP // data, a FIN or an error
	peerClosed = unix.EPOLLRDHUP                // a FIN or an error, not data
	failed     = 0                              // an error or hang-up only
)

func newSleeper() (*sleeper, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("creating epoll instance: %w", err)
	}
	wake, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("creating eventfd: %w", err)
	}
	// id 0 is the eventfd.
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, wake, &unix.EpollEvent{Events: unix.EPOLLIN}); err != nil {
		unix.Close(epfd)
		unix.Close(wake)
		return nil, fmt.Errorf("adding eventfd to epoll: %w", err)
	}
	s := &sleeper{epfd: epfd, wake: wake, next: 1, waiting: map[uint64]func(){}, done: make(chan struct{})}
	go s.loop()
	return s, nil
}

// park calls resume (once, on the loop's goroutine: it must not block) when
// fd reports one of events (EPOLLERR and EPOLLHUP always count), unless
// cancel gets there first.
func (s *sleeper) park(fd int, events uint32, resume func()) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return 0, errors.New("sleeper closed")
	}
	id := s.next
	s.next++
	s.waiting[id] = resume
	// Level-triggered, one shot: a state that arose before this call wakes
	// it at once, and the fd is reported once per park.
	ev := &unix.EpollEvent{Events: events | unix.EPOLLONESHOT, Fd: int32(id), Pad: int32(id >> 32)}
	err := unix.EpollCtl(s.epfd, unix.EPOLL_CTL_ADD, fd, ev)
	if errors.Is(err, unix.EEXIST) { // still registered, disarmed, from an earlier park
		err = unix.EpollCtl(s.epfd, unix.EPOLL_CTL_MOD, fd, ev)
	}
	if err != nil {
		delete(s.waiting, id)
		return 0, fmt.Errorf("adding socket to epoll: %w", err)
	}
	return id, nil
}

// cancel forgets id and reports whether it was still waiting: true means
// resume will never be called and the caller takes over. fd must still be
// open (closing it drops the registration too).
func (s *sleeper) cancel(id uint64, fd int) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.waiting[id]; !ok {
		return false
	}
	delete(s.waiting, id)
	unix.EpollCtl(s.epfd, unix.EPOLL_CTL_DEL, fd, nil)
	return true
}

// sleeping is how many directions are parked.
func (s *sleeper) sleeping() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.waiting)
}

func (s *sleeper) loop() {
	defer close(s.done)
	events := make([]unix.EpollEvent, 128)
	for {
		n, err := unix.EpollWait(s.epfd, events, -1)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return
		}
		var resumes []func()
		s.mu.Lock()
		for _, ev := range events[:n] {
			id := uint64(uint32(ev.Fd)) | uint64(uint32(ev.Pad))<<32
			if id == 0 {
				s.mu.Unlock()
				return // close
			}
			if r, ok := s.waiting[id]; ok {
				delete(s.waiting, id)
				resumes = append(resumes, r)
			}
		}
		s.mu.Unlock()
		for _, r := range resumes {
			r()
		}
	}
}

// close stops the loop; parked directions are not resumed (the proxy
// cancels them before).
func (s *sleeper) close() {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return
	}
	s.closed = true
	s.mu.Unlock()
	unix.Write(s.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
	<-s.done
	unix.Close(s.epfd)
	unix.Close(s.wake)
}
