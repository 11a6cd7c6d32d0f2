//go:build cgo

// The handler of SIGTERM, SIGINT and SIGHUP: one write of the signal number into a
// non-blocking pipe (async-signal-safe; errno preserved). See termsig.go.
//
// The pipe is made once and both its ends stay open for the life of the process, so
// that a handler still running on another thread while the handlers are put back
// never writes into a closed (or reused) descriptor, nor into a pipe without a
// reader. Go reads a duplicate of the read end, which Stop closes.

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <unistd.h>

static const int nkp_termsig_sigs[] = {SIGTERM, SIGINT, SIGHUP};
#define NKP_TERMSIG_N (sizeof(nkp_termsig_sigs) / sizeof(nkp_termsig_sigs[0]))

static int nkp_termsig_pipe[2] = {-1, -1};
static int nkp_termsig_installed;
static struct sigaction nkp_termsig_old[NKP_TERMSIG_N];

static void nkp_termsig_handler(int sig) {
	int saved = errno;
	unsigned char b = (unsigned char)sig;
	ssize_t n = write(nkp_termsig_pipe[1], &b, 1); // a full pipe drops it: bytes already wait
	(void)n;
	errno = saved;
}

// nkp_termsig_install installs the handler; 0 or an errno (EBUSY when installed
// already). *rfd is a new descriptor of the pipe's read end (close-on-exec,
// non-blocking), for the caller to close.
int nkp_termsig_install(int *rfd) {
	if (nkp_termsig_installed)
		return EBUSY;
	if (nkp_termsig_pipe[0] < 0 && pipe2(nkp_termsig_pipe, O_CLOEXEC | O_NONBLOCK) != 0) {
		int e = errno;
		nkp_termsig_pipe[0] = nkp_termsig_pipe[1] = -1;
		return e;
	}
	// Signals of an earlier installation that nobody read.
	unsigned char junk[64];
	while (read(nkp_termsig_pipe[0], junk, sizeof(junk)) > 0)
		;
	int fd = fcntl(nkp_termsig_pipe[0], F_DUPFD_CLOEXEC, 0);
	if (fd < 0)
		return errno;
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = nkp_termsig_handler;
	sa.sa_flags = SA_ONSTACK | SA_RESTART; // SA_ONSTACK: Go's threads run handlers on their signal stack
	sigfillset(&sa.sa_mask);
	for (size_t i = 0; i < NKP_TERMSIG_N; i++) {
		if (sigaction(nkp_termsig_sigs[i], &sa, &nkp_termsig_old[i]) != 0) {
			int e = errno;
			while (i-- > 0)
				sigaction(nkp_termsig_sigs[i], &nkp_termsig_old[i], NULL);
			close(fd);
			return e;
		}
	}
	nkp_termsig_installed = 1;
	*rfd = fd;
	return 0;
}

// nkp_termsig_uninstall puts the previous handlers back.
void nkp_termsig_uninstall(void) {
	if (!nkp_termsig_installed)
		return;
	for (size_t i = 0; i < NKP_TERMSIG_N; i++)
		sigaction(nkp_termsig_sigs[i], &nkp_termsig_old[i], NULL);
	nkp_termsig_installed = 0;
}
