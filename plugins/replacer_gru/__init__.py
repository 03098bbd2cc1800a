"""A multi-head GRU mixer: the lstm plugin's layout with a lighter cell (3 gate blocks, one state)."""

from replacer.hookspecs import hookimpl
from replacer.mixer import MixerSpec
from replacer_gru.mixer import GRUOptions, MultiHeadGRU, build


@hookimpl
def replacer_mixers() -> list[MixerSpec]:
    return [
        MixerSpec(
            name="gru",
            options_model=GRUOptions,
            factory=build,
            summary="multi-head GRU per head; both directions merged per head; forward-only on causal sites",
        )
    ]


__all__ = ["GRUOptions", "MultiHeadGRU", "build"]
