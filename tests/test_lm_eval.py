"""lm-evaluation-harness: `replacer evaluate RUN --lm-eval TASKS` runs a causal student and its teacher
through the harness's Hugging Face model class, on a local task over the run's held-out text, and the
figures join the run's report."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import replacer
from replacer.cli import app

runner = CliRunner()


def _causal_run(tmp_path):
    from helpers import tiny_causal_recipe

    path = tiny_causal_recipe(tmp_path, """mixer: {plugin: lstm, options: {hidden_per_head: 4}}
distill: {steps: 2, calibration_batches: 2}
tune: {steps: 2}
evaluate: {latency: false, figures: false}
""", max_length=32, eval_limit=6)
    assert runner.invoke(app, ["run", str(path)]).exit_code == 0
    return tmp_path / "run"


def _byte_perplexity(model, texts) -> float:
    """A reference: each text one window after the prefix token, its summed negative log-likelihood over its bytes."""
    tokenizer = replacer.get_registry().load_tokenizer("minilm")
    nll, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([[model.config.bos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]])
            logits = model(ids).logits[0, :-1]
            nll += F.cross_entropy(logits.float(), ids[0, 1:], reduction="sum").item()
            size += len(text.encode("utf-8"))
    return math.exp(nll / size)


def test_lm_eval_scores_teacher_and_student_on_the_held_out_text_into_the_report(tmp_path):
    from conftest import tiny_text_llama

    run = _causal_run(tmp_path)
    result = runner.invoke(app, ["evaluate", str(run), "--lm-eval", "replacer_heldout", "--limit", "4"])
    assert result.exit_code == 0, result.output
    figures = json.loads((run / "report.json").read_text())["ecosystem"]["lm-eval"]
    assert set(figures) == {"teacher", "student"}
    texts = [line for line in (tmp_path / "t.txt").read_text().splitlines()]
    from replacer.run.inputs import load_examples
    from replacer.recipe import load_recipe

    recipe = load_recipe(run / "recipe.yaml")
    held_out = list(load_examples(recipe.data.eval, recipe.seed + 1))[:4]
    assert set(held_out) <= set(texts)
    teacher = tiny_text_llama().eval()
    student = replacer.load(run / "model", base=teacher)
    for name, model in (("teacher", teacher), ("student", student)):
        assert figures[name]["replacer_heldout/byte_perplexity"] == pytest.approx(_byte_perplexity(model, held_out), rel=1e-4)
        assert math.log2(figures[name]["replacer_heldout/byte_perplexity"]) == pytest.approx(figures[name]["replacer_heldout/bits_per_byte"], rel=1e-4)
    assert "## lm-eval evaluation (held-out data)" in (run / "report.md").read_text()
    assert "replacer_heldout/word_perplexity" in result.output


def test_lm_eval_refuses_bad_requests_in_one_line(tmp_path):
    run = _causal_run(tmp_path)
    cases = [
        (["evaluate", str(run), "--lm-eval", "no_such_task_anywhere"], "lm-eval has no task 'no_such_task_anywhere'"),
        (["evaluate", str(run)], "give one of --lm-eval TASKS or --with EVALUATION"),
        (["evaluate", str(run), "--with", "sentence-transformers"], "measures embedding models, and"),
        (["evaluate", str(run / "model"), "--lm-eval", "replacer_heldout"], "is a saved model, not a run: give --teacher"),
        (["evaluate", str(run), "--lm-eval", "replacer_heldout", "--option", "batch_size=many"], "batch_size must be a positive whole number"),
        (["evaluate", str(run), "--lm-eval", "replacer_heldout", "--option", "shots=5"], "takes tasks, limit and batch_size, not ['shots']"),
    ]
    before = (run / "report.json").read_text()
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert (run / "report.json").read_text() == before


@pytest.mark.slow
def test_lm_eval_runs_smollm2_beside_a_converted_student(tmp_path):
    from replacer.run.evaluate_saved import evaluate_saved

    student = replacer.replace(replacer.load_model("smollm2"), "lstm", sites=[0, 1])  # two layers, untrained
    replacer.save(student, tmp_path / "student")
    args = ["evaluate", str(tmp_path / "student"), "--lm-eval", "replacer_heldout", "--teacher", "smollm2", "--text", "fortunes",
            "--limit", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "replacer_heldout/bits_per_byte" in result.output, result.output
    figures = evaluate_saved(tmp_path / "student", "lm-eval", {"tasks": "replacer_heldout"}, teacher="smollm2", text="fortunes", limit=8)
    teacher, converted = (figures[m]["replacer_heldout/bits_per_byte"] for m in ("teacher", "student"))
    assert 0.3 < teacher < 2.0  # a real language model on English text: about a bit per byte
    assert converted > teacher  # two layers' attention gone, nothing trained yet
