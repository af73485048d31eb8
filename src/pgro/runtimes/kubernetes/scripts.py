"""Shell scripts run inside the pods the operator builds.

Kept minimal: the restore Job (`pgro restore-job`) already located and repaired PGDATA,
so the postgres pod's `setup` init container does only what needs PostgreSQL's binaries,
which the restore Job's image lacks: the locale rewrite in single-user mode (building
private locale aliases first when a database names a locale the image lacks; features.md
§2.3), the bootstrap superuser's password (the operator provisions users over SQL with it)
and the WAL reset when recovery cannot start. It tells the operator what it repaired in its
termination message (`SetupReport`). Paths come from the environment only, so the same
script runs unchanged against a local data directory in the tests.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from typing import Final

from pgro.pipeline.restore_job import VERIFY_DEPTH_FILE
from pgro.postgres.config import forced_settings
from pgro.postgres.locale_aliases import (
    ALIAS_SOURCE,
    GCONV_DIR,
    IMAGE_LOCALES,
    LocaleSpec,
    gconv_aliases,
    windows_alias_specs,
)
from pgro.postgres.locale_fix import (
    MISMATCH_LABEL,
    mismatch_probe_statement,
    rewrite_statement,
)
from pgro.postgres.server import (
    INFORMATIONAL_LINE_PATTERN,
    NOT_RESETTABLE_SIGNATURES,
    WAL_FAILURE_SIGNATURES,
)

ADMIN_ROLE: Final = "postgres"
# The postgres pod's init container that runs this script.
SETUP_CONTAINER: Final = "setup"
FIX_RESET_WAL_FLAG: Final = "fix-reset-wal"
# `<data root>/fix-locale`: the single-user session rewrote a database's locale (fix
# `locale`); `<data root>/needs-reindex` holds how many, and that the indexes on the default
# collation were built in another locale's order. Both are sticky (never removed): a later
# pod of the restore reports them again, and the operator's restore status says whether the
# quick reindex was done (`fixes.reindex`).
FIX_LOCALE_FLAG: Final = "fix-locale"
NEEDS_REINDEX_MARKER: Final = "needs-reindex"
# The setup's environment: where it may build private locales (an emptyDir), and the switch
# that disables them (`pipeline.locale_repair.ALIASES_SWITCH`'s name).
LOCALES_ENV: Final = "PGRO_LOCALES"
ALIASES_SWITCH_ENV: Final = "PGRO_LOCALE_ALIASES"
TERMINATION_LOG_ENV: Final = "PGRO_TERMINATION_LOG"
# `<data root>/pgro-checksums.{status,stdout,stderr}`: the setup's pg_checksums run.
CHECKSUMS_FILE: Final = "pgro-checksums"
# The script is the same for every major, and an unknown `-c` stops the server, so it forces
# only what every major has: the library settings that single-user mode loads from. The
# newer ones (JIT, recovery commands) do nothing in a single-user session with no signal file.
_SINGLE_USER_MAJOR: Final = "10"

_SETUP_TEMPLATE: Final = r"""set -eu
# Never `set -x`: PGRO_ADMIN_PASSWORD would be echoed into the pod log.

case "${PGRO_ADMIN_PASSWORD:-}" in
  '' | *[!A-Za-z0-9]*)
    echo "setup: PGRO_ADMIN_PASSWORD must be a non-empty string of letters and digits" \
      "(it is interpolated into SQL); check the Secret it comes from" >&2
    exit 1
    ;;
esac

chmod 0700 "$PGDATA"

# Plain statements, no DO block: a DO runs PL/pgSQL through the handler the snapshot's
# catalog names, and the snapshot is untrusted. The role usually exists; when the source
# cluster was initialised by another OS user it does not, and is created.
attributes="SUPERUSER LOGIN PASSWORD '$PGRO_ADMIN_PASSWORD'"
alter="ALTER ROLE __ROLE__ WITH $attributes;"
create="CREATE ROLE __ROLE__ WITH $attributes;"

# Single-user mode exits 0 even when the statement fails, so its output decides.
# log_min_error_statement=panic keeps the statement (and the password) out of the log;
# a read-only replica's postgresql.conf makes every transaction read-only unless overridden.
run_single() {
  printf '%s\n' "$1" \
    | postgres --single -D "$PGDATA" __FORCED__ -c log_min_error_statement=panic \
        -c default_transaction_read_only=off __DATABASE__ 2>&1
}

