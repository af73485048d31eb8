"""Shell scripts run inside the pods the operator builds.

Kept minimal: the restore Job (`pgro restore-job`) already located and repaired PGDATA,
so the postgres pod's `setup` init container only sets the bootstrap superuser's password,
which the operator needs to provision users over SQL. Paths come from the environment
only, so the same script runs unchanged against a local data directory in the tests.
"""

from __future__ import annotations

import re
import shlex
from typing import Final

from pgro.pipeline.restore_job import VERIFY_DEPTH_FILE
from pgro.postgres.config import forced_settings
from pgro.postgres.server import (
    INFORMATIONAL_LINE_PATTERN,
    NOT_RESETTABLE_SIGNATURES,
    WAL_FAILURE_SIGNATURES,
)

ADMIN_ROLE: Final = "postgres"
FIX_RESET_WAL_FLAG: Final = "fix-reset-wal"
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

attempt() {
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


def setup_script() -> str:
    """The `setup` init container's script (POSIX sh). Needs `$PGDATA`, `$PGRO_DATA_ROOT`
    and `$PGRO_ADMIN_PASSWORD`; `postgres` and `pg_resetwal` on `$PATH`. When the restore Job
    left the depth standard or full in `<data root>/pgro-verify-depth`, it also runs
    `pg_checksums --check` once the cluster is cleanly shut down."""
    return (
        _SETUP_TEMPLATE.replace("__FORCED__", _forced_single_user_args())
        .replace("__WAL_SIGNATURES__", _grep_patterns(WAL_FAILURE_SIGNATURES))
        .replace("__NOT_RESETTABLE__", _grep_patterns(NOT_RESETTABLE_SIGNATURES))
        .replace("__INFORMATIONAL__", INFORMATIONAL_LINE_PATTERN)
        .replace("__ROLE__", ADMIN_ROLE)
        .replace("__DATABASE__", "postgres")
        .replace("__FLAG__", FIX_RESET_WAL_FLAG)
        .replace("__CHECKSUMS__", CHECKSUMS_FILE)
        .replace("__DEPTH_FILE__", VERIFY_DEPTH_FILE)
    )
