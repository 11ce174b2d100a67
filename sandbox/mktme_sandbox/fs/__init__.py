"""The FUSE layer: the machine as a filesystem (docs/spec.md section 4).

``nodes`` declares the kinds of node, ``tree`` maps every path to one,
``operations`` holds the FUSE entry points and ``serve()``. This layer holds no
logic of the machine: each operation is one call into ``sandbox.Machine``.
"""

from mktme_sandbox.fs.operations import SandboxFS, fuse_options, serve
from mktme_sandbox.fs.tree import Tree

__all__ = ["SandboxFS", "Tree", "fuse_options", "serve"]
