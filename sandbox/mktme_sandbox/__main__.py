"""``python -m mktme_sandbox``: the ``mktme-sandbox`` command (``mktme_sandbox.cli``)."""

from mktme_sandbox.cli import main

main()
