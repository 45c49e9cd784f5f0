"""The one base class of user mistakes, at the bottom of the package so every layer can raise it.

A `UserError` is a mistake in what the user gave — a flag, a config key, a file, a checkpoint, a prompt, an
image — and its message is one line that names the culprit and what was expected. Entry points catch this one
type (`main.py`, `ldm.inference.run_cli`, the web UI) and show the message instead of a traceback. The
specific classes keep their original homes and names: `ldm.util.ConfigError`, `ldm.util.CheckpointError`,
`ldm.training.config.UsageError`, `ldm.inference.ScriptError`,
`ldm.modules.encoders.frozen.MissingPretrainedModelError`.
"""
from __future__ import annotations


class UserError(ValueError):
    """A user mistake (flag, config key, file, checkpoint, input); the message is one line naming what to fix.

    A ValueError, as every specific user error was before this base class existed, so `except ValueError`
    keeps catching them.
    """
