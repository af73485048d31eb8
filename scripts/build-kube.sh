#!/usr/bin/env bash
# Builds the Kubernetes control plane that pgro's controller tests run against, from the Go
# module proxy (no release downloads are reachable here), and caches it in $PGRO_CACHE_DIR/bin
# (default ~/.cache/pgro/bin):
#   - etcd                     go.etcd.io/etcd/server/v3 at $ETCD_VERSION
#   - kube-apiserver           k8s.io/kubernetes cmd/kube-apiserver at $KUBE_VERSION
#   - kube-controller-manager  same module; the tests run its controllers (Job, Deployment,
#                              garbage collector, namespace, ...) against pods a fake node runs
#   - kubectl                  same module, for the tests that apply manifests as a user does
# Binaries already cached at the right version are kept (the script is idempotent).
#
# Usage: scripts/build-kube.sh [--smoke] [--force] [--quiet]
#   --smoke  afterwards start etcd + kube-apiserver (+ controller-manager) on loopback, create a
#            CRD and objects through the API, check garbage collection, print timings, stop all
#   --force  rebuild even when the cached binaries have the right versions
#   --quiet  say nothing when the cached binaries are current (scripts/setup.sh uses it)
# See docs/kube-test-env.md for the flags, timings and pitfalls.
set -euo pipefail

CACHE="${PGRO_CACHE_DIR:-$HOME/.cache/pgro}"
BIN="$CACHE/bin"
KUBE_VERSION="1.37.2"   # k8s.io/kubernetes; its staging modules are published as v0.37.2
ETCD_VERSION="3.7.3"    # Kubernetes 1.37 is tested against etcd 3.7.0 (hack/lib/etcd.sh)

SMOKE=0
FORCE=0
QUIET=0
for a in "$@"; do
  case "$a" in
    --smoke) SMOKE=1 ;;
    --force) FORCE=1 ;;
    --quiet) QUIET=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument: $a" >&2; exit 2 ;;
  esac
done

log() { printf '==> %s\n' "$*" >&2; }
cached() { [ "$QUIET" = 1 ] || log "$@"; }
export PATH="/usr/local/go/bin:$PATH"
# Build with the Go on this machine (both modules say `go 1.26.0`); never try to fetch a toolchain
# named by a `toolchain` line. A caller may still export GOTOOLCHAIN=go1.27.3 for newer versions.
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"
command -v go >/dev/null || { echo "go not found (scripts/setup.sh installs it)" >&2; exit 1; }

# (output captured first: `cmd | grep -q` under pipefail fails at random when grep's early exit
# kills the writer with SIGPIPE, which would trigger a needless rebuild)
have_etcd() { local v; v="$("$BIN/etcd" --version 2>/dev/null)" && grep -qx "etcd Version: $ETCD_VERSION" <<<"$v"; }
have_kube() { local v; v="$("$BIN/$1" --version 2>/dev/null)" && grep -qx "Kubernetes v$KUBE_VERSION" <<<"$v"; }
secs() { echo $(( $(date +%s) - $1 )); }

mkdir -p "$BIN" "$CACHE/build"

# A build module in $1 that requires k8s.io/kubernetes and replaces each of its staging
# modules (k8s.io/api, apimachinery, apiserver, client-go, kubectl, ...), which it requires at
# v0.0.0 from ./staging/src/k8s.io/* (not in the module zip), by the published v0.N.M: it builds
# the same code.
kube_build_module() {
  local w="$1" minor_patch="${KUBE_VERSION#*.}" kmod n
  local staging="v0.$minor_patch"
  kmod="$(cd /tmp && go mod download -json "k8s.io/kubernetes@v$KUBE_VERSION" \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(d.get("GoMod") or sys.exit(d.get("Error")))')"
  rm -rf "$w"; mkdir -p "$w"
  {
    printf 'module pgro.local/kubebuild\n\ngo 1.26.0\n\ngodebug default=go1.26\n\n'
    printf 'require k8s.io/kubernetes v%s\n\nreplace (\n' "$KUBE_VERSION"
    sed -n '/^replace (/,/^)/p' "$kmod" | awk -v v="$staging" '$2 == "=>" && $3 ~ /^\.\/staging\// { printf "\t%s => %s %s\n", $1, $1, v }'
    printf ')\n'
  } > "$w/go.mod"
  n="$(grep -c '=> k8s.io/' "$w/go.mod" || true)"
  [ "$n" -gt 20 ] || { echo "found only $n staging replaces in $kmod" >&2; exit 1; }
  log "resolving modules ($n staging modules replaced by $staging)"
}

