"""The emulated MKTME platform (docs/spec.md section 2): what the kernel layer runs on.

One module per mechanism, bottom up: ``dram`` (sparse physical memory), ``xts``
(the AES-XTS engine and the algorithm numbering), ``keytable`` (PCONFIG
MKTME_KEY_PROGRAM), ``msr`` (the TME MSRs), ``memctl`` (the engine between cache
and DRAM, with each KeyID's current key), ``cache`` (write-back, tagged by line
and KeyID), and ``platform`` (``Platform``, the API in docs/architecture.md).
Imports only numpy, cryptography, the standard library, ``mktme_sandbox.config`` and
``mktme_sandbox.errors``.
"""
