"""The two ways a step stops on purpose; the CLI maps them to exit codes (2 and 1).

Library code raises these and never imports the CLI.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot be used; ``str()`` is the one-line message. Exit 2."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


class StepFailed(RuntimeError):
    """A step ran but its outcome is not acceptable (e.g. too many rejected sites). Exit 1."""
