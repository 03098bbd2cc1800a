"""Recipe validation: every shipped recipe is valid; bad fields fail with the path and a hint."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from replacer.cli import app
from replacer.recipe import RecipeError, load_recipe

ROOT = Path(__file__).parent.parent
RECIPES = sorted(ROOT.joinpath("recipes").glob("*.yaml"))
MINIMAL = """
name: t
model: {source: minilm}
data:
  train: [{kind: text, source: docstrings}]
  eval: [{kind: text, source: fortunes}]
"""


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid(path):
    recipe = load_recipe(path)
    assert recipe.name == path.stem


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.mixer.plugin == "lstm" and recipe.distill.loss == "mse" and recipe.directory == Path("runs/t")


def test_unknown_field_names_path_and_suggests(tmp_path):
    with pytest.raises(RecipeError, match=r"r.yaml: distill.stepz: unknown field \(did you mean 'steps'\?\)"):
        load_recipe(write(tmp_path, MINIMAL + "distill: {stepz: 3}\n"))


def test_unknown_field_inside_a_data_source(tmp_path):
    bad = MINIMAL.replace("source: fortunes}", "source: fortunes, limt: 3}")
    with pytest.raises(RecipeError, match=r"data.eval.0.limt: unknown field \(did you mean 'limit'\?\)"):
        load_recipe(write(tmp_path, bad))


def test_wrong_type_and_missing_field(tmp_path):
    with pytest.raises(RecipeError, match=r"distill.steps: Input should be a valid integer.*\(got 'many'\)"):
        load_recipe(write(tmp_path, MINIMAL + "distill: {steps: many}\n"))
    with pytest.raises(RecipeError, match=r"model.source: required field is missing"):
        load_recipe(write(tmp_path, MINIMAL.replace("model: {source: minilm}", "model: {pretrained: true}")))


def test_overrides_are_validated_like_the_file(tmp_path):
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, ["distill.steps=7", "data.train.0.limit=5", "mixer.options.hidden_per_head=8"])
    assert recipe.distill.steps == 7 and recipe.data.train[0].limit == 5
    assert recipe.mixer.options == {"hidden_per_head": 8}
    with pytest.raises(RecipeError, match="distill.loss: Input should be 'mse', 'cosine' or 'mse\\+cosine'"):
        load_recipe(path, ["distill.loss=l1"])
    with pytest.raises(RecipeError, match="is not KEY.PATH=VALUE"):
        load_recipe(path, ["distill.steps"])
    with pytest.raises(RecipeError, match="'3' is not an index of a list of 1 items"):
        load_recipe(path, ["data.train.3.limit=5"])


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")


def test_text_selection_fields_are_checked_with_the_recipe(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(RecipeError, match=r"data.train.0.match: .*'\(\[' is not a regular expression"):
        load_recipe(path, ["data.train=[{kind: text, source: wordnet, match: '(['}]"])
    with pytest.raises(RecipeError, match="eval sources share the name wordnet: give each a distinct label"):
        load_recipe(path, ["data.eval=[{kind: text, source: wordnet, limit: 5}, {kind: text, source: wordnet}]"])
    recipe = load_recipe(path, ["data.eval=[{kind: text, source: fortunes, parts: [law]}, {kind: text, source: wordnet, match: '\\d', label: numbers}]"])
    assert [s.name for s in recipe.data.eval] == ["fortunes[law]", "numbers"]


def test_passages_fill_the_sources_max_length(tmp_path):
    from replacer.run.inputs import CHARS_PER_TOKEN, load_source

    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(f"Line {i} says something of middling length." for i in range(40)))
    path = write(tmp_path, MINIMAL)
    recipe = load_recipe(path, [f"data.eval=[{{kind: text, source: 'file:{lines}', max_length: 32, passages: true}}, {{kind: text, source: 'file:{lines}'}}]"])
    joined, single = recipe.data.eval
    assert joined.name == f"file:{lines} passages" and single.name == f"file:{lines}"  # distinct names in the report
    texts = load_source(joined, seed=0)  # 3-4 lines of 42-44 characters pass 4 x 32 characters
    whole = " ".join(lines.read_text().splitlines())
    assert all(len(t) >= CHARS_PER_TOKEN * 32 > len(t.rsplit(" Line ", 1)[0]) and t in whole for t in texts)  # no line more
    assert sum(t.count("Line ") for t in texts) > 40 - 3  # only a last piece under half a passage is left out
    assert len(load_source(single, seed=0)) == 40


def test_cli_validate(tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(write(tmp_path, MINIMAL))])
    assert ok.exit_code == 0 and "valid recipe 't'" in ok.output
    bad = runner.invoke(app, ["validate", str(tmp_path / "r.yaml"), "--set", "tune.lr=-1"])
    assert bad.exit_code == 2 and "tune.lr: Input should be greater than 0" in bad.output


def test_teacher_training_needs_random_initial_weights(tmp_path):
    path = ROOT / "recipes" / "fashion_vit_lstm.yaml"
    with pytest.raises(RecipeError, match=r"teacher.train trains the teacher from random weights: set model.pretrained to false"):
        load_recipe(path, ["model.pretrained=true"])
    message = ""
    try:
        load_recipe(path, ["model.checkpoint=/tmp/x.safetensors"])
    except RecipeError as exc:
        message = str(exc)
    assert "leave model.checkpoint unset" in message and "\n" not in message and "{" not in message


@pytest.mark.parametrize("override, message", [
    ("sites=[nowhere.*]", r"sites: site selector 'nowhere\.\*' matches no replaceable attention site"),
    ("sites=[99]", r"sites: site selector 99 matches no replaceable attention site"),
    ("sites={policy: random, layers: 40}", r"sites.layers=40 but BertModel has 6 replaceable layers"),
    ("data.train=[{kind: text, source: 'jsonl:/nonexistent/texts.jsonl'}]", r"data.train\[0\].source jsonl:/nonexistent/texts.jsonl: .* does not exist"),
    ("data.eval=[{kind: text, source: fortunez}]", r"data.eval\[0\].source: unknown text source 'fortunez'"),
    ("data.train=[{kind: text, source: wordnet, parts: [verbs]}]",
     r"data.train\[0\].parts: wordnet has no part 'verbs' \(did you mean 'verb'\?\): choose from noun, verb, adj, adv"),
    ("data.train=[{kind: text, source: bible, parts: [Psalms]}]", r"data.train\[0\].parts: text source 'bible' has no parts"),
    ("data.eval=[{kind: text, source: 'prose:/nonexistent/*.txt'}]", r"data.eval\[0\].source prose:/nonexistent/\*.txt: no file matches"),
    ("prune={enabled: true, scope: model, embeddings: false, budgets: [0.95, 0.1]}",
     r"prune.budgets \[0.1\]: \d+% of the student's parameters sit outside every prunable group .* must be above 0\.\d\d"),
    ("prune={enabled: true, scope: model, budgets: [0.95, 0.005]}",  # a factorised token embedding keeps one component
     r"prune.budgets \[0.005\]: \d+% of the student's parameters sit outside every prunable group .* must be above 0\.0\d"),
])
def test_validate_and_run_report_what_the_model_and_data_cannot_satisfy_before_any_work(tmp_path, override, message, monkeypatch):
    import replacer.run.runner

    started = []
    monkeypatch.setattr(replacer.run.runner, "run_stages", lambda *a, **k: started.append(1))
    runner = CliRunner()
    path = write(tmp_path, MINIMAL + f"run_dir: {tmp_path / 'run'}\n")
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(path), "--set", override])
        assert result.exit_code == 2, result.output
        assert re.search(message, " ".join(result.output.split())), result.output
    assert not started and not (tmp_path / "run").exists()
