"""The kit's user errors: a mistake the user can fix (a setting, the data, a path, a checkpoint, a LoRA file),
reported in one message that names what, where and the fix.

`train.py` and `cogft` print such an error as `error: <message>` and exit with status 1, without a traceback
(`HYDRA_FULL_ERROR=1`, or `debug=true` for `train.py`, shows it): `finetune.console.user_errors`. Anything else is a
bug or a crash and keeps its traceback. Every kit error type derives from `UserError` as well as from the built-in
type it always was (ValueError, FileNotFoundError, ...), so callers that catch those keep working.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message says what, where and how."""


class ModelPathError(UserError, FileNotFoundError):
    """`model.path` is not a usable checkpoint: missing, unreachable, or a damaged weight file."""


class RunDirError(UserError, FileExistsError):
    """`run_dir` holds another run's outputs."""


class PathSettingError(UserError, FileNotFoundError):
    """A path given in a setting (`ckpt_path`, `adapter_path`, ...) does not exist."""
