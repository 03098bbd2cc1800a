"""replacer: swap the attention of pretrained transformers for cheaper sequence mixers."""

from replacer.version import __version__  # noqa: E402,F401

from replacer.analyzer import AnalyzerSpec  # noqa: E402
from replacer.checkpoint import load, save  # noqa: E402
from replacer.ecosystem import Evaluation, Exporter, ModelContext  # noqa: E402
from replacer.errors import (  # noqa: E402
    CheckpointError,
    ModelSourceError,
    NoAttentionError,
    OptionsError,
    ReplacerError,
    SiteSelectionError,
    UnknownPluginError,
    UnsupportedCallError,
)
from replacer.graph.adapter import Adapter, ReplacedAttention, Unsupported  # noqa: E402
from replacer.graph.scan import ScanResult  # noqa: E402
from replacer.graph.scan import scan as _scan  # noqa: E402
from replacer.graph.site import LinearWeights, Site, UnsupportedSite  # noqa: E402
from replacer.hookspecs import hookimpl  # noqa: E402
from replacer.mixer import Mixer, MixerSpec, MixerState, ScanMixer  # noqa: E402
from replacer.models import count_parameters, load_model  # noqa: E402
from replacer.plugins import get_registry  # noqa: E402
from replacer.replace import replace  # noqa: E402


def scan(model) -> ScanResult:
    """Every attention site in `model` and how it will be handled (print it for a table)."""
    return _scan(model)


__all__ = [
    "Adapter", "AnalyzerSpec", "CheckpointError", "Evaluation", "Exporter", "LinearWeights", "Mixer", "MixerSpec", "MixerState",
    "ModelContext", "ModelSourceError", "NoAttentionError", "OptionsError", "ReplacedAttention", "ReplacerError", "ScanMixer", "ScanResult",
    "Site", "SiteSelectionError", "UnknownPluginError", "Unsupported", "UnsupportedCallError", "UnsupportedSite",
    "count_parameters", "get_registry", "hookimpl", "load", "load_model", "replace", "save", "scan",
]
