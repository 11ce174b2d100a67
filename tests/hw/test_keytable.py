"""PCONFIG MKTME_KEY_PROGRAM: the struct, every status code, every validation rule."""

from __future__ import annotations

import errno
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hw_helpers import MakePlatform, Program
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.keytable import (
    KeyMode,
    KeyProgram,
    KeyProgramCommand,
    KeyState,
    KeyTable,
    PconfigFault,
    PconfigStatus,
)
from mktme_sandbox.hw.msr import TmeActivation
from mktme_sandbox.hw.xts import AES_XTS_128, AES_XTS_256, ALGORITHMS

DIRECT = KeyProgramCommand.SET_KEY_DIRECT
RANDOM = KeyProgramCommand.SET_KEY_RANDOM
CLEAR = KeyProgramCommand.CLEAR_KEY
NO_ENCRYPT = KeyProgramCommand.NO_ENCRYPT
S = PconfigStatus
KEY, TWEAK = b"\x11" * 16, b"\x22" * 16


def struct_bytes(
    keyid: int = 1, ctrl: int = AES_XTS_128.bit << 8, f1: bytes = KEY, f2: bytes = TWEAK
) -> bytearray:
    """A struct built by hand from the documented offsets, independent of KeyProgram."""
    raw = bytearray(256)
    raw[0:2] = keyid.to_bytes(2, "little")
    raw[2:6] = ctrl.to_bytes(4, "little")
    raw[64 : 64 + len(f1)] = f1
    raw[128 : 128 + len(f2)] = f2
    return raw


class TestStructLayout:
    def test_encode_puts_every_field_at_its_documented_offset(self) -> None:
        raw = KeyProgram(0x1234, RANDOM, AES_XTS_256.bit, b"\xaa" * 32, b"\xbb" * 32).encode()
        assert len(raw) == 256
        assert raw == bytes(
            struct_bytes(0x1234, RANDOM | AES_XTS_256.bit << 8, b"\xaa" * 32, b"\xbb" * 32)
        )
        assert struct.unpack_from("<HI", raw) == (0x1234, 0x401)  # AES-XTS-256 = KEYID_CTRL bit 10

    def test_aes_xts_128_is_keyid_ctrl_bit_8(self) -> None:
        raw = KeyProgram(1, NO_ENCRYPT, AES_XTS_128.bit).encode()
        assert struct.unpack_from("<I", raw, 2)[0] == 1 << 8 | 3

    @settings(max_examples=40, deadline=None)
    @given(
        keyid=st.integers(0, 0xFFFF),
        command=st.integers(0, 255),
        algorithm=st.integers(0, 0xFFFF),
        f1=st.binary(max_size=64),
        f2=st.binary(max_size=64),
    )
    def test_decode_inverts_encode(
        self, keyid: int, command: int, algorithm: int, f1: bytes, f2: bytes
    ) -> None:
        """decode(encode(p)) == p, except that bytes past the named algorithm's key
        (past the longest key when it names none) are #GP before anything else
        (Intel's PCONFIG "Operation": reserved key-field bytes must be zero)."""
        program = KeyProgram(keyid, command, algorithm, f1, f2)
        named = [a for a in ALGORITHMS if algorithm == a.bit]
        key_bytes = named[0].key_bytes if named else max(a.key_bytes for a in ALGORITHMS)
        if any(f1[key_bytes:]) or any(f2[key_bytes:]):
            with pytest.raises(PconfigFault, match="past byte"):
                KeyProgram.decode(program.encode())
        else:
            assert KeyProgram.decode(program.encode()) == program

    @pytest.mark.parametrize(
        ("keyid", "command", "algorithm", "f1"),
        [(0x10000, 0, 1, b""), (1, 256, 1, b""), (1, 0, 0x10000, b""), (1, 0, 1, bytes(65))],
    )
    def test_fields_that_do_not_fit_cannot_be_encoded(
        self, keyid: int, command: int, algorithm: int, f1: bytes
    ) -> None:
        with pytest.raises(SandboxError) as caught:
            KeyProgram(keyid, command, algorithm, f1)
        assert caught.value.errno == errno.EINVAL

    def test_repr_shows_no_key_field(self) -> None:
        text = repr(KeyProgram(1, DIRECT, 1, KEY, TWEAK))
        assert "11" * 4 not in text
        assert "\\x11" not in text
        assert "22" * 4 not in text