# awk reads the password from its environment: on sed's command line it would be
# visible to anything that lists processes.
redacted() {
  printf '%s\n' "$1" | awk '{ gsub(ENVIRON["PGRO_ADMIN_PASSWORD"], "[redacted]"); print }'
}

failed() {
  printf '%s\n' "$1" | grep -Eq '(ERROR|FATAL|PANIC):'
}

# --- The locale rewrite (features.md §2.3), in the first single-user session: the probe and
# the UPDATE on two lines (single-user mode ends a statement at a newline). A database named
# with a locale this image lacks ("database locale is incompatible with operating system",
# e.g. a Windows source's "English_United States.1252") is opened through private locales
# built on demand into $PGRO_LOCALES (LOCPATH; GCONV_PATH for the Windows code-page names),
# never into the image's /usr/lib/locale; afterwards no database needs them.
locale_probe=__LOCALE_PROBE__
if [ "$(cat "$PGDATA/PG_VERSION" 2>/dev/null || echo 0)" -ge 15 ] 2>/dev/null; then
  locale_update=__LOCALE_UPDATE_15__
else
  locale_update=__LOCALE_UPDATE_OLD__
fi
locale_statements=$(printf '%s\n%s' "$locale_probe" "$locale_update")
private_locales=no

aliases_disabled() {
  case "$(printf '%s' "${__SWITCH__:-}" | tr 'A-Z' 'a-z')" in
    off | 0 | false | no | disabled) return 0 ;;
  esac
  return 1
}

# build_locale NAME SOURCE CHARMAP: one locale directory, whole or not at all. localedef
# exits non-zero on mere warnings and still writes the locale: the files decide.
build_locale() {
  [ -f "$__LOCALES__/$1/LC_CTYPE" ] && return 0
  rm -rf "$__LOCALES__/.building"
  localedef -i "$2" -f "$3" "$__LOCALES__/.building" >/dev/null 2>&1 || true
  if [ -f "$__LOCALES__/.building/LC_CTYPE" ]; then
    mv "$__LOCALES__/.building" "$__LOCALES__/$1"
  else
    rm -rf "$__LOCALES__/.building"
    echo "setup: could not build the locale $1" >&2
  fi
}

# A name a failed session gave (from the restored catalog: untrusted), built only when it is
# a plain <ll>_<TT>.<codeset> this image has sources for (locale_aliases.spec_for).
build_named() {
  printf '%s\n' "$1" | grep -Eq '^[a-z]{2,3}_[A-Z]{2}[.][A-Za-z0-9-]{1,20}$' || return 0
  source=${1%%.*}
  want=$(printf '%s' "${1#*.}" | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z')
  [ -f "/usr/share/i18n/locales/$source" ] || return 0
  for charmap in /usr/share/i18n/charmaps/*; do
    charmap=${charmap##*/}
    charmap=${charmap%.gz}
    if [ "$(printf '%s' "$charmap" | tr -cd 'A-Za-z0-9' | tr 'A-Z' 'a-z')" = "$want" ]; then
      build_locale "$1" "$source" "$charmap"
      return 0
    fi
  done
}

build_locales() {
  mkdir -p "$__LOCALES__/__GCONV_DIR__"
  cat >"$__LOCALES__/__GCONV_DIR__/gconv-modules" <<'PGRO_GCONV'
__GCONV_MODULES__PGRO_GCONV
__BUILDS__
  printf '%s\n' "$1" | while IFS= read -r name; do
    [ -z "$name" ] || build_named "$name"
  done
}

missing_locales() {
  printf '%s\n' "$1" | sed -n 's/.*initialized with LC_[A-Z]* "\([^"]*\)".*/\1/p' | sort -u
}

locale_unavailable() {
  message="setup: LocaleUnavailable: the snapshot's databases were created with the locale(s)"
  message="$message $(printf '%s' "$1" | tr '\n' ',' | sed 's/,$//'), which this image lacks"
  message="$message, and $2: PostgreSQL refuses such a database (\"database locale is"
  message="$message incompatible with operating system\")"
  echo "$message" >&2
  report "$message"
  exit 1
}

incompatible_locale() {
  printf '%s\n' "$1" | grep -Fq 'database locale is incompatible with operating system'
}

locale_session() {
  if [ "$private_locales" = yes ]; then
    (
      export LOCPATH="$__LOCALES__" GCONV_PATH="$__LOCALES__/__GCONV_DIR__"
      run_single "$1"
    )
  else
    run_single "$1"
  fi
}

