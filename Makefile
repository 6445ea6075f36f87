# captp: build, test and CI entry points. `make help` lists the targets.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
# Targets run one after another; the go commands parallelise internally.
.NOTPARALLEL:

GO ?= go
GO_ROOT = $(shell $(GO) env GOROOT)
GOBIN = $(or $(shell $(GO) env GOBIN),$(firstword $(subst :, ,$(shell $(GO) env GOPATH)))/bin)

# capnpc-go must match the go-capnp version in go.mod.
CAPNP_MOD = capnproto.org/go/capnp/v3
CAPNP_VERSION = $(shell $(GO) list -m -f '{{.Version}}' $(CAPNP_MOD))
CAPNP_STD = $(shell $(GO) list -m -f '{{.Dir}}' $(CAPNP_MOD))/std
CAPNPC_GO = $(GOBIN)/capnpc-go
# Directories whose *.capnp schemas are compiled to committed *.capnp.go files.
SCHEMA_DIRS := internal/testcapnp core/bytestream internal/sample adapters/netcap core/inspect internal/testnative/inheritcapnp
# capnpc-captp (./cmd/capnpc-captp) writes native stubs (*.captp.go) for
# the interfaces of NATIVE_DIRS' schemas, next to capnpc-go's output, and
# for internal/testcapnp into internal/testnative (core's own tests import
# testcapnp, so its stubs, which import core, live elsewhere).
# (Not core/*: the stubs use unsafe, which the core's allowlist forbids.)
NATIVE_DIRS := internal/testnative/inheritcapnp
CAPNPC_CAPTP = $(GOBIN)/capnpc-captp

TEST_TIMEOUT ?= 10m
# CI_FUZZTIME is how long `make test` fuzzes each target.
CI_FUZZTIME ?= 10s
FUZZTIME ?= 10s

# TAMAGO: path to a tamago-go `go` binary. Unset: upstream's launcher
# (`go tool tamago`, when go.mod declares it), which keeps the toolchain in
# $(TAMAGO_CACHE).
TAMAGO ?=
TAMAGO_CACHE = $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/tamago-go
TAMAGO_ENV := GOTOOLCHAIN=local GOOS=tamago GOARCH=amd64
# Bare-metal images (boards/): tamago's runtime hooks, microvm's memory map.
TAMAGO_BOARD_ENV := $(TAMAGO_ENV) GOOSPKG=github.com/usbarmory/tamago
TAMAGO_LDFLAGS := -T 0x10010000 -R 0x1000
# TAMAGO_OUT: where `make tamago` writes the images (<main package>.elf).
TAMAGO_OUT ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/captp-tamago
# TAMAGO_TOOLCHAIN: `any` lets upstream's launcher build tamago-go when it
# is missing (8 minutes, needs GitHub); `installed` skips instead (make test).
TAMAGO_TOOLCHAIN ?= any

.PHONY: help deps gen capnpc-go capnpc-captp gen-check fmt-check vet unit wasm wasm-js wasip1 \
	test tamago-check tamago tamago-test demo bench bench-short bench-go fuzz-short cpp

help:
	@echo 'make deps        install missing system packages (capnproto, libcapnp-dev, pkg-config, g++, nodejs; qemu-system-x86 once a tamago-go toolchain is present)'
	@echo 'make test        deps, gofmt, vet, gen-check, race tests, js/wasm tests under node, wasip1 build, tamago tests if a toolchain is present'
	@echo 'make demo        the unikernel group demo: go run ./cmd/captp demo (with a TamaGo guest in QEMU when a toolchain is installed)'
	@echo 'make cpp         interop and hostile-input tests against the C++ reference, verbose (part of make test)'
	@echo 'make bench       captp vs go-capnp, the C++ reference and the raw socket floor (several minutes; BENCH_FLAGS=-json, -profile DIR, ...)'
	@echo 'make bench-short the same comparison in under a minute'
	@echo 'make bench-go    the go test benchmarks (go test -bench)'
	@echo 'make gen         regenerate the committed *.capnp.go and *.captp.go files'
	@echo 'make fuzz-short  each Fuzz* target under ./core for FUZZTIME (default $(FUZZTIME))'
	@echo 'make tamago      core tests and board images with the TamaGo toolchain (TAMAGO=/path/to/tamago-go/bin/go), images in $(TAMAGO_OUT)'
	@echo 'make tamago-test boot the images in QEMU and run the host-side suite (captp host, cmd/captp)'

