"""What `pip install meterline` puts in site-packages: one import package, `meterline`.

The component packages live at the top of the repository (`receivers/`, `exporters/`,
...) and install as `meterline.receivers` and so on, through the links in `meterline/`,
so that no bare top-level name can collide with another distribution's modules.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.helpers import ROOT

COMPONENT_PACKAGES = ("receivers", "processors", "exporters", "extensions", "gateway", "clients")
BARE_IMPORT = re.compile(
    rf"^\s*(?:from|import)\s+({'|'.join(COMPONENT_PACKAGES)})\b", re.MULTILINE)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel `pip` builds from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    build = ROOT / "build"  # where setuptools builds; not left behind by this test
    had_build = build.exists()
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300)
    if not had_build:
        shutil.rmtree(build, ignore_errors=True)
    (built,) = out.glob("meterline-*.whl")
    return zipfile.ZipFile(built)


def test_every_component_package_is_linked_from_meterline():
    for name in COMPONENT_PACKAGES:
        link = ROOT / "meterline" / name
        assert link.is_symlink() and link.resolve() == ROOT / name, name


def test_no_code_imports_a_component_package_by_its_bare_name():
    offenders = []
    for folder in ("meterline", *COMPONENT_PACKAGES, "tests", "bench"):
        for path in (ROOT / folder).rglob("*.py"):  # rglob does not enter the links
            for match in BARE_IMPORT.finditer(path.read_text(encoding="utf-8")):
                offenders.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert not offenders, offenders


def test_the_wheel_installs_one_import_package_with_every_component_inside(wheel):
    names = wheel.namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"meterline"}
    for name in COMPONENT_PACKAGES:
        assert f"meterline/{name}/__init__.py" in names, name
    assert "meterline/processors/cost/prices.yaml" in names
    assert "meterline/default_pipeline.yaml" in names
    assert any(name.startswith("meterline/dashboard/static/") for name in names)


def test_every_entry_point_of_the_wheel_names_a_meterline_module(wheel):
    (entry_points,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    targets = [line.split("=", 1)[1].strip()
               for line in wheel.read(entry_points).decode().splitlines() if "=" in line]
    assert targets and all(t.startswith("meterline.") for t in targets), targets