class TestMalformedStructFaults:
    """The struct is checked before anything else: #GP(0), here PconfigFault (EINVAL)."""

    @pytest.mark.parametrize("size", [0, 64, 191])
    def test_a_buffer_shorter_than_the_192_bytes_pconfig_reads_faults(
        self, make_platform: MakePlatform, size: int
    ) -> None:
        with pytest.raises(PconfigFault) as caught:
            make_platform().pconfig(bytes(size))
        assert caught.value.errno == errno.EINVAL

    @pytest.mark.parametrize("size", [192, 256])
    def test_pconfig_reads_192_bytes_and_never_the_padding_after_them(
        self, make_platform: MakePlatform, size: int
    ) -> None:
        """ "Load TMP_KEY_PROGRAM_STRUCT from 192 bytes at linear address DS:RBX"
        (Source: Intel Architecture Instruction Set Extensions Programming Reference (May 2019), PCONFIG "Operation"); Linux pads the struct to 256 bytes, which the instruction does not read."""
        raw = struct_bytes(ctrl=NO_ENCRYPT | AES_XTS_128.bit << 8)
        raw[192:256] = b"\xff" * 64
        assert make_platform().pconfig(bytes(raw[:size])) is S.PROG_SUCCESS

    @pytest.mark.parametrize("offset", [6, 40, 63])
    def test_nonzero_reserved_byte_faults(self, make_platform: MakePlatform, offset: int) -> None:
        raw = struct_bytes()
        raw[offset] = 1
        with pytest.raises(PconfigFault):
            make_platform().pconfig(bytes(raw))

    def test_keyid_ctrl_reserved_bits_31_24_fault(self, make_platform: MakePlatform) -> None:
        with pytest.raises(PconfigFault):
            make_platform().pconfig(bytes(struct_bytes(ctrl=1 << 24 | 1 << 8)))

    @pytest.mark.parametrize("command", list(KeyProgramCommand))
    @pytest.mark.parametrize("field_offset", [64, 128])
    def test_key_bytes_past_the_key_length_fault_for_every_command(
        self, make_platform: MakePlatform, command: KeyProgramCommand, field_offset: int
    ) -> None:
        platform = make_platform()
        raw = struct_bytes(ctrl=command | AES_XTS_128.bit << 8)
        raw[field_offset + 16] = 0xFF  # byte 16 of a 16-byte AES-XTS-128 key
        with pytest.raises(PconfigFault) as caught:
            platform.pconfig(bytes(raw))
        assert "\\xff" not in str(caught.value)
        assert "ff" not in caught.value.reason
        assert platform.key_state(1).mode == "unprogrammed"

    def test_aes_xts_256_allows_32_key_bytes_but_not_33(self, make_platform: MakePlatform) -> None:
        platform = make_platform()
        ctrl = DIRECT | AES_XTS_256.bit << 8
        assert (
            platform.pconfig(bytes(struct_bytes(ctrl=ctrl, f1=KEY * 2, f2=TWEAK * 2)))
            is S.PROG_SUCCESS
        )
        with pytest.raises(PconfigFault):
            platform.pconfig(bytes(struct_bytes(ctrl=ctrl, f1=KEY * 2 + b"\x01", f2=TWEAK * 2)))