# deps installs only what is missing, so it is quick when everything is there.
deps:
	@missing=""; \
	command -v capnp >/dev/null 2>&1 || missing="$$missing capnproto"; \
	command -v pkg-config >/dev/null 2>&1 || missing="$$missing pkg-config"; \
	pkg-config --exists capnp-rpc 2>/dev/null || dpkg -s libcapnp-dev >/dev/null 2>&1 || missing="$$missing libcapnp-dev"; \
	command -v g++ >/dev/null 2>&1 || missing="$$missing g++"; \
	command -v node >/dev/null 2>&1 || missing="$$missing nodejs"; \
	if [ -n "$$($(call tamago_go,installed) 2>/dev/null)" ]; then command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-system-x86"; fi; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "deps: missing:$$missing; no apt-get here, install them with your package manager" >&2; exit 1; \
	fi; \
	sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	echo "deps: installing$$missing"; \
	$$sudo apt-get update -qq; \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing

capnpc-go:
	$(GO) install $(CAPNP_MOD)/capnpc-go@$(CAPNP_VERSION)

capnpc-captp:
	$(GO) build -o "$(CAPNPC_CAPTP)" ./cmd/capnpc-captp

# compile_schemas OUT: compile each schema dir's *.capnp into OUT/<dir>.
define compile_schemas
for d in $(SCHEMA_DIRS); do \
	mkdir -p "$(1)/$$d"; \
	capnp compile -I "$(CAPNP_STD)" -I . -o"$(CAPNPC_GO):$(1)/$$d" --src-prefix="$$d" "$$d"/*.capnp; \
done; \
for d in $(NATIVE_DIRS); do \
	capnp compile -I "$(CAPNP_STD)" -I . -o"$(CAPNPC_CAPTP):$(1)/$$d" --src-prefix="$$d" "$$d"/*.capnp; \
done; \
mkdir -p "$(1)/internal/testnative"; \
capnp compile -I "$(CAPNP_STD)" -I . -o- --src-prefix=internal/testcapnp internal/testcapnp/test.capnp | \
	"$(CAPNPC_CAPTP)" -package testnative -out "$(1)/internal/testnative"
endef

# captp_files lists the committed capnpc-captp outputs.
captp_files = $(foreach d,$(NATIVE_DIRS),$(patsubst %.capnp,%.captp.go,$(wildcard $(d)/*.capnp))) internal/testnative/test.captp.go

gen: capnpc-go capnpc-captp
	@$(call compile_schemas,.)

# gen-check regenerates into a temporary directory and fails if the
# committed files differ.
gen-check: capnpc-go capnpc-captp
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(call compile_schemas,$$tmp); \
	status=0; \
	for d in $(SCHEMA_DIRS); do \
		for f in "$$d"/*.capnp; do \
			diff -u "$$f.go" "$$tmp/$$f.go" || status=1; \
		done; \
	done; \
	for f in $(captp_files); do \
		if [ -e "$$f" ] || [ -e "$$tmp/$$f" ]; then diff -u "$$f" "$$tmp/$$f" || status=1; fi; \
	done; \
	if [ $$status != 0 ]; then echo "gen-check: generated code is stale; run 'make gen'" >&2; exit 1; fi; \
	echo "gen-check: generated code is up to date"

fmt-check:
	@bad=$$(find . -name '*.go' -not -path './.git/*' -not -path '*/testdata/*' -print0 | xargs -0 -r gofmt -l); \
	if [ -n "$$bad" ]; then echo "gofmt needed on:" >&2; echo "$$bad" >&2; exit 1; fi

vet:
	$(GO) vet ./...

# The allocation-count test runs again without the race detector, which
# allocates (it is built only without it).
unit:
	$(GO) test -race -count=1 -timeout=$(TEST_TIMEOUT) ./...
	$(GO) test -count=1 -run '^TestNativeCallAllocations$$' ./core

# The core's tests compiled to js/wasm and run under node.
wasm-js:
	@exec="$(GO_ROOT)/lib/wasm/go_js_wasm_exec"; \
	[ -x "$$exec" ] || { echo "wasm-js: $$exec not found" >&2; exit 1; }; \
	echo "GOOS=js GOARCH=wasm $(GO) test -exec=$$exec ./core/..."; \
	GOOS=js GOARCH=wasm $(GO) test -exec="$$exec" -count=1 -timeout=$(TEST_TIMEOUT) ./core/...

# wasip1: build, vet and compile the tests (no WASI runtime is installed).
wasip1:
	GOOS=wasip1 GOARCH=wasm $(GO) build ./core/...
	GOOS=wasip1 GOARCH=wasm $(GO) vet ./core/...
	GOOS=wasip1 GOARCH=wasm $(GO) test -c -o /dev/null ./core/...

wasm: wasm-js wasip1

test: deps fmt-check vet
	@if command -v capnp >/dev/null 2>&1; then $(MAKE) --no-print-directory gen-check; \
	else echo "SKIPPED: gen-check — capnp is not installed (make deps)"; fi
	$(MAKE) --no-print-directory unit wasm tamago-check
	$(MAKE) --no-print-directory tamago-test TAMAGO_TOOLCHAIN=installed
	$(MAKE) --no-print-directory fuzz-short FUZZTIME=$(CI_FUZZTIME)

# tamago_go prints the tamago-go `go` to use, or nothing. With $(1) = installed,
# the launcher counts only when its toolchain is already in the cache (no
# network, no 8-minute build inside `make test`).
define tamago_go
if [ -n "$(TAMAGO)" ]; then \
	[ -x "$(TAMAGO)" ] || { echo "TAMAGO=$(TAMAGO) is not an executable" >&2; exit 1; }; \
	echo "$(TAMAGO)"; \
elif launcher=$$($(GO) tool -n tamago 2>/dev/null); then \
	v=$$($(GO) list -m -f '{{.Version}}' github.com/usbarmory/tamago); \
	if [ "$(1)" != installed ] || [ -x "$(TAMAGO_CACHE)/tamago-go$${v#v}/bin/go" ]; then echo "$$launcher"; fi; \
fi
endef

define tamago_skipped
echo "=================================================================="; \
echo "SKIPPED: TamaGo tests — no tamago-go toolchain (README, section TamaGo):"; \
echo "  the core's tests under GOOS=tamago, the board images, and the"; \
echo "  guest tests in QEMU (captp host: serial, virtio-net, two guests,"; \
echo "  Level 3 handoff between guests)"; \
echo "  set TAMAGO=/path/to/tamago-go/bin/go, or run 'make tamago' once with"; \
echo "  internet access: upstream's launcher (go tool tamago, declared in"; \
echo "  go.mod) clones and builds tamago-go into $(TAMAGO_CACHE)"; \
echo "=================================================================="
endef

tamago-check:
	@tg=$$($(call tamago_go,installed)); \
	if [ -z "$$tg" ]; then $(tamago_skipped); exit 0; fi; \
	echo "$(TAMAGO_ENV) $$tg test ./core/..."; \
	$(TAMAGO_ENV) "$$tg" test -count=1 -timeout=$(TEST_TIMEOUT) ./core/...

# tamago_images builds every main package under boards/ into $$out_dir,
# with $$tg the toolchain's go; it vets the TamaGo-only code first.
define tamago_images
echo "$(TAMAGO_BOARD_ENV) $$tg vet ./boards/... ./adapters/tamago/..."; \
$(TAMAGO_BOARD_ENV) "$$tg" vet ./boards/... ./adapters/tamago/...; \
mkdir -p "$$out_dir"; \
for pkg in $$($(TAMAGO_BOARD_ENV) "$$tg" list -f '{{if eq .Name "main"}}{{.ImportPath}}{{end}}' ./boards/...); do \
	out="$$out_dir/$$(basename "$$pkg").elf"; \
	echo "$(TAMAGO_BOARD_ENV) $$tg build -ldflags '$(TAMAGO_LDFLAGS)' -o $$out $$pkg"; \
	$(TAMAGO_BOARD_ENV) "$$tg" build -ldflags "$(TAMAGO_LDFLAGS)" -o "$$out" "$$pkg"; \
	echo "  $$out: $$(du -h "$$out" | cut -f1)"; \
done
endef

tamago:
	@tg=$$($(call tamago_go,$(TAMAGO_TOOLCHAIN))); \
	if [ -z "$$tg" ]; then $(tamago_skipped); exit 0; fi; \
	echo "$(TAMAGO_ENV) $$tg test ./core/..."; \
	$(TAMAGO_ENV) "$$tg" test -count=1 -timeout=$(TEST_TIMEOUT) ./core/...; \
	out_dir="$(TAMAGO_OUT)"; \
	$(tamago_images)

# tamago-test builds the images into a temporary directory (so that runs in
# parallel do not clobber each other), boots boards/microvm/vat in QEMU (TCG,
# no KVM needed) and runs cmd/captp's guest tests against it: serial,
# -netdev stream, user-mode NAT, two guests, captp host end to end; and
# boards/microvm/level3vat (level3vat.elf, found next to vat.elf) for
# three-party handoff between guests (TestLevel3Guest*).
tamago-test:
	@tg=$$($(call tamago_go,$(TAMAGO_TOOLCHAIN))); \
	if [ -z "$$tg" ]; then $(tamago_skipped); exit 0; fi; \
	if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then \
		echo "=================================================================="; \
		echo "SKIPPED: TamaGo guest tests in QEMU — qemu-system-x86_64 is missing"; \
		echo "  (apt-get install qemu-system-x86; make deps does it when a"; \
		echo "  tamago-go toolchain is present)"; \
		echo "=================================================================="; \
		exit 0; \
	fi; \
	out_dir=$$(mktemp -d); log="$$out_dir/test.log"; trap 'rm -rf "$$out_dir"' EXIT; \
	$(tamago_images); \
	echo "CAPTP_GUEST_IMAGE=$$out_dir/vat.elf $(GO) test -race -v -run '^(TestGuest|TestTwoGuests|TestHostCommand|TestLevel3Guest)' ./cmd/captp"; \
	CAPTP_GUEST_IMAGE="$$out_dir/vat.elf" $(GO) test -race -count=1 -v -timeout=$(TEST_TIMEOUT) \
		-run '^(TestGuest|TestTwoGuests|TestHostCommand|TestLevel3Guest)' ./cmd/captp > "$$log" 2>&1 \
		|| { cat "$$log"; echo "tamago-test: FAILED (guest console and test log above)" >&2; exit 1; }; \
	grep -E '^(--- |ok|PASS|FAIL)' "$$log"; \
	if grep -q -- '--- SKIP' "$$log"; then echo "tamago-test: tests were skipped" >&2; exit 1; fi

# demo runs the unikernel group demo. With a tamago-go toolchain already
# installed and qemu-system-x86_64 present it first builds the guest image
# (boards/microvm/vat, a few seconds once cached) into $(TAMAGO_OUT) and
# boots it as one more vat; without them the demo says, in one line, that
# the guest scene was skipped and what to install. DEMO_FLAGS go to
# `captp demo` (-v for connection logs).
DEMO_FLAGS ?=

demo:
	@guest=""; tg=$$($(call tamago_go,installed)); \
	if [ -n "$$tg" ] && command -v qemu-system-x86_64 >/dev/null 2>&1; then \
		out="$(TAMAGO_OUT)/vat.elf"; mkdir -p "$(TAMAGO_OUT)"; \
		echo "$(TAMAGO_BOARD_ENV) $$tg build -ldflags '$(TAMAGO_LDFLAGS)' -o $$out ./boards/microvm/vat"; \
		$(TAMAGO_BOARD_ENV) "$$tg" build -ldflags "$(TAMAGO_LDFLAGS)" -o "$$out" ./boards/microvm/vat; \
		guest="-guest-image=$$out"; \
	fi; \
	echo "$(GO) run ./cmd/captp demo $$guest $(DEMO_FLAGS)"; \
	$(GO) run ./cmd/captp demo $$guest $(DEMO_FLAGS)

# The C++ interop tests build their programs themselves (cached under
# ~/.cache/captp-cpp); `make test` runs them with everything else.
cpp: deps
	$(GO) test -count=1 -v -timeout=$(TEST_TIMEOUT) ./internal/cppinterop

# BENCH_FLAGS are passed to `captp bench` (see `go run ./cmd/captp help bench`).
BENCH_FLAGS ?=

bench:
	$(GO) run ./cmd/captp bench $(BENCH_FLAGS)

bench-short:
	$(GO) run ./cmd/captp bench -short $(BENCH_FLAGS)

bench-go:
	$(GO) test -run='^$$' -bench=. -benchmem ./...

# A fuzz run that fails with Go 1.26's coordinator race (a bare "context
# deadline exceeded" at the deadline, no failing input written) is run once
# more; any other failure, or the race twice, fails.
fuzz-short:
	@found=0; log=$$(mktemp); trap 'rm -f "$$log"' EXIT; \
	for pkg in $$($(GO) list ./core/...); do \
		list=$$($(GO) test -list '^Fuzz' "$$pkg"); \
		for f in $$(echo "$$list" | grep '^Fuzz' || true); do \
			found=1; \
			for attempt in 1 2; do \
				echo "$(GO) test -run='^$$' -fuzz='^$$f\$$' -fuzztime=$(FUZZTIME) $$pkg"; \
				if $(GO) test -run='^$$' -fuzz="^$$f\$$" -fuzztime=$(FUZZTIME) "$$pkg" 2>&1 | tee "$$log"; then break; fi; \
				if [ $$attempt = 1 ] && grep -q '^    context deadline exceeded$$' "$$log" && ! grep -q 'Failing input written to' "$$log"; then \
					echo "fuzz-short: $$f ended with a bare 'context deadline exceeded' and no failing input:"; \
					echo "  Go 1.26's fuzz coordinator race at the -fuzztime deadline (golang/go#75804,"; \
					echo "  fixed in Go 1.27), not a finding; running $$f once more"; \
					continue; \
				fi; \
				exit 1; \
			done; \
		done; \
	done; \
	if [ $$found = 0 ]; then echo "fuzz-short: no Fuzz* targets under ./core yet"; fi
