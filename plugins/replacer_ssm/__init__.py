"""Mamba-2-style (SSD) selective state-space mixer: one SSM head per attention head, both directions for encoders."""

from replacer.hookspecs import hookimpl
from replacer.mixer import MixerSpec
from replacer_ssm.mixer import MultiHeadSSM, SSMOptions, build
from replacer_ssm.scan import chunked_scan, reference_scan


@hookimpl
def replacer_mixers() -> list[MixerSpec]:
    return [
        MixerSpec(
            name="ssm",
            options_model=SSMOptions,
            factory=build,
            summary="Mamba-2 (SSD) selective state space per head; forward + backward scans on bidirectional sites",
        )
    ]


__all__ = ["MultiHeadSSM", "SSMOptions", "build", "chunked_scan", "reference_scan"]
