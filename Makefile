# sna: build, run and test targets.  Every recipe runs unattended (CI=true, no
# stdin) on a fresh Debian 12 machine that has python3.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

# Debian packages the test suite needs; `make deps` installs the missing ones.
APT_PACKAGES := sqlite3 qemu-utils libnbd-bin nbdkit socat golang-go golang-github-vmware-govmomi-dev
# The dashboard's browser tests (tests/integration/test_dashboard.py) run Debian's Chromium headless.
APT_PACKAGES += chromium
# systemd-analyze, systemd-sysusers and systemd-tmpfiles check deploy/ (tests/integration/test_deploy.py).
APT_PACKAGES += systemd
# The SSH tunnel's tests (tests/integration/test_tunnel.py): the hub's sshd, the node's ssh,
# and ip to bring up loopback in the hub's network namespace.
APT_PACKAGES += openssh-server openssh-client iproute2
# Debian splits venv support out of python3; needed only when ensurepip is missing.
VENV_APT_PACKAGES := python3-venv

LISTEN ?= tcp:8081:interface=127.0.0.1
VCSIM := build/vcsim-cbt
TESTBED_SPEC ?= tests/testbed/example-spec.json
BENCH_ARGS ?=

export PIP_NO_INPUT := 1
export DEBIAN_FRONTEND := noninteractive

# $(call apt_install,packages): a shell command installing those of the
# packages not yet installed, as root or through sudo; apt-get runs only then.
define apt_install
missing=""; \
for pkg in $(1); do \
	dpkg -s "$$pkg" 2>/dev/null | grep -q '^Status: install ok installed' \
		|| missing="$$missing $$pkg"; \
done; \
if [ -n "$$missing" ]; then \
	echo "installing Debian packages:$$missing"; \
	if [ "$$(id -u)" -eq 0 ]; then sudo=""; else sudo="sudo"; fi; \
	$$sudo apt-get update \
		&& $$sudo env DEBIAN_FRONTEND=noninteractive \
			apt-get install -y --no-install-recommends $$missing; \
fi
endef

.PHONY: all venv deps run check test bench clean distclean vcsim testbed demo

all: test

venv: $(STAMP)

# A compat-mode editable install: code edits apply without reinstalling, and
# twisted/plugins stays on sys.path (a PEP 660 import-hook install of this flat
# layout would hide the plugin from twistd).  The last step writes dropin.cache
# so twistd need not rebuild it (it may not be able to write it later).
$(STAMP): setup.py pyproject.toml
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { $(call apt_install,$(VENV_APT_PACKAGES)); }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]' --config-settings editable_mode=compat
	$(BIN)/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	touch $@

deps:
	@$(call apt_install,$(APT_PACKAGES))

run: venv
	mkdir -p var/state var/log
	exec $(BIN)/twistd -n --pidfile var/twistd.pid sna --listen $(LISTEN) --state-dir var/state --log-dir var/log

check: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# The first step proves twistd finds the plugin through the install, not
# through the current directory.  (grep reads all the help: with -q it would
# exit early and twistd would die of a broken pipe.)
# The vCenter simulator with CBT that the VMware tests run against (tests/vcsim),
# built offline from Debian's golang-go and govmomi sources; a no-op when current.
vcsim: deps
	tests/vcsim/build.sh $(VCSIM)

# A testbed for a person at a terminal; Ctrl-C stops it.
testbed: venv vcsim
	$(BIN)/python -m tests.testbed up --spec $(TESTBED_SPEC)

# A full and an incremental backup of a two-disk VM through the whole system,
# each checked with qemu-img compare; everything is stopped at the end.
demo: deps venv vcsim
	$(BIN)/python -m tests.testbed.demo

test: deps venv check vcsim
	@dir="$$(mktemp -d)"; \
	if (cd "$$dir" && $(CURDIR)/$(BIN)/twistd --help | grep -w sna >/dev/null); then \
		rm -rf "$$dir"; echo "twistd finds the sna plugin from $$dir"; \
	else \
		rm -rf "$$dir"; echo "twistd does not list the sna plugin outside the checkout" >&2; exit 1; \
	fi
	$(BIN)/pytest -q

bench: venv
	$(BIN)/python benchmarks/api_bench.py $(BENCH_ARGS)

# Leaves .venv and var/ (the state of `make run`) alone; distclean removes them too.
clean:
	rm -rf build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis _trial_temp
	rm -f twisted/plugins/dropin.cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) var

# `make install`: sna and its backup client in a venv of their own under
# PREFIX, and the systemd unit, sysusers and tmpfiles files that run them
# (deploy/; docs/operations.md, "Installing").  DESTDIR stages it all, for a
# package: the venv's scripts then name PREFIX, where they will run, not
# DESTDIR.  The options file is installed only where there is none yet.
PREFIX ?= /opt/sna
DESTDIR ?=
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
SYSUSERSDIR ?= /etc/sysusers.d
TMPFILESDIR ?= /etc/tmpfiles.d
INSTALL_VENV = $(DESTDIR)$(PREFIX)/venv

.PHONY: install

# setuptools builds in build/lib and would package whatever a deleted module
# left there, so that goes before and after.  The plugin cache is written while
# the venv is writable: the service cannot write it under ProtectSystem=strict.
install:
	@$(PYTHON) -c 'import ensurepip, venv' 2>/dev/null || { $(call apt_install,$(VENV_APT_PACKAGES)); }
	$(PYTHON) -m venv $(INSTALL_VENV)
	rm -rf build/lib build/bdist.*
	$(INSTALL_VENV)/bin/python -m pip install --upgrade $(CURDIR)
	rm -rf build/lib build/bdist.*
	$(INSTALL_VENV)/bin/python -c 'from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))'
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlIF '$(INSTALL_VENV)' $(INSTALL_VENV)/bin $(INSTALL_VENV)/pyvenv.cfg | while read -r file; do \
			sed -i 's|$(INSTALL_VENV)|$(PREFIX)/venv|g' "$$file"; \
		done; \
	fi
	install -d $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSCONFDIR)/sna
	sed -e 's|/opt/sna/|$(PREFIX)/|g' -e 's|/etc/sna/|$(SYSCONFDIR)/sna/|g' deploy/sna.service > $(DESTDIR)$(UNITDIR)/sna.service
	chmod 0644 $(DESTDIR)$(UNITDIR)/sna.service
	install -m 0644 deploy/sna.sysusers $(DESTDIR)$(SYSUSERSDIR)/sna.conf
	install -m 0644 deploy/sna.tmpfiles $(DESTDIR)$(TMPFILESDIR)/sna.conf
	[ -e $(DESTDIR)$(SYSCONFDIR)/sna/sna.env ] || install -m 0644 deploy/sna.env $(DESTDIR)$(SYSCONFDIR)/sna/sna.env
	@[ -n "$(DESTDIR)" ] || echo "installed; then, as root: systemd-sysusers $(SYSUSERSDIR)/sna.conf &&" \
		"systemd-tmpfiles --create $(TMPFILESDIR)/sna.conf && systemctl daemon-reload && systemctl enable --now sna"
