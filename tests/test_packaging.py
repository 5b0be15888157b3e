"""sipo installs as a library (issue 9): dependency ranges whose floors are the tested set, the
exact set in constraints/cpu.txt, configs inside the wheel, and a wheel installed in a fresh
virtual environment that runs `sipo demo --quick` from an unrelated directory."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
CONSTRAINTS = REPO / "constraints" / "cpu.txt"


def _pins() -> dict[str, Version]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = Version(version)
    return pins


def _requirements() -> list[Requirement]:
    extras = [r for group in PYPROJECT["project"]["optional-dependencies"].values() for r in group]
    return [Requirement(r) for r in PYPROJECT["project"]["dependencies"] + extras]


def test_dependencies_are_ranges_whose_floor_is_the_tested_version():
    pins = _pins()
    for requirement in _requirements():
        specifiers = {s.operator: Version(s.version) for s in requirement.specifier}
        assert "==" not in specifiers, f"{requirement} is an exact pin; pyproject.toml holds ranges"
        assert ">=" in specifiers, f"{requirement} has no floor"
        tested = pins[re.sub(r"[-_.]+", "-", requirement.name).lower()]
        # the floor is the tested version, up to the precision written (torch>=2.13 for 2.13.0)
        assert specifiers[">="] <= tested and specifiers[">="].release == tested.release[: len(specifiers[">="].release)]
        assert requirement.specifier.contains(tested), f"{requirement} excludes the tested {tested}"


def test_constraints_pin_every_dependency_exactly_and_match_this_environment():
    from importlib import metadata

    pins = _pins()
    for requirement in _requirements():
        name = re.sub(r"[-_.]+", "-", requirement.name).lower()
        assert name in pins, f"constraints/cpu.txt lacks {requirement.name}"
        installed = Version(metadata.version(requirement.name))
        assert Version(installed.public) == pins[name], f"{name}: installed {installed}, constraints {pins[name]}"


def test_the_makefile_installs_from_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "-c $(CONSTRAINTS) -e '.[test]'" in makefile and "CONSTRAINTS := constraints/cpu.txt" in makefile


def test_the_configs_link_points_into_the_package():
    link = REPO / "configs"
    assert link.is_symlink() and link.resolve() == (REPO / "src" / "sipo" / "configs").resolve()


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quick_demo_from_another_directory(tmp_path):
    # Build from a copy, so the checkout gets no build/ or egg-info.
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    shutil.copytree(REPO / "src", source / "src", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(source)], check=True, env=env, timeout=300, cwd=tmp_path)
    (wheel,) = wheels.glob("sipo-*.whl")

    # A fresh venv holding only the wheel; the (large) dependencies come from this environment's
    # site-packages through a .pth line placed after the venv's own, so sipo resolves to the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, env=env, timeout=300)
    (purelib / "zz_shared_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import sipo; print(sipo.__file__)"], cwd=elsewhere, env=env,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    env = {**env, "SIPO_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    version = subprocess.run([str(venv / "bin" / "sipo"), "--version"], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=120)
    assert version.stdout.strip() == "sipo 0.1.0"
    demo = subprocess.run([str(venv / "bin" / "sipo"), "demo", "--quick", "--output-dir", "out"], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stdout.strip().splitlines()[-1].startswith("win rate vs base:")
    assert (elsewhere / "out" / "report.md").is_file()
    card = next((elsewhere / "out" / "runs").glob("*/README.md")).read_text()
    assert "[sipo](https://github.com/sipo-project/sipo)" in card  # the Homepage of the wheel's metadata
