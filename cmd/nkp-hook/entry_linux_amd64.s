#include "go_asm.h"
#include "textflag.h"

// The process's entry point (-ldflags=-E=main.entry), before the Go runtime exists: no
// goroutine, no stack checks, no thread but this one; only raw system calls and the
// kernel's initial stack. It reads stdin into ·prefix until end of file; if all of it fit
// and it does not contain ·namespace, the domain is not nkp's and the process exits 0
// (hooks.Main's fast path, without starting the runtime). Otherwise it records what it
// read in ·prefixLen and ·prefixState; for nkp's domain read whole, ask (below) may
// answer it from hostd's reply; else it jumps to the runtime's own entry point, with the
// stack as the kernel left it, so that main runs as usual on those bytes.
TEXT ·entry(SB), NOSPLIT|NOFRAME, $0
	XORQ	R12, R12                // bytes read so far
readloop:
	MOVQ	$const_prefixSize, DX
	SUBQ	R12, DX                 // room left
	JZ	more                    // buffer full: stdin may continue
	MOVQ	$0, AX                  // SYS_read
	MOVQ	$0, DI                  // fd 0
	LEAQ	·prefix(SB), SI
	ADDQ	R12, SI
	SYSCALL
	CMPQ	AX, $-4                 // EINTR: again
	JEQ	readloop
	CMPQ	AX, $0
	JLT	more                    // an error: let Go read stdin again and report it
	JEQ	eof
	ADDQ	AX, R12
	JMP	readloop

eof:
	LEAQ	·prefix(SB), SI
	MOVQ	R12, CX
	CALL	search<>(SB)
	CMPQ	AX, $0
	JNE	all
	MOVQ	$0, DI                  // not nkp's domain: exit_group(0)
	MOVQ	$231, AX
	SYSCALL
	INT	$3                      // not reached

all:
	MOVQ	R12, ·prefixLen(SB)
	MOVQ	$const_stdinAll, ·prefixState(SB)
	CALL	shortSlice<>(SB)
	MOVQ	$1, ·sliceSet(SB)
	CALL	ask<>(SB)               // returns only when Go has to take over
	JMP	_rt0_amd64_linux(SB)

more:
	MOVQ	R12, ·prefixLen(SB)
	MOVQ	$const_stdinMore, ·prefixState(SB)
	JMP	_rt0_amd64_linux(SB)

// shortSlice asks the fair scheduler for a short time slice for this thread (go doc
// internal/schedslice; the runtime's threads inherit it): sched_getattr, then
// sched_setattr with the same policy, nice value and reset-on-fork flag and
// sched_runtime = const_shortSlice, for SCHED_OTHER and SCHED_BATCH only. Errors are
// ignored: a kernel before 6.12 takes the call and ignores the value. Clobbers AX, CX,
// DX, SI, DI, R10, R11.
TEXT shortSlice<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ	$315, AX                // SYS_sched_getattr(0, &schedAttr, size, 0)
	XORQ	DI, DI
	LEAQ	·schedAttr(SB), SI
	MOVQ	$const_schedAttrSize, DX
	XORQ	R10, R10
	SYSCALL
	CMPQ	AX, $0
	JNE	sliceDone
	MOVL	·schedAttr+4(SB), AX    // sched_policy
	CMPL	AX, $0                  // SCHED_OTHER
	JEQ	sliceSet
	CMPL	AX, $3                  // SCHED_BATCH
	JNE	sliceDone
sliceSet:
	ANDQ	$1, ·schedAttr+8(SB)    // sched_flags: SCHED_FLAG_RESET_ON_FORK only
	MOVQ	$const_shortSlice, ·schedAttr+24(SB) // sched_runtime
	MOVQ	$0, ·schedAttr+32(SB)   // sched_deadline
	MOVQ	$0, ·schedAttr+40(SB)   // sched_period
	MOVQ	$314, AX                // SYS_sched_setattr(0, &schedAttr, 0)
	XORQ	DI, DI
	LEAQ	·schedAttr(SB), SI
	XORQ	DX, DX
	SYSCALL
sliceDone:
	RET

