# nkp build, test and demo entry points. See README.md.
GO        ?= go
BIN       := $(CURDIR)/bin
CMDS      := nkp-swtpm nkp-provider nkpctl nkp-hook nkp-hostd
export NKP_BIN := $(BIN)

.PHONY: all build build-shared build-others build-static setup demo test check unit e2e fuzz bench clean

all: build

# nkp-swtpm is built without Go 1.26's Green Tea GC (GOEXPERIMENT=nogreenteagc): its
# small-object spans carry mark bits at their end, which costs an idle vTPM, whose Go
# heap is a few hundred KB that the GC hardly ever scans, about 55 KB of touched pages
# (BENCHMARKS.md, vTPM memory). A Go without that opt-out builds with its default.
comma := ,
SWTPM_GOEXPERIMENT := $(shell GOEXPERIMENT=nogreenteagc $(GO) env GOEXPERIMENT >/dev/null 2>&1 && echo nogreenteagc)
SWTPM_ENV := $(if $(SWTPM_GOEXPERIMENT),GOEXPERIMENT=$(if $(GOEXPERIMENT),$(GOEXPERIMENT)$(comma))$(SWTPM_GOEXPERIMENT))

# nkp-swtpm is linked with libtpms and libcrypto inside (-tags nkpstatic, libc staying
# shared): it starts in 0.75-0.9 of swtpm's time (shared: ~1.0) and each idle vTPM has
# ~15% less memory than with the shared libraries (BENCHMARKS.md), but security updates of libtpms and OpenSSL reach it only
# by a rebuild (see "Linking" in go doc ./swtpm/internal/libtpms). build-shared links
# Debian's shared libtpms0 and libssl3 instead, which apt updates.
#
# The static build also gives the linker swtpm/internal/libtpms/hot.ld: the libcrypto and
# libtpms objects that run until a vTPM is idle go together ahead of the rest, so an idle
# vTPM maps ~1.5 MB less of the binary (go doc ./swtpm/internal/libtpms, Linking).
build: build-others
	$(SWTPM_ENV) $(GO) build -tags nkpstatic -ldflags=-extldflags=-Wl,-T,$(CURDIR)/swtpm/internal/libtpms/hot.ld -o $(BIN)/ ./cmd/nkp-swtpm

build-shared: build-others
	$(SWTPM_ENV) $(GO) build -o $(BIN)/ ./cmd/nkp-swtpm

# nkp-hook on linux/amd64 starts at its assembly entry point, which answers a domain that
# is not nkp's without starting the Go runtime (go doc ./cmd/nkp-hook); elsewhere a plain build.
HOOK_LDFLAGS := $(if $(filter linux/amd64,$(shell $(GO) env GOOS)/$(shell $(GO) env GOARCH)),-ldflags=-E=main.entry)

# Every command but nkp-swtpm, which build and build-shared link each their way.
build-others:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/ $(addprefix ./cmd/,$(filter-out nkp-swtpm nkp-hook,$(CMDS)))
	$(GO) build $(HOOK_LDFLAGS) -o $(BIN)/ ./cmd/nkp-hook

# The same as build (nkp-swtpm has been static by default since issue 9's memory work).
build-static: build

setup:
	bash test/setup.sh

# The main job: protect and boot a VM with an nkp vTPM, on the embedded defaults.
demo: setup build
	bash test/demo.sh

check:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed: $$out"; exit 1; fi
	$(GO) vet ./...

unit:
	$(GO) test -count=1 -timeout 20m $$($(GO) list ./... | grep -v '/test/')

e2e: build
	$(GO) test -count=1 -timeout 40m -p 1 ./test/...

# The README's test command: everything, as CI runs it (needs root and `make setup`).
test: check unit e2e


# Short coverage-guided runs of every fuzz target (the seed corpora run in `make unit`).
fuzz:
	bash test/fuzz.sh

# Benchmarks recorded in BENCHMARKS.md (pinned to one CPU: unpinned runs on 2 shared cores are noise).
bench: build
	$(GO) run ./test/bench/swtpmbench -cpus 1 -out bench-vtpm.md
	$(GO) run ./test/bench/hookbench -hook $(BIN)/nkp-hook -n 1,10,50 -rounds 3 -disks 4 -out bench-hook.md
	$(GO) run ./test/bench/diskbench -dir /var/tmp -size 1G -rounds 3 -memdir /dev/shm >bench-disk.md; s=$$?; cat bench-disk.md; exit $$s
	$(GO) run ./test/bench/providerbench -hosts 1000 -rate 500 -duration 20s -store bolt,etcd -out bench-provider.md

clean:
	rm -rf $(BIN)
