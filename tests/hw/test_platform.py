"""The platform as the kernel sees it: layout, CPU and DRAM views, keys, no leaks."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest

from hw_helpers import KnownKey, MakePlatform, Program
from mktme_sandbox.config import KiB, MiB
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.keytable import KeyProgram, KeyProgramCommand, PconfigStatus
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128

DIRECT = KeyProgramCommand.SET_KEY_DIRECT
RANDOM = KeyProgramCommand.SET_KEY_RANDOM
PA = 0x20000
TEXT = b"the same plaintext, line after line, at every address. 64 bytes!"  # one line


def write_through(platform: Platform, pa: int, data: bytes, keyid: int) -> None:
    """Store, then flush: the data is in DRAM whether or not there is a cache."""
    platform.store(pa, data, keyid)
    platform.flush_range(pa, len(data), keyid)


class TestLayout:
    def test_default_layout_puts_six_keyid_bits_below_maxphyaddr_46(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform()
        assert (platform.keyid_bits, platform.keyid_shift, platform.nr_keyids) == (6, 40, 63)
        assert platform.keyid_mask == 0x3F << 40 == 0x0000_3F00_0000_0000
        assert platform.phys_mem == 16 * MiB

    def test_max_keys_limits_nr_keyids_below_what_the_bits_allow(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform(keyid_bits=4, max_keys=3, maxphyaddr=39)
        assert (platform.keyid_shift, platform.keyid_mask, platform.nr_keyids) == (35, 0xF << 35, 3)

    def test_mktme_off_has_no_keyid_bits_and_only_keyid_0(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform(keyid_bits=0)
        assert (platform.keyid_shift, platform.keyid_mask, platform.nr_keyids) == (46, 0, 0)
        with pytest.raises(SandboxError):
            platform.load(0, 8, 1)


class TestArgumentChecks:
    @pytest.mark.parametrize("keyid", [-1, 64, 1000])
    def test_keyid_outside_0_to_nr_keyids_is_einval(
        self, make_platform: MakePlatform, keyid: int
    ) -> None:
        platform = make_platform()
        for call in (
            lambda: platform.load(0, 8, keyid),
            lambda: platform.store(0, b"x", keyid),
            lambda: platform.fill(0, 64, 0, keyid),
            lambda: platform.clflush(0, keyid),
            lambda: platform.flush_range(0, 64, keyid),
        ):
            with pytest.raises(SandboxError) as caught:
                call()
            assert caught.value.errno == errno.EINVAL

    @pytest.mark.parametrize(("pa", "length"), [(16 * MiB - 4, 8), (16 * MiB, 1), (-8, 8)])
    def test_range_outside_physical_memory_is_einval(
        self, make_platform: MakePlatform, pa: int, length: int
    ) -> None:
        platform = make_platform()
        for call in (
            lambda: platform.load(pa, length),
            lambda: platform.store(pa, bytes(length)),
            lambda: platform.fill(pa, length, 0),
            lambda: platform.flush_range(pa, length, 0),
            lambda: platform.dram_read(pa, length),
            lambda: platform.dram_write(pa, bytes(length)),
        ):
            with pytest.raises(SandboxError) as caught:
                call()
            assert caught.value.errno == errno.EINVAL

    def test_fill_byte_must_be_a_byte(self, make_platform: MakePlatform) -> None:
        with pytest.raises(SandboxError):
            make_platform().fill(0, 64, 256)

    def test_empty_accesses_do_nothing(self, make_platform: MakePlatform) -> None:
        platform = make_platform()
        assert platform.load(16 * MiB, 0) == b""
        platform.store(16 * MiB, b"")
        assert platform.flush_range(0, 0, 0) == 0
        platform.fill(16 * MiB, 0, 0xFF, 63)
        assert platform.cache.stats.misses == 0

    @pytest.mark.parametrize("keyid", [0, 63])
    def test_the_last_bytes_of_dram_and_the_last_keyid_are_reachable(
        self, make_platform: MakePlatform, program: Program, keyid: int
    ) -> None:
        platform = make_platform()
        if keyid:
            assert program(platform, keyid, RANDOM) is PconfigStatus.PROG_SUCCESS
        end = 16 * MiB
        platform.store(end - 8, b"the end!", keyid)
        assert platform.load(end - 8, 8, keyid) == b"the end!"
        platform.fill(end - 3, 3, 0x21, keyid)
        assert platform.load(end - 8, 8, keyid) == b"the e!!!"


@pytest.mark.parametrize("cache_size", [2 * MiB, 0], ids=["cache", "no-cache"])
@pytest.mark.parametrize("keyid", [0, 1], ids=["keyid0", "keyidN"])
class TestCpuAndDramViews:
    """Every check here holds for KeyID 0 (TME key) and N, with and without the cache."""

    def test_any_length_at_any_alignment_reads_back(
        self, known_platform: MakePlatform, cache_size: int, keyid: int
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        data = bytes(range(256)) * 40
        platform.store(PA + 13, data, keyid)
        platform.fill(PA + 5000, 300, 0x5A, keyid)
        assert platform.load(PA + 13, 4987, keyid) == data[:4987]
        assert platform.load(PA + 5000, 300, keyid) == b"\x5a" * 300
        assert platform.load(PA + 5300, 100, keyid) == data[5287:5387]

    def test_dram_holds_ciphertext_that_decrypts_back_through_the_cpu(
        self,
        known_platform: MakePlatform,
        known_keys: tuple[KnownKey, KnownKey],
        cache_size: int,
        keyid: int,
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        write_through(platform, PA, TEXT * 4, keyid)
        stored = platform.dram_read(PA, 256)
        assert TEXT not in stored
        if keyid:
            assert stored == known_keys[0].engine.encrypt(TEXT * 4, PA)
        assert platform.load(PA, 256, keyid) == TEXT * 4

    def test_same_plaintext_at_two_addresses_gives_two_ciphertexts(
        self, known_platform: MakePlatform, cache_size: int, keyid: int
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        write_through(platform, PA, TEXT * 2, keyid)
        assert platform.dram_read(PA, 64) != platform.dram_read(PA + 64, 64)

    def test_ciphertext_moved_to_another_address_decrypts_to_garbage(
        self,
        known_platform: MakePlatform,
        known_keys: tuple[KnownKey, KnownKey],
        cache_size: int,
        keyid: int,
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        write_through(platform, PA, TEXT, keyid)
        platform.dram_write(PA + 4096, platform.dram_read(PA, 64))
        moved = platform.load(PA + 4096, 64, keyid)
        assert moved != TEXT
        if keyid:
            assert moved == known_keys[0].engine.decrypt(platform.dram_read(PA, 64), PA + 4096)

    def test_replayed_old_ciphertext_decrypts_to_the_old_plaintext(
        self, known_platform: MakePlatform, cache_size: int, keyid: int
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        write_through(platform, PA, TEXT, keyid)
        old = platform.dram_read(PA, 64)
        write_through(platform, PA, b"new" * 21 + b"!", keyid)
        platform.dram_write(PA, old)
        assert platform.load(PA, 64, keyid) == TEXT  # no integrity: nothing notices

    @pytest.mark.parametrize("bit", [0, 131, 511])
    def test_one_flipped_dram_bit_garbles_exactly_its_16_byte_block(
        self, known_platform: MakePlatform, cache_size: int, keyid: int, bit: int
    ) -> None:
        platform = known_platform(cache_size=cache_size)
        write_through(platform, PA, TEXT * 2, keyid)
        line = bytearray(platform.dram_read(PA, 64))
        line[bit // 8] ^= 1 << bit % 8
        platform.dram_write(PA, bytes(line))
        seen = platform.load(PA, 128, keyid)
        blocks = [seen[i : i + 16] != (TEXT * 2)[i : i + 16] for i in range(0, 128, 16)]
        assert blocks == [i == bit // 128 for i in range(8)]
        garbled = seen[bit // 128 * 16 :][:16]
        assert sum(a != b for a, b in zip(garbled, TEXT[bit // 128 * 16 :], strict=False)) > 4


class TestPlaintextModes:
    def test_tme_bypass_leaves_keyid0_plaintext_in_dram(self, make_platform: MakePlatform) -> None:
        platform = make_platform(tme_bypass=True)
        write_through(platform, PA, TEXT, 0)
        assert platform.dram_read(PA, 64) == TEXT

    def test_no_encrypt_keyid_leaves_plaintext_in_dram(
        self, make_platform: MakePlatform, program: Program
    ) -> None:
        platform = make_platform()
        assert program(platform, 3, KeyProgramCommand.NO_ENCRYPT) is PconfigStatus.PROG_SUCCESS
        write_through(platform, PA, TEXT, 3)
        assert platform.dram_read(PA, 64) == TEXT
        write_through(platform, PA + 64, TEXT, 0)
        assert platform.dram_read(PA + 64, 64) != TEXT  # KeyID 0 is still encrypted

    def test_cleared_keyid_falls_back_to_the_tme_key(
        self, known_platform: MakePlatform, program: Program, known_keys: tuple[KnownKey, KnownKey]
    ) -> None:
        platform = known_platform()
        assert program(platform, 1, KeyProgramCommand.CLEAR_KEY) is PconfigStatus.PROG_SUCCESS
        write_through(platform, PA, TEXT, 1)
        assert platform.dram_read(PA, 64) != known_keys[0].engine.encrypt(TEXT, PA)
        assert platform.load(PA, 64, 0) == TEXT  # KeyID 0 reads it: the same key

    def test_cleared_keyid_under_tme_bypass_is_plaintext(
        self, known_platform: MakePlatform, program: Program
    ) -> None:
        platform = known_platform(tme_bypass=True)
        program(platform, 1, KeyProgramCommand.CLEAR_KEY)
        write_through(platform, PA, TEXT, 1)
        assert platform.dram_read(PA, 64) == TEXT

    def test_never_programmed_keyid_uses_the_tme_key_at_the_hardware_level(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform()
        write_through(platform, PA, TEXT, 5)
        assert platform.dram_read(PA, 64) != TEXT
        assert platform.load(PA, 64, 0) == TEXT


class TestSeeds:
    @staticmethod
    def dram_after_workload(platform: Platform, entropy: bytes = b"") -> bytes:
        raw = KeyProgram(1, RANDOM, AES_XTS_128.bit, entropy, entropy).encode()
        assert platform.pconfig(raw) is PconfigStatus.PROG_SUCCESS
        platform.store(PA, TEXT * 64, 0)
        platform.store(PA + 4 * KiB, TEXT * 64, 1)
        platform.wbinvd()
        return platform.dram_read(PA, 8 * KiB)

    def test_same_seed_gives_the_same_dram_bytes(self, make_platform: MakePlatform) -> None:
        first = self.dram_after_workload(make_platform(seed=7))
        assert first == self.dram_after_workload(make_platform(seed=7))

    def test_another_seed_or_other_entropy_gives_other_bytes(
        self, make_platform: MakePlatform
    ) -> None:
        base = self.dram_after_workload(make_platform(seed=7))
        other_seed = self.dram_after_workload(make_platform(seed=8))
        other_entropy = self.dram_after_workload(make_platform(seed=7), entropy=b"\x01")
        assert base[:4096] != other_seed[:4096]
        assert base[4096:] != other_seed[4096:]
        assert base[:4096] == other_entropy[:4096]  # the TME key comes first and is the same
        assert base[4096:] != other_entropy[4096:]

    def test_unseeded_machines_get_fresh_keys(self, make_platform: MakePlatform) -> None:
        first = self.dram_after_workload(make_platform(seed=None))
        assert first != self.dram_after_workload(make_platform(seed=None))


def test_no_key_byte_appears_in_any_repr_str_or_exception(
    known_platform: MakePlatform, program: Program, known_keys: tuple[KnownKey, KnownKey]
) -> None:
    platform = known_platform()
    key_1, key_2 = known_keys
    texts = [repr(platform), str(platform), platform.tme_text(), platform.cache.stats.text()]
    texts += [repr(platform.cache), repr(platform.cache.stats)]
    texts += [repr(platform.key_state(k)) for k in range(platform.nr_keyids + 1)]
    texts += [repr(KeyProgram(1, DIRECT, AES_XTS_128.bit, key_1.key, key_1.tweak))]
    texts += [repr(value) for value in vars(platform).values()]
    texts += [repr(value) for value in vars(platform._keys).values()]  # the table's insides
    texts += [repr(entry) for entry in platform._keys._entries.values()]
    failing: list[Callable[[], object]] = [
        lambda: program(platform, 2, DIRECT, key=key_1.key * 5, tweak=key_1.tweak),
        lambda: program(platform, 2, DIRECT, key=key_1.key + b"\x01", tweak=key_1.tweak),
        lambda: platform.pconfig(bytes(KeyProgram(2, DIRECT, 1, key_1.key).encode()[:191])),
    ]
    for call in failing:
        with pytest.raises(SandboxError) as caught:
            call()
        texts += [str(caught.value), repr(caught.value), caught.value.reason]
    for text in texts:
        blob = text.encode("latin-1", "backslashreplace")
        for secret in key_1.secrets() + key_2.secrets():
            assert secret not in blob, f"key material in {text!r}"


def test_keyid_0_is_plaintext_in_the_tme_exclusion_range_and_keyid_n_is_not(
    make_platform: MakePlatform, program: Program
) -> None:
    """Intel MKTME spec, Tables 4-5/4-6: the exclusion range is excluded from
    TME/TME-MK encryption "for KeyID=0 only"; other KeyIDs are encrypted there."""
    platform = make_platform(tme_exclude_base=1 << 20, tme_exclude_size=1 << 20)
    assert program(platform, 1, KeyProgramCommand.SET_KEY_RANDOM) is PconfigStatus.PROG_SUCCESS
    secret = b"S" * 64
    inside, outside, other = 1 << 20, 3 << 20, (1 << 20) + 4096
    platform.store(inside, secret, 0)
    platform.store(outside, secret, 0)
    platform.store(other, secret, 1)
    edge = (2 << 20) - 64  # the last line of the range, then the first after it
    platform.store(edge, secret + secret, 0)
    platform.wbinvd()
    assert platform.dram_read(inside, 64) == secret
    assert platform.dram_read(outside, 64) != secret
    assert platform.dram_read(other, 64) != secret
    assert platform.load(inside, 64, 0) == platform.load(outside, 64, 0) == secret
    assert platform.load(other, 64, 1) == secret
    assert platform.dram_read(edge, 64) == secret
    assert platform.dram_read(edge + 64, 64) != secret
    assert platform.load(edge, 128, 0) == secret + secret
