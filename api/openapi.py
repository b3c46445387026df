"""What each handler can answer besides success, for the OpenAPI document."""

from __future__ import annotations

from litestar._openapi.schema_generation import SchemaCreator
from litestar._openapi.schema_generation.plugins.struct import StructSchemaPlugin
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import Schema
from litestar.typing import FieldDefinition

from api.dto import Problem, Readiness

MEANING = {
    400: "malformed input: `field` names it, `rule` says what is expected",
    401: "no valid credentials: log in (or send a valid API key)",
    403: "not allowed: the caller's role or API key (`detail` names the role needed), or"
    " their licence (`field` names what asked for it, `rule` the feature or limit and the plan)",
    404: "no such resource",
    409: "not possible in the current state",
    413: "the body is larger than the route takes",
    422: "well-formed input that breaks a rule",
    429: "too many failed attempts: wait the seconds Retry-After says",
    503: "the event store is unreachable; retry",
}


def problems(*codes: int) -> dict[int, ResponseSpec]:
    return {code: ResponseSpec(data_container=Problem, description=MEANING[code]) for code in codes}


NOT_READY = {503: ResponseSpec(data_container=Readiness, description="names what is missing")}


class StrictStructSchemaPlugin(StructSchemaPlugin):
    """Structs that forbid unknown fields say so: ``additionalProperties: false``."""

    def to_openapi_schema(
        self, field_definition: FieldDefinition, schema_creator: SchemaCreator
    ) -> Schema:
        schema = super().to_openapi_schema(field_definition, schema_creator)
        config = getattr(field_definition.type_, "__struct_config__", None)
        if config is not None and config.forbid_unknown_fields:
            schema.additional_properties = False
        return schema
