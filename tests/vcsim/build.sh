#!/bin/sh
# Builds the vCenter simulator with changed block tracking (this directory)
# into OUTPUT, offline, from Debian's packages only: golang-go and
# golang-github-vmware-govmomi-dev (whose sources are under /usr/share/gocode).
# It builds in GOPATH mode with that tree as GOPATH, so no module download
# or network is involved.
#
# Usage: tests/vcsim/build.sh OUTPUT
#
# Idempotent: it does nothing when OUTPUT is newer than every source here and
# was built by the same Go and govmomi versions (recorded in OUTPUT.stamp).
set -eu

if [ $# -ne 1 ]; then
	echo "usage: $0 OUTPUT" >&2
	exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
out=$1
case "$out" in
/*) ;;
*) out="$(pwd)/$out" ;;
esac
gocode=${VCSIM_GOPATH:-/usr/share/gocode}

if ! command -v go >/dev/null 2>&1; then
	echo "vcsim-cbt: no 'go' command; install golang-go (make deps)" >&2
	exit 1
fi
if [ ! -d "$gocode/src/github.com/vmware/govmomi/simulator" ]; then
	echo "vcsim-cbt: no govmomi sources under $gocode; install golang-github-vmware-govmomi-dev (make deps)" >&2
	exit 1
fi

# Two test runs starting at once build one after the other.
mkdir -p "$(dirname "$out")"
if command -v flock >/dev/null 2>&1; then
	exec 9>"$out.lock"
	flock 9
fi

govmomi=$(dpkg-query -W -f '${Version}' golang-github-vmware-govmomi-dev 2>/dev/null || echo unknown)
want="$(go version) govmomi $govmomi"
stamp="$out.stamp"
if [ -x "$out" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] &&
	[ -z "$(find "$here" \( -name '*.go' -o -name build.sh \) -newer "$out" | head -n 1)" ]; then
	exit 0
fi

# go needs a build cache; a CI user without a writable home gets one beside
# the output.
if [ -z "${GOCACHE:-}" ] && { [ -z "${HOME:-}" ] || [ ! -w "${HOME:-/nonexistent}" ]; }; then
	GOCACHE="$(dirname "$out")/.gocache"
	export GOCACHE
fi

echo "vcsim-cbt: building $out (the first build takes about half a minute)" >&2
start=$(date +%s)
cd "$here"
# CGO_ENABLED=0: a static binary, and no C compiler needed.
env GO111MODULE=off GOPATH="$gocode" GOFLAGS= GOPROXY=off CGO_ENABLED=0 \
	go build -trimpath -o "$out.tmp" .
mv -f "$out.tmp" "$out"
printf '%s\n' "$want" >"$stamp"
echo "vcsim-cbt: built in $(($(date +%s) - start)) s" >&2
