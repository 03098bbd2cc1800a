"""The reference mixer (FAR): a multi-head LSTM, bidirectional for encoders, forward-only for decoders."""

from replacer.hookspecs import hookimpl
from replacer.mixer import MixerSpec
from replacer_lstm.mixer import LSTMOptions, MultiHeadLSTM, build


@hookimpl
def replacer_mixers() -> list[MixerSpec]:
    return [
        MixerSpec(
            name="lstm",
            options_model=LSTMOptions,
            factory=build,
            summary="multi-head LSTM per head (FAR); both directions merged per head; forward-only on causal sites",
        )
    ]


__all__ = ["LSTMOptions", "MultiHeadLSTM", "build"]
