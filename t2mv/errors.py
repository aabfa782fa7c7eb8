"""The project's error classes and exit codes, and the one place that turns an exception into a message and a code.

Exit codes, the same for ``t2mv`` (every subcommand), ``t2mv-multiview`` and ``t2mv-mesh``:

    0  done
    1  anything else failed (a bug, an unexpected library error); ``--debug`` prints the trace
    2  bad input: an option out of range, an image that cannot be used, an output path that cannot be written
    3  model weights are missing (not in the Hugging Face cache, offline, or a folder without the files)
    4  out of memory (GPU or host)

Missing weights: `MissingWeightsError` (``t2mv.perflow.hub``, used by text-to-image and the multiview stage) is
the base class; `WeightsUnavailableError` is the chain's, naming the stage and smoke mode. ``triposr`` keeps its
own ``triposr.system.MissingWeightsError`` because it imports nothing of ours; `is_missing_weights` knows all
three. Importing this module imports no torch.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from typing import Any, TextIO

from .perflow.hub import MissingWeightsError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_WEIGHTS, EXIT_OOM = 0, 1, 2, 3, 4

SMOKE_HINT = (
    "To try the program without any weights, run it in smoke mode (`--tiny`, or T2MV_SMOKE=1): tiny random "
    "models whose output is noise."
)
OOM_HINT = (
    "Try --offload (each model on the GPU only while it runs), a lower --mc-resolution, a smaller image, "
    "or no --bake-texture."
)

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_NO_WEIGHTS",
    "EXIT_OK",
    "EXIT_OOM",
    "BadInputError",
    "MissingWeightsError",
    "StageFailedError",
    "WeightsUnavailableError",
    "describe",
    "exit_code",
    "is_missing_weights",
    "is_out_of_memory",
    "run_command",
]


class BadInputError(ValueError):
    """Input the user can fix: an option out of range, an unusable image, an output path that cannot be written.

    A ValueError, so library callers that catch ValueError keep working.
    """


class WeightsUnavailableError(MissingWeightsError):
    """A model of the chain could not be loaded: the message names the stage, the repo, the fixes and smoke mode.

    Args:
        message: the whole message (unlike the base class, whose message is built from repo and reason).
        repo: the hub id or folder that was asked for.
    """

    def __init__(self, message: str, repo: str = ""):
        self.repo = str(repo)
        self.reason = message
        self.cache_dir = None
        self.download_hint = ""
        FileNotFoundError.__init__(self, message)

    def __reduce__(self):
        return (type(self), (str(self), self.repo))


class StageFailedError(RuntimeError):
    """A chain stage failed after earlier stages finished; the earlier results are on disk.

    Attributes:
        stage: the stage that failed (``multiview``, ``mesh``, ...).
        folder: where the finished stages' files and the ``FAILED.json`` marker are.
        cause: the original exception (also ``__cause__``); `exit_code` classifies by it.
    """

    def __init__(self, stage: str, folder: Any, cause: BaseException):
        self.stage, self.folder, self.cause = stage, folder, cause
        super().__init__(
            f"the {stage} stage failed: {_one_line(cause)} (the finished stages' files are kept in {folder}; "
            "FAILED.json says what failed)"
        )


def is_missing_weights(error: BaseException) -> bool:
    """True for a real missing-weights error of any stage (not for any FileNotFoundError)."""
    if isinstance(error, MissingWeightsError):
        return True
    triposr_system = sys.modules.get("triposr.system")  # loaded whenever its error can exist; never import it here
    return triposr_system is not None and isinstance(error, triposr_system.MissingWeightsError)


def is_out_of_memory(error: BaseException) -> bool:
    """True for torch's CUDA out-of-memory error, a host MemoryError, or a RuntimeError saying "out of memory"."""
    if isinstance(error, MemoryError):
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def exit_code(error: BaseException) -> int:
    """The exit code for `error` (see the module docstring); a `StageFailedError` is classified by its cause."""
    if isinstance(error, StageFailedError):
        return exit_code(error.cause)
    if is_missing_weights(error):
        return EXIT_NO_WEIGHTS
    if is_out_of_memory(error):
        return EXIT_OOM
    if isinstance(error, ValueError):  # BadInputError and the stages' own argument checks
        return EXIT_BAD_INPUT
    return EXIT_FAILED


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def describe(error: BaseException) -> str:
    """A one-line message for the user (whitespace and newlines folded; the type named for unexpected errors)."""
    text = _one_line(error)
    code = exit_code(error)
    if code == EXIT_NO_WEIGHTS and "--tiny" not in text:
        text = f"{text} {SMOKE_HINT}"
    elif code == EXIT_OOM and "--offload" not in text:
        text = f"out of memory ({text}). {OOM_HINT}"
    elif code == EXIT_FAILED and not isinstance(error, StageFailedError):
        text = f"{type(error).__name__}: {text} (run again with --debug for the full trace)"
    return text


def run_command(prog: str, command: Callable[[], int], *, debug: bool = False, stderr: TextIO | None = None) -> int:
    """Run `command` and turn any exception into one ``<prog>: error: ...`` line on stderr and an exit code.

    Args:
        prog: the command's name, for the message.
        command: does the work and returns the exit code.
        debug: also print the full traceback.
        stderr: where messages go (default: sys.stderr at call time).

    Returns:
        The command's exit code, or the code of its exception (`exit_code`). KeyboardInterrupt gives 130.
    """
    stream = stderr if stderr is not None else sys.stderr
    try:
        return command()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=stream)
        return 130
    except Exception as error:  # the one place every command's errors end up
        if debug:
            traceback.print_exc(file=stream)
        if exit_code(error) == EXIT_OOM:
            _free_cuda_cache()
        print(f"{prog}: error: {describe(error)}", file=stream)
        return exit_code(error)


def _free_cuda_cache() -> None:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
