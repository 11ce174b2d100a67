"""mktme-sandbox: an emulated Intel MKTME machine under a simulated Linux mm."""

from typing import TYPE_CHECKING

from mktme_sandbox.config import MachineConfig
from mktme_sandbox.errors import SandboxError

if TYPE_CHECKING:  # the type checker sees the class; the import stays lazy at run time
    from mktme_sandbox.machine import Machine

__all__ = ["Machine", "MachineConfig", "SandboxError", "__version__"]

__version__ = "0.2.0"


def __getattr__(name: str) -> object:
    # Machine pulls in numpy and cryptography: import it on first use only.
    if name == "Machine":
        from mktme_sandbox.machine import Machine

        return Machine
    raise AttributeError(name)
