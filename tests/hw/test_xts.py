"""The engine against cryptography's XTS mode, line by line (STYLE habit 8)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.xts import (
    AES_XTS_128,
    AES_XTS_256,
    PLAINTEXT,
    TweakCache,
    XtsKey,
    algorithm_named,
)

LINE = 64
# Line addresses up to 2**52 (MAXPHYADDR's limit): the tweak's upper bytes get exercised.
line_addresses = st.integers(0, (1 << 52) // LINE - 64).map(lambda n: n * LINE)
whole_lines = st.integers(1, 9).flatmap(lambda n: st.binary(min_size=n * LINE, max_size=n * LINE))


def reference_encrypt(data_key: bytes, tweak_key: bytes, data: bytes, pa: int) -> bytes:
    """cryptography's XTS, one 64-byte data unit per line, tweak = line address (LE)."""
    out = []
    for offset in range(0, len(data), LINE):
        tweak = (pa + offset).to_bytes(16, "little")
        encryptor = Cipher(algorithms.AES(data_key + tweak_key), modes.XTS(tweak)).encryptor()
        out.append(encryptor.update(data[offset : offset + LINE]) + encryptor.finalize())
    return b"".join(out)


@st.composite
def key_pairs(draw: st.DrawFn) -> tuple[bytes, bytes]:
    size = draw(st.sampled_from([16, 32]))
    data_key = draw(st.binary(min_size=size, max_size=size))
    tweak_key = draw(st.binary(min_size=size, max_size=size).filter(lambda t: t != data_key))
    return data_key, tweak_key


@settings(max_examples=200, deadline=None)
@given(keys=key_pairs(), pa=line_addresses, data=whole_lines)
def test_engine_matches_cryptography_xts_line_by_line(
    keys: tuple[bytes, bytes], pa: int, data: bytes
) -> None:
    engine = XtsKey(*keys)
    expected = reference_encrypt(*keys, data, pa)
    assert engine.encrypt(data, pa) == expected
    assert engine.decrypt(expected, pa) == data


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize("lines", [1, 2, 3, 64, 1024, 2500])  # 2500: batches of 1024 + rest
def test_engine_matches_cryptography_for_both_key_sizes_and_batch_shapes(
    size: int, lines: int
) -> None:
    rng = np.random.default_rng(size * 1000 + lines)
    data_key, tweak_key = rng.bytes(size), rng.bytes(size)
    data = rng.bytes(lines * LINE)
    pa = int(rng.integers(0, 1 << 30)) * LINE
    assert XtsKey(data_key, tweak_key).encrypt(data, pa) == reference_encrypt(
        data_key, tweak_key, data, pa
    )


def test_scattered_lines_use_each_line_own_address_as_tweak() -> None:
    data_key, tweak_key = bytes(range(16)), bytes(range(16, 32))
    engine = XtsKey(data_key, tweak_key)
    addresses = np.array([0x40, 0x7FC0, 0x1000, 0x40], dtype=np.uint64)
    lines = np.frombuffer(bytes(range(256)), dtype=np.uint8).reshape(4, LINE)
    crypted = engine.encrypt_lines(lines, addresses)
    for row, pa in enumerate(addresses.tolist()):
        expected = reference_encrypt(data_key, tweak_key, lines[row].tobytes(), pa)
        assert crypted[row].tobytes() == expected
    assert (engine.decrypt_lines(crypted, addresses) == lines).all()


def test_key_equal_to_tweak_is_accepted_as_pconfig_accepts_it() -> None:
    """PCONFIG's KEYID_SET_KEY_DIRECT writes DATA_KEY and TWEAK_KEY with no weak-key
    check (Intel ISE Programming Reference, May 2019, PCONFIG "Operation"), so the
    engine takes equal keys. ``cryptography`` refuses them ("duplicated keys"), so
    the first block is checked against IEEE 1619 by hand: C = E_K1(P ^ T) ^ T with
    T = E_K2(tweak)."""
    key = bytes(range(16))
    engine = XtsKey(key, key)
    plain = bytes(range(64))
    crypted = engine.encrypt(plain, 0x1000)
    ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    t = ecb.update((0x1000).to_bytes(16, "little"))
    first = bytes(a ^ b for a, b in zip(plain[:16], t, strict=True))
    expected = bytes(a ^ b for a, b in zip(ecb.update(first), t, strict=True))
    assert crypted[:16] == expected
    assert engine.decrypt(crypted, 0x1000) == plain


@pytest.mark.parametrize("sizes", [(16, 32), (24, 24), (0, 0), (64, 64)])
def test_key_sizes_other_than_16_or_32_bytes_each_are_rejected(sizes: tuple[int, int]) -> None:
    with pytest.raises(SandboxError) as caught:
        XtsKey(b"\x01" * sizes[0], b"\x02" * sizes[1])
    assert caught.value.errno == errno.EINVAL