mismatch_count() {
  printf '%s\n' "$1" | sed -n 's/.*__LABEL__ = "\([0-9]*\)".*/\1/p' | head -n 1
}

# The probe first; only when it counts a database to rewrite, the markers (before the
# rewrite: once rewritten, no later probe would count it again) and then the rewrite.
# Sets $output for the caller's WAL decisions when a session fails.
locale_rewrite() {
  output=$(locale_session "$locale_probe") || true
  if incompatible_locale "$output"; then
    names=$(missing_locales "$output")
    if [ "$private_locales" = yes ]; then
      locale_unavailable "$names" "pgro's private locales do not provide them"
    fi
    if aliases_disabled; then
      locale_unavailable "$names" "private locale aliases are disabled (__SWITCH__)"
    fi
    if [ -z "${__LOCALES__:-}" ] || ! command -v localedef >/dev/null 2>&1; then
      locale_unavailable "$names" "localedef or a place for private locales is missing"
    fi
    echo "setup: the databases name locale(s) this image lacks; building private locales" \
      "for the rewrite to C.UTF-8"
    build_locales "$names"
    private_locales=yes
    output=$(locale_session "$locale_probe") || true
    if incompatible_locale "$output"; then
      locale_unavailable "$(missing_locales "$output")" "pgro could not build them"
    fi
  fi
  failed "$output" && return 1
  count=$(mismatch_count "$output")
  if [ -z "$count" ]; then
    output="the locale probe printed no count in single-user mode
$output"
    return 1
  fi
  [ "$count" -gt 0 ] || return 0
  if ! { printf '%s\n' "$count" >"$PGRO_DATA_ROOT/__NEEDS_REINDEX__.tmp" \
    && mv "$PGRO_DATA_ROOT/__NEEDS_REINDEX__.tmp" "$PGRO_DATA_ROOT/__NEEDS_REINDEX__" \
    && touch "$PGRO_DATA_ROOT/__LOCALE_FLAG__"; }; then
    echo "setup: cannot write the locale markers in $PGRO_DATA_ROOT; not rewriting" >&2
    report "setup: cannot write the locale markers in the data volume's root"
    exit 1
  fi
  output=$(locale_session "$locale_statements") || true
  failed "$output" && return 1
  echo "setup: rewrote the locale of $count database(s) in single-user mode"
  return 0
}

# What this volume's setups repaired, for the operator (the container's termination
# message, read through the pod's status): one JSON line (`scripts.SetupReport`).
report() {
  [ -n "${__TERMINATION_LOG__:-}" ] || return 0
  locale=false
  [ -f "$PGRO_DATA_ROOT/__LOCALE_FLAG__" ] && locale=true
  reset=false
  [ -f "$PGRO_DATA_ROOT/__FLAG__" ] && reset=true
  pending=$(cat "$PGRO_DATA_ROOT/__NEEDS_REINDEX__" 2>/dev/null | tr -cd '0-9' | cut -c1-9)
  [ -n "$pending" ] || pending=0
  failure=$(printf '%s' "${1:-}" | tr -d '"\\' | tr '\n\t' '  ' | cut -c1-1500)
  printf '{"fixes":{"locale":%s,"reset_wal":%s},"needsReindex":%s,"failure":"%s"}\n' \
    "$locale" "$reset" "$pending" "$failure" >"$__TERMINATION_LOG__" 2>/dev/null || true
}

attempt() {
  locale_rewrite || return 1
  output=$(run_single "$alter") || return 1
  failed "$output" || return 0
  printf '%s\n' "$output" | grep -Fq 'role "__ROLE__" does not exist' || return 1
  output=$(run_single "$create") || return 1
  ! failed "$output"
}

# The same policy as `postgres.server.start_resetting_wal_if_needed`, from the same lists.
wal_lost() {
  printf '%s\n' "$1" | grep -Fq __WAL_SIGNATURES__
}

# A reset cannot fix these and would destroy the evidence (server.NOT_RESETTABLE_SIGNATURES),
# nor a failure without a FATAL or PANIC: the server started and a statement failed, or it
# was killed.
not_resettable() {
  printf '%s\n' "$1" | grep -Ev '__INFORMATIONAL__' | grep -Fq __NOT_RESETTABLE__ && return 0
  ! printf '%s\n' "$1" | grep -Eq '(FATAL|PANIC):'
}

# An online backup is never reset (server.BackupIncomplete): a data directory that held
# backup_label before the first attempt (PostgreSQL renames it once read), or whose
# pg_control still waits for a backup's end (a retried pod).
online_backup=no
if [ -e "$PGDATA/backup_label" ]; then online_backup=yes; fi

