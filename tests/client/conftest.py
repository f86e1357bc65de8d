"""The lying-server tests share the fuzz tests' hypothesis profiles (tests/fuzz/profiles.py)."""

from ..fuzz import profiles  # noqa: F401  (registers and loads the profile)
