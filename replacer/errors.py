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
