"""mktme-key: list, add on the first free KeyID, clear; errors with errno and reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mktme_sandbox.client import Mount
from tools_helpers import VA, Run, Tenant

pytestmark = pytest.mark.mount


def test_help_teaches_the_commands_with_examples_and_exit_status(tool: Run) -> None:
    done = tool("mktme-key", "--help")
    assert done.returncode == 0
    for text in ("list", "add cpu|user|no-encrypt", "clear KEYID", "examples:", "exit status"):
        assert text in done.stdout
    assert "-k FILE|-" in done.stdout
    assert "never taken on the command line" in done.stdout


def test_without_a_mountpoint_it_says_how_to_give_one_and_exits_2(tool: Run) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MKTME_MNT"}
    done = tool("mktme-key", "list", env=env)
    assert done.returncode == 2
    assert "-m MNT or set MKTME_MNT" in done.stderr


def test_a_directory_that_is_not_a_mount_is_refused(tool: Run, tmp_path: object) -> None:
    done = tool("mktme-key", "-m", str(tmp_path), "list")
    assert done.returncode == 2
    assert "not an mktme-sandbox mount" in done.stderr


def test_add_cpu_prints_the_keyid_list_shows_it_and_clear_frees_it(tool: Run, mnt: Mount) -> None:
    added = tool("mktme-key", "add", "cpu")
    assert added.returncode == 0, added.stderr
    keyid = int(added.stdout)
    listed = tool("mktme-key", "list").stdout.splitlines()
    assert f"keyid={keyid} state=programmed type=cpu" in listed[keyid - 1]
    cleared = tool("mktme-key", "clear", str(keyid))
    assert cleared.returncode == 0
    assert not mnt.key(keyid).programmed


def test_add_takes_the_first_free_keyid(tool: Run, mnt: Mount) -> None:
    first = int(tool("mktme-key", "add", "no-encrypt").stdout)
    second = int(tool("mktme-key", "add", "user", "-a", "aes-xts-256").stdout)
    try:
        free = [k.keyid for k in mnt.key_table() if not k.programmed]
        assert second < min(free)
        assert mnt.key(first).type == "no-encrypt"
        assert mnt.key(second).fields["algorithm"] == "aes-xts-256"
    finally:
        mnt.clear_key(first)
        mnt.clear_key(second)


def test_equal_key_and_tweak_is_rejected_with_einval_and_the_reason(tool: Run) -> None:
    same = "00112233445566778899aabbccddeeff"
    done = tool("mktme-key", "add", "user", "-k", "-", stdin=f"{same} {same}\n")
    assert done.returncode == 1
    assert "EINVAL" in done.stderr
    assert "equal" in done.stderr


KEY, TWEAK = "a1b2c3d4e5f60718293a4b5c6d7e8f90", "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


@pytest.mark.parametrize(
    ("args", "material"),
    [
        (["user"], f"{KEY} {KEY}"),  # equal
        (["user", "-a", "aes-xts-256"], f"{KEY}\n{TWEAK}\n"),  # too short for 256
        (["cpu"], f"{KEY} {TWEAK[:-1]}"),  # odd-length entropy
    ],
    ids=["equal", "short", "odd"],
)
def test_a_rejected_key_is_shown_redacted_never_in_hex(
    tool: Run, args: list[str], material: str
) -> None:
    done = tool("mktme-key", "add", *args, "-k", "-", stdin=material)
    assert done.returncode == 1, done.stderr
    assert "EINVAL" in done.stderr
    assert "key=<redacted> tweak=<redacted>" in done.stderr
    for secret in (KEY, TWEAK[:-1]):
        assert secret not in done.stderr
        assert secret not in done.stdout


def test_a_user_key_from_stdin_is_programmed_and_never_shown(tool: Run, mnt: Mount) -> None:
    key, tweak = os.urandom(16).hex(), os.urandom(16).hex()
    done = tool("mktme-key", "add", "user", "-a", "aes-xts-128", "-k", "-", stdin=f"{key} {tweak}")
    assert done.returncode == 0, done.stderr
    keyid = int(done.stdout)
    try:
        status = mnt.key(keyid)
        assert status.programmed
        assert status.type == "user"
        seen = " ".join([done.args[-1], *done.args, done.stdout, done.stderr, mnt.dmesg()])
        seen += " ".join(k.line for k in mnt.key_table())
        assert key not in seen
        assert tweak not in seen
    finally:
        mnt.clear_key(keyid)


def test_a_user_key_from_a_file_is_programmed(tool: Run, mnt: Mount, tmp_path: Path) -> None:
    material = tmp_path / "tenant.key"
    material.write_text(f"{os.urandom(16).hex()}\n{os.urandom(16).hex()}\n")
    done = tool("mktme-key", "add", "user", "-a", "aes-xts-128", "-k", str(material))
    assert done.returncode == 0, done.stderr
    mnt.clear_key(int(done.stdout))


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["-k", KEY], None, "cannot read the key file"),  # the old argv form: never echoed
        (["-k", "-", "-t", TWEAK], "x y", "-t was removed"),
        (["-k", "-"], KEY, "two hex words, KEY TWEAK"),
    ],
    ids=["key-on-argv", "tweak-option", "one-word"],
)
def test_key_material_on_the_command_line_is_a_usage_error_that_never_echoes_it(
    tool: Run, args: list[str], stdin: str | None, message: str
) -> None:
    done = tool("mktme-key", "add", "user", *args, stdin=stdin)
    assert done.returncode == 2
    assert message in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert KEY not in done.stderr + done.stdout
    assert TWEAK not in done.stderr + done.stdout


def test_list_json_is_one_object_per_keyid(tool: Run, mnt: Mount) -> None:
    done = tool("mktme-key", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [row["keyid"] for row in rows] == mnt.keyids()
    assert {row["state"] for row in rows} <= {"free", "cleared", "programmed"}


def test_clearing_a_keyid_that_is_still_mapped_is_ebusy(tool: Run, tenant: Tenant) -> None:
    done = tool("mktme-key", "clear", str(tenant.keyid))
    assert done.returncode == 1
    assert "EBUSY" in done.stderr
    assert tenant.space.translate(VA).present


def test_unknown_type_is_a_usage_error(tool: Run) -> None:
    done = tool("mktme-key", "add", "quantum")
    assert done.returncode == 2
    assert "unknown key type" in done.stderr