# The version the binaries report (kube-apiserver --version, GET /version, kubectl version);
# without it they say v0.0.0-master. component-base/version is also what emulation-version
# checks read.
kube_ldflags() {
  local minor_patch="${KUBE_VERSION#*.}" ld="-s -w" p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=v$KUBE_VERSION -X $p.gitMajor=${KUBE_VERSION%%.*} -X $p.gitMinor=${minor_patch%%.*} -X $p.gitTreeState=clean"
  done
  echo "$ld"
}


# --- etcd --------------------------------------------------------------------------------
if [ "$FORCE" = 1 ] || ! have_etcd; then
  log "building etcd v$ETCD_VERSION from the Go module proxy (about 1 minute on 2 cores)"
  start=$(date +%s)
  # server/v3's own go.mod replaces its sibling modules with ../ paths, which only work in the
  # etcd repository; as a dependency of a small build module those replaces are ignored and the
  # published go.etcd.io/etcd/{api,client,pkg}/v3 of the same version are used instead.
  w="$CACHE/build/etcd-v$ETCD_VERSION"
  rm -rf "$w"; mkdir -p "$w"
  cat > "$w/go.mod" <<EOF
module pgro.local/etcdbuild

go 1.26.0

require go.etcd.io/etcd/server/v3 v$ETCD_VERSION
EOF
  printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy && go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" go.etcd.io/etcd/server/v3)
  mv "$BIN/etcd.tmp" "$BIN/etcd"
  have_etcd || { echo "built etcd does not report version $ETCD_VERSION" >&2; exit 1; }
  log "etcd built in $(secs "$start")s"
else
  cached "etcd v$ETCD_VERSION already cached in $BIN"
fi

# --- kube-apiserver, kube-controller-manager ---------------------------------------------
if [ "$FORCE" = 1 ] || ! have_kube kube-apiserver || ! have_kube kube-controller-manager; then
  log "building kube-apiserver and kube-controller-manager v$KUBE_VERSION from the Go module proxy (about 7-8 minutes on 2 cores, once)"
  start=$(date +%s)
  w="$CACHE/build/kube-v$KUBE_VERSION"
  kube_build_module "$w"
  cat > "$w/tools.go" <<'EOF'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
EOF
  (cd "$w" && go mod tidy)
  ld="$(kube_ldflags)"
  log "compiling (the slow part)"
  rm -rf "$w/out"; mkdir -p "$w/out"
  (cd "$w" && go build -trimpath -ldflags "$ld" -o "$w/out/" \
    k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager)
  mv "$w/out/kube-apiserver" "$BIN/kube-apiserver"
  mv "$w/out/kube-controller-manager" "$BIN/kube-controller-manager"
  have_kube kube-apiserver && have_kube kube-controller-manager \
    || { echo "built binaries do not report v$KUBE_VERSION" >&2; exit 1; }
  log "kube-apiserver and kube-controller-manager built in $(secs "$start")s"
else
  cached "kube-apiserver and kube-controller-manager v$KUBE_VERSION already cached in $BIN"
fi

# --- kubectl -------------------------------------------------------------------------------
# The tests that apply manifests as a user does (tests/kube/test_operator_adoption.py: a plain
# client-side apply, then deploy/'s documented server-side apply over it).
have_kubectl() { local v; v="$("$BIN/kubectl" version --client 2>/dev/null)" && grep -qx "Client Version: v$KUBE_VERSION" <<<"$v"; }
if [ "$FORCE" = 1 ] || ! have_kubectl; then
  log "building kubectl v$KUBE_VERSION from the Go module proxy (about 2 minutes on 2 cores, once)"
  start=$(date +%s)
  w="$CACHE/build/kubectl-v$KUBE_VERSION"
  kube_build_module "$w"
  printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kubectl"\n' > "$w/tools.go"
  (cd "$w" && go mod tidy && go build -trimpath -ldflags "$(kube_ldflags)" -o "$BIN/kubectl.tmp" k8s.io/kubernetes/cmd/kubectl)
  mv "$BIN/kubectl.tmp" "$BIN/kubectl"
  have_kubectl || { echo "built kubectl does not report v$KUBE_VERSION" >&2; exit 1; }
  log "kubectl built in $(secs "$start")s"
else
  cached "kubectl v$KUBE_VERSION already cached in $BIN"
fi

[ "$SMOKE" = 1 ] || exit 0

