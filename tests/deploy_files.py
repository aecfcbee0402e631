"""Reading the deployment files of deploy/ as their tools would, for the deploy tests."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from meterline import config as config_mod
from tests.helpers import ROOT

DEPLOY = ROOT / "deploy"

_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")
_REQUIRED = re.compile(r"\$\{(\w+):?\?[^}]*\}")
OPERATOR_SET = "set-by-the-operator"
"""What a compose-style `${NAME:?message}` stands for: the operator must set NAME."""


def shell_default(value: object) -> str:
    """A compose-style `${NAME:-default}` value as it is when NAME is not set (a required
    `${NAME:?message}` as `OPERATOR_SET`)."""
    return _INTERPOLATION.sub(lambda m: m.group(2) or "",
                              _REQUIRED.sub(OPERATOR_SET, str(value)))


def pipeline_files() -> list[Path]:
    """Every pipeline.yaml-shaped file the repository ships (deploy/ and the default)."""
    found = [ROOT / "pipeline.yaml"]
    for path in sorted(DEPLOY.rglob("*.yaml")):
        text = path.read_text()
        if re.search(r"^service:", text, re.M) and re.search(r"^receivers:", text, re.M):
            found.append(path)
    return found


def load_pipeline(path: Path | str, environ: Mapping[str, str]) -> config_mod.PipelineFile:
    """What `meterline validate -c PATH` checks, with exactly `environ` for ${env:...}
    (not the test runner's environment, so the answer does not depend on it)."""
    return config_mod.load(str(path), environ=dict(environ))
