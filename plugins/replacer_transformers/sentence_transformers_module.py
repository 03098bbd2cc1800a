"""The sentence-transformers module that holds a converted encoder, so `SentenceTransformer(folder)`
runs a replacer model: it tokenizes, runs the encoder and hands token embeddings on to the teacher's
own pooling (and normalisation, dense layers) modules.

The folder's `modules.json` names this class, which lives outside sentence-transformers' namespace,
so sentence-transformers asks for `trust_remote_code=True` to import it. What it imports is this
installed package, never code from the folder; the encoder itself is rebuilt by `replacer.load`,
which reads only safetensors and JSON.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
from sentence_transformers.base.modules import InputModule
from sentence_transformers.util import load_dir_path
from torch import nn

MODEL_FOLDER = "replacer_model"


class ReplacerEncoder(InputModule):
    """A replacer model (a converted transformers encoder) as sentence-transformers' first module."""

    config_file_name = "replacer_encoder_config.json"
    config_keys = ["max_seq_length", "do_lower_case"]
    save_in_root = True

    def __init__(self, model: nn.Module, tokenizer: Any, max_seq_length: int = 256, do_lower_case: bool = False) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_seq_length, self.do_lower_case = max_seq_length, do_lower_case
        self._inputs = set(inspect.signature(model.forward).parameters)

    def preprocess(self, inputs: Sequence[str | tuple[str, str]], prompt: str | None = None, **kwargs: Any) -> dict[str, torch.Tensor]:
        texts = [prompt + t if prompt and isinstance(t, str) else t for t in inputs]
        if self.do_lower_case:
            texts = [t.lower() if isinstance(t, str) else tuple(s.lower() for s in t) for t in texts]
        if texts and all(isinstance(t, tuple) for t in texts):
            first, second = zip(*texts)
            encoded = self.tokenizer(list(first), list(second), padding=True, truncation="longest_first",
                                     max_length=self.max_seq_length, return_tensors="pt")
        else:
            encoded = self.tokenizer(list(texts), padding=True, truncation="longest_first", max_length=self.max_seq_length,
                                     return_tensors="pt")
        return dict(encoded)

    def forward(self, features: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
        out = self.model(**{k: v for k, v in features.items() if k in self._inputs and k in ("input_ids", "attention_mask", "token_type_ids")})
        features["token_embeddings"] = out.last_hidden_state
        return features

    def get_embedding_dimension(self) -> int:
        return int(self.model.config.hidden_size)

    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        import replacer

        replacer.save(self.model, Path(output_path) / MODEL_FOLDER)
        self.tokenizer.save_pretrained(output_path)
        self.save_config(output_path)

    @classmethod
    def load(
        cls, model_name_or_path: str, subfolder: str = "", token: bool | str | None = None, cache_folder: str | None = None,
        revision: str | None = None, local_files_only: bool = False, trust_remote_code: bool = False, **kwargs: Any,
    ) -> "ReplacerEncoder":
        import transformers

        import replacer

        folder = Path(load_dir_path(model_name_or_path, subfolder, token=token, cache_folder=cache_folder, revision=revision,
                                    local_files_only=local_files_only))
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        model = replacer.load(folder / MODEL_FOLDER, trust_remote_code=bool(trust_remote_code))
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
        return cls(model, tokenizer, **{k: v for k, v in config.items() if k in cls.config_keys})
