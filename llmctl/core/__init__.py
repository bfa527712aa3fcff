"""llmctl's library: every algorithm and every rule of the CLI contract lives under here.

Importing it sets environment defaults that keep third-party libraries quiet and offline: llmctl never
calls a model hub at run time, and it owns stderr (its own progress bars, not tqdm's). These are defaults
(``setdefault``): a user who exports ``TQDM_DISABLE=0`` gets tqdm's bars back.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
