"""Conformance kits for plugin authors; the built-in plugins run them in their own tests.

A mixer is checked through its registered `MixerSpec` on small synthetic sites:

    from replacer.testing import check_mixer
    check_mixer("my-mixer", options={"width": 8})

An adapter is checked on a small model of its family:

    from replacer.testing import check_adapter
    check_adapter(lambda: MyModel(tiny_config), lambda: ((), {"input_ids": ids}), adapter="my-family")

Every check raises AssertionError with a sentence that names the rule that broke.
"""

from replacer.testing.adapters import check_adapter
from replacer.testing.counting import AttentionCounter, main_tensor
from replacer.testing.mixers import CHECKS, build_mixer, check_mixer, synthetic_site

__all__ = ["AttentionCounter", "CHECKS", "build_mixer", "check_adapter", "check_mixer", "main_tensor", "synthetic_site"]
