#include "go_asm.h"
#include "textflag.h"

// The process's entry point (-ldflags=-E=main.entry), before the Go runtime exists: no
// goroutine, no stack checks, no thread but this one; only raw system calls and the
// kernel's initial stack. It reads stdin into ·prefix until end of file; if all of it fit
// and it does not contain ·namespace, the domain is not nkp's and the process exits 0
// (hooks.Main's fast path, without starting the runtime). Otherwise it records what it
// read in ·prefixLen and ·prefixState and jumps to the runtime's own entry point, with
// the stack as the kernel left it, so that main runs as usual on those bytes.
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
	JMP	_rt0_amd64_linux(SB)

more:
	MOVQ	R12, ·prefixLen(SB)
	MOVQ	$const_stdinMore, ·prefixState(SB)
	JMP	_rt0_amd64_linux(SB)

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