// func hasNamespace(b []byte) bool
TEXT ·hasNamespace(SB), NOSPLIT, $0-25
	MOVQ	b_base+0(FP), SI
	MOVQ	b_len+8(FP), CX
	CALL	search<>(SB)
	MOVB	AX, ret+24(FP)
	RET

// search: AX = 1 if the CX bytes at SI contain ·namespace, else 0. Uses only registers
// (AX, CX, DX, DI, R8, R9, R10, R11) and no stack beyond its return address.
TEXT search<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ	·namespace+0(SB), DI    // needle
	MOVQ	·namespace+8(SB), DX    // its length (not zero)
	XORQ	AX, AX
	CMPQ	CX, DX
	JLT	done                    // shorter than the needle
	SUBQ	DX, CX                  // CX = last position where it can start
	XORQ	R8, R8                  // R8 = position
outer:
	CMPQ	R8, CX
	JGT	done
	LEAQ	(SI)(R8*1), R10
	XORQ	R9, R9                  // R9 = index in the needle
inner:
	CMPQ	R9, DX
	JEQ	found
	MOVBLZX	(R10)(R9*1), R11
	CMPB	R11, (DI)(R9*1)
	JNE	next
	INCQ	R9
	JMP	inner
next:
	INCQ	R8
	JMP	outer
found:
	MOVQ	$1, AX
done:
	RET

// ask: nkp's domain, all of stdin in ·prefix. When the Go path would ask hostd with the
// built-in defaults (exactly DOMAIN OP SUB-OP EXTRA, the first not a flag; no NKP_HOOK_*
// variable; no config file at ·hookConfig), it sends the request in hookproto's binary
// framing to ·hookSocket with the Go path's timeouts and reads the reply: an allow
// without a message is exit_group(0). Anything else returns, with the exchange recorded
// in the sent* globals for main (hooks.Exchange); a check that fails returns with
// ·sentStage 0 and nothing sent, and Go does it all.
//
// Registers kept across the calls below: R15 = &argc, R14 = the socket, R12 and BX.
TEXT ask<>(SB), NOSPLIT|NOFRAME, $0
	LEAQ	8(SP), R15              // argc, argv[0..4], NULL, envp..., NULL
	CMPQ	0(R15), $5
	JNE	giveup
	MOVQ	16(R15), SI             // argv[1], the domain: not a flag
	CMPB	0(SI), $0x2d            // '-'
	JEQ	giveup

	// The request's header: magic and version, argv[1..4] each a 32-bit length and its
	// bytes (printable ASCII only, at most hookproto.MaxName; domain and operation not
	// empty), the XML's length.
	MOVQ	·header2+0(SB), SI
	MOVQ	·header2+8(SB), CX
	LEAQ	·reqHeader(SB), DI
	REP;	MOVSB
	MOVQ	$1, R8
argloop:
	MOVQ	8(R15)(R8*8), SI
	XORQ	CX, CX
arglen:
	MOVBLZX	(SI)(CX*1), AX
	TESTB	AL, AL
	JZ	argend
	CMPB	AL, $0x20
	JCS	giveup                  // a control character
	CMPB	AL, $0x7e
	JHI	giveup                  // DEL, or not ASCII
	INCQ	CX
	CMPQ	CX, $const_maxName
	JHI	giveup
	JMP	arglen
argend:
	CMPQ	R8, $2
	JHI	argput
	TESTQ	CX, CX
	JZ	giveup                  // no domain or no operation
argput:
	MOVL	CX, (DI)
	ADDQ	$4, DI
	REP;	MOVSB
	INCQ	R8
	CMPQ	R8, $4
	JLS	argloop
	MOVQ	·prefixLen(SB), CX
	MOVL	CX, (DI)
	ADDQ	$4, DI
	LEAQ	·reqHeader(SB), AX
	SUBQ	AX, DI
	MOVQ	DI, ·reqHeaderLen(SB)

	// The XML: ASCII only (hostd refuses what is not UTF-8; Go checks that first).
	LEAQ	·prefix(SB), SI
	MOVQ	·prefixLen(SB), CX
	XORQ	AX, AX
ascii:
	CMPQ	AX, CX
	JEQ	asciiok
	MOVBLZX	(SI)(AX*1), DX
	TESTB	$0x80, DL
	JNZ	giveup
	INCQ	AX
	JMP	ascii
