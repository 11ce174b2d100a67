"""The security experiments: each ``NN-name.py`` a script that checks its own result.

``lab`` is the harness they run in, ``run_all`` runs them (``mktme-sandbox
examples list|run|run-all``), and ``tour`` is the bash guided tour
(``mktme-sandbox examples tour``), shipped as package data. Like the tools,
they use the mount and nothing else: the standard library and
``mktme_sandbox.client``. docs/experiments.md explains each one.
"""
