"""Shared fixtures for the platform tests: small seeded machines and PCONFIG helpers."""

from __future__ import annotations

import pytest

from hw_helpers import KnownKey, MakePlatform, Program
from mktme_sandbox.config import MachineConfig, MiB
from mktme_sandbox.hw.keytable import KeyProgram, KeyProgramCommand, PconfigStatus
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128, Algorithm

SET_KEY_DIRECT = KeyProgramCommand.SET_KEY_DIRECT

# Key material the tests know, to compute what DRAM must hold and to search for leaks.
KEY_1 = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
TWEAK_1 = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
KEY_2 = bytes.fromhex("a1a2a3a4a5a6a7a8a9aaabacadaeafb0")
TWEAK_2 = bytes.fromhex("5f5e5d5c5b5a59585756555453525150")


@pytest.fixture
def make_platform() -> MakePlatform:
    """``make_platform(**MachineConfig options)``: 16 MiB, seed 1 unless told otherwise."""

    def make(**options: object) -> Platform:
        options.setdefault("phys_mem", 16 * MiB)
        options.setdefault("seed", 1)
        return Platform(MachineConfig(**options))  # type: ignore[arg-type]

    return make


@pytest.fixture
def program() -> Program:
    """``program(platform, keyid, command, algorithm=AES_XTS_128, key=b"", tweak=b"")``."""

    def run(
        platform: Platform,
        keyid: int,
        command: KeyProgramCommand,
        algorithm: Algorithm = AES_XTS_128,
        key: bytes = b"",
        tweak: bytes = b"",
    ) -> PconfigStatus:
        return platform.pconfig(KeyProgram(keyid, command, algorithm.bit, key, tweak).encode())

    return run


KNOWN_1 = KnownKey(KEY_1, TWEAK_1)
KNOWN_2 = KnownKey(KEY_2, TWEAK_2)


@pytest.fixture
def known_platform(make_platform: MakePlatform, program: Program) -> MakePlatform:
    """Like ``make_platform``, with KeyIDs 1 and 2 programmed directly with KNOWN_1 and KNOWN_2."""

    def make(**options: object) -> Platform:
        platform = make_platform(**options)
        for keyid, known in ((1, KNOWN_1), (2, KNOWN_2)):
            status = program(platform, keyid, SET_KEY_DIRECT, key=known.key, tweak=known.tweak)
            assert status is PconfigStatus.PROG_SUCCESS
        return platform

    return make


@pytest.fixture
def known_keys() -> tuple[KnownKey, KnownKey]:
    """The keys ``known_platform`` programs into KeyIDs 1 and 2."""
    return KNOWN_1, KNOWN_2
