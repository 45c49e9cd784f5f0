"""One user-error hierarchy: every user mistake derives from ldm.errors.UserError (still a ValueError), the old
names stay importable from their old modules, and the entry points catch that one type."""
import argparse

import pytest

from ldm.errors import UserError
from ldm.inference import USER_ERRORS, ScriptError, run_cli
from ldm.modules.encoders.frozen import MissingPretrainedModelError
from ldm.modules.encoders.modules import MissingPretrainedModelError as ReExported
from ldm.training.config import UsageError
from ldm.util import CheckpointError, ConfigError, MissingTargetError


@pytest.mark.parametrize("cls", [ScriptError, UsageError, ConfigError, CheckpointError, MissingPretrainedModelError,
                                 MissingTargetError])
def test_every_user_error_is_a_user_error_and_a_value_error(cls):
    assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    assert USER_ERRORS == (UserError,)


def test_missing_target_error_stays_a_key_error_with_a_plain_message():
    err = MissingTargetError("Expected key `target`")
    assert isinstance(err, KeyError) and str(err) == "Expected key `target`"
    assert ReExported is MissingPretrainedModelError


class NewKindOfMistake(UserError):
    """A user error class that no entry point names."""


def _body(error):
    def body(args):
        raise error

    return body


def test_run_cli_catches_any_user_error_in_one_line(capsys):
    parser = argparse.ArgumentParser()
    assert run_cli(parser, _body(NewKindOfMistake("flag --x: expected\n  a number")), []) == 2
    err = capsys.readouterr().err
    assert err == "error: flag --x: expected a number\n"
    assert run_cli(parser, _body(MissingPretrainedModelError("model 'm' is not available")), []) == 2
    assert capsys.readouterr().err == "error: model 'm' is not available\n"
    with pytest.raises(RuntimeError):  # a bug is not a user error: its traceback stays
        run_cli(parser, _body(RuntimeError("bug")), [])


@pytest.mark.parametrize("error", [NewKindOfMistake("bad thing"), ScriptError("bad thing"),
                                   MissingPretrainedModelError("bad thing")])
def test_main_catches_any_user_error(main_module, monkeypatch, capsys, error):
    def prepare(*args, **kwargs):
        raise error

    monkeypatch.setattr(main_module, "prepare", prepare)
    assert main_module.main(["-b", "x.yaml"]) == 2
    assert capsys.readouterr().err == "main.py: error: bad thing\n"
