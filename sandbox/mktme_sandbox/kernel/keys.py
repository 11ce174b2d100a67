"""The mktme key service: KeyIDs programmed through PCONFIG.

Models the userspace API proposed after the v5 series (the ``mktme`` key type
of Alison Schofield's patches): a payload of ``field=value`` words
(``type=cpu|user|no-encrypt|clear``, ``algorithm=aes-xts-128|aes-xts-256``,
``key=HEX``, ``tweak=HEX``) programs one hardware KeyID with PCONFIG
MKTME_KEY_PROGRAM. The KeyID is owned by whoever programmed it until it is
cleared.

Rules kept (docs/spec.md 2.3 and 7):
- The whole payload is checked before PCONFIG runs: EINVAL for an unknown or
  repeated field, bad hex, a wrong key length, an algorithm that is not
  activated, and a user key equal to its tweak key (the key service's policy:
  NIST SP 800-38E wants the two XTS keys to differ; PCONFIG itself accepts them).
- A KeyID still referenced by a VMA or by an allocated page cannot be
  reprogrammed or cleared (EBUSY). Before a KeyID is reprogrammed the cache is
  written back (WBINVD), so no dirty line of the old key is later written back
  with the new one.
- A user owns at most ``keyid_limit(uid)`` KeyIDs (``max_keyids_per_uid``;
  None for root and the daemon's user): programming one more is EDQUOT, as
  ``key_alloc()`` fails when a user's ``maxkeys`` quota is exceeded.
- PCONFIG answering ENTROPY_ERROR or DEVICE_BUSY is retried, ten tries in all,
  then EAGAIN.
- Key material is parsed here and handed to the hardware; it is never stored,
  logged, or put in an exception (the payload text is not echoed back).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass

from mktme_sandbox.errors import fail
from mktme_sandbox.hw.keytable import KeyProgram, KeyState, PconfigStatus
from mktme_sandbox.hw.keytable import KeyProgramCommand as Cmd
from mktme_sandbox.hw.xts import algorithm_named
from mktme_sandbox.kernel.mktme import KeyIdLayout
from mktme_sandbox.kernel.printk import KernelLog
from mktme_sandbox.kernel.vmstat import VmStat

__all__ = ["PCONFIG_TRIES", "KeyService", "KeySlot"]

PCONFIG_TRIES = 10
_TYPES = ("cpu", "user", "no-encrypt", "clear")
_FIELDS = {
    "cpu": ({"type", "algorithm"}, {"key", "tweak"}),
    "user": ({"type", "algorithm", "key", "tweak"}, set()),
    "no-encrypt": ({"type"}, {"algorithm"}),
    "clear": ({"type"}, set()),
}
_RETRY = (PconfigStatus.ENTROPY_ERROR, PconfigStatus.DEVICE_BUSY)


_TYPE_OF_MODE = {"random": "cpu", "direct": "user", "no-encrypt": "no-encrypt"}


@dataclass(frozen=True)
class KeySlot:
    """What may be said of a KeyID: the key table's mode, and its owner."""

    state: str = "free"  # free | programmed | cleared
    type: str = "-"
    algorithm: str = "-"
    owner: int | None = None

    @classmethod
    def of(cls, hw: KeyState, owner: int | None) -> KeySlot:
        """The hardware's key state (``hw/keytable``) plus the kernel's owner."""
        if hw.mode in _TYPE_OF_MODE:
            algorithm = hw.algorithm if hw.mode != "no-encrypt" and hw.algorithm else "-"
            return cls("programmed", _TYPE_OF_MODE[hw.mode], algorithm, owner)
        return cls("cleared" if hw.mode == "cleared" else "free")


