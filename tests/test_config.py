"""MachineConfig: defaults from docs/spec.md section 2, every option checked with a message."""

from __future__ import annotations

from typing import Any

import pytest

from mktme_sandbox.config import GiB, MachineConfig, MiB, parse_size


def test_defaults_are_the_specs() -> None:
    c = MachineConfig()
    assert (c.phys_mem, c.maxphyaddr, c.keyid_bits, c.max_keys) == (256 * MiB, 46, 6, 63)
    assert c.nr_keyids == 63
    assert c.cache_size == 2 * MiB
    assert not c.tme_bypass


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("0x1000", 4096),
        ("64K", 64 << 10),
        ("256M", 256 * MiB),
        ("2g", 2 * GiB),
        ("16MiB", 16 * MiB),
    ],
)
def test_sizes_parse_as_a_user_types_them(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_a_decimal_with_leading_zeros_is_still_decimal() -> None:
    assert parse_size("010") == 10


@pytest.mark.parametrize(
    "text", ["", "ten", "4X", "-1", "1.5M", "1_000", "0x1_000", "\u0664K", "\uff14M", "\u00b2M"]
)
def test_bad_sizes_say_what_a_size_looks_like(text: str) -> None:
    with pytest.raises(ValueError, match="is not a size"):
        parse_size(text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keyid_bits": 99}, "keyid_bits must be 0..15"),
        ({"keyid_bits": -1}, "keyid_bits must be 0..15"),
        ({"maxphyaddr": 60}, "maxphyaddr must be 32..52"),
        ({"max_keys": 2}, "max_keys must be 3..32767"),
        ({"phys_mem": 3 * MiB}, "phys_mem must be a multiple of 2M"),
        ({"phys_mem": 128 * GiB}, "phys_mem must be a multiple of 2M between 4M and 64G"),
        ({"maxphyaddr": 36, "keyid_bits": 6, "phys_mem": 2 * GiB}, "does not fit below the KeyID"),
        ({"algorithms": ("aes-xts-512",)}, "algorithms must be a non-empty subset"),
        ({"algorithms": ()}, "algorithms must be a non-empty subset"),
        ({"cache_size": 1000}, "cache_size must be 0"),
        ({"tweak_cache": 1000}, "tweak_cache must be 0"),
        ({"tweak_cache": 2 * GiB}, "tweak_cache must be 0 .* up to 1G"),
        ({"seed": -5}, "seed must be >= 0"),
    ],
)
def test_each_bad_option_is_named_in_the_error(options: dict[str, Any], message: str) -> None:
    # Any: each row gives one field a value of that field's type, so no one type fits all rows.
    with pytest.raises(ValueError, match=message):
        MachineConfig(**options)


def test_max_keys_and_keyid_bits_both_cap_the_keyids() -> None:
    assert MachineConfig(max_keys=5).nr_keyids == 5
    assert MachineConfig(keyid_bits=2).nr_keyids == 3
    assert MachineConfig(keyid_bits=0).nr_keyids == 0


def test_options_as_typed_become_a_config() -> None:
    c = MachineConfig.from_options(phys_mem="64M", algorithms="aes-xts-128, aes-xts-256", seed=3)
    assert c.phys_mem == 64 * MiB
    assert c.algorithms == ("aes-xts-128", "aes-xts-256")
    assert MachineConfig.from_options(c, keyid_bits=3).phys_mem == 64 * MiB


def test_an_unknown_option_names_the_known_ones() -> None:
    with pytest.raises(TypeError, match="unknown option colour .*phys_mem"):
        MachineConfig.from_options(colour="red")


def test_a_bad_size_is_shown_as_a_user_would_type_it() -> None:
    with pytest.raises(ValueError, match="not 3M$"):
        MachineConfig(phys_mem=3 * MiB)
    with pytest.raises(ValueError, match="not 100K$"):
        MachineConfig(cache_size=100 * 1024)