asciiok:

	// No NKP_HOOK_* in the environment.
	LEAQ	56(R15), BX             // envp
envloop:
	MOVQ	(BX), SI
	TESTQ	SI, SI
	JZ	envok
	MOVQ	·envPrefix+0(SB), DI
	MOVQ	·envPrefix+8(SB), CX
	XORQ	AX, AX
envcmp:
	CMPQ	AX, CX
	JEQ	giveup                  // it starts with NKP_HOOK_
	MOVBLZX	(SI)(AX*1), DX
	CMPB	DL, (DI)(AX*1)
	JNE	envnext
	INCQ	AX
	JMP	envcmp
envnext:
	ADDQ	$8, BX
	JMP	envloop
envok:

	// No config file: stat(·hookConfig) must say ENOENT.
	MOVQ	·hookConfig+0(SB), SI
	MOVQ	·hookConfig+8(SB), CX
	LEAQ	·pathBuf(SB), DI
	MOVQ	$const_pathBufSize, DX
	CALL	cstring<>(SB)
	CMPQ	AX, $0
	JEQ	giveup
	MOVQ	$4, AX                  // SYS_stat
	LEAQ	·pathBuf(SB), DI
	LEAQ	·statBuf(SB), SI
	SYSCALL
	CMPQ	AX, $-2                 // ENOENT
	JNE	giveup

	// The timeout: the required one, or for an optional operation the smaller of the
	// two (hooks.Run's rule).
	MOVQ	·requiredTimeoutMs+0(SB), SI
	MOVQ	·requiredTimeoutMs+8(SB), CX
	CALL	atoi<>(SB)
	CMPQ	AX, $0
	JLE	giveup
	MOVQ	AX, R13
	MOVQ	·optionalOps+0(SB), DI
	MOVQ	·optionalOps+8(SB), BX
	ADDQ	DI, BX                  // end of the list
	MOVQ	24(R15), SI             // argv[2], the operation
opsloop:
	CMPQ	DI, BX
	JCC	opsdone                 // not in the list: required
	XORQ	AX, AX
opcmp:
	MOVBLZX	(DI)(AX*1), DX
	CMPB	DL, (SI)(AX*1)
	JNE	opskip
	TESTB	DL, DL
	JZ	optional
	INCQ	AX
	JMP	opcmp
opskip:
	MOVBLZX	(DI), DX
	INCQ	DI
	TESTB	DL, DL
	JNZ	opskip
	JMP	opsloop
optional:
	MOVQ	·optionalTimeoutMs+0(SB), SI
	MOVQ	·optionalTimeoutMs+8(SB), CX
	CALL	atoi<>(SB)
	CMPQ	AX, $0
	JLE	giveup
	CMPQ	AX, R13
	JGE	opsdone
	MOVQ	AX, R13
opsdone:
	MOVQ	R13, ·timeoutMs(SB)

	// struct sockaddr_un for ·hookSocket as syscall.Connect makes it: not empty, not
	// abstract (@), shorter than sun_path; length 2 + len + 1.
	MOVQ	·hookSocket+0(SB), SI
	MOVQ	·hookSocket+8(SB), CX
	CMPQ	CX, $0
	JEQ	giveup
	CMPB	0(SI), $0x40            // '@'
	JEQ	giveup
	MOVW	$1, ·sockaddr(SB)       // AF_UNIX
	LEAQ	·sockaddr+2(SB), DI
	MOVQ	$108, DX
	CALL	cstring<>(SB)
	CMPQ	AX, $0
	JEQ	giveup
	ADDQ	$3, AX
	MOVQ	AX, ·sockaddrLen(SB)

	// From here on the sent* globals say what happened.
	MOVQ	$228, AX                // SYS_clock_gettime
	MOVQ	$0, DI                  // CLOCK_REALTIME, as time.Unix reads it back
	LEAQ	·sentTime(SB), SI
	SYSCALL
	MOVQ	$41, AX                 // SYS_socket
	MOVQ	$1, DI                  // AF_UNIX
	MOVQ	$0x80001, SI            // SOCK_STREAM|SOCK_CLOEXEC
	MOVQ	$0, DX
	SYSCALL
	CMPQ	AX, $0
	JLT	giveup                  // nothing happened: Go tries again
	MOVQ	AX, R14
	MOVQ	AX, ·sentFd(SB)
