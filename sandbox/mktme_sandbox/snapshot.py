"""Machine snapshots: the file format, and a state tree to bytes and back.

A snapshot is what ``Machine.snapshot()`` writes and ``Machine.restore()``
reads (docs/api.md, "Snapshots"). The state itself comes from the layers'
``export_state()`` as a tree of dicts, lists, numbers, strings, ``bytes`` and
numpy arrays; this module only stores and checks it.

Format 1, in this order:

1. the line ``MKTME-SANDBOX-SNAPSHOT``;
2. the line ``format 1``;
3. one line of JSON, the header: ``config`` (the ``MachineConfig`` fields),
   ``created`` (UTC, ISO 8601), ``payload_size``, ``payload_sha256`` and
   ``state``, the state tree in which every array is replaced by
   ``{"$array": NAME}`` and every byte string by ``{"$bytes": NAME}``;
4. ``payload_size`` bytes: an uncompressed numpy ``.npz`` (a zip of ``.npy``
   members) holding those arrays by NAME.

Reading checks each part in turn (magic, format, header, size, SHA-256), then
loads the arrays with ``allow_pickle=False``: no byte of a file ever reaches
``pickle``. Every refusal is ``SandboxError(EINVAL)`` saying what is wrong.

The file holds key material (every programmed key and the TME key): files are
written mode 0600, through a temporary file renamed into place, so a reader
never sees half of one.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import hashlib
import io
import json
import os
import stat
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mktme_sandbox.config import MachineConfig
from mktme_sandbox.errors import fail
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.kernel.kernel import Kernel

__all__ = [
    "FORMAT",
    "MAGIC",
    "Snapshot",
    "boot",
    "capture",
    "decode",
    "encode",
    "read_file",
    "size_limit",
    "write_file",
]

MAGIC = b"MKTME-SANDBOX-SNAPSHOT"
FORMAT = 1
# the generator's state is in the snapshot: the seed need not match; the tweak
# tables are the host's cache, no part of the machine
_UNCHECKED = ("seed", "tweak_cache")
_HEADER_ROOM = 256 << 20


@dataclass(frozen=True)
class Snapshot:
    """A decoded snapshot: the saved config (JSON values) and the state tree."""

    config: dict[str, Any]
    state: dict[str, Any]

    def check_config(self, config: MachineConfig) -> None:
        """EINVAL unless the snapshot was taken on a machine configured as ``config``."""
        mine = _config_json(config)
        differ = [
            f"{name} {self.config.get(name)!r} (this machine: {value!r})"
            for name, value in mine.items()
            if name not in _UNCHECKED and self.config.get(name) != value
        ]
        if differ:
            fail(errno.EINVAL, f"snapshot: taken on another machine: {', '.join(differ)}")


def capture(platform: Platform, kernel: Kernel) -> dict[str, Any]:
    """The state tree of a whole machine."""
    return {"platform": platform.export_state(), "kernel": kernel.export_state()}


def boot(
    config: MachineConfig, snapshot: Snapshot, coldboot: bool, owner_uid: int = 0
) -> tuple[Platform, Kernel]:
    """A new platform and kernel that are the snapshot's machine; with ``coldboot``, a
    machine freshly booted on the snapshot's DRAM (``owner_uid``: the daemon's
    user). Nothing existing is touched: the caller swaps the pair in, or keeps
    its own when this raises."""
    snapshot.check_config(config)
    platform = Platform(config)
    try:
        if coldboot:
            platform.cold_boot(snapshot.state["platform"])
            return platform, Kernel(platform, config, owner_uid)
        kernel = Kernel(platform, config, owner_uid)
        platform.import_state(snapshot.state["platform"])
        kernel.import_state(snapshot.state["kernel"])
    except (AttributeError, IndexError, KeyError, OverflowError, TypeError, ValueError) as err:
        fail(errno.EINVAL, f"snapshot: the state does not fit this machine ({type(err).__name__})")
    return platform, kernel


def encode(config: MachineConfig, state: dict[str, Any]) -> bytes:
    """The snapshot file's bytes for ``state`` of a machine configured as ``config``."""
    arrays: dict[str, np.ndarray] = {}
    tree = _pack(state, arrays)
    buffer = io.BytesIO()
    np.savez(buffer, allow_pickle=False, **arrays)
    payload = buffer.getvalue()
    header = {
        "config": _config_json(config),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "payload_size": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "state": tree,
    }
    lines = [MAGIC, f"format {FORMAT}".encode(), json.dumps(header).encode()]
    return b"\n".join(lines) + b"\n" + payload


