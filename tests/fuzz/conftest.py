"""The hypothesis profiles of the decoder fuzz tests (profiles.py)."""

from ..fuzz import profiles  # noqa: F401  (registers and loads the profile)
