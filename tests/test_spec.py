"""docs/spec.md, the contract, checked against the code it describes.

The tables of the spec are read as data: the paths and modes of section 4.2
against a real mount (both ways: nothing documented is missing, nothing
present is undocumented), the command forms of section 4.4 through the
parsers and the control files, the options of section 5.1 against
``mktme-sandbox mount --help``, and the switches, machine options and vmstat
names against their declarations. Last, no file tracked by git points into a
folder outside the repository: a clone has only the repository.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from mktme_sandbox.cli import cli
from mktme_sandbox.commands import USAGE, decode_command, parse_space_command
from mktme_sandbox.config import MachineConfig
from mktme_sandbox.fs.nodes import TextFile
from mktme_sandbox.fs.tree import Tree
from mktme_sandbox.kernel.kernel import MITIGATIONS
from mktme_sandbox.kernel.keys import parse_payload
from mktme_sandbox.kernel.mmap import ADVICE, PROTS
from mktme_sandbox.kernel.vmstat import VMSTAT_ITEMS
from mktme_sandbox.machine import Machine
from mktme_sandbox.mounting import MountedSandbox

ROOT = Path(__file__).resolve().parent.parent
SPEC = (ROOT / "docs" / "spec.md").read_text()
SPACE = "spec"


# --- reading the spec's tables ------------------------------------------------


def section(number: str) -> str:
    """The text of section ``number`` (``"4.2"``) up to the next heading."""
    match = re.search(rf"^#+ {re.escape(number)} .*?\n(.*?)(?=^#)", SPEC, re.DOTALL | re.MULTILINE)
    assert match, f"docs/spec.md has no section {number}"
    return match.group(1)


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text``: its data rows, each a list of cells."""
    found: list[list[list[str]]] = []
    rows: list[list[str]] | None = None
    for line in [*text.splitlines(), ""]:
        if not line.startswith("|"):
            if rows is not None:
                found.append(rows[2:])  # less the header and the |---| line
            rows = None
            continue
        cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
        rows = (rows or []) + [[cell.strip().replace("\\|", "|") for cell in cells]]
    return found


def spans(cell: str) -> list[str]:
    """The code spans of a cell: ``"`0666` while free"`` -> ``["0666"]``."""
    return re.findall(r"`([^`]+)`", cell)


def table(number: str, index: int = 0) -> list[list[str]]:
    return tables(section(number))[index]


# --- section 4.2: the paths -------------------------------------------------------


def documented_modes(nr_keyids: int) -> dict[str, int]:
    """Concrete path -> mode on a fresh mount, for a machine with ``nr_keyids``
    and one space named SPACE. Directories end in ``/``; the root is ``/``."""
    switches = [spans(row[0])[0] for row in table("3.8")]
    modes: dict[str, int] = {}
    for row in table("4.2"):
        pattern, mode = spans(row[0])[0], int(spans(row[1])[0], 8)
        first = 0 if pattern.startswith("keyids/") else 1
        values = {
            "N": [str(n) for n in range(first, nr_keyids + 1)],
            "NAME": [SPACE],
            "SWITCH": switches,
            "START-END": [],  # the space has no VMA
        }
        for path in expand(pattern, values):
            modes.setdefault(path, mode)  # keyids/0/mem has its own row first
    return modes


def expand(pattern: str, values: dict[str, list[str]]) -> list[str]:
    """``keys/N`` with N in 1, 2 -> ``keys/1``, ``keys/2``."""
    parts = [values.get(part, [part]) for part in pattern.split("/")]
    return ["/".join(choice) for choice in itertools.product(*parts)]


def walk(mount: Path) -> dict[str, int]:
    """Every path of the mount -> its permission bits, named as in the table."""
    found = {"/": stat.S_IMODE(mount.stat().st_mode)}
    for directory, dirs, files in os.walk(mount):
        rel = Path(directory).relative_to(mount)
        for name in dirs + files:
            info = (Path(directory) / name).lstat()
            key = (rel / name).as_posix() + ("/" if stat.S_ISDIR(info.st_mode) else "")
            found[key] = stat.S_IMODE(info.st_mode)
    return found


