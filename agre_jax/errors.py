"""The one base exception for bad input, and its kinds.

`UserError` means: the user's input (config, data folder, checkpoint, workdir) cannot be used
as given. `main.py` and the sweep runner catch it, print its message as one paragraph and exit
with status 2, before any training when it is raised by validation. Any other exception is a
bug and keeps its traceback.

Every message names the key or path, the value found, and what was expected.
"""

from __future__ import annotations

EXIT_BAD_INPUT = 2


class UserError(ValueError):
    """Bad input: exit status 2 and one message, no traceback."""


class ConfigError(UserError):
    """A configuration value or key that cannot run."""


class WorkdirError(UserError):
    """A workdir that cannot be used: not writable, a file, in use by another run, or made
    with another config."""


class CheckpointError(UserError):
    """A ported or pretrained checkpoint that is missing, unreadable or does not fit."""