# --- smoke test: a real control plane on loopback ------------------------------------------
for t in curl openssl python3; do command -v "$t" >/dev/null || { echo "--smoke needs $t" >&2; exit 1; }; done
D="$(mktemp -d /tmp/pgro-kube-smoke.XXXXXX)"
ETCD_PID=""; API_PID=""; KCM_PID=""
# Every wait below goes through tick, so the smoke test ends (and the EXIT trap stops every
# server) after a deadline instead of hanging.
deadline=$((SECONDS + ${PGRO_SMOKE_TIMEOUT:-300}))
tick() {
  [ "$SECONDS" -lt "$deadline" ] || { echo "smoke: timed out waiting for: $1" >&2; exit 1; }
  sleep "${2:-0.1}"
}
stop_all() {
  # Order matters: the apiserver first (it needs etcd to shut down promptly), then etcd.
  for p in $KCM_PID $API_PID $ETCD_PID; do
    kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true
  done
  ETCD_PID=""; API_PID=""; KCM_PID=""
  cd /; rm -rf "$D"
}
trap stop_all EXIT
now() { date +%s.%N; }
dt() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}s')" "$1" "$2"; }
freeport() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
cd "$D"

log "smoke: certificates, keys and a static token in $D"
t0=$(now)
ec_key() { openssl ecparam -name prime256v1 -genkey -noout -out "$1"; }
ec_key ca.key
openssl req -x509 -new -key ca.key -out ca.crt -days 7 -subj /CN=pgro-test-ca 2>/dev/null
sign() {  # sign <name> <subject> <extensions>
  ec_key "$1.key"
  openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
  printf '%b' "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 7 -extfile "$1.ext" -out "$1.crt" 2>/dev/null
}
sign apiserver /CN=kube-apiserver 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nkeyUsage=digitalSignature\n'
sign admin "/O=system:masters/CN=pgro-test-admin" 'extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n'
ec_key sa.key; openssl ec -in sa.key -pubout -out sa.pub 2>/dev/null
TOKEN="$(openssl rand -hex 16)"
echo "$TOKEN,pgro-test-admin,pgro-test-admin,system:masters" > tokens.csv
ETCD_CLIENT=$(freeport); ETCD_PEER=$(freeport); API_PORT=$(freeport)
U="https://127.0.0.1:$API_PORT"

log "smoke: starting etcd (:$ETCD_CLIENT) and kube-apiserver (:$API_PORT)"
t1=$(now)
"$BIN/etcd" --name=pgro-test --data-dir="$D/etcd" \
  --listen-client-urls="http://127.0.0.1:$ETCD_CLIENT" --advertise-client-urls="http://127.0.0.1:$ETCD_CLIENT" \
  --listen-peer-urls="http://127.0.0.1:$ETCD_PEER" --initial-advertise-peer-urls="http://127.0.0.1:$ETCD_PEER" \
  --initial-cluster="pgro-test=http://127.0.0.1:$ETCD_PEER" \
  --unsafe-no-fsync=true --log-level=warn > etcd.log 2>&1 &
ETCD_PID=$!
"$BIN/kube-apiserver" --etcd-servers="http://127.0.0.1:$ETCD_CLIENT" \
  --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$API_PORT" \
  --endpoint-reconciler-type=none \
  --tls-cert-file=apiserver.crt --tls-private-key-file=apiserver.key \
  --client-ca-file=ca.crt --token-auth-file=tokens.csv --authorization-mode=RBAC \
  --service-account-issuer="$U" --service-account-key-file=sa.pub --service-account-signing-key-file=sa.key \
  --service-cluster-ip-range=10.0.0.0/24 --disable-admission-plugins=ServiceAccount --allow-privileged=true \
  > apiserver.log 2>&1 &
API_PID=$!
k() { curl -sS --max-time 20 --fail-with-body --cacert ca.crt -H "Authorization: Bearer $TOKEN" "$@"; }
code() { curl -sS --max-time 20 --cacert ca.crt -H "Authorization: Bearer $TOKEN" -o /dev/null -w '%{http_code}' "$@" 2>/dev/null || true; }
until [ "$(code "$U/readyz")" = 200 ]; do
  kill -0 "$API_PID" 2>/dev/null || { echo "kube-apiserver exited:" >&2; tail -20 apiserver.log >&2; exit 1; }
  kill -0 "$ETCD_PID" 2>/dev/null || { echo "etcd exited:" >&2; tail -20 etcd.log >&2; exit 1; }
  tick "kube-apiserver /readyz"
done
t2=$(now)
log "smoke: GET /readyz = 200 after $(dt "$t1" "$t2") (server $(k "$U/version" | python3 -c 'import json,sys; print(json.load(sys.stdin)["gitVersion"])'))"