def test_key_size_selects_the_algorithm() -> None:
    assert XtsKey(b"\x01" * 16, b"\x02" * 16).algorithm is AES_XTS_128
    assert XtsKey(b"\x01" * 32, b"\x02" * 32).algorithm is AES_XTS_256


def test_engine_repr_and_str_name_the_algorithm_and_no_key_bytes() -> None:
    data_key, tweak_key = bytes.fromhex("11" * 16), bytes.fromhex("22" * 16)
    engine = XtsKey(data_key, tweak_key)
    for text in (repr(engine), str(engine)):
        assert "aes-xts-128" in text
        for secret in (data_key, tweak_key):
            assert secret.hex() not in text.lower()
            assert secret.decode("latin-1") not in text
    assert not hasattr(engine, "__dict__")  # nothing but the slots: no stray key copy


def test_unaligned_convenience_calls_are_rejected() -> None:
    engine = XtsKey(b"\x01" * 16, b"\x02" * 16)
    with pytest.raises(SandboxError):
        engine.encrypt(bytes(LINE), 8)
    with pytest.raises(SandboxError):
        engine.encrypt(bytes(LINE + 1), 0)


def test_plaintext_cipher_is_the_identity() -> None:
    lines = np.arange(128, dtype=np.uint8).reshape(2, LINE)
    addresses = np.array([0, LINE], dtype=np.uint64)
    assert (PLAINTEXT.encrypt_lines(lines, addresses) == lines).all()
    assert (PLAINTEXT.decrypt_lines(lines, addresses) == lines).all()


def test_algorithm_numbers_match_intel_numbering() -> None:
    assert (AES_XTS_128.code, AES_XTS_128.bit, AES_XTS_128.key_bytes) == (0, 0b001, 16)
    assert (AES_XTS_256.code, AES_XTS_256.bit, AES_XTS_256.key_bytes) == (2, 0b100, 32)
    assert algorithm_named("aes-xts-256") is AES_XTS_256
    with pytest.raises(SandboxError):
        algorithm_named("aes-gcm")


