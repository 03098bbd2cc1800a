"""Export formats: the sentence-transformers folder a run (or `replacer export`) writes loads in
`SentenceTransformer` offline and encodes exactly as `replacer.load` plus the embedding task's pooling."""

from __future__ import annotations

import json

import pytest
import torch
from sentence_transformers import SentenceTransformer
from typer.testing import CliRunner

import replacer
from conftest import tiny_text_bert
from helpers import folder_embeddings, saved_embeddings
from replacer.cli import app
from replacer.ecosystem import ModelContext
from replacer.exporting import export_formats, export_into
from replacer.tasks import EmbeddingTask

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Attention becomes a recurrence.", "short", "A longer text, " * 8]
runner = CliRunner()


def test_a_sentence_transformers_export_encodes_as_the_replaced_model(tmp_path):
    student = replacer.replace(tiny_text_bert(), "lstm", options={"hidden_per_head": 4}).eval()
    context = ModelContext("conftest:tiny_text_bert", "minilm", "embedding", 256)
    (exporter,) = export_formats(["sentence-transformers"], context)
    export_into(exporter, student, tmp_path / "st", context)
    model, embeddings = folder_embeddings(tmp_path / "st", TEXTS)
    assert [type(m).__name__ for m in model] == ["ReplacerEncoder", "Pooling", "Normalize"]  # as the embedding task pools
    torch.testing.assert_close(embeddings, saved_embeddings(tmp_path / "st" / "replacer_model", TEXTS), atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="trust_remote_code=True"):  # sentence-transformers' own opt-in for a module class
        SentenceTransformer(str(tmp_path / "st"), device="cpu")


def test_unknown_and_unsuitable_formats_are_refused_before_work():
    context = ModelContext("smollm2", "smollm2", "causal-lm", 64)
    with pytest.raises(replacer.ReplacerError, match="unknown format 'onnx'; known: replacer, sentence-transformers"):
        export_formats(["replacer", "onnx"], context)
    with pytest.raises(replacer.ReplacerError, match="writes embedding models, and this recipe's task is 'causal-lm'"):
        export_formats(["sentence-transformers"], context)
    assert [e.name for e in export_formats(None, context)] == ["replacer"]
    assert [e.name for e in export_formats(None, ModelContext("x", "minilm", "embedding", 64))] == ["replacer", "sentence-transformers"]


def test_a_run_writes_both_formats_by_default_and_replacer_export_writes_one(tmp_path):
    from helpers import tiny_text_recipe

    recipe = tiny_text_recipe(tmp_path, distill_steps=2, tune_steps=2)
    assert runner.invoke(app, ["run", str(recipe)]).exit_code == 0
    run = tmp_path / "run"
    st, embeddings = folder_embeddings(run / "sentence-transformers", TEXTS)
    assert st.max_seq_length == 16  # what the run trained on, where the teacher folder does not say
    torch.testing.assert_close(embeddings, saved_embeddings(run / "model", TEXTS, max_length=16), atol=1e-6, rtol=1e-5)
    report = json.loads((run / "report.json").read_text())
    assert set(report["ecosystem"]["sentence-transformers"]) == {"teacher", "student", "untrained"}
    assert "## sentence-transformers evaluation (held-out data)" in (run / "report.md").read_text()
    state = json.loads((run / "state.json").read_text())
    assert state["stages"]["export"]["formats"] == {"replacer": "model", "sentence-transformers": "sentence-transformers"}

    result = runner.invoke(app, ["export", str(run), "--format", "sentence-transformers", "--out", str(tmp_path / "again"),
                                  "--trust-remote-code"])
    assert result.exit_code == 0, result.output
    torch.testing.assert_close(folder_embeddings(tmp_path / "again", TEXTS)[1], embeddings, atol=1e-6, rtol=1e-5)
    saved = runner.invoke(app, ["export", str(run / "model"), "--format", "sentence-transformers", "--out", str(tmp_path / "from-model"),
                                "--teacher", "minilm", "--trust-remote-code"])
    assert saved.exit_code == 0, saved.output
    # pooling and the longest input as the teacher's sentence-transformers folder declares them
    from_model, encoded = folder_embeddings(tmp_path / "from-model", TEXTS)
    assert from_model.max_seq_length == 256
    torch.testing.assert_close(encoded, saved_embeddings(run / "model", TEXTS), atol=1e-6, rtol=1e-5)


