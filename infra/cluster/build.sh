#!/usr/bin/env bash
# Build etcd + kube-apiserver 1.20.2 for the tests, from Debian 12's packages and source only.
#
#   infra/cluster/build.sh           build once (a no-op when cached), print the bin directory
#   infra/cluster/build.sh --where   print the bin directory, build nothing (exit 1 if not built)
#
# The result lives outside the clone, keyed by the Kubernetes version and a hash of this file:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/driftloop/kube-apiserver-1.20.2-<recipe>/bin/{kube-apiserver,etcd}
# Recipe (../shared FACTS, "A real kube-apiserver"): Debian's source package `kubernetes`
# (1.20.5+really1.20.2, the upstream tree with vendor/), Go 1.19 and etcd-server 3.4 from the
# machine's own bookworm mirror through a private apt configuration (nothing system-wide
# changes except rsync, make and gcc where missing, which the Kubernetes build needs), built offline
# (GOPROXY=off, -mod=vendor). The one trap: the vendored modern-go/reflect2 v1.0.1 crashes
# the server under Go >= 1.18 on the first custom-resource request, so it is replaced by
# Debian's 1.0.2 before building. First build: ~8 min of one core, ~2.7 GB of scratch space
# (removed afterwards; the cache keeps ~150 MB).
set -euo pipefail

K8S_VERSION=1.20.2
# What the binaries are made from and how; the cache key is its hash, so change it with the recipe
# (a new key builds afresh), not with the messages around it.
RECIPE_INPUTS="bookworm kubernetes=1.20.5+really1.20.2 golang-1.19 reflect2=1.0.2-over-vendor etcd-server
GOFLAGS=-mod=vendor GOPROXY=off make WHAT=cmd/kube-apiserver"
RECIPE="$(printf '%s' "$RECIPE_INPUTS" | sha256sum | cut -c1-12)"
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/driftloop"
DEST="$CACHE_ROOT/kube-apiserver-$K8S_VERSION-$RECIPE"
BIN="$DEST/bin"

