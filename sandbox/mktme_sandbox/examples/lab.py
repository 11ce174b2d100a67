"""lab: the harness every experiment of this folder runs in.

An experiment is a function ``run(lab)``: it says what it does (``lab.step``),
what it saw (``lab.saw``), checks each expectation (``lab.expect``) and ends
with a one-line observation (``lab.conclude``). ``main()`` turns that into a
script: ``-m MNT`` or ``$MKTME_MNT``, ``--help`` from the experiment's
docstring, and a last line ``VERDICT: PASS|FAIL|ERROR | observation`` that
``run-all`` collects.

Most experiments start the same way, from a tenant's page:
``lab.tenant_page(prefix)`` programs a key, makes a space, maps and populates
a page under that KeyID, finds its physical address and says so in one step.

Leaving the machine as it was found: everything an experiment takes goes
through the lab (a KeyID, a space, a switch, cache lines read through a foreign
KeyID), and the lab gives it back in reverse order in a ``finally``, whatever
happened. It then compares the machine with the snapshot taken at the start
(keys, spaces, switches, free pages, ``mm/check``) and fails the run if anything differs,
so experiments can run in any order on one mount.

Exit status: 0 the observation matches the expectation (PASS); 1 it
contradicts it (FAIL); 2 the experiment could not run (ERROR: no mount, no free
KeyID, a rejected command it did not expect).

Only the standard library and ``mktme_sandbox.client``: the experiments
use the mount and nothing else.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from mktme_sandbox.client import (
    BLOCK,
    LINE,
    PAGE,
    KeyStatus,
    Mount,
    MountError,
    NotAMount,
    Space,
    fresh_sandbox,
    mount_from,
)

__all__ = [
    "BASE",
    "BLOCK",
    "LINE",
    "PAGE",
    "CannotRun",
    "Lab",
    "Mount",
    "MountError",
    "Space",
    "TenantPage",
    "blocks_differing",
    "hexline",
    "main",
    "on_a_fresh_sandbox",
]

PASS, FAIL, ERROR = "PASS", "FAIL", "ERROR"
EXIT_STATUS = {PASS: 0, FAIL: 1, ERROR: 2}
BASE = 0x7F0000000000  # where experiments map; each has its own space
KEY_KINDS = {  # what lab.key() programs, as the narration says it
    "cpu": "a CPU-generated key",
    "user": "a user key",
    "no-encrypt": "no encryption (type=no-encrypt)",
}


class CannotRun(Exception):
    """The experiment cannot run on this mount (not a contradiction)."""


def hexline(data: bytes, n: int = 16) -> str:
    """The first ``n`` bytes as hex, then their printable text."""
    head = data[:n]
    text = "".join(chr(b) if 32 <= b < 127 else "." for b in head)
    return f"{head.hex(' ')}  |{text}|" + (" ..." if len(data) > n else "")


def blocks_differing(a: bytes, b: bytes, size: int = BLOCK) -> list[int]:
    """Indexes of the ``size``-byte blocks where ``a`` and ``b`` differ."""
    return [
        i // size for i in range(0, min(len(a), len(b)), size) if a[i : i + size] != b[i : i + size]
    ]


@dataclass(frozen=True)
class Snapshot:
    """What an experiment must give back: keys, spaces, switches, free pages, audit."""

    keys: tuple[tuple[int, str, str], ...]
    spaces: tuple[str, ...]
    switches: tuple[tuple[str, bool], ...]
    free_pools: str
    check: tuple[str, ...]

    @classmethod
    def take(cls, m: Mount) -> Snapshot:
        def key_tuple(k: KeyStatus) -> tuple[int, str, str]:
            # "programmed" or not is what counts; a cleared KeyID may read
            # "cleared" where it read "free" before.
            return (
                k.keyid,
                "programmed" if k.programmed else "free",
                k.type if k.programmed else "",
            )

        switches = dict(m.mitigations())
        switches["keyid_free_pools"] = m.flag("mm/keyid_free_pools")
        return cls(
            keys=tuple(key_tuple(k) for k in m.key_table()),
            spaces=tuple(s.name for s in m.spaces()),
            switches=tuple(sorted(switches.items())),
            free_pools=" ".join(m.read_text("mm/free_pools").split()),
            check=tuple(m.check()),
        )

    def differences(self, after: Snapshot) -> list[str]:
        out = []
        if after.keys != self.keys:
            changed = [
                f"KeyID {a[0]}: {a[1]} -> {b[1]}"
                for a, b in zip(self.keys, after.keys, strict=False)
                if a != b
            ]
            out.append("keys changed: " + ", ".join(changed))
        if after.spaces != self.spaces:
            out.append(f"spaces changed: {list(self.spaces)} -> {list(after.spaces)}")
        if after.switches != self.switches:
            out.append(f"switches changed: {dict(self.switches)} -> {dict(after.switches)}")
        if after.free_pools != self.free_pools:
            out.append(f"free pages changed: {self.free_pools} -> {after.free_pools}")
        new = [c for c in after.check if c not in self.check]
        if new:
            out.append("mm/check reports: " + "; ".join(new))
        return out


@dataclass(frozen=True)
class TenantPage:
    """``pages`` pages at ``va`` of ``space``, mapped rw- and populated under ``keyid``."""

    keyid: int
    space: Space
    va: int
    pa: int  # physical address of the first page
    pages: int = 1


class Lab:
    """One experiment's run on one mount."""

    def __init__(self, mount: Mount) -> None:
        self.m = mount
        self.summary = ""
        self.failed: list[str] = []
        self._undo: list[tuple[str, Callable[[], None]]] = []
        self._original: dict[str, bool] = {}

    # -- narration --------------------------------------------------------
    def step(self, text: str) -> None:
        print(f"- {text}", flush=True)

    def saw(self, text: str) -> None:
        print(f"    saw: {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"    note: {text}", flush=True)

    def expect(self, ok: bool, text: str) -> bool:
        print(f"    expect {text}: {'yes' if ok else 'NO'}", flush=True)
        if not ok:
            self.failed.append(text)
        return ok

    def conclude(self, text: str) -> None:
        self.summary = text

    # -- what the experiment takes, given back at the end -----------------
    def later(self, what: str, undo: Callable[[], None]) -> None:
        self._undo.append((what, undo))

    def key(self, kind: str = "cpu") -> int:
        """Program a key of ``kind`` (cpu, user, no-encrypt) on a free KeyID."""
        if not self.m.keyids():
            raise CannotRun("MKTME is off on this mount: keys/ is empty (see dmesg)")
        payload = {"cpu": f"type=cpu algorithm={self.algorithm()}", "no-encrypt": "type=no-encrypt"}
        if kind == "user":
            size = 16 if self.algorithm() == "aes-xts-128" else 32
            key, tweak = os.urandom(size).hex(), os.urandom(size).hex()
            payload["user"] = f"type=user algorithm={self.algorithm()} key={key} tweak={tweak}"
        try:
            keyid = self.m.add_key(payload[kind])
        except MountError as e:
            if e.errno == errno.ENOKEY:
                raise CannotRun(f"no free KeyID for a {kind} key: {e}") from None
            raise
        self.later(f"clear KeyID {keyid}", lambda: self.m.clear_key(keyid))
        return keyid

    def algorithm(self) -> str:
        algs = self.m.algorithms()
        return algs[0] if algs else "aes-xts-128"

    def space(self, prefix: str) -> Space:
        sp = self.m.new_space(prefix)
        self.later(f"destroy spaces/{sp.name}", sp.destroy)
        return sp

    def tenant_page(
        self,
        prefix: str,
        kind: str = "cpu",
        keyid: int | None = None,
        va: int = BASE,
        pages: int = 1,
    ) -> TenantPage:
        """A new space ``PREFIX-...`` with ``pages`` pages at ``va`` mapped rw- and
        populated under ``keyid``, or under a new key of ``kind`` when it is None;
        narrated as one step. Everything is given back at the end."""
        if keyid is None:
            keyid = self.key(kind)
            what = f"programmed KeyID {keyid} with {KEY_KINDS[kind]} (keys/{keyid}); "
        else:
            what = f"KeyID {keyid}: "
        sp = self.space(prefix)
        sp.mmap(va, pages * PAGE, "rw-", keyid=keyid, populate=True)
        pa = self.physical(sp, va)
        self.step(
            f"{what}mapped {va:#x} +{pages * PAGE >> 10}K rw- populate in spaces/{sp.name}; "
            f"pagemap: physical {pa:#x}"
        )
        return TenantPage(keyid, sp, va, pa, pages)

    def destroy(self, sp: Space) -> None:
        """Destroy a space of this lab now rather than at the end."""
        sp.destroy()
        self._undo = [(w, u) for w, u in self._undo if w != f"destroy spaces/{sp.name}"]

    def switch(self, rel: str, on: bool) -> None:
        """Set a 1/0 file (mm/mitigations/NAME, mm/keyid_free_pools); restore it later."""
        was = self.m.flag(rel)
        if rel not in self._original:
            self._original[rel] = was
            self.later(f"restore {rel}={int(was)}", lambda: self.m.set_flag(rel, was))
        if was != on:
            self.m.set_flag(rel, on)

    def mitigation(self, name: str, on: bool) -> None:
        if not self.m.file(f"mm/mitigations/{name}").exists():
            raise CannotRun(f"this mount has no mm/mitigations/{name}")
        self.switch(f"mm/mitigations/{name}", on)

    def read_foreign(self, keyid: int, pa: int, length: int) -> bytes:
        """Read through a KeyID that does not own the page, and invalidate the
        clean lines this pulls into the cache afterwards: left there, they
        would be stale for whoever uses the page with that KeyID next."""
        self.later(
            f"invalidate KeyID-{keyid} lines at {pa:#x}", lambda: self.m.clflush(pa, length, keyid)
        )
        return self.m.phys(keyid, pa, length)

    def cleanup(self) -> None:
        """Give everything back, last taken first. A step that fails (a KeyID
        still busy because a space it depends on is not gone yet) is tried
        once more after the others."""
        retry: list[tuple[str, Callable[[], None]]] = []
        for what, undo in reversed(self._undo):
            try:
                undo()
            except OSError:
                retry.append((what, undo))
        self._undo = []
        for what, undo in retry:
            try:
                undo()
            except OSError as e:
                print(f"    cleanup: could not {what}: {e}", flush=True)
                self.failed.append(f"cleanup: {what}")

    # -- common measurements ---------------------------------------------
    def physical(self, sp: Space, va: int) -> int:
        entry = sp.translate(va)
        if not entry.present:
            raise CannotRun(f"spaces/{sp.name} {va:#x} is not present after populate")
        return entry.pa


def on_a_fresh_sandbox(
    lab: Lab, why: str, options: tuple[str, ...], observe: Callable[[Lab], None]
) -> None:
    """Run ``observe`` on a sandbox of its own, mounted with ``options`` (the
    ``mktme-sandbox mount`` flags) and unmounted after it, and report its
    outcome in ``lab``: for an experiment the given mount cannot serve (a
    machine option it lacks, or a memory layout earlier work has changed)."""
    lab.step(f"{why}: mounting {' '.join(options)}")
    with fresh_sandbox(*options) as mount:
        inner = Lab(mount)
        try:
            observe(inner)
        finally:
            inner.cleanup()
    lab.failed += inner.failed
    lab.conclude(inner.summary)


def main(run: Callable[[Lab], None], title: str, doc: str | None) -> None:
    """Run ``run`` as a script: arguments, narration, cleanup, verdict, exit status."""
    parser = argparse.ArgumentParser(
        description=(doc or title) + "\n" + EXIT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-m", "--mount", help="the mountpoint (default: $MKTME_MNT)")
    args = parser.parse_args()
    print(f"== {title} ==", flush=True)
    try:
        mount = mount_from(args.mount)
    except NotAMount as e:
        finish(ERROR, f"no mount: {e}")
        return
    lab = Lab(mount)
    verdict, summary = PASS, ""
    try:
        before = Snapshot.take(mount)
        try:
            run(lab)
        finally:
            lab.cleanup()
        left = before.differences(Snapshot.take(mount))
        for text in left:
            lab.expect(False, f"the machine is left as found ({text})")
        verdict = FAIL if lab.failed else PASS
        summary = (
            lab.summary if not lab.failed else f"{lab.summary} [failed: {'; '.join(lab.failed)}]"
        )
    except CannotRun as e:
        verdict, summary = ERROR, f"cannot run: {e}"
    except MountError as e:
        verdict, summary = ERROR, f"unexpected rejection: {e}"
    except Exception as e:  # noqa: BLE001 (an experiment's bug is an ERROR verdict, not a crash)
        traceback.print_exc()
        verdict, summary = ERROR, f"{type(e).__name__}: {e}"
    finish(verdict, summary)


def finish(verdict: str, summary: str) -> None:
    print(f"VERDICT: {verdict} | {summary}", flush=True)
    sys.exit(EXIT_STATUS[verdict])


EXIT_HELP = """
Runs against the mount given by -m or $MKTME_MNT, on its own space and KeyIDs,
and gives back everything it took (spaces, KeyIDs, switches) when it ends.
Prints each step, what it saw and a last line "VERDICT: PASS|FAIL|ERROR | ...".

exit status: 0 PASS (the observation matches the expectation); 1 FAIL (it
contradicts it); 2 ERROR (could not run: no mount, no free KeyID, an
unexpected rejection).
"""