def test_replacer_export_refuses_bad_arguments_in_one_line(tmp_path):
    student = replacer.replace(tiny_text_bert(), "lstm", options={"hidden_per_head": 4})
    replacer.save(student, tmp_path / "model")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(tmp_path / "x")], "is a saved model, not a run: give --teacher"),
        (["--out", str(tmp_path / "busy"), "--teacher", "minilm"], "already exists and is not an empty folder"),
        (["--out", str(tmp_path / "x"), "--teacher", "minilm", "--format", "onnx"], "unknown format 'onnx'"),
    ]
    missing = runner.invoke(app, ["export", str(tmp_path / "nope"), "--format", "sentence-transformers", "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nope is not a folder: give a run directory or a model saved by replacer" in missing.output
    for extra, message in cases:
        args = ["export", str(tmp_path / "model"), *extra]
        if "--format" not in extra:
            args += ["--format", "sentence-transformers"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"


@pytest.mark.slow
def test_the_teacher_folders_pooling_and_normalisation_are_kept(tmp_path):
    from replacer_transformers.loading import minilm_dir

    student = replacer.replace(replacer.load_model("minilm"), "lstm", options={"hidden_per_head": 8}).eval()
    context = ModelContext("minilm", "minilm", "embedding", 64)
    (exporter,) = export_formats(["sentence-transformers"], context)
    export_into(exporter, student, tmp_path / "st", context)
    model, embeddings = folder_embeddings(tmp_path / "st", TEXTS)
    assert model.max_seq_length == 256  # the teacher folder's, not the recipe's
    teacher = SentenceTransformer(str(minilm_dir()), device="cpu", local_files_only=True)
    assert [type(m).__name__ for m in model] == ["ReplacerEncoder", "Pooling", "Normalize"]
    assert model[1].get_config_dict() == teacher[1].get_config_dict()
    torch.testing.assert_close(embeddings, saved_embeddings(tmp_path / "st" / "replacer_model", TEXTS), atol=1e-6, rtol=1e-5)


def test_the_sentence_transformers_evaluation_scores_held_out_halves_as_a_reference_does():
    from replacer_transformers.sentence_transformers_evaluation import SentenceTransformersEvaluation, split_halves

    texts = [f"text {i} says " + " ".join(f"w{(i * 7 + j) % 23}" for j in range(8)) for i in range(12)] + ["too short"]
    firsts, seconds = split_halves(texts)
    assert len(firsts) == 12 and firsts[0] == "text 0 says w0 w1" and seconds[0] == "w2 w3 w4 w5 w6 w7"
    many = split_halves([f"{i} a b c d e f" for i in range(1203)])[0]
    assert len(many) == 401 and many[:2] == ["0 a b", "3 a b"]  # at most 500, evenly spaced
    teacher = tiny_text_bert().eval()
    student = replacer.replace(teacher, "lstm", options={"hidden_per_head": 4}).eval()
    context = ModelContext("conftest:tiny_text_bert", "minilm", "embedding", 64)
    figures = SentenceTransformersEvaluation().evaluate({"teacher": teacher, "student": student}, texts, context)
    task = EmbeddingTask(replacer.get_registry().load_tokenizer("minilm"), 64)
    for name, model in (("teacher", teacher), ("student", student)):
        with torch.no_grad():
            a, p = (task.run(model, task.collate(t))["embedding"] for t in (firsts, seconds))
        n = torch.roll(p, -6, 0)  # each anchor's negative: the text half the list away
        similarity = a @ p.T
        assert figures[name]["triplet_accuracy"] == pytest.approx(((a * p).sum(-1) > (a * n).sum(-1)).float().mean().item())
        rank_of_own = (similarity > similarity.diag()[:, None]).sum(1)
        assert figures[name]["retrieval_accuracy@1"] == pytest.approx((rank_of_own == 0).float().mean().item())
        assert figures[name]["retrieval_mrr@10"] == pytest.approx(torch.where(rank_of_own < 10, 1 / (rank_of_own + 1), 0).mean().item())
        assert figures[name]["pairs"] == 12


def test_validate_refuses_a_format_the_recipe_cannot_write(tmp_path):
    from helpers import tiny_text_recipe

    recipe = str(tiny_text_recipe(tmp_path))
    unknown = runner.invoke(app, ["validate", recipe, "--set", "export.formats=[replacer, onnx]"])
    assert unknown.exit_code == 2 and "unknown format 'onnx'; known: replacer, sentence-transformers" in unknown.output
    unsuitable = runner.invoke(app, ["validate", recipe, "--set", "export.formats=[sentence-transformers]", "--set", "model.task=causal-lm"])
    assert unsuitable.exit_code == 2 and "writes embedding models, and this recipe's task is 'causal-lm'" in unsuitable.output
    assert runner.invoke(app, ["validate", recipe, "--set", "export.formats=[sentence-transformers]"]).exit_code == 0
    assert not (tmp_path / "run").exists()  # validating writes nothing
