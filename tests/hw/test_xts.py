"""The engine against cryptography's XTS mode, line by line (STYLE habit 8)."""

from __future__ import annotations

import errno

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st

from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.xts import AES_XTS_128, AES_XTS_256, PLAINTEXT, XtsKey, algorithm_named

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


def test_tweak_tables_are_made_on_a_second_sight_kept_for_recent_pages_and_stay_right(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("mktme_sandbox.hw.xts._TWEAK_PAGES", 2)
    monkeypatch.setattr("mktme_sandbox.hw.xts._SEEN_PAGES", 3)
    data_key, tweak_key = bytes(range(16)), bytes(range(16, 32))
    engine = XtsKey(data_key, tweak_key)
    data = bytes(range(256))  # four lines
    engine.encrypt(data, 5 * PAGE)
    assert not engine._page_tweaks  # seen once: no table
    for page in (5, 6, 7, 8, 5, 6, 9, 7, 5, 5, 8, 6):
        assert engine.encrypt(data, page * PAGE) == reference_encrypt(
            data_key, tweak_key, data, page * PAGE
        )
        assert len(engine._page_tweaks) <= 2
        assert len(engine._pages_seen) <= 3
    assert engine._page_tweaks  # some pages were seen again in time
