"""What the platform tests share besides fixtures (tests/hw/conftest.py): the
fixtures' types and the keys the tests know."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mktme_sandbox.hw.keytable import PconfigStatus
from mktme_sandbox.hw.platform import Platform
from mktme_sandbox.hw.xts import XtsKey

MakePlatform = Callable[..., Platform]  # make_platform, known_platform: **MachineConfig options
Program = Callable[..., PconfigStatus]  # program(platform, keyid, command, ...)


@dataclass(frozen=True)
class KnownKey:
    """A data key and tweak key the test knows, and the engine built from them."""

    key: bytes = field(repr=False)
    tweak: bytes = field(repr=False)

    @property
    def engine(self) -> XtsKey:
        return XtsKey(self.key, self.tweak)

    def secrets(self) -> list[bytes]:
        """Every form in which these keys (or either half of one) must never appear."""
        forms = []
        for material in (self.key, self.tweak):
            for piece in (material, material[:8], material[8:]):
                forms += [piece, piece.hex().encode(), piece.hex().upper().encode()]
                forms.append(repr(piece)[2:-1].encode())  # as a bytes repr escapes it
        return forms