def decode(data: bytes) -> Snapshot:
    """Check and read a snapshot file's bytes (EINVAL for anything else)."""
    magic, version, header_line, payload = (data.split(b"\n", 3) + [b""] * 3)[:4]
    if magic != MAGIC:
        fail(errno.EINVAL, f"snapshot: not a snapshot (no {MAGIC.decode()} line)")
    if version != f"format {FORMAT}".encode():
        shown = version[:40].decode(errors="replace")
        fail(errno.EINVAL, f"snapshot: {shown!r} is not format {FORMAT}, the one this reads")
    header = _header(header_line)
    if len(payload) != header["payload_size"]:
        fail(
            errno.EINVAL,
            f"snapshot: truncated or extended: {len(payload)} bytes of data, "
            f"the header says {header['payload_size']}",
        )
    if hashlib.sha256(payload).hexdigest() != header["payload_sha256"]:
        fail(errno.EINVAL, "snapshot: corrupted: the data does not match its SHA-256")
    return Snapshot(header["config"], _unpack(header["state"], _arrays(payload)))


def write_file(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, all or nothing."""
    target = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    except OSError as err:
        fail(err.errno or errno.EIO, f"snapshot: cannot write {target}: {err.strerror}")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.chmod(temporary, 0o600)
        os.replace(temporary, target)
    except OSError as err:
        Path(temporary).unlink(missing_ok=True)
        fail(err.errno or errno.EIO, f"snapshot: cannot write {target}: {err.strerror}")


def size_limit(config: MachineConfig) -> int:
    """The most bytes a snapshot of a machine configured as ``config`` can take:
    twice its DRAM, swap and cache (the per-page and per-line arrays included),
    and room for the header."""
    return 2 * (config.phys_mem + config.swap + config.cache_size) + _HEADER_ROOM


def read_file(path: str | os.PathLike[str], config: MachineConfig) -> bytes:
    """The bytes of the regular file ``path``, at most ``size_limit(config)`` of
    them (EINVAL for a FIFO, a device or a larger file: the daemon must neither
    wait for a writer nor read without end)."""
    limit = size_limit(config)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as err:
        fail(err.errno or errno.EIO, f"snapshot: cannot read {path}: {err.strerror}")
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        fail(errno.EINVAL, f"snapshot: {path} is not a regular file")
    with os.fdopen(fd, "rb") as file:
        chunks: list[bytes] = []
        size = status.st_size  # a file that grows while read is counted as read
        while size <= limit and (chunk := _read_chunk(file, path)):
            chunks.append(chunk)
            size = max(size, sum(map(len, chunks)))
    if size > limit:
        fail(
            errno.EINVAL,
            f"snapshot: {path} is larger than this machine's snapshots ({limit} bytes)",
        )
    return b"".join(chunks)


def _read_chunk(file: io.BufferedReader, path: str | os.PathLike[str]) -> bytes:
    try:
        return file.read(16 << 20)
    except OSError as err:
        fail(err.errno or errno.EIO, f"snapshot: cannot read {path}: {err.strerror}")


def _config_json(config: MachineConfig) -> dict[str, Any]:
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {name: list(v) if isinstance(v, tuple) else v for name, v in values.items()}


def _header(line: bytes) -> dict[str, Any]:
    try:
        header = json.loads(line)
    except ValueError:
        fail(errno.EINVAL, "snapshot: the header is not JSON")
    keys = {"config", "created", "payload_size", "payload_sha256", "state"}
    if not isinstance(header, dict) or not keys <= header.keys():
        fail(errno.EINVAL, f"snapshot: the header lacks one of {', '.join(sorted(keys))}")
    types = {"config": dict, "state": dict, "payload_size": int, "payload_sha256": str}
    wrong = [name for name, kind in types.items() if not isinstance(header[name], kind)]
    if wrong:
        fail(errno.EINVAL, f"snapshot: the header's {', '.join(wrong)} has the wrong type")
    return header


def _arrays(payload: bytes) -> dict[str, np.ndarray]:
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as members:
            return {name: members[name] for name in members.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as err:
        fail(errno.EINVAL, f"snapshot: the arrays cannot be read ({type(err).__name__})")


def _pack(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``tree`` as JSON values, its arrays and byte strings moved into ``arrays``."""
    if isinstance(tree, bytes):
        return {"$bytes": _pack(np.frombuffer(tree, dtype=np.uint8), arrays)["$array"]}
    if isinstance(tree, np.ndarray):
        name = f"a{len(arrays)}"
        arrays[name] = tree
        return {"$array": name}
    if isinstance(tree, dict):
        return {str(key): _pack(value, arrays) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return [_pack(value, arrays) for value in tree]
    return tree


def _unpack(tree: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(tree, dict):
        if tree.keys() in ({"$array"}, {"$bytes"}):
            ((kind, name),) = tree.items()
            if not isinstance(name, str) or name not in arrays:
                fail(errno.EINVAL, f"snapshot: the array {name!r} is missing")
            return arrays[name].tobytes() if kind == "$bytes" else arrays[name]
        return {key: _unpack(value, arrays) for key, value in tree.items()}
    if isinstance(tree, list):
        return [_unpack(value, arrays) for value in tree]
    return tree
