"""The checked-in CRD is the one the models generate, and it is structural."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from townsquare.api.crd import custom_resource_definition, render_crd

ROOT = Path(__file__).resolve().parents[2]
CHECKED_IN = ROOT / "crds" / "audiorooms.townsquare.dev.yaml"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found: list[tuple[str, dict[str, Any]]] = []
    if isinstance(node, dict):
        found.append((path, node))
        for key, value in node.items():
            found += _walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _walk(value, f"{path}[{index}]")
    return found


def test_checked_in_crd_equals_generated_byte_for_byte() -> None:
    assert CHECKED_IN.read_text(encoding="utf-8") == render_crd(), "run `make crd`"


def test_schema_is_structural() -> None:
    schema = custom_resource_definition()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert "title" not in node, path
        assert node.get("type") != "null", path
        if "properties" in node:
            assert "additionalProperties" not in node, path
        if "anyOf" in node:
            assert node.get("x-kubernetes-int-or-string") is True, path


def test_cross_field_rules_reach_the_api_server() -> None:
    text = render_crd()
    assert "self.minRelays <= self.maxRelays" in text
    assert "duration(self) > duration('0s')" in text
    assert "self.metadata.name.size() <= 40" in text


def test_printer_columns_and_names() -> None:
    spec = yaml.safe_load(render_crd())["spec"]
    assert spec["names"]["shortNames"] == ["ar"]
    assert spec["names"]["categories"] == ["townsquare"]
    columns = [c["name"] for c in spec["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Expected", "Listeners", "Relays", "Start", "Age"]
    assert spec["versions"][0]["subresources"] == {"status": {}}
