"""`townsquare plan` and `townsquare crd` as a producer runs them."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from townsquare.api.crd import render_crd

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def townsquare(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "townsquare", *args], capture_output=True, text=True, check=False
    )


def test_plan_json_for_the_design_example() -> None:
    result = townsquare(
        "plan",
        "-f",
        str(EXAMPLES / "campaign-launch.yaml"),
        "-o",
        "json",
        "--now",
        "2026-11-24T00:00:00Z",
    )
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["relays"] == 715
    assert plan["capacity"] == 500_500
    assert plan["prewarmAt"] == "2026-12-01T22:45:00Z"
    assert plan["readyBy"] <= plan["startTime"]
    assert plan["warnings"] == []


def test_version_is_the_package_version_from_pyproject() -> None:
    result = townsquare("--version")
    assert result.returncode == 0, result.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert result.stdout.strip() == f"townsquare {declared}"


def test_plan_table_is_readable() -> None:
    result = townsquare("plan", "-f", str(EXAMPLES / "weekly-townhall.yaml"))
    assert result.returncode == 0, result.stderr
    assert "AudioRoom weekly-townhall" in result.stdout
    assert "relays" in result.stdout and "pre-warm at" in result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["-f", str(EXAMPLES / "invalid-utilization.yaml")],
            "spec.scaling.targetUtilization: input should be less than or equal to 1",
        ),
        (["-f", "/nonexistent.yaml"], "/nonexistent.yaml: cannot read"),
        (["-f", str(EXAMPLES / "weekly-townhall.yaml"), "--now", "soon"], "argument --now"),
        (["-f", str(EXAMPLES / "weekly-townhall.yaml"), "-o", "xml"], "argument -o/--output"),
        ([], "the following arguments are required: -f/--file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], expected: str) -> None:
    result = townsquare("plan", *args)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr


def test_every_shipped_example_but_the_invalid_one_plans() -> None:
    for manifest in sorted(EXAMPLES.glob("*.yaml")):
        result = townsquare("plan", "-f", str(manifest))
        assert (result.returncode == 0) == (not manifest.name.startswith("invalid")), manifest


def test_crd_command_prints_the_generated_crd() -> None:
    result = townsquare("crd")
    assert result.returncode == 0
    assert result.stdout == render_crd()