class TestStatusCodes:
    def test_every_command_succeeds_and_sets_its_mode(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        platform = make_platform()
        expected: dict[KeyProgramCommand, KeyMode] = {
            DIRECT: "direct",
            RANDOM: "random",
            CLEAR: "cleared",
            NO_ENCRYPT: "no-encrypt",
        }
        for keyid, (command, mode) in enumerate(expected.items(), start=1):
            assert program(platform, keyid, command, key=KEY, tweak=TWEAK) is S.PROG_SUCCESS
            assert platform.key_state(keyid) == KeyState(keyid, mode, "aes-xts-128")

    @pytest.mark.parametrize("keyid", [0, 4, 63, 0xFFFF])
    def test_keyid_0_or_above_nr_keyids_is_invalid_keyid(
        self, make_platform: MakePlatform, program: Program, keyid: int
    ) -> None:
        platform = make_platform(max_keys=3)  # 6 KeyID bits, but only KeyIDs 1..3
        assert program(platform, keyid, DIRECT, key=KEY, tweak=TWEAK) is S.INVALID_KEYID

    @pytest.mark.parametrize("command", list(KeyProgramCommand))
    @pytest.mark.parametrize("field", [0, 0b101, 0b010, 1 << 15])
    def test_algorithm_field_without_exactly_one_known_bit_is_invalid_enc_alg(
        self, make_platform: MakePlatform, command: KeyProgramCommand, field: int
    ) -> None:
        raw = KeyProgram(1, command, field, KEY, TWEAK).encode()
        assert make_platform().pconfig(raw) is S.INVALID_ENC_ALG

    @pytest.mark.parametrize("command", list(KeyProgramCommand))
    def test_algorithm_not_activated_is_invalid_enc_alg_even_for_clear_and_no_encrypt(
        self, make_platform: MakePlatform, program: Program, command: KeyProgramCommand
    ) -> None:
        platform = make_platform(algorithms=("aes-xts-128",))
        assert program(platform, 1, command, AES_XTS_256, KEY * 2, TWEAK * 2) is S.INVALID_ENC_ALG

    @pytest.mark.parametrize("command", [4, 7, 255])
    def test_unknown_command_is_invalid_prog_cmd(
        self, make_platform: MakePlatform, command: int
    ) -> None:
        raw = KeyProgram(1, command, AES_XTS_128.bit, KEY, TWEAK).encode()
        assert make_platform().pconfig(raw) is S.INVALID_PROG_CMD

    def test_command_is_checked_before_keyid_and_keyid_before_algorithm(
        self, make_platform: MakePlatform
    ) -> None:
        """Intel's order (Source: Intel Architecture Instruction Set Extensions Programming Reference (May 2019), PCONFIG "Operation"): reserved bits and key-field tails #GP(0) first, then
        "Check for a valid command" (INVALID_PROG_CMD), then "Check that the KEYID
        being operated upon is a valid KEYID" (INVALID_KEYID), then "Check that only
        one algorithm is requested" (INVALID_ENC_ALG)."""
        platform = make_platform()
        assert platform.pconfig(KeyProgram(0, 9, 0).encode()) is S.INVALID_PROG_CMD
        assert platform.pconfig(KeyProgram(0, DIRECT, 0).encode()) is S.INVALID_KEYID
        assert platform.pconfig(KeyProgram(1, DIRECT, 0).encode()) is S.INVALID_ENC_ALG
        raw = struct_bytes(keyid=0, ctrl=9 | 0b11 << 8, f1=KEY + b"\x01" * 32)
        with pytest.raises(PconfigFault):  # a nonzero tail past byte 31 faults before any status
            platform.pconfig(bytes(raw))

    def test_random_key_equal_to_random_tweak_is_accepted(self) -> None:
        """The flow has no weak-key check (Source: Intel Architecture Instruction Set Extensions Programming Reference (May 2019), PCONFIG "Operation"): SET_KEY_RANDOM answers ENTROPY_ERROR
        only "if (NOT ENOUGH ENTROPY)", never for a data key equal to the tweak key."""
        bypass = TmeActivation(AES_XTS_128, True, 6, 63, ALGORITHMS)  # no TME key to draw
        table = KeyTable(bypass, seed=None, random_bytes=lambda n: b"\x5a" * n)
        assert table.pconfig(KeyProgram(1, RANDOM, AES_XTS_128.bit).encode()) is S.PROG_SUCCESS
        assert table.key_state(1).mode == "random"

    def test_random_keys_are_the_generators_bytes_xored_with_the_key_fields(self) -> None:
        """KEYID_SET_KEY_RANDOM: "TMP_RND_DATA_KEY = get random key", "DATA_KEY =
        TMP_RND_DATA_KEY XOR KEY_FIELD_1", and the tweak key alike from
        KEY_FIELD_2 (Source: Intel Architecture Instruction Set Extensions
        Programming Reference (May 2019), PCONFIG "Operation"): the same cipher
        as a direct key of those XORs, and neither half is the key field alone."""
        bypass = TmeActivation(AES_XTS_128, True, 6, 63, ALGORITHMS)  # no TME key to draw
        table = KeyTable(bypass, seed=None, random_bytes=lambda n: b"\x5a" * n)
        mixed = [bytes(b ^ 0x5A for b in field) for field in (KEY, TWEAK)]
        programs = [
            KeyProgram(1, RANDOM, AES_XTS_128.bit, KEY, TWEAK),
            KeyProgram(2, DIRECT, AES_XTS_128.bit, *mixed),
            KeyProgram(3, DIRECT, AES_XTS_128.bit, KEY, mixed[1]),
            KeyProgram(4, DIRECT, AES_XTS_128.bit, mixed[0], TWEAK),
        ]
        for program in programs:
            assert table.pconfig(program.encode()) is S.PROG_SUCCESS
        line = bytes(range(64))
        seen = [table.cipher(keyid).decrypt_line(line, 0x1000) for keyid in (1, 2, 3, 4)]
        assert seen[0] == seen[1]
        assert seen[0] not in (seen[2], seen[3])

    def test_direct_key_equal_to_tweak_is_accepted_and_encrypts(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        """KEYID_SET_KEY_DIRECT writes "DATA_KEY=KEY_FIELD_1, TWEAK_KEY=KEY_FIELD_2" with
        no comparison of the two (Source: Intel Architecture Instruction Set Extensions Programming Reference (May 2019), PCONFIG "Operation"): the hardware accepts a key equal to its tweak."""
        platform = make_platform()
        assert program(platform, 1, DIRECT, key=KEY, tweak=KEY) is S.PROG_SUCCESS
        assert platform.key_state(1).mode == "direct"
        platform.store(0x1000, b"A" * 64, 1)
        platform.wbinvd()
        assert platform.dram_read(0x1000, 64) != b"A" * 64
        assert platform.load(0x1000, 64, 1) == b"A" * 64


class TestFaultInjection:
    @pytest.mark.parametrize("status", [S.DEVICE_BUSY, S.ENTROPY_ERROR])
    def test_next_count_calls_answer_the_injected_status_and_change_nothing(
        self, make_platform: MakePlatform, program: Program, status: PconfigStatus
    ) -> None:
        platform = make_platform()
        assert program(platform, 1, NO_ENCRYPT) is S.PROG_SUCCESS
        platform.inject_pconfig_faults(status, 2)
        assert program(platform, 1, DIRECT, key=KEY, tweak=TWEAK) is status
        assert program(platform, 2, RANDOM) is status
        assert platform.key_state(1).mode == "no-encrypt"
        assert platform.key_state(2).mode == "unprogrammed"
        assert program(platform, 1, DIRECT, key=KEY, tweak=TWEAK) is S.PROG_SUCCESS

    def test_injected_answers_come_after_the_command_keyid_and_algorithm_checks(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        """DEVICE_BUSY is the key-table lock, taken after every check (Source: Intel Architecture Instruction Set Extensions Programming Reference (May 2019), PCONFIG "Operation")."""
        platform = make_platform()
        platform.inject_pconfig_faults(S.DEVICE_BUSY, 1)
        assert platform.pconfig(KeyProgram(0, 9, 0).encode()) is S.INVALID_PROG_CMD
        assert program(platform, 1, NO_ENCRYPT) is S.DEVICE_BUSY

    def test_a_malformed_struct_still_faults_and_does_not_use_up_an_injection(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        platform = make_platform()
        platform.inject_pconfig_faults(S.DEVICE_BUSY, 1)
        with pytest.raises(PconfigFault):
            platform.pconfig(bytes(191))
        assert program(platform, 1, NO_ENCRYPT) is S.DEVICE_BUSY
        assert program(platform, 1, NO_ENCRYPT) is S.PROG_SUCCESS

    @pytest.mark.parametrize(
        ("status", "count"), [(S.PROG_SUCCESS, 1), (S.INVALID_KEYID, 1), (S.DEVICE_BUSY, -1)]
    )
    def test_only_busy_or_entropy_error_a_nonnegative_number_of_times_can_be_injected(
        self, make_platform: MakePlatform, status: PconfigStatus, count: int
    ) -> None:
        with pytest.raises(SandboxError) as caught:
            make_platform().inject_pconfig_faults(status, count)
        assert caught.value.errno == errno.EINVAL


class TestKeyState:
    def test_never_programmed_keyid_has_no_algorithm_and_is_not_programmed(
        self, make_platform: MakePlatform
    ) -> None:
        state = make_platform().key_state(5)
        assert state == KeyState(5, "unprogrammed", None)
        assert not state.programmed

    def test_cleared_keyid_is_not_programmed_but_direct_random_and_no_encrypt_are(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        platform = make_platform()
        for keyid, command in enumerate([DIRECT, RANDOM, NO_ENCRYPT, CLEAR], start=1):
            program(platform, keyid, command, key=KEY, tweak=TWEAK)
        assert [platform.key_state(k).programmed for k in (1, 2, 3, 4)] == [True] * 3 + [False]

    def test_keyid_0_reports_the_tme_key_or_bypass(self, make_platform: MakePlatform) -> None:
        assert make_platform().key_state(0) == KeyState(0, "tme", "aes-xts-128")
        only_256 = make_platform(algorithms=("aes-xts-256",))
        assert only_256.key_state(0) == KeyState(0, "tme", "aes-xts-256")
        assert make_platform(tme_bypass=True).key_state(0) == KeyState(0, "tme-bypass", None)

    @pytest.mark.parametrize("keyid", [-1, 64])
    def test_key_state_of_a_keyid_that_does_not_exist_is_einval(
        self, make_platform: MakePlatform, keyid: int
    ) -> None:
        with pytest.raises(SandboxError) as caught:
            make_platform().key_state(keyid)
        assert caught.value.errno == errno.EINVAL

    def test_keyids_are_unusable_when_mktme_is_off(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        platform = make_platform(keyid_bits=0)
        assert program(platform, 1, DIRECT, key=KEY, tweak=TWEAK) is S.INVALID_KEYID
        assert program(platform, 1, NO_ENCRYPT) is S.INVALID_KEYID
