"""Helpers several test modules share: tiny text recipes (an encoder's, a decoder's), random word texts,
an IDX writer, greedy decoding without a cache (the reference `generate` is held to), embeddings of a
sentence-transformers folder and of the saved model it was exported from."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import torch

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau".split()


def _texts(path: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(" ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for _ in range(n)))
    return path


def tiny_text_recipe(tmp_path: Path, distill_steps: int = 30, tune_steps: int = 10, checkpoint_every: int = 10) -> Path:
    train, held_out = _texts(tmp_path / "train.txt", 200, 0), _texts(tmp_path / "eval.txt", 40, 1)
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
run_dir: {tmp_path / 'run'}
model: {{source: "conftest:tiny_text_bert", tokenizer: minilm, task: embedding}}
data:
  train: [{{kind: text, source: "file:{train}", max_length: 16}}]
  eval: [{{kind: text, source: "file:{held_out}", max_length: 16}}]
  batch_size: 8
mixer: {{plugin: lstm, options: {{hidden_per_head: 8}}}}
distill: {{steps: {distill_steps}, lr: 0.01, calibration_batches: 8, checkpoint_every: {checkpoint_every}}}
tune: {{steps: {tune_steps}, lr: 0.003, checkpoint_every: 5}}
evaluate: {{latency_repeats: 2}}
""")
    return path


def tiny_causal_recipe(tmp_path: Path, sections: str, max_length: int = 16, eval_limit: int = 16) -> Path:
    """A recipe over a tiny random Llama that reads MiniLM's tokenizer, numbered lines of text for both
    data sections, and the stage `sections` given as YAML."""
    texts = tmp_path / "t.txt"
    texts.write_text("\n".join(f"line {i} of some text about {i % 7} things and more" for i in range(64)))
    path = tmp_path / "r.yaml"
    path.write_text(f"""
name: causal
run_dir: {tmp_path / 'run'}
model: {{source: "conftest:tiny_text_llama", tokenizer: minilm, task: causal-lm}}
data:
  train: [{{kind: text, source: "file:{texts}", max_length: {max_length}}}]
  eval: [{{kind: text, source: "file:{texts}", max_length: {max_length}, limit: {eval_limit}}}]
  batch_size: 8
""" + sections)
    return path


IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(">i2"): 0x0B, np.dtype(">i4"): 0x0C,
             np.dtype(">f4"): 0x0D, np.dtype(">f8"): 0x0E}


def write_idx(path: Path, array: np.ndarray, dtype: str, compress: bool = False) -> Path:
    """Our own IDX writer: two zero bytes, dtype code, ndim, big-endian dims, big-endian data."""
    data = array.astype(dtype)
    header = bytes([0, 0, IDX_CODES[data.dtype], data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    payload = header + data.tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


@torch.no_grad()
def greedy_without_cache(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The prompt and `new_tokens` greedy tokens, each from a full forward pass over everything so far."""
    full = prompt
    for _ in range(new_tokens):
        full = torch.cat((full, model(full).logits[:, -1:].argmax(-1)), 1)
    return full


def cut_zeroed_groups(model: torch.nn.Module, index, chosen: list[int], run) -> int:
    """Zero the chosen groups of `index`, then remove them physically; asserts that removing zeroed groups
    changes nothing `run(model)` returns, and returns how many parameters went."""
    from replacer.pruning import model_parameters
    from replacer.pruning.groups import shrink

    params = model_parameters(model)
    index.zero_(chosen)
    with torch.no_grad():
        before = run(model)
        model.replacer_record.setdefault("shapes", {}).update(shrink(model, index, chosen))
        torch.testing.assert_close(run(model), before, atol=1e-5, rtol=1e-5)
    return params - model_parameters(model)


def folder_embeddings(folder: Path, texts: list[str]):
    """The sentence-transformers folder loaded offline, and its embeddings of `texts`."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(folder), trust_remote_code=True, device="cpu", local_files_only=True)
    return model, model.encode(texts, convert_to_tensor=True)


def saved_embeddings(saved: Path, texts: list[str], max_length: int = 256) -> torch.Tensor:
    """What replacer's embedding task computes from a saved model (the reference an export is held to)."""
    import replacer
    from replacer.tasks import EmbeddingTask

    task = EmbeddingTask(replacer.get_registry().load_tokenizer("minilm"), max_length)
    with torch.no_grad():
        model = replacer.load(saved, trust_remote_code=True)  # a run's teacher may be conftest's
        return task.run(model, task.collate(texts))["embedding"]
