"""Settings for the whole suite.

Under CI (``CI`` set, as ``.ci/run`` is run) hypothesis draws the same examples
every run, so a submission is judged on its own change and not on which random
examples one run happened to draw; locally it explores new ones each run.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
