// The C side of the engine: the lock every libtpms call is made under, the state the
// data loop needs without calling Go, and the data loop itself (conn.c).

#ifndef NKP_CONN_H
#define NKP_CONN_H

#include <stddef.h>
#include <stdint.h>

// nkp_lock and nkp_unlock take and release the engine's recursive mutex. Every libtpms
// call is made under it, from Go (TPM's methods, with the OS thread locked) and from
// the data loop.
void nkp_lock(void);
void nkp_unlock(void);

// Guarded by the mutex.
extern int nkp_running;        // between a successful TPMLIB_MainInit and TPMLIB_Terminate
extern uint8_t nkp_locality;   // what libtpms' getlocality callback reports
extern uint32_t nkp_last_cc;   // command code of the last command processed since MainInit
extern int nkp_cb_failed;      // an NVRAM callback failed during the current libtpms call
extern unsigned char *nkp_resp; // libtpms' response buffer, kept across calls
extern uint32_t nkp_resp_cap;

// nkp_conn_commands counts the commands the data loop answered, over all its
// connections: written under the mutex, read without it (relaxed atomics), so that
// package swtpm's idle trim can tell a busy TPM from an idle one without any cost on
// the command path beyond one store.
extern uint64_t nkp_conn_commands;
static inline uint64_t nkp_conn_commands_load(void) {
	return __atomic_load_n(&nkp_conn_commands, __ATOMIC_RELAXED);
}

// nkp_process runs one command (under the mutex, which the caller holds) and records
// its command code; the response is in nkp_resp[0:*rlen].
uint32_t nkp_process(const unsigned char *cmd, uint32_t len, uint32_t *rlen);

// nkp_job is one libtpms call run on a thread of its own (nkp_job_start), while the
// thread that holds the mutex waits for it: op 0 is TPMLIB_MainInit, op 1 nkp_process
// of cmd[0:len]. The job's thread writes one byte to fd when the call returned.
struct nkp_job {
	int op;
	const unsigned char *cmd;
	uint32_t len;
	uint32_t rlen;     // nkp_process' response length
	uint32_t rc;       // the call's result
	int fd;            // written to once rc is set
	void *stack;       // the thread's stack (mmap), unmapped by nkp_job_join
	size_t stack_size;
	unsigned long thread; // pthread_t
};

// nkp_job_start starts j's thread: 0, or an errno (nothing started).
int nkp_job_start(struct nkp_job *j);

// nkp_job_join waits for j's thread to end and unmaps its stack.
void nkp_job_join(struct nkp_job *j);

// nkp_frame finds the first command in b[0:len] as package data's Frame does. It
// returns 1 and fills f when a whole command is there, 0 with f->need set when more
// bytes are needed, and -1 with f->size and f->prefixed set for a refused size.
struct nkp_frame {
	size_t off;      // start of the command (after a TPM_SEND_COMMAND prefix)
	size_t n;        // bytes the command takes, prefix included
	size_t need;     // bytes needed to go on
	uint32_t size;   // the command's declared size
	int prefixed;    // it came with the prefix
	uint8_t locality; // the prefix's locality
};
int nkp_frame(const unsigned char *b, size_t len, uint32_t max, struct nkp_frame *f);

// Options of one data connection.
struct nkp_conn_opts {
	int fd;
	uint32_t max_cmd;        // largest command accepted, without the prefix
	int msg_timeout_ms;      // the rest of a command must arrive within this (0: no bound)
	int write_timeout_ms;    // a response must be written within this (0: no bound)
	int reject_locality4;
	int allow_set_locality;
	int disconnect;          // end after the first response
	uintptr_t handle;        // passed to nkpConnCommandFailed
};

// Why nkp_serve_conn returned.
enum {
	NKP_END_EOF = 1,     // the peer closed (or the connection was shut down) between commands
	NKP_END_SIZE,        // a refused command size; TPM_RC_COMMAND_SIZE was sent
	NKP_END_TRUNCATED,   // the stream ended inside a command (err: 0, or the read's errno)
	NKP_END_STALLED,     // the rest of a command did not come within msg_timeout_ms
	NKP_END_READ,        // reading failed (err)
	NKP_END_WRITE,       // writing a response failed (err; ETIMEDOUT after write_timeout_ms)
	NKP_END_DISCONNECT,  // disconnect: one response was sent
	NKP_END_NOMEM,
};

struct nkp_conn_end {
	int why;
	int err;
	uint32_t size;     // NKP_END_SIZE: the declared size
	int prefixed;      // NKP_END_SIZE: the command had the prefix
	uint32_t pending;  // NKP_END_TRUNCATED, NKP_END_STALLED: bytes of the unfinished command
	uint64_t commands; // commands answered
};

// nkp_serve_conn answers TPM commands on a connected stream socket until it ends.
void nkp_serve_conn(const struct nkp_conn_opts *o, struct nkp_conn_end *end);

#endif
