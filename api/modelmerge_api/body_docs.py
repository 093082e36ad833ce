"""/docs for the routes that read their JSON body themselves (to pop the hf_token and report errors their own way):
the OpenAPI document still shows the contract's schema for their body, plus the write-only hf_token."""

from __future__ import annotations

from typing import Any

from modelmerge_api.bodies import MAX_TOKEN_LENGTH

REF = "#/components/schemas/{model}"


def hf_token_property(receiver: str) -> dict[str, Any]:
    """The body's hf_token, passed to `receiver` only."""
    return {"type": "string", "writeOnly": True, "maxLength": MAX_TOKEN_LENGTH,
            "description": "Hugging Face token for gated or private models (or the X-HF-Token header): passed to "
            f"{receiver} only, never stored, shown, or logged."}


def add_schema(schema: dict[str, Any], name: str, model_schema: dict[str, Any]) -> str:
    """Adds `model_schema` (a pydantic model_json_schema with ref_template REF) to the OpenAPI `schema`'s components
    as `name`, with its definitions (a name already there is kept); returns its $ref."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for definition, value in model_schema.pop("$defs", {}).items():
        components.setdefault(definition, value)
    components[name] = model_schema
    return REF.format(model=name)


def document_body(schema: dict[str, Any], path: str, name: str, body_schema: dict[str, Any]) -> None:
    """The POST `path` of the OpenAPI `schema` takes a JSON body of `body_schema`, component `name`."""
    ref = add_schema(schema, name, body_schema)
    schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {
        "application/json": {"schema": {"$ref": ref}}}}
