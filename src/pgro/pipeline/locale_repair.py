"""The locale, reindex and collation repairs of one restore, shared by `pgro verify` and
`pgro run`'s restore worker (issue 13; features.md §2.3, §2.4; docs/locale-and-collation.md).

Order, for both:
1. `LocaleRepair.before_start`: the single-user probe and rewrite, first without any
   private locale (a sound snapshot pays one single-user session, nothing is built); only
   when single-user mode refuses a database for its locale are the aliases built (into the
   restore's own `locales` directory, never the host's) and the rewrite run again with them.
2. The server starts with `LocaleRepair.env()` (nothing when no aliases were built).
3. `LocaleRepair.after_start`: the counted fallback rewrite and `pg_collation`'s default
   rows; `fixes.locale` is the or of both counts; then the quick reindex of the
   default-collation indexes when either count was non-zero (`fixes.reindex`).
4. `refresh_collations`: detection (one query per database) and, on a mismatch, the
   rebuilds then `REFRESH VERSION` (`fixes.collation_refresh`); what remains is reported.
5. `full_reindex_after_reset`: after `pg_resetwal` (`fixes.reindex`).

The rebuilds run user code (index expressions): the catalog guard must have run first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from pgro.postgres.account import RunAccount
from pgro.postgres.binaries import PostgresBinaries
from pgro.postgres.locale_aliases import (
    RESTORE_LOCALES_DIR,
    LocaleAliases,
    LocalesUnavailable,
    build_locale_aliases,
    missing_locales,
)
from pgro.postgres.locale_fix import (
    ReindexResult,
    error_text,
    full_reindex,
    quick_reindex,
    rewrite_after_start,
    rewrite_in_single_user,
)
from pgro.postgres.repair import Repairs
from pgro.postgres.server import StartupFailed
from pgro.postgres.single_user import SingleUserFailed

if TYPE_CHECKING:
    from pgro.postgres.collation_refresh import CollationMismatch, CollationRefreshResult
    from pgro.postgres.health import HealthReport

# `PGRO_LOCALE_ALIASES=off` (or 0, false, no): never build private locales. A snapshot whose
# databases name a locale this host lacks then fails with `LocaleUnavailable`.
ALIASES_SWITCH: Final = "PGRO_LOCALE_ALIASES"
_OFF: Final = frozenset({"off", "0", "false", "no", "disabled"})

Say = Callable[[str], None]


class LocaleUnavailable(StartupFailed):
    """The snapshot's databases name a locale this host lacks, and pgro could not provide
    it (aliases disabled, no `localedef`, or no source for that name)."""

    reason = "LocaleUnavailable"


def aliases_disabled() -> bool:
    return os.environ.get(ALIASES_SWITCH, "").strip().lower() in _OFF


def locales_dir(restore_dir: Path) -> Path:
    """Where a restore's private locales live: its own directory, beside (never inside)
    the restored tree, so the server `pgro run` serves later finds them too."""
    return restore_dir / RESTORE_LOCALES_DIR


@dataclass
class LocaleRepair:
    """One restore's locale state, from before the first start to the reindex."""

    directory: Path
    aliases: LocaleAliases | None = None
    single_user: int = 0  # databases the single-user session rewrote
    fallback: int = 0  # databases the post-start fallback still rewrote
    default_collations: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def env(self) -> dict[str, str] | None:
        """The environment every PostgreSQL process on the data needs (None: nothing)."""
        return self.aliases.env() if self.aliases is not None else None

    @property
    def rewritten(self) -> bool:
        """`fixes.locale` and "needs reindex": the or of both counts (the fallback after a
        successful single-user rewrite counts 0 and must not hide the first count)."""
        return bool(self.single_user or self.fallback)

    # -- before the first start ----------------------------------------------------------

    @classmethod
    def before_start(
        cls,
        binaries: PostgresBinaries,
        pgdata: Path,
        account: RunAccount,
        directory: Path,
        say: Say,
    ) -> LocaleRepair:
        """The single-user probe and rewrite (the first time PostgreSQL opens the data:
        crash recovery runs here). Raises `LocaleUnavailable` when a database names a
        locale pgro cannot provide; any other single-user failure is left to the server's
        start, which decides on a WAL reset (the fallback rewrite then runs after it)."""
        state = cls(directory)
        try:
            state.single_user = rewrite_in_single_user(binaries, pgdata, account).rewritten
            state._said_rewrite(say)
            return state
        except SingleUserFailed as exc:
            missing = missing_locales(exc.log_tail)
            if not missing:
                state._not_locale(exc, say, build=True)
                return state
            log_tail = exc.log_tail
        say(
            "the databases name locale(s) this host lacks ("
            + ", ".join(missing)
            + "): building private locale aliases for the rewrite to C.UTF-8"
        )
        state.aliases = state._build(missing, log_tail)
        for attempt in range(2):
            try:
                state.single_user = rewrite_in_single_user(
                    binaries, pgdata, account, env=state.env()
                ).rewritten
                state._said_rewrite(say)
                return state
            except SingleUserFailed as exc:
                still = missing_locales(exc.log_tail)
                if not still:
                    state._not_locale(exc, say, build=False)
                    return state
                if attempt == 1 or set(still) <= set(missing):
                    raise state._unavailable(still, log_tail=exc.log_tail) from exc
                missing = [*missing, *still]
                state.aliases = state._build(missing, exc.log_tail)
        raise AssertionError("unreachable")

    def _build(self, names: list[str], log_tail: str) -> LocaleAliases:
        if aliases_disabled():
            raise self._unavailable(
                names,
                f"private locale aliases are disabled ({ALIASES_SWITCH})",
                log_tail=log_tail,
            )
        try:
            aliases = build_locale_aliases(self.directory, extra=names)
        except LocalesUnavailable as exc:
            raise self._unavailable(names, str(exc), log_tail=log_tail) from exc
        self.notes.append(
            f"built {len(aliases.built)} private locale(s) in the restore's own directory "
            "(LOCPATH) to open the databases"
        )
        return aliases

    def _unavailable(
        self, names: list[str], why: str = "", *, log_tail: str = ""
    ) -> LocaleUnavailable:
        named = ", ".join(repr(n) for n in names) if names else "(named in the server log)"
        start = (
            f"the snapshot's databases were created with the locale {named}, which this host "
            'lacks (PostgreSQL refuses such a database: "database locale is incompatible with '
            'operating system")'
        )
        if why:
            fix = (
                f"; {why}: install Debian's 'locales' package (localedef and its sources) and "
                f"leave {ALIASES_SWITCH} unset, so pgro builds it privately"
            )
        else:
            fix = (
                "; pgro could not build it privately (it builds en_US.UTF-8, C.UTF-8, the "
                "English Windows aliases and language_TERRITORY.codeset names this host has "
                "locale sources for): generate that locale on this host"
            )
        return LocaleUnavailable(start + fix, log_tail)

    def _not_locale(self, exc: SingleUserFailed, say: Say, *, build: bool) -> None:
        """Single-user mode failed for another reason (WAL to reset, ...): the server's
        start decides. Without the probe the databases' locales are unknown, so the aliases
        are built (when allowed) and the post-start fallback rewrites whatever remains."""
        say(f"the single-user locale probe did not run ({exc}): the rewrite runs after start")
        if build and not aliases_disabled():
            try:
                self.aliases = build_locale_aliases(self.directory)
            except LocalesUnavailable as why:
                say(f"no private locale aliases: {why}")

    def _said_rewrite(self, say: Say) -> None:
        if self.single_user:
            say(f"rewrote the locale of {self.single_user} database(s) in single-user mode")

    # -- after the start -------------------------------------------------------------------

    def after_start(
        self, conninfo_for: Callable[[str], str], repairs: Repairs, say: Say
    ) -> ReindexResult | None:
        """`after_start_rewrite` then `quick_reindex` (the catalog guard ran already)."""
        self.after_start_rewrite(conninfo_for, repairs, say)
        return self.quick_reindex(conninfo_for, repairs, say)

    def after_start_rewrite(
        self, conninfo_for: Callable[[str], str], repairs: Repairs, say: Say
    ) -> None:
        """The counted fallback rewrite (and the `default` collation rows) on the running
        server, and `fixes.locale` (the or of both counts). Runs no user code."""
        import psycopg

        try:
            fallback = rewrite_after_start(conninfo_for)
        except psycopg.Error as exc:
            text = error_text(exc)
            if "incompatible with operating system" in str(exc):
                raise self._unavailable(missing_locales(str(exc))) from exc
            raise LocaleUnavailable(f"the post-start locale rewrite failed: {text}") from exc
        self.fallback = fallback.rewritten
        self.default_collations = fallback.default_collations
        if fallback.rewritten:
            say(f"rewrote the locale of {fallback.rewritten} database(s) after start")
        notes = self._notes()
        if self.rewritten:
            repairs.record("locale", notes.pop(0))
        repairs.notes.extend([*self.notes, *notes])
        self.notes = []

    def quick_reindex(
        self, conninfo_for: Callable[[str], str], repairs: Repairs, say: Say
    ) -> ReindexResult | None:
        """When a database was rewritten: rebuild the indexes on the default collation
        (`fixes.reindex` when any was). None when none was due. The catalog guard must have
        run (index expressions are user code)."""
        if not self.rewritten:
            return None
        # The indexes of the rewritten databases were built in the source's locale order.
        result = quick_reindex(conninfo_for)
        note = result.note("quick reindex of the indexes on the default collation")
        say(note)
        if result.reindexed:
            repairs.record("reindex", note)
        else:
            repairs.notes.append(note)
        return result

    def _notes(self) -> list[str]:
        count = self.single_user + self.fallback
        notes = []
        if count:
            how = "in single-user mode" if self.single_user else "after start"
            notes.append(
                f"rewrote the locale of {count} database(s) to C.UTF-8 (C for other "
                f"encodings) {how}: the source's locale is not this host's"
            )
        if self.default_collations:
            notes.append(
                "rewrote the default collation row of "
                + ", ".join(self.default_collations)
                + " to C.UTF-8"
            )
        return notes


