"""Settings and fixtures for the whole suite.

Under CI (``CI`` set, as ``.ci/run`` is run) hypothesis draws the same examples
every run, so a submission is judged on its own change and not on which random
examples one run happened to draw; locally it explores new ones each run, and
``scripts/fuzz`` (``MKTME_FUZZ`` set) runs the property tests again and again
with fresh seeds and more examples for a time budget.

Mounts: a test that needs a real FUSE mount is marked ``@pytest.mark.mount``
(a module: ``pytestmark = pytest.mark.mount``); where FUSE is missing it is
skipped with the reason ``mktme_sandbox.pytest_plugin.fuse_unavailable_reason()``
gives. ``module_mount(**options)`` is a mount shared by the tests of one module
(it skips the same way): it lives in a world-traversable directory under /tmp,
so that the unprivileged users of the ownership tests can reach it, and at
teardown it must still answer, its dmesg must show no internal error and
``mm/check`` must say "ok". ``mounted()`` fails it on tracebacks in the log.

Detached daemons (``mktme-sandbox mount`` without ``--foreground``) write their
logs to ``$XDG_RUNTIME_DIR``: a test that starts one takes ``runtime_dir``, its
own under ``tmp_path``, so no log of a test run lands in the user's runtime or
temp directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import Phase, settings

from mktme_sandbox.mounting import MountedSandbox, fuse_unavailable_reason, mounted

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
# scripts/fuzz: fresh randomness and many more examples, no deadline.
settings.register_profile(
    "fuzz",
    max_examples=int(os.environ.get("MKTME_FUZZ_EXAMPLES", "300")),
    deadline=None,
    database=None,
    print_blob=True,
)
if os.environ.get("MKTME_FUZZ"):
    settings.load_profile("fuzz")
elif os.environ.get("CI"):
    settings.load_profile("ci")
if os.environ.get("MKTME_NO_SHRINK"):  # planting bugs: report the first failure, fast
    settings.register_profile(
        "no-shrink",
        settings(settings.default, phases=[Phase.explicit, Phase.reuse, Phase.generate]),
    )
    settings.load_profile("no-shrink")


def _skip_without_fuse() -> None:
    reason = fuse_unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip a ``mount`` test where FUSE is missing, before its fixtures try to mount."""
    if item.get_closest_marker("mount") is not None:
        _skip_without_fuse()


@pytest.fixture
def runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``$XDG_RUNTIME_DIR`` of this test, under its ``tmp_path``: where the detached
    daemons it starts put their logs."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    return runtime


@contextlib.contextmanager
def _checked_mount(**options: Any) -> Iterator[MountedSandbox]:
    directory = Path(tempfile.mkdtemp(prefix="mktme-test-"))
    directory.chmod(0o755)
    try:
        with mounted(directory / "mnt", **options) as sandbox:
            yield sandbox
            assert (sandbox.path / "README").read_text(), "the daemon stopped answering"
            assert "internal error" not in sandbox.dmesg()
            assert sandbox.check() == [], "the tests left the machine inconsistent"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def module_mount() -> Iterator[Callable[..., MountedSandbox]]:
    """``module_mount(**options)``: a new mount that lasts for the test module."""
    _skip_without_fuse()
    with contextlib.ExitStack() as stack:
        yield lambda **options: stack.enter_context(_checked_mount(**options))
