"""replacer-conv: registers the `conv` mixer with replacer through the `replacer` entry point."""

from replacer import MixerSpec, hookimpl

from replacer_conv.mixer import ConvOptions, ShortConvMixer, build


@hookimpl
def replacer_mixers() -> list[MixerSpec]:
    return [
        MixerSpec(
            name="conv",
            options_model=ConvOptions,
            factory=build,
            summary="multi-head short convolution: each channel averages a learned window of nearby tokens",
        )
    ]


__all__ = ["ConvOptions", "ShortConvMixer", "build"]