def full_reindex_after_reset(
    conninfo_for: Callable[[str], str], repairs: Repairs, say: Say
) -> ReindexResult:
    """After `pg_resetwal`: `REINDEX DATABASE` everywhere (torn index pages would surface
    later as "unexpected zero page"). `fixes.reindex` when anything was rebuilt."""
    result = full_reindex(conninfo_for)
    note = result.note("full reindex after pg_resetwal (databases)")
    say(note)
    if result.reindexed:
        repairs.record("reindex", note)
    else:
        repairs.notes.append(note)
    return result


def detect_collations(conninfo_for: Callable[[str], str]) -> tuple[CollationMismatch, ...]:
    """The collation-version mismatches (one query per database)."""
    from pgro.postgres.collation_refresh import detect

    return detect(conninfo_for)


def refresh_collations(
    conninfo_for: Callable[[str], str], repairs: Repairs, say: Say
) -> CollationRefreshResult:
    """Detect and repair collation-version drift: rebuild the dependent indexes, refresh the
    versions only where every rebuild succeeded (`fixes.collation_refresh` when something
    was refreshed). What `remaining` holds is the caller's to report."""
    from pgro.postgres.collation_refresh import repair

    result = repair(conninfo_for)
    notes = result.notes()
    for note in notes:
        say(note)
    if result.refreshed:
        repairs.record("collation_refresh", notes[0])
        repairs.notes.extend(notes[1:])
    else:
        repairs.notes.extend(notes)
    return result


def remaining_collations(health: HealthReport, conninfo_for: Callable[[str], str]) -> None:
    """The `collation_versions` check of a runtime's verification report (pgro run and the
    operator): the repair ran before the restore was ready, so a mismatch detected now is one
    it could not fix, and the report says unhealthy, naming it (features.md §2.4). A
    detection that cannot run leaves the check out: the other checks say why."""
    import psycopg

    from pgro.postgres.health import record_remaining_collations

    try:
        mismatches = detect_collations(conninfo_for)
    except psycopg.Error:
        return
    record_remaining_collations(health, mismatches)
