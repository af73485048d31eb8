"""Login roles a replica provisions besides the analytics user."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated

from pydantic import AfterValidator, Field, model_serializer, model_validator

from pgro.api.base import ApiModel
from pgro.api.names import user_slug

# PostgreSQL truncates identifiers to NAMEDATALEN - 1 bytes; a longer name would be a
# different role on the server than the one pgro keeps credentials for.
MAX_ROLE_NAME_BYTES = 63


def check_role_name(name: str) -> str:
    """`name` if it can be a PostgreSQL role pgro provisions, else ValueError saying why.

    SQL quotes every identifier, so most characters are fine; what is refused could do
    harm outside SQL (a `/` or `..` in a file name derived from it, a NUL or control
    character in a config file or a log line) or would be silently truncated."""
    size = len(name.encode())
    if size == 0:
        raise ValueError("a role name must not be empty")
    if size > MAX_ROLE_NAME_BYTES:
        raise ValueError(
            f"role name {name[:20]!r}... is {size} bytes long; PostgreSQL role names are at "
            f"most {MAX_ROLE_NAME_BYTES} bytes"
        )
    if "/" in name:
        raise ValueError(f"role name {name!r} must not contain '/'")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
        raise ValueError(f"role name {name!r} must not contain NUL or control characters")
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a usable role name")
    return name


RoleName = Annotated[str, AfterValidator(check_role_name)]


def _clean_names(names: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    cleaned = []
    for name in (n.strip() for n in names):
        if name and name not in seen:
            seen.add(name)
            cleaned.append(name)
    return cleaned


class ExtraUser(ApiModel):
    """An `extraUsers` entry: a bare role name, or `{name, schemas[]}` for grants scoped
    to those schemas. A bare name is written back as a bare name, so manifests read by
    the reference's string-list form keep working."""

    name: str
    schemas: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: object) -> object:
        return {"name": data} if isinstance(data, str) else data

    @model_validator(mode="after")
    def _tidy(self) -> ExtraUser:
        self.name = self.name.strip()
        # An empty entry is dropped by normalize_extra_users (the reference's lists have
        # them); any other name must be a usable role name.
        if self.name:
            check_role_name(self.name)
        if self.schemas is not None:
            self.schemas = _clean_names(self.schemas)
        return self

    @model_serializer(mode="plain")
    def _serialize(self) -> str | dict[str, str | list[str]]:  # type: ignore[override]
        if self.schemas is None:
            return self.name
        return {"name": self.name, "schemas": list(self.schemas)}


def normalize_extra_users(users: Iterable[ExtraUser], analytics_username: str) -> list[ExtraUser]:
    """Trimmed, empties and repeats dropped (the first entry wins), the analytics user
    dropped because it is provisioned on its own; order kept so per-user Secrets and
    their indices stay stable from one reconcile to the next."""
    seen: set[str] = set()
    kept = []
    for user in users:
        name = user.name.strip()
        if not name or name == analytics_username or name in seen:
            continue
        seen.add(name)
        kept.append(user if name == user.name else user.model_copy(update={"name": name}))
    return kept


class PersistentUser(ApiModel):
    """A read-only role re-created on every restore with a password that survives
    switchovers."""

    name: RoleName
    read_schemas: list[str] = Field(default_factory=list)
    search_path: list[str] = Field(default_factory=list)
    secret_name: str | None = None

    def secret_name_for(self, replica: str) -> str:
        return self.secret_name or f"{replica}-user-{user_slug(self.name)}"