PAGE = 4096
page_numbers = st.integers(0, (1 << 52) // PAGE - 1)


@settings(max_examples=100, deadline=None)
@given(
    keys=key_pairs(),
    page=page_numbers,
    rows=st.lists(st.integers(0, PAGE // LINE - 1), min_size=2, max_size=80),
)
def test_lines_of_one_page_in_any_order_match_cryptography_from_the_tweak_table(
    keys: tuple[bytes, bytes], page: int, rows: list[int]
) -> None:
    """Any lines of one page (any order, repeats) take their tweaks from the page's table."""
    engine = XtsKey(*keys)
    addresses = np.array([page * PAGE + row * LINE for row in rows], dtype=np.uint64)
    lines = np.random.default_rng(len(rows)).integers(0, 256, (len(rows), LINE), dtype=np.uint8)
    for _ in range(3):  # computed directly, then the table is made, then only read
        crypted = engine.encrypt_lines(lines, addresses)
        for row, pa in enumerate(addresses.tolist()):
            expected = reference_encrypt(*keys, lines[row].tobytes(), pa)
            assert crypted[row].tobytes() == expected
        assert (engine.decrypt_lines(crypted, addresses) == lines).all()


@pytest.mark.parametrize(
    "addresses",
    [
        [PAGE - LINE, PAGE],  # the last line of a page and the first of the next
        [PAGE, PAGE - LINE],  # the same, the higher page first: the lower one wraps
        [3 * PAGE + 128, 3 * PAGE + 64, 9 * PAGE],
        [PAGE, 7 * PAGE, PAGE + LINE],  # first and last in one page, not the middle
        [5 * PAGE + LINE, 4 * PAGE, 5 * PAGE],  # the same, the middle one page lower
    ],
)
def test_lines_of_several_pages_are_not_taken_from_one_page_table(addresses: list[int]) -> None:
    data_key, tweak_key = bytes(range(16)), bytes(range(16, 32))
    engine = XtsKey(data_key, tweak_key)
    lines = np.arange(len(addresses) * LINE, dtype=np.uint8).reshape(-1, LINE)
    for _ in range(3):  # as often as it takes one page to get a table
        crypted = engine.encrypt_lines(lines, np.array(addresses, dtype=np.uint64))
        for row, pa in enumerate(addresses):
            assert crypted[row].tobytes() == reference_encrypt(
                data_key, tweak_key, lines[row].tobytes(), pa
            )


def test_tweak_tables_are_made_on_a_second_sight_kept_within_their_cap_and_stay_right() -> None:
    data_key, tweak_key = bytes(range(16)), bytes(range(16, 32))
    tables = TweakCache(2 * PAGE)
    engine = XtsKey(data_key, tweak_key, tables)
    data = bytes(range(256))  # four lines
    engine.encrypt(data, 5 * PAGE)
    assert not tables._slot_of  # seen once: no table
    for page in (5, 6, 7, 8, 5, 6, 9, 7, 5, 5, 8, 6):
        assert engine.encrypt(data, page * PAGE) == reference_encrypt(
            data_key, tweak_key, data, page * PAGE
        )
        assert len(tables._slot_of) <= 2
        assert len(tables._seen) <= 4 * 2
    assert tables._slot_of  # some pages were seen again in time


def test_a_tweak_cache_of_0_bytes_keeps_no_tables() -> None:
    tables = TweakCache(0)
    engine = XtsKey(bytes(16), bytes(range(16)), tables)
    for _ in range(3):
        engine.encrypt(bytes(PAGE), 0)
    assert tables.slots == 0
    assert not tables._slot_of


def lines_at(rng: np.random.Generator, count: int) -> np.ndarray:
    """Line addresses: a run, lines in a few pages, or lines anywhere below 2**52."""
    shape = rng.integers(4)
    if shape == 0:
        base = int(rng.integers(0, 1 << 24)) * LINE
        return base + LINE * np.arange(count, dtype=np.uint64)
    if shape == 1:
        base = int(rng.integers(0, 1 << 20)) * PAGE
        return (base + LINE * rng.integers(0, 64 * 6, count)).astype(np.uint64)
    if shape == 2:  # a run, shuffled
        base = int(rng.integers(0, 1 << 24)) * LINE
        return base + LINE * rng.permutation(count).astype(np.uint64)
    return (LINE * rng.integers(0, (1 << 52) // LINE, count)).astype(np.uint64)


def test_the_engine_with_tweak_tables_equals_it_without_and_cryptographys_xts() -> None:
    """Random keys, cache sizes (from one page, so the ring wraps), addresses and
    lengths (up to three 1024-line batches); every batch three times, so that
    tables are seen, made and used; two keys share each cache."""
    rng = np.random.default_rng(16)
    for _ in range(60):
        size = int(rng.choice([16, 32]))
        tables = TweakCache(int(rng.choice([1, 3, 40, 4096])) * PAGE)
        pairs = [(rng.bytes(size), rng.bytes(size)) for _ in range(2)]
        cached = [XtsKey(data_key, tweak_key, tables) for data_key, tweak_key in pairs]
        plain = [XtsKey(data_key, tweak_key) for data_key, tweak_key in pairs]
        for _ in range(3):
            count = int(rng.integers(1, 3 * 1024 + 100))
            line_pas = lines_at(rng, count)
            lines = rng.integers(0, 256, (count, LINE), dtype=np.uint8)
            for _ in range(3):
                for engine, expected in zip(cached, plain, strict=True):
                    crypted = engine.encrypt_lines(lines, line_pas)
                    assert (crypted == expected.encrypt_lines(lines, line_pas)).all()
                    assert (engine.decrypt_lines(crypted, line_pas) == lines).all()
        data_key, tweak_key = pairs[1]
        some = rng.integers(count, size=min(count, 8))
        for i in some:
            line = lines[i].tobytes()
            wanted = reference_encrypt(data_key, tweak_key, line, int(line_pas[i]))
            assert crypted[i].tobytes() == wanted


def test_a_run_over_pages_whose_tables_were_made_out_of_order_uses_each_pages_own() -> None:
    """Tables made page by page in a shuffled order sit in slots whose ends may
    look consecutive (``[5, 7, 6, 8]``) while the middle is not."""
    rng = np.random.default_rng(7)
    data_key, tweak_key = rng.bytes(16), rng.bytes(16)
    for _ in range(20):
        engine = XtsKey(data_key, tweak_key, TweakCache(64 * PAGE))
        pages = [int(page) for page in rng.permutation(6) + 100]
        for page in pages:
            for _ in range(2):  # seen, then made
                engine.encrypt(bytes(PAGE), page * PAGE)
        data = rng.bytes(6 * PAGE)
        wanted = reference_encrypt(data_key, tweak_key, data, 100 * PAGE)
        assert engine.encrypt(data, 100 * PAGE) == wanted


def test_runs_decrypt_into_the_callers_buffer_with_and_without_tables() -> None:
    rng = np.random.default_rng(61)
    for _ in range(40):
        data_key, tweak_key = rng.bytes(16), rng.bytes(16)
        tables = TweakCache(int(rng.choice([1, 4096])) * PAGE)
        engine, plain = XtsKey(data_key, tweak_key, tables), XtsKey(data_key, tweak_key)
        count, pa = int(rng.integers(1, 2200)), int(rng.integers(0, 1 << 30)) * LINE
        data = rng.bytes(count * LINE)
        wanted = reference_encrypt(data_key, tweak_key, data, pa)
        for _ in range(3):
            crypted = engine.encrypt(data, pa)
            assert crypted == wanted == plain.encrypt(data, pa)
            out = np.empty((count, LINE), dtype=np.uint8)
            engine.decrypt_run(np.frombuffer(crypted, dtype=np.uint8).reshape(-1, LINE), pa, out)
            assert out.tobytes() == data
