"""Locales a restored cluster names, built into a private `LOCPATH` (never the host's archive).

A database records the locale it was created with (`datcollate`, `datctype`), and PostgreSQL
refuses every connection to it, single-user mode included, when this host's C library does
not know that name ("database locale is incompatible with operating system"). Snapshots
from Windows hosts name Windows locales ("English_United States.1252"); snapshots from
Linux hosts usually name `en_US.UTF-8`, which the `postgres` image carries and a bare host
often does not. The reference builds Windows aliases into the pod's `/usr/lib/locale`
(restore-pipeline.md §4.2); pgro builds them, and the image's `en_US.UTF-8`, into a
directory of its own and hands the server `LOCPATH` for it: the host is never changed.

They only need to let the server open the databases long enough for the locale rewrite to
`C.UTF-8` (`postgres.locale_fix`), after which no database needs them.

glibc detail: with `LOCPATH`, a locale is read from `<LOCPATH>/<name>/LC_*` (the archive is
not consulted), and setlocale then checks that the codeset in the name ("1252", "65001") is
the locale's own (CP1252, UTF-8) through the iconv alias table. Windows code-page numbers are
no aliases there, so a private `gconv-modules` holding only those aliases goes with it
(`GCONV_PATH`, which glibc reads before its own configuration); it names no module, so it
loads no code.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

log = logging.getLogger("pgro.postgres")

WINDOWS_LANGUAGES: Final = ("English_United States", "English_United Kingdom")
WINDOWS_CODE_PAGES: Final = tuple(f"125{x}" for x in range(9))  # CP1250 … CP1258
WINDOWS_UTF8_CODE_PAGE: Final = "65001"
# What the `postgres:<major>` image generates, so a Linux source's usual locale opens here.
IMAGE_LOCALES: Final = ("en_US.UTF-8",)
# Every alias is made from this locale source (as the reference does).
ALIAS_SOURCE: Final = "en_US"

I18N_ROOT: Final = Path("/usr/share/i18n")
GCONV_DIR: Final = "gconv"
# A restore's private locales: `<restore dir>/locales` (pgro's own directory, beside the
# restored tree), read by every PostgreSQL process on that restore's data.
RESTORE_LOCALES_DIR: Final = "locales"
LOCALEDEF_TIMEOUT_S: Final = 120.0

# A locale name pgro builds on demand (from a startup failure's message): a language and
# territory with an explicit codeset, nothing that could be a path.
_BUILDABLE = re.compile(r"^([a-z]{2,3}_[A-Z]{2})\.([A-Za-z0-9-]{1,20})$")
# PostgreSQL's message when a database names a locale this host lacks (PG 13 to 17).
_MISSING_LOCALE = re.compile(r'initialized with LC_(?:COLLATE|CTYPE) "([^"\n]{1,100})"')


class LocalesUnavailable(Exception):
    """`localedef` or the locale sources are not installed."""

    reason = "LocalesUnavailable"


@dataclass(frozen=True)
class LocaleSpec:
    """One locale to build: its name (the directory under LOCPATH) and its sources."""

    name: str
    source: str  # a locale source under /usr/share/i18n/locales
    charmap: str  # a charmap under /usr/share/i18n/charmaps


@dataclass(frozen=True)
class LocaleAliases:
    """A private locale directory: what was built, what failed (and why)."""

    locpath: Path
    built: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (locale name, localedef's reason)

    def env(self) -> dict[str, str]:
        """The environment a PostgreSQL process (server, single-user, initdb) needs to
        find these locales."""
        return locale_env(self.locpath)

    def has(self, name: str) -> bool:
        return (self.locpath / name / "LC_CTYPE").is_file()


def locale_env(locpath: Path) -> dict[str, str]:
    """`LOCPATH` (the locales) and `GCONV_PATH` (the code-page aliases) for `locpath`."""
    return {"LOCPATH": str(locpath), "GCONV_PATH": str(locpath / GCONV_DIR)}


def restore_locale_env(restore_dir: Path) -> dict[str, str] | None:
    """The environment for a restore whose worker built private locales (None when it built
    none: a sound snapshot's server runs with the host's own)."""
    locpath = restore_dir / RESTORE_LOCALES_DIR
    if not (locpath / GCONV_DIR / "gconv-modules").is_file():
        return None
    return locale_env(locpath)


def windows_alias_specs() -> list[LocaleSpec]:
    """The reference's aliases: each language with CP1250…CP1258 and UTF-8 (code page 65001)."""
    specs = []
    for language in WINDOWS_LANGUAGES:
        for page in WINDOWS_CODE_PAGES:
            specs.append(LocaleSpec(f"{language}.{page}", ALIAS_SOURCE, f"CP{page}"))
        specs.append(LocaleSpec(f"{language}.{WINDOWS_UTF8_CODE_PAGE}", ALIAS_SOURCE, "UTF-8"))
    return specs