backup_end_pending() {
  control=$(pg_controldata "$PGDATA" 2>/dev/null) || return 1
  printf '%s\n' "$control" | grep -Eq '^Backup start location: +[0-9A-F]+/[0-9A-F]+$' \
    && ! printf '%s\n' "$control" | grep -Eq '^Backup start location: +0/0$'
}

reset_wal() {
  if [ "$online_backup" = yes ] || backup_end_pending; then
    echo "setup: BackupIncomplete: the data directory is an online backup (backup_label)" \
      "and $1; resetting its WAL would start an inconsistent database, so it is left as" \
      "it is. Restore the WAL archived for this backup into pg_wal, or take the backup" \
      "with its WAL" >&2
    exit 1
  fi
  echo "setup: $1; running pg_resetwal -f" >&2
  # A PANIC in single-user mode leaves its lock file behind, and pg_resetwal refuses to
  # run while one exists; nothing else uses this data directory while the pod initialises
  # (another server holding it fails with a lock-file error, which is never reset).
  rm -f "$PGDATA/postmaster.pid"
  if ! pg_resetwal -f "$PGDATA" >&2; then
    echo "setup: pg_resetwal failed; the data directory cannot be started" >&2
    exit 1
  fi
  touch "$PGRO_DATA_ROOT/__FLAG__"
}

# The offline page checksums the operator's data checks read back through the server
# (pgro.pipeline.data_check_job), taken once single-user mode has shut the cluster down
# cleanly, after any WAL replay: a copy of a running server is checked too. A previous
# start's results go first, so only this start's can be read.
checks="$PGRO_DATA_ROOT/__CHECKSUMS__"
rm -f "$checks.status" "$checks.stdout" "$checks.stderr" "$checks.tmp"

capture_checksums() {
  depth=$(cat "$PGRO_DATA_ROOT/__DEPTH_FILE__" 2>/dev/null || echo quick)
  case "$depth" in
    standard | full) ;;
    *) return 0 ;;
  esac
  if ! command -v pg_checksums >/dev/null 2>&1; then
    status=missing
  elif pg_controldata "$PGDATA" 2>/dev/null | grep -Eq '^Data page checksum version: +0$'; then
    status=disabled
  else
    echo "setup: checking the page checksums (pg_checksums --check)"
    status=0
    pg_checksums --check -D "$PGDATA" >"$checks.stdout" 2>"$checks.stderr" || status=$?
  fi
  printf 'pgdata %s\nstatus %s\n' "$PGDATA" "$status" >"$checks.tmp"
  mv "$checks.tmp" "$checks.status"
}

done_ok() {
  echo "setup: $1"
  capture_checksums
  report
  exit 0
}

if attempt; then
  done_ok "set the __ROLE__ password"
fi

if not_resettable "$output"; then
  echo "setup: a WAL reset cannot fix this failure; the data directory is left as it is" >&2
elif wal_lost "$output"; then
  redacted "$output" >&2
  reset_wal "the WAL needed for recovery is missing or torn"
  if attempt; then
    done_ok "set the __ROLE__ password after pg_resetwal"
  fi
else
  echo "setup: single-user mode failed for a reason pgro does not recognise; retrying once" >&2
  redacted "$output" >&2
  if attempt; then
    done_ok "set the __ROLE__ password on the second attempt"
  fi
  if ! not_resettable "$output"; then
    redacted "$output" >&2
    reset_wal "single-user mode failed twice; as a last resort"
    if attempt; then
      done_ok "set the __ROLE__ password after pg_resetwal (the last resort)"
    fi
  fi
fi

echo "setup: could not set the __ROLE__ password in single-user mode:" >&2
redacted "$output" >&2
report "setup: could not set the __ROLE__ password in single-user mode (see the pod log)"
exit 1
"""


def _forced_single_user_args() -> str:
    """Single-user mode loads shared_preload_libraries too: the same forced settings as the
    server's container (`config.forced_settings`), with `$PGDATA` expanded by the shell."""
    placeholder = "/__PGRO_PGDATA__"
    words = []
    for key, value in forced_settings(_SINGLE_USER_MAJOR, placeholder).items():
        escaped = re.sub(r'([$`"\\])', r"\\\1", f"{key}={value}")
        words.append("-c " + f'"{escaped}"'.replace(placeholder, "$PGDATA"))
    return " ".join(words)


def _grep_patterns(signatures: tuple[str, ...]) -> str:
    return " ".join(f"-e {shlex.quote(s)}" for s in signatures)


