//go:build cgo

// Runs before the Go runtime starts (an ELF constructor of the executable), so that
// the runtime sizes itself for one CPU. See doc.go.

#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <string.h>
#include <sched.h>
#include <stdio.h>
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

// One malloc arena for the whole process (see doc.go); before the runtime starts its
// threads, so that none has made an arena of its own yet.
__attribute__((constructor)) static void nkp_one_arena(void) {
	const char *t = getenv("GLIBC_TUNABLES");
	if (t != NULL && strstr(t, "glibc.malloc.arena_max") != NULL)
		return;
	mallopt(M_ARENA_MAX, 1);
}

// nkp_oneproc_arenas mallocs and frees on the calling thread and returns how many
// arenas glibc has (the <heap> elements of malloc_info), or -1.
int nkp_oneproc_arenas(void) {
	free(malloc(64));
	char *buf = NULL;
	size_t len = 0;
	FILE *f = open_memstream(&buf, &len);
	if (f == NULL)
		return -1;
	int ok = malloc_info(0, f) == 0;
	fclose(f);
	int n = 0;
	for (char *p = buf; ok && (p = strstr(p, "<heap nr=")) != NULL; p++)
		n++;
	free(buf);
	return ok ? n : -1;
}