json() { k -X POST -H 'Content-Type: application/json' "$@" -o /dev/null; }
json "$U/apis/apiextensions.k8s.io/v1/customresourcedefinitions" -d '{
  "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
  "metadata": {"name": "widgets.smoke.pgro.test"},
  "spec": {"group": "smoke.pgro.test", "scope": "Namespaced",
    "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
    "versions": [{"name": "v1", "served": true, "storage": true, "subresources": {"status": {}},
      "schema": {"openAPIV3Schema": {"type": "object", "properties": {
        "spec": {"type": "object", "properties": {"size": {"type": "integer", "default": 3}}},
        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}}}}}]}}'
until k "$U/apis/apiextensions.k8s.io/v1/customresourcedefinitions/widgets.smoke.pgro.test" | python3 -c '
import json, sys
conds = json.load(sys.stdin).get("status", {}).get("conditions", [])
sys.exit(not any(c["type"] == "Established" and c["status"] == "True" for c in conds))'; do tick "CRD Established"; done
t3=$(now)
log "smoke: CRD created and Established after $(dt "$t2" "$t3")"
json "$U/api/v1/namespaces" -d '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "smoke"}}'
# the new resource's endpoint can answer 404 for a moment after Established
until json "$U/apis/smoke.pgro.test/v1/namespaces/smoke/widgets" \
  -d '{"apiVersion": "smoke.pgro.test/v1", "kind": "Widget", "metadata": {"name": "w1"}, "spec": {}}' 2>/dev/null; do tick "the Widget resource to be served" 0.2; done
k -X PATCH -H 'Content-Type: application/merge-patch+json' "$U/apis/smoke.pgro.test/v1/namespaces/smoke/widgets/w1/status" \
  -d '{"status": {"phase": "Ready"}}' -o /dev/null
# client-certificate authentication works as well as the token
curl -sS --max-time 20 --fail-with-body --cacert ca.crt --cert admin.crt --key admin.key "$U/apis/smoke.pgro.test/v1/namespaces/smoke/widgets" \
  | python3 -c '
import json, sys
items = json.load(sys.stdin)["items"]
assert [(i["metadata"]["name"], i["spec"], i["status"]) for i in items] == [("w1", {"size": 3}, {"phase": "Ready"})], items
print("==> smoke: listed back widgets/w1 with spec.size defaulted to 3 and status.phase Ready", file=sys.stderr)'

log "smoke: starting kube-controller-manager (garbage collector + namespace controllers)"
cat > admin.kubeconfig <<EOF
apiVersion: v1
kind: Config
clusters: [{name: test, cluster: {server: "$U", certificate-authority: "$D/ca.crt"}}]
users: [{name: admin, user: {client-certificate: "$D/admin.crt", client-key: "$D/admin.key"}}]
contexts: [{name: test, context: {cluster: test, user: admin}}]
current-context: test
EOF
"$BIN/kube-controller-manager" --kubeconfig=admin.kubeconfig --controllers=garbagecollector,namespace \
  --leader-elect=false --secure-port=0 > kcm.log 2>&1 &
KCM_PID=$!
uid="$(k "$U/apis/smoke.pgro.test/v1/namespaces/smoke/widgets/w1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["metadata"]["uid"])')"
owner='"ownerReferences": [{"apiVersion": "smoke.pgro.test/v1", "kind": "Widget", "name": "w1", "uid": "'"$uid"'", "controller": true, "blockOwnerDeletion": true}]'
json "$U/api/v1/namespaces/smoke/configmaps" -d '{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "child", '"$owner"'}}'
until grep -q "all resource monitors have synced" kcm.log; do
  kill -0 "$KCM_PID" 2>/dev/null || { echo "kube-controller-manager exited:" >&2; tail -20 kcm.log >&2; exit 1; }
  tick "the garbage collector to sync"
done
t4=$(now)
k -X DELETE "$U/apis/smoke.pgro.test/v1/namespaces/smoke/widgets/w1" -o /dev/null
until [ "$(code "$U/api/v1/namespaces/smoke/configmaps/child")" = 404 ]; do tick "garbage collection of the owned ConfigMap"; done
t5=$(now)
log "smoke: owned ConfigMap garbage-collected $(dt "$t4" "$t5") after its Widget was deleted"
k -X DELETE "$U/api/v1/namespaces/smoke" -o /dev/null
until [ "$(code "$U/api/v1/namespaces/smoke")" = 404 ]; do tick "namespace deletion" 0.2; done
t6=$(now)
log "smoke: namespace deleted and finalized after $(dt "$t5" "$t6")"
t7=$(now); stop_all; trap - EXIT; t8=$(now)
log "smoke: all stopped in $(dt "$t7" "$t8"); whole smoke test $(dt "$t0" "$t8")"
log "smoke: OK"