def default_specs(i18n: Path = I18N_ROOT) -> list[LocaleSpec]:
    """Everything `build_locale_aliases` builds by default: the image's locales first, then
    the Windows aliases, then `C.UTF-8` where glibc has its source (2.35+). With `LOCPATH`
    glibc no longer reads its locale archive, only directories: a host whose `C.UTF-8` lives
    in the archive would otherwise refuse the rewritten databases while the aliases apply."""
    image = [LocaleSpec(name, name.split(".")[0], name.split(".")[1]) for name in IMAGE_LOCALES]
    base = [LocaleSpec("C.UTF-8", "C", "UTF-8")] if (i18n / "locales" / "C").is_file() else []
    return [*image, *windows_alias_specs(), *base]


def gconv_aliases() -> str:
    """The private `gconv-modules`: Windows code-page numbers as iconv aliases, nothing else."""
    lines = ["# pgro: Windows code pages as aliases, for locale names such as 'x.1252'"]
    lines += [f"alias\t{page}//\tCP{page}//" for page in WINDOWS_CODE_PAGES]
    lines.append(f"alias\t{WINDOWS_UTF8_CODE_PAGE}//\tISO-10646/UTF8/")
    return "\n".join(lines) + "\n"


def missing_locales(log_text: str) -> list[str]:
    """The locale names a failed start (or single-user session) says this host lacks."""
    found: list[str] = []
    for name in _MISSING_LOCALE.findall(log_text):
        if name not in found:
            found.append(name)
    return found


def _normalise_codeset(codeset: str) -> str:
    return "".join(ch for ch in codeset.lower() if ch.isalnum())


def spec_for(name: str, i18n: Path = I18N_ROOT) -> LocaleSpec | None:
    """How to build a locale named `<ll>_<TT>.<codeset>` from this host's sources, or None
    (an unusual name, no such source or charmap: pgro builds nothing it cannot vouch for).
    `name` may come from a restored catalog, so it is matched, never used as a path."""
    m = _BUILDABLE.match(name)
    if m is None:
        return None
    source, codeset = m.group(1), _normalise_codeset(m.group(2))
    if not (i18n / "locales" / source).is_file():
        return None
    charmaps = i18n / "charmaps"
    try:
        entries = sorted(p.name for p in charmaps.iterdir())
    except OSError:
        return None
    for entry in entries:
        charmap = entry.removesuffix(".gz")
        if _normalise_codeset(charmap) == codeset:
            return LocaleSpec(name, source, charmap)
    return None


def _localedef() -> str:
    tool = shutil.which("localedef")
    if tool is None:
        raise LocalesUnavailable(
            "localedef is not installed: install the C library's locale tools (Debian: the "
            "'locales' package), which pgro needs to open databases created with a locale "
            "this host lacks"
        )
    if not (I18N_ROOT / "locales" / ALIAS_SOURCE).is_file():
        raise LocalesUnavailable(
            f"the locale sources are not installed ({I18N_ROOT}/locales/{ALIAS_SOURCE} is "
            "missing): install Debian's 'locales' package"
        )
    return tool


