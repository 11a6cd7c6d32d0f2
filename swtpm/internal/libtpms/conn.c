//go:build cgo

// The engine's lock and its data loop: one TPM command after another on a data
// connection, read, executed by libtpms and answered without a transition to Go (Go is
// entered only when libtpms stores its state, through the NVRAM callbacks, and to log a
// failed command). See ServeConn in conn_cgo.go.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <libtpms/tpm_library.h>
#include <libtpms/tpm_error.h>

#include "conn.h"
#include "_cgo_export.h"

static pthread_mutex_t nkp_mu = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

int nkp_running;
uint8_t nkp_locality;
uint32_t nkp_last_cc;
int nkp_cb_failed;
unsigned char *nkp_resp;
uint32_t nkp_resp_cap;
uint64_t nkp_conn_commands;

void nkp_lock(void) { pthread_mutex_lock(&nkp_mu); }
void nkp_unlock(void) { pthread_mutex_unlock(&nkp_mu); }

static uint32_t be32(const unsigned char *b) {
	return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | b[3];
}

static void put32(unsigned char *b, uint32_t v) {
	b[0] = v >> 24; b[1] = v >> 16; b[2] = v >> 8; b[3] = v;
}

uint32_t nkp_process(const unsigned char *cmd, uint32_t len, uint32_t *rlen) {
	*rlen = 0;
	nkp_cb_failed = 0;
	uint32_t rc = TPMLIB_Process(&nkp_resp, rlen, &nkp_resp_cap, (unsigned char *)cmd, len);
	nkp_last_cc = len >= 10 ? be32(cmd + 6) : 0;
	return rc;
}

// The stack of a job's thread: libtpms and OpenSSL need far less. The job's own
// mapping rather than glibc's cached thread stacks, so that the pages its call
// touched go back to the kernel when it is joined.
#define NKP_JOB_STACK (1 << 20)

static void *nkp_job_main(void *arg) {
	struct nkp_job *j = arg;
	// Let the thread that started us go on to wait in Go's poller, which hands the P
	// to a thread that answers waiting clients: on a busy or single CPU the new
	// thread would otherwise run its whole time slice first, and a client connecting
	// during the start wait for it (what that does to a start: swtpmbench's
	// start-to-ready, BENCHMARKS.md).
	sched_yield();
	if (j->op == 0)
		j->rc = TPMLIB_MainInit();
	else
		j->rc = nkp_process(j->cmd, j->len, &j->rlen);
	char b = 1;
	while (write(j->fd, &b, 1) < 0 && errno == EINTR)
		;
	return NULL;
}

