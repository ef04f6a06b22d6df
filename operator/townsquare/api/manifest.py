"""Read an AudioRoom manifest from YAML text exactly as the API server would see it."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import ValidationError

from townsquare.api import errors
from townsquare.api.models import AudioRoom


class ManifestError(ValueError):
    """A manifest that cannot become an AudioRoom; the message is one line for a person."""


class _KubernetesYamlLoader(yaml.SafeLoader):
    """YAML as kubectl sends it: timestamps stay strings, so the schema judges them."""


_KubernetesYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_yaml(text: str) -> Any:
    """Parse one YAML document, refusing syntax errors with their line number."""
    try:
        return yaml.load(text, Loader=_KubernetesYamlLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise ManifestError(f"not valid YAML{where}: {problem}") from None


def parse_room(text: str) -> AudioRoom:
    """Validate a manifest with the same rules the CRD gives the API server."""
    document = load_yaml(text)
    if not isinstance(document, dict):
        raise ManifestError("expected an AudioRoom manifest (a YAML mapping)")
    try:
        return AudioRoom.model_validate(document)
    except ValidationError as exc:
        raise ManifestError(errors.describe(exc)) from None
