"""Defaults shared by the API, the CLI and recipes, spelled once (and importable without torch)."""

DEFAULT_MIXER = "lstm"
"""The mixer plugin used where none is named (`replace`, `replacer replace`, a recipe's `mixer.plugin`): FAR's LSTM."""
