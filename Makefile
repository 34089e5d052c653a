# The README's two commands: `make lab` runs the seed's two clusters in the local lab,
# `make test` runs every test. Each installs the Debian packages it needs when they are
# missing, builds what it runs, and needs root: the lab and the end-to-end tests create
# network namespaces (on 198.18.0.0/15, with no route off the machine) and program
# iptables in them.

CARGO ?= cargo
# Options for `isthmus lab up`, e.g. LAB_ARGS='--duration 20s --wan-delay 20'.
LAB_ARGS ?=

# What the lab and the tests run: ip and iptables for the namespaces and the capture,
# curl and tcpdump in the lab's pods, openssl and procps in the tests, and a C compiler
# for the crates that build C (ring).
PACKAGES := iptables iproute2 curl tcpdump openssl ca-certificates procps gcc libc6-dev

.PHONY: lab test lab-smoke packages-lab packages-test

lab: packages-lab
	@echo "make lab: building the workspace's binaries (isthmus, isthmus-proxy, isthmus-init, ...)"
	$(CARGO) build --workspace --bins --locked
	@echo "make lab: starting examples/seed (Ctrl-C stops it and removes every namespace)"
	$(CARGO) run --locked -q -p isthmus --bin isthmus -- lab up examples/seed $(LAB_ARGS)

test: packages-test
	@echo "make test: unit, end-to-end, hostile-input, fault and load tests"
	$(CARGO) test --workspace --locked
	@$(MAKE) --no-print-directory lab-smoke

# The first command, bounded, with its output checked: frontend must print hello's
# answers through the mirrored Service.
lab-smoke:
	@echo "make test: the README's lab command, for 25 s"
	@out=$$($(MAKE) --no-print-directory lab LAB_ARGS='--duration 25s' 2>&1) || { echo "$$out"; echo "make lab failed" >&2; exit 1; }; \
	 echo "$$out" | tail -n 20; \
	 echo "$$out" | grep -Eq '^\[cluster-b/frontend[^]]*\] Server name: hello-' || { echo "make lab: frontend never printed hello's answer" >&2; exit 1; }; \
	 echo "$$out" | grep -Eq '^\[cluster-b/frontend[^]]*\] Response: 0' || { echo "make lab: frontend's curl never succeeded" >&2; exit 1; }; \
	 echo "make test: make lab carried frontend's calls to hello"

packages-lab:
	@scripts/ensure-debian-packages "make lab" "the lab creates network namespaces and programs iptables in them" $(PACKAGES)

packages-test:
	@scripts/ensure-debian-packages "make test" "the end-to-end tests create network namespaces and program iptables in them" $(PACKAGES)
