"""Keeping secret values out of anything a person or a log can read: the one scrubbing policy
for every message, status, report and log line pgro writes."""

from __future__ import annotations

from collections.abc import Iterable

MASK = "***"


def _forms(secret: str) -> set[str]:
    """The ways `secret` shows up in text we did not write: as is, trimmed, and escaped the
    way `repr()` of a str or of its UTF-8 bytes quotes it (exception messages do that)."""
    forms = {secret, secret.strip(), repr(secret)[1:-1], repr(secret.encode())[2:-1]}
    # A whitespace-only form would mask every blank in the text and hide nothing.
    return {form for form in forms if form.strip()}


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every occurrence of every secret value replaced by `MASK`.

    Every character covered by any occurrence of any secret is masked, so a secret that
    contains, overlaps or touches another is masked whole, whatever order they come in; a run
    of covered characters becomes one mask. Values of any length count (a short password is
    still a password); None and empty values are ignored.
    """
    spans: list[tuple[int, int]] = []
    for form in {form for secret in secrets if secret for form in _forms(secret)}:
        start = text.find(form)
        while start != -1:
            spans.append((start, start + len(form)))
            start = text.find(form, start + 1)
    if not spans:
        return text
    spans.sort()
    out: list[str] = []
    done = 0
    run_start, run_end = spans[0]
    for start, end in spans[1:]:
        if start <= run_end:
            run_end = max(run_end, end)
            continue
        out += [text[done:run_start], MASK]
        done, (run_start, run_end) = run_end, (start, end)
    out += [text[done:run_start], MASK, text[run_end:]]
    return "".join(out)


class Scrubber:
    """A growing set of secrets (a run learns some as it goes) and `scrub` with them."""

    def __init__(self, secrets: Iterable[str | None] = ()) -> None:
        self._secrets = {s for s in secrets if s}

    def add(self, secret: str | None) -> None:
        if secret:
            self._secrets.add(secret)

    def __call__(self, text: str) -> str:
        return scrub(text, self._secrets)
