"""Generate the AudioRoom CustomResourceDefinition from the pydantic models.

Kubernetes wants a structural OpenAPI v3.0 schema: no `$ref`, no `anyOf` with null, no
`additionalProperties: false` beside `properties`, exclusive bounds as booleans. This module
rewrites pydantic's JSON Schema into that form; nothing here restates a field or a rule.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema

from townsquare.api.models import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ApiModel,
    AudioRoom,
    AudioRoomSpec,
    AudioRoomStatus,
)
from townsquare.api.types import format_duration

Schema = dict[str, Any]

PRINTER_COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Expected", "type": "integer", "jsonPath": ".spec.expectedAudience"},
    {"name": "Listeners", "type": "integer", "jsonPath": ".status.listeners.current"},
    {
        "name": "Relays",
        "type": "string",
        "jsonPath": ".status.relays.summary",
        "description": "Ready relays / desired relays",
    },
    {"name": "Start", "type": "string", "jsonPath": ".spec.startTime"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


class _CrdSchemaGenerator(GenerateJsonSchema):
    """Writes duration defaults as a person would (`15m`), not in ISO 8601 (`PT15M`)."""

    def encode_default(self, dft: Any) -> Any:
        if isinstance(dft, timedelta):
            return format_duration(dft)
        return super().encode_default(dft)


def model_schema(model: type[ApiModel], *, nested_defaults: bool = True) -> Schema:
    """The structural OpenAPI schema of one model, with every reference inlined."""
    raw = model.model_json_schema(
        by_alias=True, mode="validation", schema_generator=_CrdSchemaGenerator
    )
    definitions = raw.pop("$defs", {})
    schema: Schema = _structural(raw, definitions, nested_defaults)
    return schema


def _structural(node: Any, definitions: dict[str, Schema], nested_defaults: bool) -> Any:
    if isinstance(node, list):
        return [_structural(item, definitions, nested_defaults) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = definitions[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _structural(merged, definitions, nested_defaults)
    variants = node.get("anyOf")
    if variants and {"type": "null"} in variants:
        others = [v for v in variants if v != {"type": "null"}]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        inner = others[0] if len(others) == 1 else {"anyOf": others}
        return _structural({**inner, **rest, "nullable": True}, definitions, nested_defaults)

    out: Schema = {}
    for key, value in node.items():
        if key == "title" or (key == "default" and value is None):
            continue
        if key == "additionalProperties" and isinstance(value, bool):
            continue
        if key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "properties":
            out[key] = {
                name: _structural(prop, definitions, nested_defaults)
                for name, prop in value.items()
            }
        else:
            out[key] = _structural(value, definitions, nested_defaults)
    if nested_defaults:
        _default_nested_objects(out)
    return out


def _default_nested_objects(schema: Schema) -> None:
    """Optional sub-objects default to their fields' defaults, so omitting one is valid.

    The API server checks a default against the object's CEL rules, so `{}` is not enough.
    """
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        optional = name not in required and not prop.get("nullable")  # None: absent, not {}
        if optional and prop.get("type") == "object" and "properties" in prop:
            defaults = {
                field: sub["default"]
                for field, sub in prop["properties"].items()
                if "default" in sub
            }
            prop.setdefault("default", defaults)


def status_schema() -> Schema:
    """The status schema; conditions are a map keyed by type, as the API conventions ask."""
    schema = model_schema(AudioRoomStatus, nested_defaults=False)
    conditions = schema["properties"]["conditions"]
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    conditions.pop("default", None)
    return schema


def root_schema() -> Schema:
    """The whole resource: spec and status from the models, root rules from `AudioRoom`."""
    return {
        "type": "object",
        "description": AudioRoom.__doc__,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": model_schema(AudioRoomSpec),
            "status": status_schema(),
        },
        "x-kubernetes-validations": [rule.as_validation() for rule in AudioRoom.rules],
    }


def custom_resource_definition() -> Schema:
    """The `apiextensions.k8s.io/v1` CRD for AudioRoom."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": ["ar"],
                "categories": ["townsquare"],
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root_schema()},
                }
            ],
        },
    }


def render_crd() -> str:
    """The CRD as the YAML checked into `crds/`."""
    header = f"# Generated by `townsquare crd` from the {API_VERSION} models. Do not edit.\n"
    body = yaml.safe_dump(custom_resource_definition(), sort_keys=False, width=100)
    return header + body
