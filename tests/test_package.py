"""The package as another project gets it: a wheel and an sdist built from this tree.

The wheel is installed into a fresh virtual environment outside the checkout.
Its dependencies come from the suite's own environment through a ``.pth`` file
naming a directory of links to every distribution there *but* mktme-sandbox, so
the test runs offline and only the wheel's copy of the package can be imported.
A foreign project with its own ``sandbox.py`` then runs pytest with the plugin
(the old import name ``sandbox`` made such a project fail at start-up).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

import mktme_sandbox

ROOT = Path(__file__).resolve().parent.parent
SITE = Path(sysconfig.get_paths()["purelib"])
OURS = ("mktme_sandbox", "__editable__", "mktme-sandbox")


def _run(argv: list[str | Path], cwd: Path | None = None, timeout: float = 300) -> str:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "VIRTUAL_ENV"}}
    done = subprocess.run(
        [str(a) for a in argv],
        check=False,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


SKIP_DIRS = {".git", ".venv", "build", "__pycache__", ".hypothesis", ".mypy_cache", ".ruff_cache"}


def _project_files() -> list[str]:
    """The files of the project as git sees them (tracked, or new and not ignored);
    outside a git checkout (an unpacked sdist), every file but caches and builds."""
    if (ROOT / ".git").exists():
        listed = _run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT)
        return [name for name in listed.splitlines() if (ROOT / name).is_file()]
    return sorted(
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*")
        if path.is_file()
        and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts)
        and path.suffix != ".pyc"
        and not any(part.endswith(".egg-info") for part in path.parts)
    )


def _build(kind: str, out: Path) -> Path:
    """Build a wheel or an sdist into ``out`` with setuptools' PEP 517 hooks, from a
    copy of the project (builds write build/ and egg-info beside the sources)."""
    tree = out / "tree"
    for name in _project_files():
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    hook = f"from setuptools import build_meta as b; print(b.build_{kind}({str(out)!r}))"
    name = _run([sys.executable, "-c", hook], cwd=tree).strip().splitlines()[-1]
    return out / name


@dataclass(frozen=True)
class Installed:
    """A fresh venv outside the checkout with only the wheel of mktme-sandbox."""

    venv: Path
    wheel: Path

    def bin(self, name: str) -> Path:
        return self.venv / "bin" / name


def _deps_without_us(venv: Path, links: Path) -> None:
    links.mkdir()
    for entry in SITE.iterdir():
        if not entry.name.startswith(OURS) and not entry.name.endswith(".pth"):
            (links / entry.name).symlink_to(entry)
    purelib = _run(
        [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    )
    Path(purelib.strip(), "suite-deps.pth").write_text(f"{links}\n")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    top = tmp_path_factory.mktemp("wheel")
    wheel = _build("wheel", top)
    venv = top / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    _deps_without_us(venv, top / "deps")
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", venv / "bin" / "python"]
    _run([*pip, "install", "-q", "--no-deps", "--no-index", "--disable-pip-version-check", wheel])
    return Installed(venv, wheel)


def test_the_wheel_holds_the_package_its_types_licence_and_entry_points(
    installed: Installed,
) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(meta).decode()
        entry_points = wheel.read(meta.replace("METADATA", "entry_points.txt")).decode()
    assert "mktme_sandbox/py.typed" in names
    assert "mktme_sandbox/machine.py" in names
    assert not any(n.startswith(("sandbox/", "tests/")) for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert f"Version: {mktme_sandbox.__version__}" in metadata
    assert "License-Expression: MIT" in metadata
    assert "Classifier: Framework :: Pytest" in metadata
    assert "Classifier: Typing :: Typed" in metadata
    assert "mktme_sandbox = mktme_sandbox.pytest_plugin" in entry_points


def test_the_installed_command_reports_the_version(installed: Installed) -> None:
    out = _run([installed.bin("mktme-sandbox"), "--version"], cwd=installed.venv)
    assert out.strip() == f"mktme-sandbox, version {mktme_sandbox.__version__}"


def test_python_dash_m_mktme_sandbox_is_the_command(installed: Installed) -> None:
    out = _run([installed.bin("python"), "-m", "mktme_sandbox", "--help"], cwd=installed.venv)
    assert out.startswith("Usage: mktme-sandbox [OPTIONS] COMMAND [ARGS]...")


TOOLS = ["mktme-key", "mktme-map", "mktme-peek", "mktme-walk", "mktme-find"]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_is_on_the_installed_path(installed: Installed, tool: str) -> None:
    out = _run([installed.bin(tool), "--help"], cwd=installed.venv)
    assert out.startswith("usage: " + tool)


def test_the_installed_examples_are_listed(installed: Installed) -> None:
    out = _run([installed.bin("mktme-sandbox"), "examples", "list"], cwd=installed.venv)
    assert len([line for line in out.splitlines() if line.split()[0].isdigit()]) >= 13


@pytest.mark.mount
def test_run_all_runs_every_experiment_from_the_installed_package(
    installed: Installed, tmp_path: Path
) -> None:
    """A fresh mount, every experiment, from the wheel alone (no checkout on the path)."""
    env_bin = f"{installed.venv / 'bin'}:{os.environ['PATH']}"
    done = subprocess.run(
        [installed.bin("mktme-sandbox"), "examples", "run-all", "--json"],
        cwd=tmp_path,
        env={**os.environ, "PATH": env_bin, "XDG_RUNTIME_DIR": str(tmp_path)},
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    outcomes = json.loads(done.stdout)["outcomes"]
    assert len(outcomes) >= 13
    assert {o["verdict"] for o in outcomes} == {"PASS"}


def test_the_installed_package_is_the_wheel_not_the_checkout(installed: Installed) -> None:
    where = _run(
        [installed.bin("python"), "-c", "import mktme_sandbox; print(mktme_sandbox.__file__)"]
    )
    assert Path(where.strip()).is_relative_to(installed.venv)


FOREIGN_TEST = """
import sandbox  # the project's own module, not ours


def test_its_own_sandbox_module_is_imported():
    assert sandbox.OWN is True


def test_machine(mktme_machine):
    mktme_machine.key_command(1, "type=cpu algorithm=aes-xts-128", uid=0)
    assert "state=programmed" in mktme_machine.key_status(1)


def test_mount(mktme_mount):
    mktme_mount.program_key(1)
    assert "state=programmed" in mktme_mount.read_text("keys/1")
"""


@pytest.mark.mount
def test_a_project_with_its_own_sandbox_module_runs_the_plugin_under_xdist(
    installed: Installed, tmp_path: Path
) -> None:
    """The plugin loads through the pytest11 entry point in a project that has
    its own ``sandbox.py``, with two xdist workers."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "sandbox.py").write_text("OWN = True\n")
    (project / "test_foreign.py").write_text(textwrap.dedent(FOREIGN_TEST))
    out = _run(
        [installed.bin("python"), "-m", "pytest", "-n", "2", "-p", "no:cacheprovider", "-q"],
        cwd=project,
    )
    assert "3 passed" in out, out


def test_the_sdist_is_the_whole_project(tmp_path: Path) -> None:
    """Tests with their conftest files, docs, tools, scripts and the licence."""
    sdist = _build("sdist", tmp_path)
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        names = {n.removeprefix(top + "/") for n in tar.getnames()}
    missing = sorted(set(_project_files()) - names)
    assert not missing, f"tracked files missing from the sdist: {missing}"
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