connect:
	MOVQ	$21, DX                 // SO_SNDTIMEO bounds a connect to a full backlog
	CALL	settimeo<>(SB)
	CMPQ	AX, $0
	JNE	connfail
	MOVQ	$42, AX                 // SYS_connect
	MOVQ	R14, DI
	LEAQ	·sockaddr(SB), SI
	MOVQ	·sockaddrLen(SB), DX
	SYSCALL
	CMPQ	AX, $-4                 // EINTR
	JEQ	connect
	CMPQ	AX, $0
	JNE	connfail

	LEAQ	·reqHeader(SB), R12
	MOVQ	·reqHeaderLen(SB), BX
	CALL	sendall<>(SB)
	CMPQ	AX, $0
	JNE	writefail
	LEAQ	·prefix(SB), R12
	MOVQ	·prefixLen(SB), BX
	CALL	sendall<>(SB)
	CMPQ	AX, $0
	JNE	writefail

	// The reply's first len(ReplyAllow) bytes, no more (the Go path reads no further
	// than one message either).
	XORQ	BX, BX
readreply:
	CMPQ	BX, $const_replyAllowLen
	JEQ	gotreply
	MOVQ	$20, DX                 // SO_RCVTIMEO
	CALL	settimeo<>(SB)
	CMPQ	AX, $0
	JNE	readfail
	MOVQ	$0, AX                  // SYS_read
	MOVQ	R14, DI
	LEAQ	·replyBuf(SB), SI
	ADDQ	BX, SI
	MOVQ	$const_replyAllowLen, DX
	SUBQ	BX, DX
	SYSCALL
	CMPQ	AX, $-4
	JEQ	readreply
	CMPQ	AX, $0
	JLT	readfail
	JEQ	readfail                // end of file: errno 0
	ADDQ	AX, BX
	JMP	readreply
gotreply:
	MOVQ	BX, ·replyLen(SB)
	MOVQ	·replyAllow+0(SB), SI
	MOVQ	0(SI), AX
	CMPQ	AX, ·replyBuf+0(SB)
	JNE	handreply
	MOVWLZX	8(SI), AX
	MOVWLZX	·replyBuf+8(SB), DX
	CMPQ	AX, DX
	JNE	handreply
	MOVQ	$0, DI                  // hostd allows, nothing to say: exit_group(0)
	MOVQ	$231, AX
	SYSCALL
	INT	$3
handreply:
	MOVQ	$const_stageReply, ·sentStage(SB)
	RET
readfail:
	MOVQ	BX, ·replyLen(SB)
	NEGQ	AX
	MOVQ	AX, ·sentErrno(SB)
	MOVQ	$const_stageRead, ·sentStage(SB)
	RET
writefail:
	NEGQ	AX
	MOVQ	AX, ·sentErrno(SB)
	MOVQ	$const_stageWrite, ·sentStage(SB)
	RET
connfail:
	NEGQ	AX
	MOVQ	AX, ·sentErrno(SB)
	MOVQ	$const_stageConnect, ·sentStage(SB)
	MOVQ	$3, AX                  // SYS_close
	MOVQ	R14, DI
	SYSCALL
	RET
giveup:
	MOVQ	$0, ·sentStage(SB)
	RET

// cstring copies the CX bytes at SI to DI with a NUL after them; AX = CX, or 0 when
// they hold a NUL or do not fit in DX bytes with the NUL.
TEXT cstring<>(SB), NOSPLIT|NOFRAME, $0
	XORQ	AX, AX
	CMPQ	CX, DX
	JCC	cstrret
cstrloop:
	CMPQ	AX, CX
	JEQ	cstrend
	MOVBLZX	(SI)(AX*1), R8
	TESTB	R8B, R8B
	JZ	cstrbad
	MOVB	R8B, (DI)(AX*1)
	INCQ	AX
	JMP	cstrloop
cstrend:
	MOVB	$0, (DI)(AX*1)
	RET
