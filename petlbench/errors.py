"""Typed errors. Each message is one line a user can act on: where, what was wrong, what to do."""

from __future__ import annotations


class PetlbenchError(Exception):
    """Base of every error petlbench raises on purpose. The CLI maps it to a one-line message."""

    exit_code: int = 2


class ConfigError(PetlbenchError):
    """A suite, budget file or command-line value is invalid (exit code 2)."""


class TunerError(ConfigError):
    """A tuner cannot be applied to the given backbone with the given knobs."""


class KnobError(TunerError):
    """One knob of a tuner is at fault: `field` is its path below the entry's params (`rank`, `config.r`), or None
    when the tuner itself cannot be used (its optional install is missing). The pre-flight probe turns it into the
    suite location the user wrote (`tuners[1].grid.r`, `tuners[1].params.config.rr`, `tuners[1].tuner`)."""

    def __init__(self, field: str | None, detail: str, prefix: str = "") -> None:
        super().__init__(f"{prefix}{field + ': ' if field else ''}{detail}")
        self.field = field
        self.detail = detail


class DataError(ConfigError):
    """A dataset is missing, empty or malformed."""


class DeviceError(ConfigError):
    """The requested device is not available (e.g. `--device cuda` without a GPU)."""


class ResultsError(PetlbenchError):
    """A results file cannot be read (corrupt, or written by a newer schema)."""


class WriteError(PetlbenchError):
    """A results or report folder cannot be written (read-only, full, a file where a folder should be): exit 2."""


class ResultsLocked(PetlbenchError):
    """Another `petlbench run` holds the suite's results folder (exit code 2)."""


class BudgetExceeded(PetlbenchError):
    """One or more runs exceed their memory/params/speed budget (exit code 1)."""

    exit_code = 1


def is_config_error(name: str | None) -> bool:
    """Whether an exception class name (a result row's `error_type`) is ConfigError or one of its subclasses."""
    if name is None:
        return False
    pending: list[type[PetlbenchError]] = [ConfigError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name:
            return True
        pending.extend(cls.__subclasses__())
    return False