built() { [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/etcd" ] && [ -f "$DEST/.complete" ]; }

if [ "${1:-}" = "--where" ]; then
  echo "$BIN"
  built
  exit
fi
if built; then echo "$BIN"; exit 0; fi

mkdir -p "$CACHE_ROOT"
exec 9>"$CACHE_ROOT/.kube-apiserver-$K8S_VERSION.lock"
if ! flock -n 9; then
  echo "cluster: another build of kube-apiserver $K8S_VERSION is running; waiting for it" >&2
  flock 9
fi
if built; then echo "$BIN"; exit 0; fi

WORK="$DEST.work"
LOG="$DEST.log"
rm -rf "$WORK" "$DEST"
mkdir -p "$WORK/apt/lists/partial" "$WORK/apt/cache/archives/partial" "$WORK/root" "$WORK/src" "$WORK/home"
echo "cluster: building etcd + kube-apiserver $K8S_VERSION from Debian's packages and source" >&2
echo "cluster: first time only, ~8 min of one core and ~2.7 GB of scratch in $WORK; log: $LOG" >&2
started=$(date +%s)
: >"$LOG"
step() { echo "cluster: $*" >&2; echo "=== $*" >>"$LOG"; }
fail() { echo "cluster: FAILED: $* (last lines of $LOG follow)" >&2; tail -n 30 "$LOG" >&2; exit 1; }

# --- the machine's own bookworm mirror, with sources, in a private apt configuration -------
mirror=""; keyring=""
if [ -f /etc/apt/sources.list.d/debian.sources ]; then
  mirror=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
  keyring=$(awk '/^Signed-By:/ {print $2; exit}' /etc/apt/sources.list.d/debian.sources)
fi
if [ -z "$mirror" ] && [ -f /etc/apt/sources.list ]; then
  mirror=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {print $i; exit}}' /etc/apt/sources.list)
fi
[ -n "$mirror" ] || fail "no Debian mirror found in /etc/apt/sources.list.d/debian.sources or /etc/apt/sources.list"
keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
cat >"$WORK/apt/sources.sources" <<SRC
Types: deb deb-src
URIs: $mirror
Suites: bookworm
Components: main
Signed-By: $keyring
SRC
APT=(-o Dir::Etc::SourceList="$WORK/apt/sources.sources" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$WORK/apt/lists" -o Dir::Cache="$WORK/apt/cache" -o Debug::NoLocking=1)

step "apt: reading bookworm's package lists (sources included) from $mirror"
apt-get "${APT[@]}" -qq update >>"$LOG" 2>&1 || fail "apt-get update"

# The Kubernetes build scripts use rsync and make; its code generators build with cgo (gcc).
missing=""
for tool in rsync make gcc; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    step "apt: installing$missing (the Kubernetes build needs them)"
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >>"$LOG" 2>&1 \
      || { apt-get -qq update >>"$LOG" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >>"$LOG" 2>&1; } \
      || fail "apt-get install$missing"
  else
    fail "the Kubernetes build needs$missing: install them (Debian: apt-get install$missing)"
  fi
fi

step "apt: fetching the kubernetes source package (34 MB) and golang-1.19, reflect2 1.0.2, etcd-server"
(cd "$WORK/src" && apt-get "${APT[@]}" -qq source --download-only kubernetes >>"$LOG" 2>&1) || fail "apt-get source kubernetes"
(cd "$WORK" && apt-get "${APT[@]}" -qq download golang-1.19-go golang-1.19-src \
   golang-github-modern-go-reflect2-dev etcd-server >>"$LOG" 2>&1) || fail "apt-get download"
for deb in "$WORK"/*.deb; do dpkg -x "$deb" "$WORK/root"; done

step "unpacking the Kubernetes $K8S_VERSION tree"
orig=$(ls "$WORK"/src/kubernetes_*.orig.tar.* | head -n1)
mkdir -p "$WORK/kubernetes"
tar -xf "$orig" -C "$WORK/kubernetes" --strip-components=1 >>"$LOG" 2>&1 || fail "untar $orig"
tree="$WORK/kubernetes"
[ -d "$tree/cmd/kube-apiserver" ] && [ -d "$tree/vendor" ] || fail "$orig holds no cmd/kube-apiserver with vendor/"

# Go: the extracted package links its src/ to an absolute /usr/share path; point it inside the root.
GOROOT="$WORK/root/usr/lib/go-1.19"
for link in "$GOROOT"/*; do
  if [ -L "$link" ]; then
    target=$(readlink "$link")
    case "$target" in /*) ln -sfn "$WORK/root$target" "$link" ;; esac
  fi
done
[ -x "$GOROOT/bin/go" ] && [ -d "$GOROOT/src/runtime" ] || fail "Go 1.19 did not unpack into $GOROOT"

step "trap: replacing the vendored modern-go/reflect2 v1.0.1 by Debian's 1.0.2 (v1.0.1 crashes on custom resources under Go >= 1.18)"
r2src="$WORK/root/usr/share/gocode/src/github.com/modern-go/reflect2"
r2dst="$tree/vendor/github.com/modern-go/reflect2"
[ -d "$r2src" ] && [ -d "$r2dst" ] || fail "reflect2 sources missing ($r2src or $r2dst)"
rm -f "$r2dst"/*.go "$r2dst"/*.s
cp "$r2src"/*.go "$r2dst"/
cp "$r2src"/*.s "$r2dst"/ 2>/dev/null || true
rm -f "$r2dst"/*_test.go

jobs=$(nproc 2>/dev/null || echo 1)
jobs=$(( jobs > 2 ? jobs - 1 : 1 ))
step "go build: kube-apiserver (offline, vendor/, $jobs parallel job(s)); this is the long part"
(
  cd "$tree"
  # GOFLAGS holds -mod=vendor only: hack/lib/golang.sh turns the rest of it into build tags.
  # The number of parallel compiles follows GOMAXPROCS.
  export GOROOT PATH="$GOROOT/bin:$PATH" GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on \
         HOME="$WORK/home" GOPATH="$WORK/home/go" GOCACHE="$WORK/home/gocache" GOMAXPROCS="$jobs" \
         KUBE_GIT_VERSION="v$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
  make WHAT=cmd/kube-apiserver
) >>"$LOG" 2>&1 || fail "make WHAT=cmd/kube-apiserver"

apiserver=$(find "$tree/_output" -type f -name kube-apiserver -perm -u+x | head -n1)
[ -n "$apiserver" ] || fail "no kube-apiserver under $tree/_output"
"$apiserver" --version >>"$LOG" 2>&1 || fail "the built kube-apiserver does not run"
mkdir -p "$BIN"
cp "$apiserver" "$BIN/kube-apiserver"
cp "$WORK/root/usr/bin/etcd" "$BIN/etcd"
"$BIN/etcd" --version >>"$LOG" 2>&1 || fail "etcd from etcd-server does not run"
{ "$BIN/kube-apiserver" --version; "$BIN/etcd" --version | head -n1; } >"$DEST/VERSIONS"
touch "$DEST/.complete"
rm -rf "$WORK"
# older recipes of the same version are superseded
for old in "$CACHE_ROOT"/kube-apiserver-"$K8S_VERSION"-*; do
  [ "$old" = "$DEST" ] || [ "$old" = "$LOG" ] || case "$old" in *.log|*.work) ;; *) rm -rf "$old" ;; esac
done
step "done in $(( $(date +%s) - started )) s: $(tr '\n' ' ' <"$DEST/VERSIONS")"
echo "$BIN"
