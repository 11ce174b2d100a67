"""run_all: the experiments of this package, one after the other, and a summary table.

``mktme-sandbox examples list|run|run-all|tour`` (cli.py) are thin click
commands over this module. Each experiment ``expNN_name`` runs in its own
process (``python -m mktme_sandbox.examples.expNN_name -m MNT``; shown as
``NN-name``), its output echoed, its last line
``VERDICT: PASS|FAIL|ERROR | observation`` collected. The mount is the one
given by ``-m`` or ``$MKTME_MNT``; without either, a fresh sandbox is mounted
for the run in a temporary directory (``mktme-sandbox mount DIR --seed 1``) and
always unmounted at the end, also on Ctrl-C or SIGTERM. A mountpoint that is
not a mount is refused once, before any experiment starts.

Standard library and ``mktme_sandbox.client`` only, like the experiments.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TextIO

from mktme_sandbox.client import Mount, fresh_sandbox, sandbox_command

__all__ = [
    "Experiment",
    "Outcome",
    "experiments",
    "run_all",
    "run_one",
    "select",
    "the_mount",
    "tour_path",
]

HERE = Path(__file__).resolve().parent
VERDICT = re.compile(r"^VERDICT: (PASS|FAIL|ERROR) \| (.*)$")
TIMEOUT = 300
STATUS = {"PASS": 0, "FAIL": 1, "ERROR": 2}


@dataclass(frozen=True)
class Experiment:
    """One module ``expNN_name.py`` of this package, known as ``NN-name``."""

    number: int
    name: str  # "wrong-key"
    path: Path

    @property
    def stem(self) -> str:
        """``01-wrong-key``: how tables and ``examples run`` name it."""
        return f"{self.number:02d}-{self.name}"

    @property
    def module(self) -> str:
        return f"{__package__}.{self.path.stem}"

    @property
    def title(self) -> str:
        """The first line of the docstring, without its number: "Plaintext vs ... key"."""
        doc = ast.get_docstring(ast.parse(self.path.read_text())) or self.stem
        return doc.splitlines()[0].partition(". ")[2].rstrip(".") or doc.splitlines()[0]


@dataclass(frozen=True)
class Outcome:
    experiment: str
    verdict: str
    observation: str
    seconds: float


def experiments() -> list[Experiment]:
    found = sorted(HERE.glob("exp[0-9][0-9]_*.py"))
    return [Experiment(int(p.stem[3:5]), p.stem[6:].replace("_", "-"), p) for p in found]


def select(key: str) -> Experiment:
    """An experiment by number (``3``, ``03``), name (``address-tweak``) or file
    stem (``03-address-tweak``); ``LookupError`` names the choices."""
    for e in experiments():
        names = (e.name, e.stem, e.path.stem, e.path.name)
        if key in names or (key.isdigit() and int(key) == e.number):
            return e
    raise LookupError(f"no experiment {key!r} (mktme-sandbox examples list shows them)")


def tour_path() -> Path:
    """The bash tour, shipped as package data."""
    return HERE / "tour"


def python_env() -> dict[str, str]:
    """The environment of a child that imports this package: the package's parent
    first on PYTHONPATH, so a checkout that is not installed works too."""
    parent = str(HERE.parents[1])
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": parent if not path else f"{parent}{os.pathsep}{path}"}


def run_one(exp: Experiment, mnt: str, out: TextIO) -> Outcome:
    """Run one experiment, echoing its output to ``out``, and read its verdict line."""
    start = time.monotonic()
    verdict, observation = "ERROR", "no VERDICT line"
    proc = subprocess.Popen(
        [sys.executable, "-m", exp.module, "-m", mnt],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=python_env(),
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            print(line, end="", file=out, flush=True)
            if m := VERDICT.match(line.rstrip("\n")):
                verdict, observation = m.groups()
        status = proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        status, verdict, observation = -1, "ERROR", f"timed out after {TIMEOUT}s"
    except BaseException:
        stop(proc)
        raise
    if status != STATUS[verdict] and verdict != "ERROR":
        observation = f"exit status {status} does not match {verdict}: {observation}"
        verdict = "ERROR"
    print(file=out, flush=True)
    return Outcome(exp.stem, verdict, observation, time.monotonic() - start)


def stop(proc: subprocess.Popen[str]) -> None:
    """Interrupt an experiment so that it still gives back what it took."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def table(outcomes: list[Outcome], out: TextIO) -> None:
    width = max(len(o.experiment) for o in outcomes)
    print("=" * 20 + " summary " + "=" * 20, file=out)
    print(f"{'experiment':<{width}}  {'verdict':<7}  {'time':>5}  observation", file=out)
    for o in outcomes:
        print(
            f"{o.experiment:<{width}}  {o.verdict:<7}  {o.seconds:4.1f}s  {o.observation}", file=out
        )
    print(counts(outcomes), file=out)


def counts(outcomes: list[Outcome]) -> str:
    n = {v: sum(o.verdict == v for o in outcomes) for v in STATUS}
    return ", ".join(f"{count} {v}" for v, count in n.items()) + f" of {len(outcomes)}"


def run_all(mnt: str, chosen: list[Experiment], as_json: bool = False) -> int:
    """Run ``chosen`` on ``mnt``; a progress line per experiment, then the table
    (or, with ``as_json``, the outcomes as JSON on stdout and everything else on
    stderr). The exit status: 0 all PASS, 1 a FAIL, 2 an ERROR."""
    out = sys.stderr if as_json else sys.stdout
    outcomes = []
    for i, exp in enumerate(chosen, 1):
        print(f"run-all: [{i}/{len(chosen)}] {exp.stem}", file=sys.stderr, flush=True)
        outcomes.append(run_one(exp, mnt, out))
    if as_json:
        rows = [asdict(o) for o in outcomes]
        json.dump({"outcomes": rows, "summary": counts(outcomes)}, sys.stdout, indent=2)
        print()
    else:
        table(outcomes, out)
    verdicts = {o.verdict for o in outcomes}
    return 1 if "FAIL" in verdicts else 2 if "ERROR" in verdicts else 0


def on_signal(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def the_mount(mnt: str | None, out: TextIO) -> Iterator[str]:
    """``mnt`` (else ``$MKTME_MNT``), checked once; without either, a fresh sandbox
    (``--seed 1``) in a temporary directory, always unmounted. ``NotAMount`` or
    ``MountError`` when neither works."""
    given = mnt or os.environ.get("MKTME_MNT")
    if given:
        yield str(Mount(given).root)
        return
    signal.signal(signal.SIGTERM, on_signal)
    print(
        f"run-all: mounting a fresh sandbox: {sandbox_command()} mount DIR --seed 1 --numa-nodes 2",
        file=out,
    )
    with fresh_sandbox("--seed", "1", "--numa-nodes", "2", prefix="mktme-run-all-") as mount:
        print(f"run-all: mounted at {mount.root}", file=out, flush=True)
        try:
            yield str(mount.root)
        finally:
            print(f"run-all: unmounting {mount.root}", file=out, flush=True)
