"""The shared base of every resource model: camelCase on the wire, snake_case in Python."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel


class ApiModel(BaseModel):
    """Unknown fields are ignored so manifests written for a newer version still load."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        serialize_by_alias=True,
        extra="ignore",
        # Build validators on first use: a CLI run touches a few of the models, and building
        # all of them up front costs a noticeable part of its start-up time.
        defer_build=True,
    )

    # Lists the reference leaves out when empty. Writing `[]` instead is not neutral: in
    # a JSON merge patch it replaces the list, wiping what another writer put there.
    omit_when_empty: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _serialize(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for field in self.omit_when_empty:
                for key in (field, type(self).model_fields[field].alias):
                    if key in data and data[key] == []:
                        del data[key]
        return data

    def to_wire(self) -> dict[str, Any]:
        """The JSON form a Kubernetes API server or a YAML file holds."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)
