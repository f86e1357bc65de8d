"""kvpool command-line interface."""