cstrbad:
	XORQ	AX, AX
cstrret:
	RET

// atoi: AX = the decimal number in the CX bytes at SI (at most 12 digits), -1 if they
// are not one.
TEXT atoi<>(SB), NOSPLIT|NOFRAME, $0
	XORQ	AX, AX
	TESTQ	CX, CX
	JZ	atoibad
	CMPQ	CX, $12
	JHI	atoibad
atoiloop:
	MOVBLZX	(SI), DX
	SUBQ	$0x30, DX
	CMPQ	DX, $9
	JHI	atoibad
	IMULQ	$10, AX
	ADDQ	DX, AX
	INCQ	SI
	DECQ	CX
	JNZ	atoiloop
	RET
atoibad:
	MOVQ	$-1, AX
	RET

// settimeo sets socket option DX (SO_SNDTIMEO or SO_RCVTIMEO) of R14 to what is left
// until ·sentTime + ·timeoutMs, as hooks' conn.setTimeout does: AX = 0, or -EAGAIN when
// nothing is left (Go's timeout error, as a call's own), or setsockopt's -errno (and
// ·sentSockopt = 1). Keeps BX, R12-R15.
TEXT settimeo<>(SB), NOSPLIT|NOFRAME, $0
	MOVQ	DX, R9
	MOVQ	$228, AX                // SYS_clock_gettime
	MOVQ	$0, DI
	LEAQ	·nowTime(SB), SI
	SYSCALL
	MOVQ	·sentTime+0(SB), AX
	IMULQ	$1000000000, AX
	ADDQ	·sentTime+8(SB), AX
	MOVQ	·timeoutMs(SB), CX
	IMULQ	$1000000, CX
	ADDQ	CX, AX                  // the deadline in ns
	MOVQ	·nowTime+0(SB), CX
	IMULQ	$1000000000, CX
	ADDQ	·nowTime+8(SB), CX
	SUBQ	CX, AX                  // left
	CMPQ	AX, $0
	JLE	timeoexp
	XORQ	DX, DX
	MOVQ	$1000000000, CX
	DIVQ	CX
	MOVQ	AX, ·timeval+0(SB)      // seconds
	MOVQ	DX, AX
	XORQ	DX, DX
	MOVQ	$1000, CX
	DIVQ	CX
	MOVQ	AX, ·timeval+8(SB)      // microseconds
	ORQ	·timeval+0(SB), AX
	JNZ	timeoset
	MOVQ	$1, ·timeval+8(SB)      // under 1 µs: 1 µs (zero would mean no timeout)
timeoset:
	MOVQ	$54, AX                 // SYS_setsockopt
	MOVQ	R14, DI
	MOVQ	$1, SI                  // SOL_SOCKET
	MOVQ	R9, DX
	LEAQ	·timeval(SB), R10
	MOVQ	$16, R8
	SYSCALL
	CMPQ	AX, $0
	JEQ	timeoret
	MOVQ	$1, ·sentSockopt(SB)
timeoret:
	RET
timeoexp:
	MOVQ	$-11, AX                // EAGAIN
	RET

// sendall sends the BX bytes at R12 on R14 (MSG_NOSIGNAL: EPIPE, not SIGPIPE, as Go
// gets it); AX = 0, or the -errno of the call that failed.
TEXT sendall<>(SB), NOSPLIT|NOFRAME, $0
sendloop:
	TESTQ	BX, BX
	JZ	sendok
	MOVQ	$21, DX                 // SO_SNDTIMEO
	CALL	settimeo<>(SB)
	CMPQ	AX, $0
	JNE	sendret
	MOVQ	$44, AX                 // SYS_sendto
	MOVQ	R14, DI
	MOVQ	R12, SI
	MOVQ	BX, DX
	MOVQ	$0x4000, R10            // MSG_NOSIGNAL
	XORQ	R8, R8
	XORQ	R9, R9
	SYSCALL
	CMPQ	AX, $-4
	JEQ	sendloop
	CMPQ	AX, $0
	JLT	sendret
	ADDQ	AX, R12
	SUBQ	AX, BX
	JMP	sendloop
sendok:
	XORQ	AX, AX
sendret:
	RET
