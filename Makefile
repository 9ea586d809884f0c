# spinbox — build, test, demo and install.
#
#   make demo     install what is missing, build, boot a microVM and talk to its agent
#   make test     install what is missing, build the guest, run every test, then a smoke set
#                 on the other guest kernel (tests/kernel-smoke.sh) and one against
#                 containerd 1.7 and 2.x (tests/containerd-matrix.sh; fetched from Debian
#                 trixie and sid into build/containerd; CONTAINERD_MATRIX=none skips it)
#   make bench    spinbox side by side with runc and the boot floor (docs/BENCHMARKS.md)
#   make install  put binaries, guest image and default config in place
#
# Variables: PREFIX (/usr/local), SHAREDIR (/usr/share/spinbox), CONFDIR (/etc/spinbox),
# CONTAINERD_MATRIX (the Debian suites whose containerd `make test` also runs: trixie sid),
# GUEST_KERNEL (minimal or debian; default minimal).

SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)

PREFIX   ?= /usr/local
SHAREDIR ?= /usr/share/spinbox
CONFDIR  ?= /etc/spinbox
BUILD    := build
GUEST    := $(BUILD)/guest
TARGET   := x86_64-unknown-linux-gnu
# The agent is built in its own target dir: static linking flags must not touch host builds.
AGENT_TARGET_DIR := target/guest
AGENT    := $(AGENT_TARGET_DIR)/$(TARGET)/release/spinbox-agent
# Two cores: one VM-booting test at a time is what the tests enforce; threads for the rest.
TEST_THREADS ?= 2
CONTAINERD_MATRIX ?= trixie sid
# The guest kernel: minimal (built from Debian's linux-source on allnoconfig + the fragment
# kernel/microvm.config, cached outside build/ by a hash of its inputs) or debian (Debian's
# cloud kernel and the modules the guest needs). kernel/README.md.
GUEST_KERNEL ?= minimal
OTHER_KERNEL := $(if $(filter debian,$(GUEST_KERNEL)),minimal,debian)
GUEST_OTHER  := $(BUILD)/guest-$(OTHER_KERNEL)

.PHONY: all deps build agent guest guest-other test containerd-matrix bench unit lint demo install clean

all: build guest

deps:
	@bash deploy/install-deps.sh

build:
	cargo build --release --workspace --exclude spinbox-agent

agent:
	RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR=$(AGENT_TARGET_DIR) \
	  cargo build --release --target $(TARGET) -p spinbox-agent

# A guest kernel into a folder: $(call guest_kernel,KERNEL,DIR).
guest_kernel = case $(1) in \
	  minimal) bash kernel/build-minimal-kernel.sh $(2) ;; \
	  debian) bash kernel/fetch-debian-kernel.sh $(2) ;; \
	  *) echo "GUEST_KERNEL=$(1): want minimal or debian" >&2; exit 2 ;; \
	esac

guest: agent
	@$(call guest_kernel,$(GUEST_KERNEL),$(GUEST))
	bash kernel/build-initrd.sh $(AGENT) $(GUEST) $(GUEST)/initrd.img

# The other kernel's guest, for the smoke set `make test` runs on it (tests/kernel-smoke.sh).
guest-other: agent
	@$(call guest_kernel,$(OTHER_KERNEL),$(GUEST_OTHER))
	bash kernel/build-initrd.sh $(AGENT) $(GUEST_OTHER) $(GUEST_OTHER)/initrd.img

# The benchmark table (docs/BENCHMARKS.md); BENCH_RUNS, BENCH_STDOUT_MIB, BENCH_PARALLEL tune it.
bench: deps guest guest-other
	bash tests/run.sh --bench

unit:
	cargo test --workspace --exclude spinbox-tests

test: deps guest guest-other
	TEST_THREADS=$(TEST_THREADS) bash tests/run.sh
	TEST_THREADS=$(TEST_THREADS) bash tests/kernel-smoke.sh $(GUEST_OTHER)
	TEST_THREADS=$(TEST_THREADS) SPINBOX_CONTAINERD_MATRIX="$(CONTAINERD_MATRIX)" bash tests/containerd-matrix.sh

# Only the smoke set against other containerd versions (tests/containerd-matrix.sh).
containerd-matrix: deps guest
	TEST_THREADS=$(TEST_THREADS) SPINBOX_CONTAINERD_MATRIX="$(CONTAINERD_MATRIX)" bash tests/containerd-matrix.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

demo: deps build guest
	@bash deploy/demo.sh

install: build guest
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(SHAREDIR) $(DESTDIR)$(CONFDIR)
	install -m 0755 target/release/spinbox $(DESTDIR)$(PREFIX)/bin/spinbox
	install -m 0755 target/release/containerd-shim-spinbox-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-spinbox-v2
	install -m 0644 $(GUEST)/vmlinux $(DESTDIR)$(SHAREDIR)/vmlinux
	install -m 0644 $(GUEST)/initrd.img $(DESTDIR)$(SHAREDIR)/initrd.img
	@if command -v vhost-device-vsock >/dev/null && [ ! -e $(DESTDIR)$(PREFIX)/bin/vhost-device-vsock ]; then \
	  install -m 0755 "$$(command -v vhost-device-vsock)" $(DESTDIR)$(PREFIX)/bin/vhost-device-vsock; fi
	@# Never overwrite a config an operator changed; drop the new default beside it.
	@if [ -e $(DESTDIR)$(CONFDIR)/config.json ] && ! cmp -s config/config.json $(DESTDIR)$(CONFDIR)/config.json; then \
	  install -m 0644 config/config.json $(DESTDIR)$(CONFDIR)/config.json.default; \
	  echo "kept $(CONFDIR)/config.json; the shipped default is at $(CONFDIR)/config.json.default"; \
	else install -m 0644 config/config.json $(DESTDIR)$(CONFDIR)/config.json; fi
	install -d $(DESTDIR)$(CONFDIR)/cni
	@if [ ! -e $(DESTDIR)$(CONFDIR)/cni/spinbox.conflist ]; then \
	  install -m 0644 deploy/cni/spinbox.conflist $(DESTDIR)$(CONFDIR)/cni/spinbox.conflist; fi
	install -m 0755 deploy/cleanup-cni.sh $(DESTDIR)$(PREFIX)/bin/spinbox-cleanup-cni

clean:
	cargo clean
	rm -rf $(BUILD)
