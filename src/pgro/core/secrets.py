"""Keeping secret values out of anything a person or a log can read."""

from __future__ import annotations

from collections.abc import Iterable

MASK = "***"


def scrub(text: str, secrets: Iterable[str]) -> str:
    """Replace every occurrence of every secret value in `text` with a mask.

    Longer secrets go first so a secret that contains a shorter one is masked whole.
    Values shorter than 4 characters are masked too: a short password is still a password.
    """
    for secret in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text
