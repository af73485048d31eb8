"""The one scrubbing policy (pgro.core.secrets) every message, status and log line goes
through."""

from __future__ import annotations

from pgro.core.secrets import MASK, Scrubber, scrub


def test_a_secret_containing_a_shorter_one_is_masked_whole_in_any_order() -> None:
    text = "key abcdefgh, then abc"
    expected = f"key {MASK}, then {MASK}"
    assert scrub(text, ["abc", "abcdefgh"]) == expected
    assert scrub(text, ["abcdefgh", "abc"]) == expected


def test_overlapping_and_touching_secrets_leave_no_fragment() -> None:
    # Masking one secret first must not leave a piece of another in the clear.
    assert scrub("xabcd", ["abcd", "xab"]) == MASK
    assert scrub("[s3cretTOKEN]", ["s3cret", "TOKEN"]) == f"[{MASK}]"
    assert scrub("aaaaa", ["aa"]) == MASK


def test_none_empty_and_blank_values_are_ignored() -> None:
    text = "nothing secret here"
    assert scrub(text, [None, "", "   "]) == text
    assert scrub(text, []) == text


def test_short_values_are_masked_too() -> None:
    assert scrub("pin 42 accepted", ["42"]) == f"pin {MASK} accepted"
    assert scrub("x=1", ["1"]) == f"x={MASK}"


def test_escaped_and_padded_forms_are_masked() -> None:
    # Exception messages quote values with repr(), of the str or of its bytes.
    secret = "pass\nwörd\t1"
    quoted = f"bad header {secret!r} / {secret.encode()!r}"
    scrubbed = scrub(quoted, [secret])
    assert "ss" not in scrubbed and "rd" not in scrubbed
    assert scrubbed == f"bad header '{MASK}' / b'{MASK}'"
    assert scrub("token=hunter2", ["  hunter2\n"]) == f"token={MASK}"


def test_the_mask_never_reveals_length_or_boundaries() -> None:
    assert scrub("a hunter2 b", ["hunter2"]) == scrub("a hunter2hunter2 b", ["hunter2"])


def test_scrubber_learns_secrets_as_a_run_goes() -> None:
    scrubber = Scrubber(["first-secret", None])
    scrubber.add("")
    scrubber.add(None)
    assert scrubber("first-secret second-secret") == f"{MASK} second-secret"
    scrubber.add("second-secret")
    assert scrubber("first-secret second-secret") == f"{MASK} {MASK}"
