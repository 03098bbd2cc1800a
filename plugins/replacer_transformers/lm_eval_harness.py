"""Causal students and their teachers side by side through lm-evaluation-harness, the field's
reference for decoder figures: its Hugging Face model class (`HFLM`) is handed the built model
object, so a converted model runs exactly as `replacer.load` returns it.

The harness's standard tasks need their datasets (usually downloaded); `replacer_heldout`, a task
file written here, scores rolling log-likelihood (word and byte perplexity, bits per byte) over the
run's own held-out text, which exists offline.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from replacer.ecosystem import Evaluation, ModelContext
from replacer.errors import ReplacerError

HELD_OUT = "replacer_heldout"
_TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - {{metric: word_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: byte_perplexity, aggregation: weighted_perplexity, higher_is_better: false}}
  - {{metric: bits_per_byte, aggregation: bits_per_byte, higher_is_better: false}}
metadata:
  version: 1.0
"""


def write_held_out_task(folder: Path, texts: list[str]) -> Path:
    """The `replacer_heldout` task over `texts` (one document each), as a folder the harness includes."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{HELD_OUT}.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts if t.strip()), encoding="utf-8")
    (folder / f"{HELD_OUT}.yaml").write_text(_TASK.format(name=HELD_OUT, data=json.dumps(str(data))), encoding="utf-8")
    return folder


class LMEvalHarness(Evaluation):
    name = "lm-eval"
    tasks = ("causal-lm",)
    automatic = False

    def available(self) -> str | None:
        return None if importlib.util.find_spec("lm_eval") else "needs the package: pip install lm-eval"

    def evaluate(
        self, models: dict[str, nn.Module], examples: list, context: ModelContext, tasks: str | list[str] = HELD_OUT,
        limit: int | None = None, batch_size: int = 8, **unknown: Any,
    ) -> dict[str, dict[str, float]]:
        """`tasks`: harness task names (comma-separated or a list); `limit`: documents per task."""
        if unknown:
            raise ReplacerError(f"the lm-eval evaluation takes tasks, limit and batch_size, not {sorted(unknown)}")
        if self.available() is not None:
            raise ReplacerError(f"the lm-eval evaluation {self.available()}")
        for option, value in (("batch_size", batch_size), ("limit", limit)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ReplacerError(f"the lm-eval option {option} must be a positive whole number, got {value!r}")
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        from replacer.plugins import get_registry

        names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
        tokenizer = get_registry().load_tokenizer(context.tokenizer_source)
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        figures: dict[str, dict[str, float]] = {}
        with tempfile.TemporaryDirectory(prefix="replacer-lm-eval-") as folder:
            manager = TaskManager(include_path=str(write_held_out_task(Path(folder), [e for e in examples if isinstance(e, str)])))
            unknown_tasks = [n for n in names if n not in manager.all_tasks]
            if unknown_tasks:
                raise ReplacerError(f"lm-eval has no task {unknown_tasks[0]!r}; use {HELD_OUT} or a task `lm_eval --tasks list` shows")
            for label, model in models.items():
                # each window starts from the prefix token; the text itself is encoded without special tokens
                harness = HFLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=batch_size, max_length=context.max_length,
                               prefix_token_id=_prefix_token(tokenizer, model), add_bos_token=False)
                with contextlib.redirect_stderr(io.StringIO()):  # the harness's per-batch bars would flood a log
                    results = simple_evaluate(model=harness, tasks=names, task_manager=manager, limit=limit, log_samples=False,
                                              bootstrap_iters=0, verbosity="WARNING")
                figures[label] = _flatten(results["results"])
        return figures


def _prefix_token(tokenizer: Any, model: nn.Module) -> int | None:
    """The token rolling windows start from: the tokenizer's BOS or EOS, else the model config's BOS."""
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id, getattr(getattr(model, "config", None), "bos_token_id", None)):
        if isinstance(candidate, int):
            return candidate
    return None


def _flatten(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`task/metric` -> value for every numeric metric the harness reports (filters after the comma dropped
    when it is the default `none`; standard errors left out)."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, sep, filtered = key.partition(",")
            if sep and "stderr" not in metric and isinstance(value, (int, float)):
                flat[f"{task}/{metric}" + ("" if filtered == "none" else f",{filtered}")] = float(value)
    return flat