class KeyService:
    """KeyIDs 1..nr_keyids: payloads in, PCONFIG calls out."""

    def __init__(
        self,
        pconfig: Callable[[bytes], PconfigStatus],
        key_state: Callable[[int], KeyState],
        wbinvd: Callable[[], None],
        layout: KeyIdLayout,
        algorithms: tuple[str, ...],
        log: KernelLog,
        vmstat: VmStat,
        in_use: Callable[[int], bool],
        keyid_limit: Callable[[int], int | None] = lambda uid: None,
    ) -> None:
        self._pconfig = pconfig
        self._key_state = key_state
        self._wbinvd = wbinvd
        self.layout = layout
        self.algorithms = algorithms
        self._log = log
        self._vmstat = vmstat
        self._in_use = in_use
        self._keyid_limit = keyid_limit
        self._owners: dict[int, int] = {}  # the one thing the key table does not know

    # --- queries ------------------------------------------------------------

    def slot(self, keyid: int) -> KeySlot:
        return KeySlot.of(self._key_state(keyid), self._owners.get(keyid))

    def owner(self, keyid: int) -> int | None:
        return self._owners.get(keyid)

    def check_exists(self, keyid: int, op: str) -> None:
        if keyid == 0 or not self.layout.valid_keyid(keyid):
            have = f"KeyIDs 1..{self.layout.nr_keyids}" if self.layout.nr_keyids else "no KeyIDs"
            fail(errno.EINVAL, f"{op}: KeyID {keyid} does not exist (this machine has {have})")

    def check_usable(self, keyid: int, op: str, uid: int) -> None:
        """KeyID 0 always; others only while programmed (else ENOKEY), and
        only by their owner or root (else EACCES, as key_task_permission())."""
        if keyid == 0:
            return
        self.check_exists(keyid, op)
        slot = self.slot(keyid)
        if slot.state != "programmed":
            fail(errno.ENOKEY, f"{op}: KeyID {keyid} has no key (program keys/{keyid} first)")
        if uid not in (0, slot.owner):
            fail(errno.EACCES, f"{op}: KeyID {keyid} belongs to uid {slot.owner}")

    # --- programming ----------------------------------------------------------

    def program(self, keyid: int, payload: str, uid: int) -> None:
        """Apply one payload to ``keyid`` for caller ``uid``."""
        self.check_exists(keyid, "key")
        fields = parse_payload(payload)
        program = self._build(keyid, fields)
        self._check_owner(keyid, uid)
        if fields["type"] != "clear":
            self._check_quota(keyid, uid)
        if self._in_use(keyid):
            fail(errno.EBUSY, f"key: KeyID {keyid} is still mapped; unmap it first")
        self._wbinvd()
        self._vmstat.inc("mktme_key_wbinvd")
        self._execute(program)
        kind = fields["type"]
        if kind == "clear":
            self._owners.pop(keyid, None)
        else:
            self._owners[keyid] = uid
        self._log.printk(
            f"mktme: KeyID {keyid} {'cleared' if kind == 'clear' else 'programmed'}"
            f" (type={kind}, uid={uid})"
        )

    def _check_owner(self, keyid: int, uid: int) -> None:
        owner = self._owners.get(keyid)
        if owner is not None and uid not in (0, owner):
            fail(errno.EACCES, f"key: KeyID {keyid} belongs to uid {owner}")

    def _check_quota(self, keyid: int, uid: int) -> None:
        """EDQUOT when ``uid`` already owns its limit of KeyIDs (reprogramming
        one it owns takes none more)."""
        limit = self._keyid_limit(uid)
        owned = sum(1 for owner in self._owners.values() if owner == uid)
        if limit is not None and self._owners.get(keyid) != uid and owned >= limit:
            fail(
                errno.EDQUOT,
                f"key: uid {uid} owns {owned} KeyIDs, the limit max_keyids_per_uid is {limit}",
            )

    def _build(self, keyid: int, fields: dict[str, str]) -> KeyProgram:
        kind = fields["type"]
        alg_name = fields.get("algorithm", self.algorithms[0])
        if alg_name not in self.algorithms:
            fail(errno.EINVAL, f"key: algorithm= must be one of {', '.join(self.algorithms)}")
        alg = algorithm_named(alg_name)
        key = _hex_field(fields, "key", alg.key_bytes)
        tweak = _hex_field(fields, "tweak", alg.key_bytes)
        if kind == "user" and key == tweak:
            fail(errno.EINVAL, "key: key and tweak are equal; XTS forbids it")
        command = {
            "cpu": Cmd.SET_KEY_RANDOM,
            "user": Cmd.SET_KEY_DIRECT,
            "no-encrypt": Cmd.NO_ENCRYPT,
            "clear": Cmd.CLEAR_KEY,
        }[kind]
        return KeyProgram(keyid, command, alg.bit, key, tweak)

    def _execute(self, program: KeyProgram) -> None:
        struct = program.encode()
        for attempt in range(PCONFIG_TRIES):
            status = self._pconfig(struct)
            if status == PconfigStatus.PROG_SUCCESS:
                self._vmstat.inc("mktme_key_program")
                return
            if status not in _RETRY:
                fail(errno.EINVAL, f"key: PCONFIG refused the key: {status.name}")
            if attempt < PCONFIG_TRIES - 1:
                self._vmstat.inc("mktme_key_program_retry")
        fail(errno.EAGAIN, f"key: PCONFIG answered {status.name} {PCONFIG_TRIES} times; try again")

    def owners(self) -> dict[int, int]:
        """KeyID -> the uid that programmed it (a copy, for snapshots)."""
        return dict(self._owners)

    def set_owners(self, owners: dict[int, int]) -> None:
        self._owners = dict(owners)

    def status_line(self, keyid: int, pages: int) -> str:
        s = self.slot(keyid)
        owner = "-" if s.owner is None else str(s.owner)
        return (
            f"keyid={keyid} state={s.state} type={s.type} algorithm={s.algorithm} "
            f"owner={owner} pages={pages}\n"
        )


def parse_payload(payload: str) -> dict[str, str]:
    """``type=cpu algorithm=aes-xts-128`` -> fields, every rule but lengths."""
    fields: dict[str, str] = {}
    for n, word in enumerate(payload.split(), 1):
        # A payload may hold key material anywhere: name words by position only.
        name, eq, value = word.partition("=")
        if not eq or not value:
            fail(errno.EINVAL, f"key: word {n} is not of the form field=value")
        if name not in ("type", "algorithm", "key", "tweak"):
            fail(
                errno.EINVAL, f"key: word {n} names an unknown field (type, algorithm, key, tweak)"
            )
        if name in fields:
            fail(errno.EINVAL, f"key: field {name} given twice")
        fields[name] = value
    kind = fields.get("type")
    if kind not in _TYPES:
        fail(errno.EINVAL, f"key: type= must be one of {', '.join(_TYPES)}")
    required, optional = _FIELDS[kind]
    missing = required - fields.keys()
    extra = fields.keys() - required - optional
    if missing:
        fail(errno.EINVAL, f"key: type={kind} needs {', '.join(sorted(missing))}")
    if extra:
        fail(errno.EINVAL, f"key: type={kind} takes no {', '.join(sorted(extra))}")
    return fields


def _hex_field(fields: dict[str, str], name: str, nbytes: int) -> bytes:
    """The field as bytes (zeros when absent); its value is never echoed."""
    text = fields.get(name)
    if text is None:
        return bytes(nbytes)
    if len(text) != 2 * nbytes:
        fail(errno.EINVAL, f"key: {name} must be {2 * nbytes} hex digits, not {len(text)}")
    try:
        return bytes.fromhex(text)
    except ValueError:
        fail(errno.EINVAL, f"key: {name} is not hexadecimal")