@pytest.fixture(scope="module")
def mount_paths(
    module_mount: Callable[..., MountedSandbox],
) -> tuple[dict[str, int], dict[str, int]]:
    """(documented, found) for a small machine with one address space."""
    sandbox = module_mount(phys_mem="16M", keyid_bits=2, seed=1)
    (sandbox.path / "spaces" / SPACE).mkdir()
    nr_keyids = len(os.listdir(sandbox.path / "keys"))
    assert nr_keyids == 3
    return documented_modes(nr_keyids), walk(sandbox.path)


@pytest.mark.mount
def test_every_path_of_the_filesystem_table_exists_on_a_mount_with_its_mode(
    mount_paths: tuple[dict[str, int], dict[str, int]],
) -> None:
    documented, found = mount_paths
    wrong = {
        path: (f"{mode:04o}", f"{found[path]:04o}" if path in found else "missing")
        for path, mode in documented.items()
        if found.get(path) != mode
    }
    assert wrong == {}, "path: (documented mode, mode on the mount)"


@pytest.mark.mount
def test_the_mount_has_no_path_the_filesystem_table_lacks(
    mount_paths: tuple[dict[str, int], dict[str, int]],
) -> None:
    documented, found = mount_paths
    undocumented = sorted(set(found) - set(documented))
    assert undocumented == [], "add a row to section 4.2 of docs/spec.md"


# --- section 4.4: the commands -------------------------------------------------------

ARGUMENTS = {spans(row[0])[0]: spans(row[1]) for row in table("4.4", 0)}
COMMANDS = [(spans(row[0])[0], spans(row[1])[0]) for row in table("4.4", 1)]
PLACEHOLDER_VALUES = {"N": ["1"], "HEX": ["00112233445566778899aabbccddeeff"]}


def word_forms(word: str) -> list[str]:
    """One grammar word -> the concrete words it stands for: ``PROT`` -> every
    documented protection, ``keyid=N`` -> ``keyid=1``, ``a|b`` -> a and b
    (``algorithm=x|y`` -> ``algorithm=x`` and ``algorithm=y``)."""
    name, eq, value = word.partition("=")
    if eq:
        return [
            f"{name}={v}" for alt in value.split("|") for v in PLACEHOLDER_VALUES.get(alt, [alt])
        ]
    return [form for alt in word.split("|") for form in ARGUMENTS.get(alt, [alt])]


def commands_of(grammar: str) -> list[str]:
    """Every command a grammar line allows: ``[x]`` with and without x, each
    alternative, each documented form of each argument."""
    choices = []
    for word in grammar.split():
        optional = word.startswith("[") and word.endswith("]")
        forms = word_forms(word.strip("[]"))
        choices.append([*forms, ""] if optional else forms)
    return [" ".join(w for w in combo if w) for combo in itertools.product(*choices)]


def test_the_argument_table_lists_every_protection_the_parser_knows() -> None:
    assert sorted(ARGUMENTS["PROT"]) == sorted(PROTS)


def test_the_grammar_lists_every_space_command_and_advice_of_the_parser() -> None:
    ctl = " ".join(grammar for file, grammar in COMMANDS if file == "spaces/NAME/ctl")
    assert {grammar.split()[0] for file, grammar in COMMANDS if file == "spaces/NAME/ctl"} == set(
        USAGE
    )
    assert all(advice in ctl for advice in ADVICE)


@pytest.mark.parametrize(
    "grammar", [g for f, g in COMMANDS if f == "spaces/NAME/ctl"], ids=lambda g: g.split()[0]
)
def test_every_documented_form_of_a_space_command_is_parsed(grammar: str) -> None:
    commands = commands_of(grammar)
    assert commands
    for command in commands:
        parsed = parse_space_command(decode_command(command, "ctl"))
        assert parsed.op == grammar.split()[0], command


@pytest.mark.parametrize("grammar", [g for f, g in COMMANDS if f == "keys/N"])
def test_every_documented_key_payload_is_parsed(grammar: str) -> None:
    for payload in commands_of(grammar):
        assert parse_payload(decode_command(payload, "key"))["type"] == grammar.split()[0][5:]