int nkp_job_start(struct nkp_job *j) {
	void *stack = mmap(NULL, NKP_JOB_STACK, PROT_READ | PROT_WRITE,
	                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
	if (stack == MAP_FAILED)
		return errno;
	pthread_attr_t at;
	int e = pthread_attr_init(&at);
	if (e == 0) {
		e = pthread_attr_setstack(&at, stack, NKP_JOB_STACK);
		pthread_t th;
		if (e == 0)
			e = pthread_create(&th, &at, nkp_job_main, j);
		if (e == 0)
			j->thread = (unsigned long)th;
		pthread_attr_destroy(&at);
	}
	if (e != 0) {
		munmap(stack, NKP_JOB_STACK);
		return e;
	}
	j->stack = stack;
	j->stack_size = NKP_JOB_STACK;
	return 0;
}

void nkp_job_join(struct nkp_job *j) {
	pthread_join((pthread_t)j->thread, NULL);
	munmap(j->stack, j->stack_size);
	j->stack = NULL;
}

// Wire constants (package data).
enum {
	HEADER = 10, PREFIX = 9, SEND_COMMAND = 8,
	RC_SUCCESS = 0, RC_FAILURE = 0x101, RC_INSUFFICIENT = 0x9a, RC_COMMAND_SIZE = 0x142,
	RC_LOCALITY = 0x907, CC_SET_LOCALITY = 0x20001000,
};

int nkp_frame(const unsigned char *b, size_t len, uint32_t max, struct nkp_frame *f) {
	memset(f, 0, sizeof(*f));
	uint16_t tag = len >= 2 ? (uint16_t)(b[0] << 8 | b[1]) : 0;
	if (len >= 4 && tag != 0x8001 && tag != 0x8002 && be32(b) == SEND_COMMAND) {
		if (len < PREFIX) {
			f->need = PREFIX;
			return 0;
		}
		f->prefixed = 1;
		f->locality = b[4];
		f->off = PREFIX;
		f->size = be32(b + 5);
	} else {
		if (len < 6) {
			f->need = 6;
			return 0;
		}
		f->size = be32(b + 2);
	}
	if (f->size < HEADER || f->size > max)
		return -1;
	size_t end = f->off + f->size;
	if (len < end) {
		f->need = end;
		return 0;
	}
	f->n = end;
	return 1;
}

static int64_t now_ms(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

// timeout_left returns what is left until deadline for poll, starting the clock on
// the first call (*deadline 0); -1 (no bound) when ms is 0.
static int timeout_left(int64_t *deadline, int ms) {
	if (ms <= 0)
		return -1;
	int64_t now = now_ms();
	if (*deadline == 0)
		*deadline = now + ms;
	return *deadline > now ? (int)(*deadline - now) : 0;
}

// write_all writes b[0:len] within timeout_ms; 0 or an errno.
static int write_all(int fd, const unsigned char *b, size_t len, int timeout_ms) {
	int64_t deadline = 0;
	size_t off = 0;
	while (off < len) {
		// MSG_NOSIGNAL: a peer that went away gives EPIPE, not SIGPIPE.
		ssize_t k = send(fd, b + off, len - off, MSG_NOSIGNAL);
		if (k < 0 && errno == ENOTSOCK)
			k = write(fd, b + off, len - off);
		if (k > 0) {
			off += k;
			continue;
		}
		if (k < 0 && errno == EINTR)
			continue;
		if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
			struct pollfd p = {.fd = fd, .events = POLLOUT};
			int t = timeout_left(&deadline, timeout_ms);
			int r = poll(&p, 1, t);
			if (r == 0)
				return ETIMEDOUT;
			if (r < 0 && errno != EINTR)
				return errno;
			continue;
		}
		return k < 0 ? errno : EIO;
	}
	return 0;
}

static void error_response(unsigned char *b, uint32_t rc) {
	b[0] = 0x80; b[1] = 0x01;
	put32(b + 2, HEADER);
	put32(b + 6, rc);
}

// frame_reply puts resp (n bytes) into out as the command's reply: unchanged, or as
// `u32 n, resp, u32 0` after the TPM_SEND_COMMAND prefix. It returns the length.
static size_t frame_reply(unsigned char *out, const unsigned char *resp, uint32_t n, int prefixed) {
	if (!prefixed) {
		memcpy(out, resp, n);
		return n;
	}
	put32(out, n);
	memcpy(out + 4, resp, n);
	put32(out + 4 + n, 0);
	return (size_t)n + 8;
}

static int locality_ok(const struct nkp_conn_opts *o, uint8_t loc) {
	return loc <= 4 && !(loc == 4 && o->reject_locality4);
}

// execute runs one framed command under the lock and leaves its reply in *out
// (grown as needed); it returns the reply's length, 0 when out of memory.
static size_t execute(const struct nkp_conn_opts *o, const struct nkp_frame *f,
                      const unsigned char *cmd, unsigned char **out, size_t *outcap) {
	unsigned char err[HEADER];
	const unsigned char *resp = err;
	uint32_t n = HEADER;
	size_t len = 0;
	nkp_lock();
	__atomic_store_n(&nkp_conn_commands, nkp_conn_commands + 1, __ATOMIC_RELAXED);
	if (f->prefixed && !locality_ok(o, f->locality)) {
		error_response(err, RC_LOCALITY);
	} else {
		if (f->prefixed)
			nkp_locality = f->locality;
		uint32_t cc = be32(cmd + 6);
		if (!nkp_running) {
			error_response(err, RC_FAILURE);
		} else if (cc == CC_SET_LOCALITY) {
			// swtpm's TPM2_SetLocality vendor command: header, u8 locality.
			if (!o->allow_set_locality)
				error_response(err, RC_FAILURE);
			else if (f->size < HEADER + 1)
				error_response(err, RC_INSUFFICIENT);
			else if (!locality_ok(o, cmd[HEADER]))
				error_response(err, RC_LOCALITY);
			else {
				nkp_locality = cmd[HEADER];
				error_response(err, RC_SUCCESS);
			}
		} else {
			uint32_t rc = nkp_process(cmd, f->size, &n);
			if (rc != 0 || nkp_cb_failed || nkp_resp == NULL || n < HEADER || n > nkp_resp_cap) {
				// The engine failed (a state store that failed puts libtpms in failure
				// mode): the command is not acknowledged.
				if (nkp_resp != NULL && n > 0 && n <= nkp_resp_cap)
					memset(nkp_resp, 0, n);
				nkpConnCommandFailed(o->handle, cc, rc, n);
				error_response(err, RC_FAILURE);
				n = HEADER;
			} else {
				resp = nkp_resp;
			}
		}
	}
	size_t need = (size_t)n + 8;
	if (need > *outcap) {
		unsigned char *nb = malloc(need);
		if (nb != NULL) {
			memset(*out, 0, *outcap);
			free(*out);
			*out = nb;
			*outcap = need;
		}
	}
	if (need <= *outcap)
		len = frame_reply(*out, resp, n, f->prefixed);
	if (resp == nkp_resp)
		memset(nkp_resp, 0, n); // responses carry unsealed data and NV contents
	nkp_unlock();
	return len;
}

void nkp_serve_conn(const struct nkp_conn_opts *o, struct nkp_conn_end *end) {
	memset(end, 0, sizeof(*end));
	int fd = o->fd;
	size_t cap = (size_t)o->max_cmd + PREFIX;
	size_t outcap = (size_t)o->max_cmd + 8;
	unsigned char *buf = malloc(cap);
	unsigned char *out = malloc(outcap);
	if (buf == NULL || out == NULL) {
		end->why = NKP_END_NOMEM;
		goto done;
	}
	memset(buf, 0, cap);
	// Non-blocking, so that a write is bounded by write_timeout_ms (poll waits).
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0 && !(fl & O_NONBLOCK))
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);

	size_t start = 0, have = 0; // buf[start:have] is read and not yet used
	for (;;) {
		struct nkp_frame f;
		int64_t deadline = 0;
		int r;
		while ((r = nkp_frame(buf + start, have - start, o->max_cmd, &f)) == 0) {
			if (start > 0 && start + f.need > cap) {
				memmove(buf, buf + start, have - start);
				memset(buf + have - start, 0, start);
				have -= start;
				start = 0;
			}
			// Waiting for a command's first byte is unbounded; once it has come, the
			// rest must come within msg_timeout_ms.
			int t = have > start ? timeout_left(&deadline, o->msg_timeout_ms) : -1;
			struct pollfd p = {.fd = fd, .events = POLLIN};
			int pr = poll(&p, 1, t);
			if (pr < 0) {
				if (errno == EINTR)
					continue;
				end->why = NKP_END_READ;
				end->err = errno;
				goto done;
			}
			if (pr == 0) {
				end->why = NKP_END_STALLED;
				end->pending = have - start;
				goto done;
			}
			ssize_t k = read(fd, buf + have, cap - have);
			if (k > 0) {
				have += k;
				continue;
			}
			if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
				continue;
			end->err = k < 0 ? errno : 0;
			if (have > start) {
				end->why = NKP_END_TRUNCATED;
				end->pending = have - start;
			} else {
				end->why = k == 0 ? NKP_END_EOF : NKP_END_READ;
			}
			goto done;
		}
		if (r < 0) {
			// The size field is the only framing the stream has and it is the field
			// that is wrong: answer TPM_RC_COMMAND_SIZE and end (package data's SizeError).
			unsigned char e[HEADER], reply[HEADER + 8];
			error_response(e, RC_COMMAND_SIZE);
			size_t n = frame_reply(reply, e, HEADER, f.prefixed);
			write_all(fd, reply, n, o->write_timeout_ms);
			end->why = NKP_END_SIZE;
			end->size = f.size;
			end->prefixed = f.prefixed;
			goto done;
		}
		unsigned char *cmd = buf + start + f.off;
		size_t len = execute(o, &f, cmd, &out, &outcap);
		memset(buf + start, 0, f.n); // commands carry auth values and NV data
		start += f.n;
		if (start == have)
			start = have = 0;
		if (len == 0) {
			end->why = NKP_END_NOMEM;
			goto done;
		}
		int werr = write_all(fd, out, len, o->write_timeout_ms);
		memset(out, 0, len);
		if (werr != 0) {
			end->why = NKP_END_WRITE;
			end->err = werr;
			goto done;
		}
		end->commands++;
		if (o->disconnect) {
			end->why = NKP_END_DISCONNECT;
			goto done;
		}
	}
done:
	if (buf != NULL) {
		memset(buf, 0, cap);
		free(buf);
	}
	if (out != NULL) {
		memset(out, 0, outcap);
		free(out);
	}
}
