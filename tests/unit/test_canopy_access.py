"""Kopia's credentials for a canopy repository, and back."""

from __future__ import annotations

from pgro.canopy.access import CanopyRepository
from pgro.canopy.materialise import PROXY_DUMMY_ACCESS_KEY


def test_the_repository_behind_kopias_credentials_is_the_one_they_were_made_from() -> None:
    repo = CanopyRepository("canopy-int-test", "ap-southeast-2", "p/", "hunter2")
    creds = repo.through("canopy-proxy")
    assert creds.access_key_id == PROXY_DUMMY_ACCESS_KEY
    assert CanopyRepository.behind(creds) == repo
    assert "hunter2" not in repr(repo)