def _alias_specs() -> list[LocaleSpec]:
    """What the setup builds when a database names a locale the image lacks: the image's own
    locales (its archive is not read with LOCPATH), the reference's Windows aliases, and
    `C.UTF-8` (which the rewritten databases name), as `locale_aliases.default_specs`."""
    image = [LocaleSpec(name, name.split(".")[0], name.split(".")[1]) for name in IMAGE_LOCALES]
    return [*image, *windows_alias_specs(), LocaleSpec("C.UTF-8", "C", "UTF-8")]


def _alias_builds() -> str:
    assert all(s.source in (ALIAS_SOURCE, "C") or s.name in IMAGE_LOCALES for s in _alias_specs())
    return "\n".join(
        f"  build_locale {shlex.quote(s.name)} {shlex.quote(s.source)} {shlex.quote(s.charmap)}"
        for s in _alias_specs()
    )


@dataclass(frozen=True)
class SetupReport:
    """What the `setup` init container says it repaired on the volume (its termination
    message; the markers it reads are sticky, so a later pod of the restore says it again).

    `needs_reindex`: databases the single-user session rewrote from another locale, whose
    indexes on the default collation the operator rebuilds (the quick reindex)."""

    locale: bool = False
    reset_wal: bool = False
    needs_reindex: int = 0
    failure: str = ""

    @classmethod
    def parse(cls, message: str) -> SetupReport | None:
        """None when the message is not the setup's (an older operator's pod, a lost
        message): the operator then relies on its own post-start checks."""
        for line in reversed(message.strip().splitlines()):
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict) or not isinstance(doc.get("fixes"), dict):
                continue
            fixes = doc["fixes"]
            count = doc.get("needsReindex")
            failure = doc.get("failure")
            return cls(
                locale=fixes.get("locale") is True,
                reset_wal=fixes.get("reset_wal") is True,
                needs_reindex=count if isinstance(count, int) and count > 0 else 0,
                failure=failure if isinstance(failure, str) else "",
            )
        return None


def setup_script() -> str:
    """The `setup` init container's script (POSIX sh). Needs `$PGDATA`, `$PGRO_DATA_ROOT`
    and `$PGRO_ADMIN_PASSWORD`; `postgres` and `pg_resetwal` on `$PATH`. When the restore Job
    left the depth standard or full in `<data root>/pgro-verify-depth`, it also runs
    `pg_checksums --check` once the cluster is cleanly shut down. Optional: `$PGRO_LOCALES`
    (a writable directory for private locales, with `localedef` on `$PATH`),
    `$PGRO_LOCALE_ALIASES=off` (never build them) and `$PGRO_TERMINATION_LOG` (where the
    `SetupReport` line goes)."""
    return (
        _SETUP_TEMPLATE.replace("__LOCALE_PROBE__", shlex.quote(mismatch_probe_statement()))
        .replace("__LOCALE_UPDATE_15__", shlex.quote(rewrite_statement(150000)))
        .replace("__LOCALE_UPDATE_OLD__", shlex.quote(rewrite_statement(140000)))
        .replace("__GCONV_MODULES__", gconv_aliases())
        .replace("__BUILDS__", _alias_builds())
        .replace("__GCONV_DIR__", GCONV_DIR)
        .replace("__LOCALES__", LOCALES_ENV)
        .replace("__SWITCH__", ALIASES_SWITCH_ENV)
        .replace("__LABEL__", MISMATCH_LABEL)
        .replace("__NEEDS_REINDEX__", NEEDS_REINDEX_MARKER)
        .replace("__LOCALE_FLAG__", FIX_LOCALE_FLAG)
        .replace("__TERMINATION_LOG__", TERMINATION_LOG_ENV)
        .replace("__FORCED__", _forced_single_user_args())
        .replace("__WAL_SIGNATURES__", _grep_patterns(WAL_FAILURE_SIGNATURES))
        .replace("__NOT_RESETTABLE__", _grep_patterns(NOT_RESETTABLE_SIGNATURES))
        .replace("__INFORMATIONAL__", INFORMATIONAL_LINE_PATTERN)
        .replace("__ROLE__", ADMIN_ROLE)
        .replace("__DATABASE__", "postgres")
        .replace("__FLAG__", FIX_RESET_WAL_FLAG)
        .replace("__CHECKSUMS__", CHECKSUMS_FILE)
        .replace("__DEPTH_FILE__", VERIFY_DEPTH_FILE)
    )
