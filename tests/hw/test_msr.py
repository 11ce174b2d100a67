"""The TME MSRs: boot values field by field, decoders, faults."""

from __future__ import annotations

import errno
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mktme_sandbox.config import MachineConfig
from mktme_sandbox.errors import SandboxError
from mktme_sandbox.hw.msr import (
    FIELDS,
    FieldValue,
    Msr,
    MsrFault,
    TmeActivation,
    TmeMsrs,
    boot_values,
    decode,
    encode,
)
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import AES_XTS_128, AES_XTS_256

MakePlatform = Callable[..., Platform]
CAP, ACT = Msr.IA32_TME_CAPABILITY, Msr.IA32_TME_ACTIVATE


def bits(value: int, high: int, low: int) -> int:
    """What Linux's TME_ACTIVATE_*() macros do: shift and mask, written out independently."""
    return value >> low & ((1 << (high - low + 1)) - 1)


class TestBootValues:
    def test_default_capability_supports_both_algorithms_bypass_and_63_keys(
        self, make_platform: MakePlatform
    ) -> None:
        cap = make_platform().rdmsr(0x981)
        assert bits(cap, 0, 0) == 1
        assert bits(cap, 2, 2) == 1
        assert bits(cap, 1, 1) == 0
        assert bits(cap, 3, 3) == 0
        assert bits(cap, 31, 31) == 1  # TME bypass supported
        assert bits(cap, 35, 32) == 6  # MK_TME_MAX_KEYID_BITS
        assert bits(cap, 50, 36) == 63  # MK_TME_MAX_KEYS
        assert cap == 63 << 36 | 6 << 32 | 1 << 31 | 0b101

    def test_default_activate_is_locked_enabled_xts128_six_keyid_bits_both_algorithms(
        self, make_platform: MakePlatform
    ) -> None:
        act = make_platform().rdmsr(0x982)
        assert bits(act, 0, 0) == 1
        assert bits(act, 1, 1) == 1
        assert bits(act, 7, 4) == 0  # policy AES-XTS-128
        assert bits(act, 31, 31) == 0  # no bypass
        assert bits(act, 35, 32) == 6  # MK_TME_KEYID_BITS
        assert bits(act, 63, 48) == 0b101  # MK_TME_CRYPTO_ALGS: bits 48 and 50
        assert act == 0b101 << 48 | 6 << 32 | 0b11

    def test_exclusion_msrs_are_present_and_disabled(self, make_platform: MakePlatform) -> None:
        platform = make_platform()
        assert platform.rdmsr(0x983) == 0
        assert platform.rdmsr(0x984) == 0

    def test_bypass_sets_activate_bit_31(self, make_platform: MakePlatform) -> None:
        assert bits(make_platform(tme_bypass=True).rdmsr(0x982), 31, 31) == 1

    def test_configured_algorithms_and_key_counts_reach_the_msrs(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform(keyid_bits=3, max_keys=5, algorithms=("aes-xts-256",))
        cap, act = platform.rdmsr(0x981), platform.rdmsr(0x982)
        assert (bits(cap, 35, 32), bits(cap, 50, 36)) == (3, 5)
        assert bits(act, 35, 32) == 3
        assert bits(act, 63, 48) == 0b100  # only AES-XTS-256 for MKTME KeyIDs
        assert bits(act, 7, 4) == 2  # no AES-XTS-128 configured: TME policy AES-XTS-256

    def test_mktme_off_leaves_no_keyid_bits_keys_or_algorithms(
        self, make_platform: MakePlatform
    ) -> None:
        platform = make_platform(keyid_bits=0)
        cap, act = platform.rdmsr(0x981), platform.rdmsr(0x982)
        assert bits(cap, 50, 32) == 0
        assert bits(act, 35, 32) == 0
        assert bits(act, 63, 48) == 0
        assert bits(act, 1, 0) == 0b11  # TME itself stays on

    def test_activation_decoded_from_the_msrs_matches_the_config(self) -> None:
        config = MachineConfig(keyid_bits=4, max_keys=7, tme_bypass=True)
        values = boot_values(config)
        activation = TmeActivation.from_msrs(values[CAP], values[ACT])
        assert activation == TmeActivation(AES_XTS_128, True, 4, 7, (AES_XTS_128, AES_XTS_256))
        assert activation.nr_keyids == 7 == config.nr_keyids

    def test_keyid_bits_cap_the_keyids_below_max_keys(self) -> None:
        """Intel MKTME spec: KeyIDs are the upper ``MK_TME_KEYID_BITS`` physical
        address bits, so with 2 bits the highest KeyID is 3 (all ones), however
        many keys the part has (docs/spec.md 2.1: KeyIDs 1 to ``nr_keyids``)."""
        config = MachineConfig(keyid_bits=2, max_keys=63)
        values = boot_values(config)
        activation = TmeActivation.from_msrs(values[CAP], values[ACT])
        assert activation.nr_keyids == 3 == config.nr_keyids


class TestDecoders:
    def test_decode_names_every_field_in_bit_order(self) -> None:
        act = 0b101 << 48 | 6 << 32 | 1 << 31 | 2 << 4 | 0b11
        assert decode(0x982, act) == [
            FieldValue("lock", 1),
            FieldValue("tme_enable", 1),
            FieldValue("key_select", 0),
            FieldValue("save_key_for_standby", 0),
            FieldValue("tme_policy", 2),
            FieldValue("tme_bypass_enable", 1),
            FieldValue("mk_tme_keyid_bits", 6),
            FieldValue("mk_tme_crypto_aes_xts_128", 1),
            FieldValue("mk_tme_crypto_aes_xts_256", 1),
        ]

    def test_decode_reports_reserved_bits_that_are_set(self) -> None:
        assert decode(0x981, 1 << 1 | 1 << 63)[-1] == FieldValue("reserved", 1 << 1 | 1 << 63)
        assert decode(0x983, 1 << 11 | 0xFFF000)[:2] == [
            FieldValue("exclude_enable", 1),
            FieldValue("exclude_mask", 0xFFF),
        ]

    def test_capability_keyid_fields_span_intels_bits_35_32_and_50_36(self) -> None:
        """Intel MKTME spec, IA32_TME_CAPABILITY: "35:32 MK_TME_MAX_KEYID_BITS"
        and "50:36 MK_TME_MAX_KEYS" (docs/spec.md 2.2): every bit of both
        decodes into its field, none as reserved."""
        fields = dict(decode(CAP, (1 << 51) - (1 << 32)))
        assert (fields["mk_tme_max_keyid_bits"], fields["mk_tme_max_keys"]) == (0xF, 0x7FFF)
        assert "reserved" not in fields

    @settings(max_examples=50, deadline=None)
    @given(msr=st.sampled_from(list(Msr)), value=st.integers(0, (1 << 64) - 1))
    def test_encode_of_the_decoded_fields_gives_back_the_value_minus_reserved_bits(
        self, msr: Msr, value: int
    ) -> None:
        fields = dict(decode(msr, value))
        reserved = fields.pop("reserved", 0)
        assert encode(msr, fields) | reserved == value

    def test_field_table_has_unique_names_and_no_overlapping_bits(self) -> None:
        assert len({f.name for f in FIELDS}) == len(FIELDS)
        for msr in Msr:
            masks = [f.mask for f in FIELDS if f.msr == msr]
            assert sum(masks) == _or_all(masks), f"{msr.name} has overlapping fields"

    def test_encode_refuses_fields_of_another_msr_or_values_too_wide(self) -> None:
        with pytest.raises(SandboxError):
            encode(CAP, {"lock": 1})
        with pytest.raises(SandboxError):
            encode(ACT, {"mk_tme_keyid_bits": 16})

    def test_tme_text_gives_each_msr_then_its_fields_one_name_value_per_line(
        self, make_platform: MakePlatform
    ) -> None:
        lines = make_platform().tme_text().splitlines()
        assert lines[0] == "IA32_TME_CAPABILITY 0x000003f680000005"
        assert "mk_tme_max_keys 63" in lines
        assert "IA32_TME_ACTIVATE 0x0005000600000003" in lines
        assert "tme_policy 0" in lines
        assert all(len(line.split(" ")) == 2 for line in lines)


class TestFaults:
    @pytest.mark.parametrize("addr", [0, 0x980, 0x985, 0x10])
    def test_rdmsr_of_an_msr_that_does_not_exist_faults_with_eio(
        self, make_platform: MakePlatform, addr: int
    ) -> None:
        with pytest.raises(MsrFault) as caught:
            make_platform().rdmsr(addr)
        assert caught.value.errno == errno.EIO
        assert f"{addr:#x}" in str(caught.value)

    @pytest.mark.parametrize("addr", [0x981, 0x982, 0x983, 0x984, 0x985])
    def test_every_wrmsr_faults_because_activate_is_locked_and_capability_read_only(
        self, make_platform: MakePlatform, addr: int
    ) -> None:
        platform = make_platform()
        before = [platform.rdmsr(a) for a in Msr]
        with pytest.raises(MsrFault) as caught:
            platform.wrmsr(addr, 0)
        assert caught.value.errno == errno.EIO
        assert [platform.rdmsr(a) for a in Msr] == before

    def test_locked_activate_names_the_lock_in_the_fault(self) -> None:
        with pytest.raises(MsrFault, match="locked"):
            TmeMsrs(MachineConfig()).wrmsr(0x982, 0)


def _or_all(masks: list[int]) -> int:
    result = 0
    for mask in masks:
        result |= mask
    return result


class TestExclusionRange:
    """Intel's MKTME spec, Table 4-5 (IA32_TME_EXCLUDE_MASK, 983H: bit 11 Enable,
    bits MAXPHYADDR-1:12 TMEEMASK, 63:MAXPHYADDR reserved) and Table 4-6
    (IA32_TME_EXCLUDE_BASE, 984H: bits MAXPHYADDR-1:12 TMEEBASE): an address is in
    the range when its TMEEMASK bits match TMEEBASE."""

    def test_the_mount_options_set_enable_mask_and_base(self, make_platform: MakePlatform) -> None:
        platform = make_platform(maxphyaddr=39, tme_exclude_base=8 << 20, tme_exclude_size=4 << 20)
        mask, base = platform.rdmsr(0x983), platform.rdmsr(0x984)
        assert mask == (1 << 11) | (((1 << 39) - 1) & ~((4 << 20) - 1))
        assert base == 8 << 20
        assert bits(mask, 63, 39) == 0  # bits from MAXPHYADDR up are reserved
        text = platform.tme_text()
        assert "exclude_enable 1\n" in text
        assert f"exclude_mask {mask >> 12 & ((1 << 27) - 1)}\n" in text
        assert f"exclude_base {(8 << 20) >> 12}\n" in text

    def test_without_the_options_exclusion_is_off(self, make_platform: MakePlatform) -> None:
        platform = make_platform()
        assert (platform.rdmsr(0x983), platform.rdmsr(0x984)) == (0, 0)

    def test_fields_end_at_maxphyaddr_and_higher_bits_decode_as_reserved(self) -> None:
        value = 1 << 11 | 1 << 38 | 1 << 45
        assert decode(Msr.IA32_TME_EXCLUDE_MASK, value, 39) == [
            FieldValue("exclude_enable", 1),
            FieldValue("exclude_mask", 1 << 26),
            FieldValue("reserved", 1 << 45),
        ]
        assert dict(decode(Msr.IA32_TME_EXCLUDE_BASE, value, 46))["exclude_base"] == (
            1 << 26 | 1 << 33
        )

    @pytest.mark.parametrize(
        ("base", "size"), [(0, 3 << 12), (4096, 8192), (4096, 0), (0, 2048), (1 << 40, 4096)]
    )
    def test_a_range_that_is_not_an_aligned_power_of_two_is_refused(
        self, base: int, size: int
    ) -> None:
        with pytest.raises(ValueError, match="tme_exclude|TME exclusion range"):
            MachineConfig(tme_exclude_base=base, tme_exclude_size=size)
