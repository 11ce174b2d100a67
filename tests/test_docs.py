"""The Python examples in docs/ run as written, in an interpreter where pytest
cannot be imported (they are for scripts; the plugin's own examples, which
name pytest, run under pytester in tests/test_pytest_plugin.py)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
WITHOUT_PYTEST = "import sys\nsys.modules['pytest'] = None  # import pytest fails\n"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def python_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in sorted(DOCS.glob("*.md")):
        for i, block in enumerate(BLOCK.findall(doc.read_text())):
            if "pytest" not in block:  # plugin examples run under pytester instead
                found.append((f"{doc.name}#{i}", block))
    return found


@pytest.mark.parametrize(("where", "code"), python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_example_in_docs_runs(where: str, code: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_PYTEST + code],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{where} failed:\n{done.stderr}"
