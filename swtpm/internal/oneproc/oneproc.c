//go:build cgo

// Runs before the Go runtime starts (an ELF constructor of the executable), so that
// the runtime sizes itself for one CPU. See doc.go.

#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdlib.h>

static cpu_set_t nkp_saved;
static int nkp_narrowed;

__attribute__((constructor)) static void nkp_one_proc(void) {
	const char *env = getenv("GOMAXPROCS");
	if (env != NULL && *env != '\0')
		return; // the operator chose: the runtime reads it
	if (sched_getaffinity(0, sizeof(nkp_saved), &nkp_saved) != 0 || CPU_COUNT(&nkp_saved) <= 1)
		return;
	int cpu = sched_getcpu();
	if (cpu < 0 || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &nkp_saved)) {
		for (cpu = 0; cpu < CPU_SETSIZE && !CPU_ISSET(cpu, &nkp_saved); cpu++)
			;
	}
	cpu_set_t one;
	CPU_ZERO(&one);
	CPU_SET(cpu, &one);
	if (sched_setaffinity(0, sizeof(one), &one) == 0)
		nkp_narrowed = 1;
}

int nkp_oneproc_narrowed(void) { return nkp_narrowed; }

// nkp_oneproc_restore gives thread tid the affinity the process started with; 0 or an errno.
int nkp_oneproc_restore(int tid) {
	return sched_setaffinity(tid, sizeof(nkp_saved), &nkp_saved) == 0 ? 0 : errno;
}