@pytest.mark.mktme(phys_mem="16M", seed=1)
@pytest.mark.parametrize(
    ("file", "grammar"),
    [(f, g) for f, g in COMMANDS if f not in ("spaces/NAME/ctl", "keys/N")],
    ids=lambda x: x,
)
def test_every_documented_command_of_the_other_control_files_is_accepted(
    mktme_machine: Machine, file: str, grammar: str, tmp_path: Path
) -> None:
    mktme_machine.create_space(SPACE, 0)
    tree = Tree(mktme_machine)
    (path,) = expand(file, {"NAME": [SPACE], "SWITCH": [next(iter(MITIGATIONS))]})
    node = tree.resolve(path)
    assert isinstance(node, TextFile), path
    assert node.command is not None, path
    mktme_machine.snapshot(tmp_path / "machine.snapshot")  # for restore and coldboot
    for command in commands_of(grammar):
        for path in ARGUMENTS["PATH"]:  # a snapshot lands in this test's directory
            command = command.replace(path, str(tmp_path / "machine.snapshot"))
        node.command(command.encode(), 0)
    assert mktme_machine.check() == []


# --- sections 2.1, 3.8 and 4.3: names declared in the code -----------------------------


def test_the_switch_table_names_every_switch_with_the_title_of_its_patch() -> None:
    documented = {spans(row[0])[0]: row[1] for row in table("3.8")}
    assert set(documented) == set(MITIGATIONS)
    for name, title in MITIGATIONS.items():
        assert f'"{title}"' in documented[name], name


def test_the_option_table_names_every_machine_option() -> None:
    documented = {spans(row[0])[0] for row in table("2.1")}
    assert documented == {f.name for f in dataclasses.fields(MachineConfig)}


def test_the_vmstat_paragraph_names_every_gauge_and_counter() -> None:
    paragraph = section("4.3").split("**`mm/vmstat`.**")[1].split("**")[0]
    names = {span for span in spans(paragraph) if re.fullmatch(r"[a-z0-9_]+[a-z0-9]", span)}
    assert names == set(Machine(phys_mem="4M").vmstat_counts())
    assert set(VMSTAT_ITEMS) <= names


# --- section 5.1: the mount options ---------------------------------------------------

MOUNT_OPTIONS = {spans(row[0])[0].split()[0]: row[1] for row in table("5.1")}


def test_every_documented_mount_option_is_in_the_help() -> None:
    done = CliRunner().invoke(cli, ["mount", "--help"])
    assert done.exit_code == 0
    shown = set(re.findall(r"^\s+(--[a-z-]+)", done.output, re.MULTILINE)) - {"--help"}
    assert set(MOUNT_OPTIONS) == shown


def mount_params(*args: str) -> dict[str, object]:
    """The values ``mktme-sandbox mount MNT ARGS`` would run with."""
    return cli.commands["mount"].make_context("mount", ["MNT", *args]).params


def test_every_documented_mount_default_is_the_default() -> None:
    defaults = mount_params()
    for option, cell in MOUNT_OPTIONS.items():
        written = spans(cell)
        if written:  # a value such as `256M`: giving it changes nothing
            assert mount_params(option, *written) == defaults, option
        else:  # "off", "random"
            assert defaults[option[2:].replace("-", "_")] in (None, False), option


# --- section 5.4: the bench suites ---------------------------------------------------


def test_the_bench_table_lists_every_suite_and_option_of_the_help() -> None:
    from mktme_sandbox.bench import SUITES

    assert [spans(row[0])[0] for row in table("5.4")] == list(SUITES)
    done = CliRunner().invoke(cli, ["bench", "--help"])
    shown = set(re.findall(r"^\s+(--[a-z-]+)", done.output, re.MULTILINE)) - {"--help"}
    heading = re.search(r"^### 5\.4 (.*)$", SPEC, re.MULTILINE)
    assert heading
    assert shown == set(re.findall(r"\[(--[a-z-]+)", heading.group(1)))


# --- the repository stands alone ----------------------------------------------------

OUTSIDE = ("..", "/shared")  # joined at run time, so this file does not match itself
# A citation left in a file outside this branch's scope; the lead rewrites it,
# and then this list must be emptied (the test fails until it is).
STILL_TO_REWRITE: list[str] = []


def test_no_tracked_file_mentions_the_shared_folder() -> None:
    needles = ["".join(OUTSIDE).encode(), ("/work" + OUTSIDE[1]).encode()]
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    mentioning = [
        name
        for name in listed.decode().split("\0")
        if name
        and (ROOT / name).is_file()
        and any(needle in (ROOT / name).read_bytes() for needle in needles)
    ]
    assert mentioning == STILL_TO_REWRITE