def _build_one(tool: str, locpath: Path, spec: LocaleSpec) -> str | None:
    """Build `spec` into `locpath`; its failure reason, or None. A locale appears whole or
    not at all (built beside, then renamed)."""
    target = locpath / spec.name
    if (target / "LC_CTYPE").is_file():
        return None
    work = Path(tempfile.mkdtemp(prefix=".building-", dir=locpath))
    try:
        out = work / "locale"
        proc = subprocess.run(
            [tool, "-i", spec.source, "-f", spec.charmap, str(out)],
            capture_output=True,
            text=True,
            check=False,
            timeout=LOCALEDEF_TIMEOUT_S,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
            cwd="/",
        )
        # localedef exits 1 on warnings too, and still writes the locale.
        if not (out / "LC_CTYPE").is_file():
            text = (proc.stderr or proc.stdout).strip().splitlines()
            return text[-1][:200] if text else f"localedef exited with code {proc.returncode}"
        _readable(out)
        try:
            os.rename(out, target)
        except OSError:
            if not (target / "LC_CTYPE").is_file():  # not a concurrent build of the same
                raise
        return None
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)[:200]
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _readable(tree: Path) -> None:
    """Readable by everyone (the server's account), writable only by pgro."""
    for dirpath, _, filenames in os.walk(tree):
        os.chmod(dirpath, 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def build_locales(locpath: Path, specs: Iterable[LocaleSpec], *, workers: int = 2) -> LocaleAliases:
    """Build `specs` into `locpath` (created if needed); existing ones are kept. Failures are
    counted and logged, never raised: a locale no database names does not matter, and one
    that does shows up as the server's own clear error. Raises `LocalesUnavailable` only
    when localedef or its sources are not installed at all."""
    tool = _localedef()
    locpath.mkdir(parents=True, exist_ok=True)
    os.chmod(locpath, 0o755)
    gconv = locpath / GCONV_DIR
    gconv.mkdir(exist_ok=True)
    os.chmod(gconv, 0o755)
    modules = gconv / "gconv-modules"
    if not modules.is_file() or modules.read_text() != gconv_aliases():
        tmp = gconv / ".gconv-modules.tmp"
        tmp.write_text(gconv_aliases())
        os.chmod(tmp, 0o644)
        os.replace(tmp, modules)
    wanted = list(specs)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        reasons = list(pool.map(lambda s: _build_one(tool, locpath, s), wanted))
    built = tuple(s.name for s, why in zip(wanted, reasons, strict=True) if why is None)
    failed = tuple((s.name, why) for s, why in zip(wanted, reasons, strict=True) if why)
    for name, why in failed:
        log.warning("could not build the locale %r: %s", name, why)
    if failed:
        log.warning("%d of %d locales could not be built in %s", len(failed), len(wanted), locpath)
    return LocaleAliases(locpath, built, failed)


def build_locale_aliases(locpath: Path, *, extra: Iterable[str] = ()) -> LocaleAliases:
    """The image's locales and the Windows aliases (`default_specs`), plus any `extra` names
    `spec_for` can build (e.g. `missing_locales` of a failed start), in `locpath`.
    Pass `LocaleAliases.env()` to every PostgreSQL process on the restored data."""
    specs = default_specs()
    for name in extra:
        spec = spec_for(name)
        if spec is None:
            log.warning("no locale source on this host to build %r from", name)
        elif spec.name not in {s.name for s in specs}:
            specs.append(spec)
    return build_locales(locpath, specs)


def with_locales(env: Mapping[str, str], aliases: LocaleAliases | None) -> dict[str, str]:
    """`env` plus the aliases' variables (unchanged when there are none)."""
    return {**env, **(aliases.env() if aliases else {})}
