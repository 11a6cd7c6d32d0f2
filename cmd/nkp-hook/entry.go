package main

import (
	"bytes"
	"io"
	"os"
	"strconv"
	"syscall"
	"time"

	"github.com/nkp-dev/nkp/hooks"
	"github.com/nkp-dev/nkp/hooks/hookproto"
	"github.com/nkp-dev/nkp/internal/schedslice"
)

// What the entry point (entry_linux_amd64.s) leaves for main when it hands over to the Go
// runtime. They are set before the runtime starts, so they must need no initialisation
// code: prefix and the counters are zeroed by the loader, namespace is a string constant
// the linker lays out.
var (
	prefix      [prefixSize]byte // the first bytes of stdin
	prefixLen   int              // how many of them the entry read
	prefixState int              // stdinUntouched, stdinAll or stdinMore
	namespace   = hookproto.Namespace
)

// The defaults that both the entry and hooks.Run start from. They are strings laid out
// by the linker (no initialisation code), so that a build can point them elsewhere with
// -ldflags=-X (TestEntry does); the timeouts are in milliseconds.
var (
	hookSocket        = hooks.DefaultSocket
	hookConfig        = hooks.DefaultConfig
	requiredTimeoutMs = "30000" // hooks.DefaultTimeout
	optionalTimeoutMs = "5000"  // hooks.OptionalTimeout
)

// What the entry compares with, laid out by the linker.
var (
	// optionalOps are the operations that are not hookproto.Required, each followed by a
	// NUL byte (the entry compares them with argv's C strings).
	optionalOps = hookproto.OpStarted + "\x00" + hookproto.OpStopped + "\x00" + hookproto.OpRelease + "\x00" +
		hookproto.OpReconnect + "\x00" + hookproto.OpAttach + "\x00"
	envPrefix  = "NKP_HOOK_"              // any such variable: the entry leaves it all to Go
	header2    = hookproto.Magic + "\x02" // a version 2 message's first bytes
	replyAllow = hookproto.ReplyAllow
)

// Constants for the entry.
const (
	maxName       = hookproto.MaxName
	pathBufSize   = len(pathBuf)
	replyAllowLen = len(hookproto.ReplyAllow)
	stageConnect  = int(hooks.StageConnect)
	stageWrite    = int(hooks.StageWrite)
	stageRead     = int(hooks.StageRead)
	stageReply    = int(hooks.StageReply)
)

// The entry's exchange with hostd, which it hands over to main unless the reply was
// hookproto.ReplyAllow (then it exits 0 itself). Zeroed by the loader.
var (
	sentStage   int      // 0: not attempted (main asks hostd itself), else a hooks.Stage
	sentErrno   int      // the failed call's errno (0 with StageRead: end of file)
	sentSockopt int      // 1: it was setting the socket's timeout that failed
	sentFd      int      // the socket (StageWrite and later)
	sentTime    [2]int64 // CLOCK_REALTIME when the entry began (seconds, nanoseconds)
	replyBuf    [len(hookproto.ReplyAllow)]byte
	replyLen    int

	// The entry's scratch space.
	reqHeader    [len(hookproto.Magic) + 1 + 4*(4+hookproto.MaxName) + 4]byte
	reqHeaderLen int
	sockaddr     [110]byte // struct sockaddr_un
	sockaddrLen  int
	pathBuf      [4096]byte // hookConfig as a C string
	statBuf      [256]byte  // struct stat, unused
	timeoutMs    int
	timeval      [2]int64
	nowTime      [2]int64
	schedAttr    [schedAttrSize]byte // struct sched_attr (version 1)
	sliceSet     int                 // 1: the entry asked for a short time slice
)

// schedAttrSize is struct sched_attr's size in its first version (with the utilisation
// clamps); shortSlice is the time slice the entry asks for, in nanoseconds.
const (
	schedAttrSize = 56
	shortSlice    = int64(schedslice.Short)
)

// prefixSize is what the entry reads before it hands over: a domain XML is a few KiB, one
// with many devices some tens; a larger one takes the ordinary path.
const prefixSize = 1 << 20

// prefixState values. The zero value is what a binary built without the entry sees.
const (
	stdinUntouched = 0 // the entry did not run: read os.Stdin
	stdinAll       = 1 // prefix[:prefixLen] is all of stdin (end of file reached)
	stdinMore      = 2 // stdin continues after prefix[:prefixLen] (buffer full, or read failed: read it again)
)

// stdin is the domain XML as hooks.Main reads it: what the entry read, then what is left.
func stdin() io.Reader {
	switch prefixState {
	case stdinAll:
		return bytes.NewReader(prefix[:prefixLen])
	case stdinMore:
		return io.MultiReader(bytes.NewReader(prefix[:prefixLen]), os.Stdin)
	}
	return os.Stdin
}

// options are hooks.Run's: the defaults above and the entry's exchange.
func options() hooks.Options {
	ms := func(s string) time.Duration {
		n, err := strconv.Atoi(s)
		if err != nil {
			return 0 // hooks' own default
		}
		return time.Duration(n) * time.Millisecond
	}
	o := hooks.Options{Socket: hookSocket, Config: hookConfig, Timeout: ms(requiredTimeoutMs), OptionalTimeout: ms(optionalTimeoutMs), SliceSet: sliceSet != 0}
	if sentStage != 0 {
		o.Sent = &hooks.Exchange{
			Start:   time.Unix(sentTime[0], sentTime[1]),
			Stage:   hooks.Stage(sentStage),
			Errno:   syscall.Errno(sentErrno),
			Sockopt: sentSockopt != 0,
			Fd:      sentFd,
			Reply:   replyBuf[:replyLen],
		}
	}
	return o
}
