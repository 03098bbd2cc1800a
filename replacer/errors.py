"""One exception family, so the CLI can turn any user-facing failure into a one-line message."""


class ReplacerError(Exception):
    """A failure caused by the user's input; its message names the problem and the fix."""


class NoAttentionError(ReplacerError):
    """The model holds no attention module that any adapter understands."""


class UnknownPluginError(ReplacerError):
    """A plugin name was asked for that no installed distribution provides."""


class OptionsError(ReplacerError):
    """Plugin options failed validation."""


class SiteSelectionError(ReplacerError):
    """A `sites=` selector matched nothing, or matched something that cannot be replaced."""


class ModelSourceError(ReplacerError):
    """A model source string (timm name, HF dir, module:callable) could not be resolved."""


class CheckpointError(ReplacerError):
    """A saved model directory is missing, corrupt, or does not match its manifest."""


class UnsupportedCallError(ReplacerError):
    """A replaced site was called in a way its mixer cannot honour (e.g. causal call on a bidirectional mixer)."""


class DataError(ReplacerError):
    """A data source is missing or unreadable."""


class DamagedFileError(ReplacerError):
    """A file replacer wrote earlier (a checkpoint, a run's state) cannot be read back."""


class RunDirectoryError(ReplacerError):
    """A run directory cannot be used: it is not a replacer run, holds the user's files, or is in use."""


class DivergedError(ReplacerError):
    """Training produced a NaN or infinite loss, or a model produced non-finite outputs."""


class PluginConflictError(UnknownPluginError):
    """Two installed plugins provide the same name and neither may be chosen silently."""


class UntrustedCodeError(CheckpointError):
    """A checkpoint asks to run code (a module:callable origin) that the caller has not allowed."""


def summary(exc: BaseException) -> str:
    """An exception's message as one line that says what is wrong.

    Libraries put a header first (torch's "Error(s) in loading state_dict") or end a line with ':'
    before the detail; both are joined with the line that follows.
    """
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head = lines[0]
    if len(lines) > 1 and (head.endswith(":") or head.startswith("Error(s) in loading")):
        head = f"{head} {lines[1]}"
    return head
