"""Trust: bad inputs and faults, tried as a new user would, each ending in one line and exit code 2.

Every case asserts the exit code, that no traceback is printed, that the one error line names the
problem, and for faults that the user's files and the run's finished work are intact.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import replacer
from conftest import tiny_bert, tiny_deit
from replacer.cli import app
from helpers import tiny_text_recipe

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, pattern: str) -> str:
    """Exit 2, no traceback, and the last line of stderr is the only error line and matches `pattern`."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    return errors[0]


def recipe_with(tmp_path: Path, **replacements: str) -> Path:
    """The tiny text recipe with some of its lines replaced (`old line start` -> new line)."""
    path = tiny_text_recipe(tmp_path, distill_steps=4, tune_steps=2, checkpoint_every=2)
    text = path.read_text()
    for old, new in replacements.items():
        text = re.sub(rf"^{re.escape(old)}.*$", new, text, flags=re.MULTILINE)
    path.write_text(text)
    return path


# ---- recipes: every error is known before any work ----------------------------------------------------------------

RECIPE_CASES = {
    "not-utf8": (lambda p: p.write_bytes(b"name: caf\xe9\n"), [], r"is not UTF-8"),
    "yaml-syntax": (lambda p: p.write_text("name: x\nmodel: {source: [\n"), [], r"not valid YAML \(line \d+, column \d+"),
    "set-not-yaml": (None, ["--set", "distill.steps=[3"], r"--set distill.steps: the value '\[3' is not YAML"),
    "set-into-a-value": (None, ["--set", "name.x=1"], r"--set name.x: 'name' is not a section"),
    "unknown-plugin": (None, ["--set", "mixer.plugin=lstn"], r"unknown mixer plugin 'lstn'; installed: .*lstm"),
    "bad-option": (None, ["--set", "mixer.options.hidden_per_head=-1"], r"mixer.options: plugin 'lstm' option 'hidden_per_head'"),
    "unknown-option": (None, ["--set", "mixer.options.hiden=3"], r"mixer.options: plugin 'lstm' option 'hiden'"),
    "no-sites": (None, ["--set", "sites=[]"], r"sites: \[\] selects no site"),
    "huge-lr": (None, ["--set", "tune.lr=1e38"], r"tune.lr: Input should be less than or equal to 1"),
    "unknown-analyzer": (None, ["--set", "sites={policy: sparsest, layers: 1}", "--set", "analyze.analyzer=nope"],
                         r"unknown analyzer plugin 'nope'"),
    "analyzer-option": (None, ["--set", "analyze.enabled=true", "--set", "analyze.options={topk: 3}"],
                        r"analyze.options \{'topk': 3\} do not suit analyzer 'sparsity'"),
}


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("case", sorted(RECIPE_CASES))
def test_bad_recipe_is_one_line_before_any_work(tmp_path, case, command, monkeypatch):
    write, extra, pattern = RECIPE_CASES[case]
    path = recipe_with(tmp_path)
    if write is not None:
        write(path)
    import replacer.run.runner as run_module

    monkeypatch.setattr(run_module, "preflight", lambda *_: pytest.fail("work started before the recipe was checked"))
    assert_one_line_error(invoke(command, path, *extra), pattern)
    assert not (tmp_path / "run").exists()


def test_recipe_that_is_a_directory(tmp_path):
    assert_one_line_error(invoke("validate", tmp_path), r"recipe .* is a directory; give the recipe's YAML file")


# ---- run directories are replacer's own -------------------------------------------------------------------------

def test_run_dir_holding_the_recipe_is_refused_and_the_recipe_kept(tmp_path):
    path = recipe_with(tmp_path, **{"run_dir:": "run_dir: ."})
    before = path.read_bytes()
    os.chdir(tmp_path)
    assert_one_line_error(invoke("validate", path.name), r"run_dir \. holds the recipe tiny.yaml")
    assert_one_line_error(invoke("run", path.name), r"run_dir \. holds the recipe tiny.yaml")
    assert path.read_bytes() == before and not (tmp_path / "recipe.yaml").exists()


def test_restart_never_deletes_a_folder_that_is_not_a_run(tmp_path):
    mine = tmp_path / "my-project"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    path = recipe_with(tmp_path, **{"run_dir:": f"run_dir: {mine}"})
    assert_one_line_error(invoke("run", path, "--restart"), r"is not a replacer run directory .*notes.txt")
    assert (mine / "notes.txt").read_text() == "precious" and sorted(os.listdir(mine)) == ["notes.txt"]


def test_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "taken").write_text("x")
    path = recipe_with(tmp_path, **{"run_dir:": f"run_dir: {tmp_path / 'taken'}"})
    assert_one_line_error(invoke("run", path), r"run_dir .*taken is a file")
    assert (tmp_path / "taken").read_text() == "x"


def test_second_run_into_a_locked_directory_names_the_holder(tmp_path):
    from replacer.run.layout import RunLock, claim

    path = recipe_with(tmp_path)
    claim(tmp_path / "run", None)
    lock = RunLock(tmp_path / "run")
    try:
        assert_one_line_error(invoke("run", path), rf"in use by another replacer run \(pid {os.getpid()} on ")
    finally:
        lock.release()
    assert invoke("run", path).exit_code == 0  # the lock went with its holder


def test_restart_of_a_run_keeps_nothing_but_still_a_run(tmp_path):
    path = recipe_with(tmp_path)
    assert invoke("run", path).exit_code == 0
    assert (tmp_path / "run" / "model" / "manifest.json").is_file()
    assert invoke("run", path, "--set", "distill.steps=3", "--restart").exit_code == 0
    assert json.loads((tmp_path / "run" / "state.json").read_text())["stages"]["distill"]
    assert (tmp_path / "run" / ".replacer-run").is_file()


def test_a_run_that_failed_on_a_user_error_does_not_pin_its_recipe(tmp_path):
    path = recipe_with(tmp_path)
    assert_one_line_error(invoke("run", path, "--set", "sites=[7]"), r"site selector 7 matches no replaceable")
    result = invoke("run", path, "--set", "sites=[1]")
    assert result.exit_code == 0, result.output


def test_disk_full_is_one_line_and_finished_stages_stay(tmp_path, monkeypatch):
    import errno

    import replacer.report.markdown

    path = recipe_with(tmp_path)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "report.json"))

    monkeypatch.setattr(replacer.report.markdown, "write_text_atomically", full)
    assert_one_line_error(invoke("run", path), r"cannot use .*report.json: No space left on device; free some disk space")
    stages = json.loads((tmp_path / "run" / "state.json").read_text())["stages"]
    assert {"distill", "tune", "evaluate", "export"} <= set(stages)
    monkeypatch.undo()
    assert invoke("run", path).exit_code == 0
    assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_finished_run(tmp_path):
    path = recipe_with(tmp_path)
    assert invoke("run", path).exit_code == 0
    (tmp_path / "run").chmod(0o555)
    try:
        assert_one_line_error(invoke("run", path), r"run directory .* is not writable")
    finally:
        (tmp_path / "run").chmod(0o755)


def test_unwritable_run_dir_is_named(tmp_path, monkeypatch):
    import replacer.run.layout

    path = recipe_with(tmp_path)
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(replacer.run.layout, "writable", lambda _: False)
    assert_one_line_error(invoke("run", path), r"run directory .*run is not writable")


# ---- damaged run files on resume ------------------------------------------------------------------------------

def _finished_run(tmp_path: Path) -> Path:
    path = recipe_with(tmp_path)
    assert invoke("run", path).exit_code == 0
    return path


def test_damaged_state_json(tmp_path):
    path = _finished_run(tmp_path)
    (tmp_path / "run" / "state.json").write_text("{half")
    assert_one_line_error(invoke("run", path), r"state.json is damaged .*delete it .* or run with --restart")


def test_damaged_distilled_site_on_resume(tmp_path):
    path = _finished_run(tmp_path)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    state["stages"] = {}
    (tmp_path / "run" / "state.json").write_text(json.dumps(state))
    (tmp_path / "run" / "distill" / "encoder.layer.0.attention.self.safetensors").write_bytes(b"\x00" * 20)
    assert_one_line_error(invoke("run", path), r"encoder.layer.0.attention.self.safetensors is damaged .*distil that site again")


def test_damaged_training_state_on_resume(tmp_path):
    path = recipe_with(tmp_path)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".replacer-run").write_text("{}")
    state = tmp_path / "run" / "distill" / "encoder.layer.0.attention.self.partial.safetensors"
    state.parent.mkdir()
    state.write_bytes(b"garbage")
    assert_one_line_error(invoke("run", path), r"partial.safetensors is damaged .*delete it to train this part again")


def test_damaged_metrics_log_is_a_log(tmp_path):
    path = _finished_run(tmp_path)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"site": "x", "step": 3, "lo')  # a line cut short by a kill
    result = invoke("run", path, "--set", "evaluate.latency_repeats=1")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "figures" / "loss_curves.png").is_file()


def test_damaged_evaluation_is_evaluated_again(tmp_path):
    path = _finished_run(tmp_path)
    (tmp_path / "run" / "evaluation.json").write_text("[1, 2")
    result = invoke("run", path)
    assert result.exit_code == 0, result.output
    assert "fidelity" in json.loads((tmp_path / "run" / "evaluation.json").read_text())


# ---- divergence: NaN teacher, NaN loss ----------------------------------------------------------------------------

def test_nan_teacher_names_the_site(tmp_path):
    from conftest import tiny_text_bert

    weights = {k: v.clone() for k, v in tiny_text_bert().state_dict().items()}
    weights["encoder.layer.0.attention.output.dense.weight"].fill_(float("nan"))
    save_file(weights, str(tmp_path / "nan.safetensors"))
    path = recipe_with(tmp_path, **{"model:": (
        f'model: {{source: "conftest:tiny_text_bert", tokenizer: minilm, task: embedding, pretrained: false, '
        f'checkpoint: "{tmp_path / "nan.safetensors"}"}}'
    )})
    assert_one_line_error(invoke("run", path), r"teacher's site encoder.layer.1.attention.self .*NaN or infinite")
    assert json.loads((tmp_path / "run" / "state.json").read_text())["stages"] == {}


def test_diverging_loss_stops_with_site_and_step_and_keeps_the_last_checkpoint(tmp_path):
    from replacer.train.loop import train_loop
    from replacer.errors import DivergedError
    from replacer.train.state import load_state

    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.Adam([weight], lr=0.1)
    state = tmp_path / "state"

    def loss_at(step: int) -> torch.Tensor:
        return weight.sum() * (float("nan") if step == 6 else 1.0)

    with pytest.raises(DivergedError, match=r"site blocks.3.attn: the loss is nan at step 7; the checkpoint at step 6 is kept"):
        train_loop({"w": weight}, optimizer, loss_at, 10, 0.1, 2, state, {"site": "blocks.3.attn"}, lambda loss=None: None, lambda _: None)
    again = torch.nn.Parameter(torch.zeros(3))
    meta = load_state(state, {"w": again}, torch.optim.Adam([again], lr=0.1))
    assert meta["step"] == 6 and torch.isfinite(again).all() and not torch.equal(again, torch.zeros(3))


# ---- model sources ------------------------------------------------------------------------------------------------

def _model_dir(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    tiny_bert().save_pretrained(folder)
    return folder


class Marker:
    """Unpickling this writes a file: proof that a pickle was (or was not) executed."""

    path = ""

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_model_dir_faults(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert_one_line_error(invoke("scan", empty), r"cannot load a transformers model from .*model_type")

    wrong = _model_dir(tmp_path, "wrong")
    config = json.loads((wrong / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (wrong / "config.json").write_text(json.dumps(config))
    assert_one_line_error(invoke("scan", wrong), r"num_hidden_layers.* expected int")

    damaged = _model_dir(tmp_path, "damaged")
    (damaged / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_line_error(invoke("scan", damaged, "--pretrained"), r"SafetensorError")


def test_pickled_weights_are_never_unpickled(tmp_path):
    folder = tmp_path / "pickled"
    tiny_bert().config.save_pretrained(folder)
    Marker.path = str(tmp_path / "PWNED")
    torch.save({"x": Marker()}, folder / "pytorch_model.bin")
    line = assert_one_line_error(invoke("scan", folder, "--pretrained"), r"replacer never unpickles code")
    assert "weights_only=False" not in line and not (tmp_path / "PWNED").exists()
    recipe = recipe_with(tmp_path, **{"model:": (
        f'model: {{source: "conftest:tiny_text_bert", tokenizer: minilm, task: embedding, pretrained: false, '
        f'checkpoint: "{folder / "pytorch_model.bin"}"}}'
    )})
    line = assert_one_line_error(invoke("run", recipe), r"model.checkpoint .* is a pickle .* never unpickles code")
    assert "weights_only" not in line and not (tmp_path / "PWNED").exists()


def test_checkpoint_that_does_not_fit_names_the_keys(tmp_path):
    from conftest import tiny_text_bert

    weights = dict(tiny_text_bert().state_dict())
    weights.pop("pooler.dense.bias")
    weights["embeddings.word_embeddings.weight"] = torch.zeros(5, 32)
    save_file(weights, str(tmp_path / "w.safetensors"))
    recipe = recipe_with(tmp_path, **{"model:": (
        f'model: {{source: "conftest:tiny_text_bert", tokenizer: minilm, task: embedding, pretrained: false, '
        f'checkpoint: "{tmp_path / "w.safetensors"}"}}'
    )})
    assert_one_line_error(
        invoke("run", recipe),
        r"does not fit conftest:tiny_text_bert: missing \['pooler.dense.bias'\] \(1\); shape differs "
        r"\['embeddings.word_embeddings.weight \(5, 32\) vs \(30522, 32\)'\]",
    )


def test_callable_sources(tmp_path, monkeypatch):
    (tmp_path / "factories.py").write_text(
        "import torch\n"
        "def explodes():\n    raise ValueError('no GPU here')\n"
        "def needs(width):\n    return torch.nn.Linear(width, width)\n"
        "not_callable = 3\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert_one_line_error(invoke("scan", "factories:explodes"), r"'factories:explodes' raised ValueError: no GPU here")
    line = assert_one_line_error(invoke("scan", "factories:needs"), r"does not accept being called without arguments")
    assert "model.kwargs given" not in line
    assert_one_line_error(invoke("scan", "factories:not_callable"), r"is a int, not a callable")


# ---- checkpoints: data, never code --------------------------------------------------------------------------------

@pytest.fixture
def saved(tmp_path):
    student = replacer.replace(tiny_deit().eval())
    return replacer.save(student, tmp_path / "ck")


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_callable_origin_is_refused_without_running_it(saved, tmp_path):
    marker = tmp_path / "PWNED"
    _edit_manifest(saved, lambda m: m.update(origin={
        "family": "callable", "target": "subprocess:call", "kwargs": {"args": ["touch", str(marker)]}}))
    with pytest.raises(replacer.CheckpointError, match=r"built by calling 'subprocess:call', which would run that code; pass trust_remote_code=True"):
        replacer.load(saved)
    assert not marker.exists()


def test_callable_origin_loads_when_trusted(tmp_path):
    student = replacer.replace(replacer.load_model("conftest:tiny_bert"), sites=[1])
    replacer.save(student, tmp_path / "ck")
    with pytest.raises(replacer.CheckpointError, match="conftest:tiny_bert"):
        replacer.load(tmp_path / "ck")
    again = replacer.load(tmp_path / "ck", trust_remote_code=True)
    ids = torch.randint(1, 100, (1, 6))
    torch.testing.assert_close(again(input_ids=ids).last_hidden_state, student.eval()(input_ids=ids).last_hidden_state)


MANIFEST_CASES = {
    "no-replacements": (lambda m: m.pop("replacements"), r"replacements: Field required"),
    "sites-not-a-list": (lambda m: m["replacements"][0].update(sites="all"), r"replacements.0.sites: Input should be a valid list"),
    "shape-not-ints": (lambda m: m.update(shapes={"blocks.0.attn.mixer.in_proj.weight": ["x"]}), r"shapes.*valid integer"),
    "weights-outside": (lambda m: m.update(weights="../../etc/passwd"), r"names weights .* outside its folder"),
    "not-an-object": (lambda m: (m.clear(), m.update(format="replacer/1", replacements="x")), r"replacements: Input should be a valid list"),
    "unknown-plugin": (lambda m: m["replacements"][0].update(plugin="nope"), r"unknown mixer plugin 'nope'"),
    "timm-loader-argument": (lambda m: m["origin"]["kwargs"].update(checkpoint_path="/etc/passwd"), r"arguments \['checkpoint_path'\] that load files"),
    "timm-unknown-architecture": (lambda m: m["origin"].update(architecture="os.system"), r"timm architecture 'os.system'"),
    "no-family": (lambda m: m["origin"].pop("family"), r"origin names no model family"),
    "tampered-shape": (lambda m: m.update(shapes={"blocks.0.attn.mixer.no_such": [3]}), r"prunes blocks.0.attn.mixer.no_such, which the rebuilt model does not have"),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_CASES))
def test_tampered_manifest_is_one_checkpoint_error(saved, case):
    edit, pattern = MANIFEST_CASES[case]
    _edit_manifest(saved, edit)
    with pytest.raises(replacer.ReplacerError, match=pattern) as info:
        replacer.load(saved)
    assert "\n" not in str(info.value)


def test_transformers_origin_never_names_remote_code(tmp_path):
    student = replacer.replace(tiny_bert().eval(), sites=[0])
    path = replacer.save(student, tmp_path / "ck")
    _edit_manifest(path, lambda m: m["origin"].update({"class": "AutoModel"}))
    with pytest.raises(replacer.CheckpointError, match="'AutoModel', which is not a transformers model class"):
        replacer.load(path)
    _edit_manifest(path, lambda m: m["origin"].update({"class": "BertModel", "dtype": "load"}))
    with pytest.raises(replacer.CheckpointError, match="dtype 'load', which is not a torch dtype"):
        replacer.load(path)


def test_torn_save_is_detected(saved, tmp_path):
    student = replacer.load(saved)
    other = replacer.save(student, tmp_path / "other")
    shutil.copy(other / "model.safetensors", saved / "model.safetensors")  # weights of one save, manifest of another
    with pytest.raises(replacer.CheckpointError, match="come from two different saves"):
        replacer.load(saved)


def test_killed_save_leaves_no_temporary_files_behind(saved):
    (saved / ".saving-old").mkdir()
    (saved / "model.safetensors.123.partial-write").write_bytes(b"half")
    replacer.save(replacer.load(saved), saved)
    assert sorted(p.name for p in saved.iterdir()) == ["manifest.json", "model.safetensors"]


def test_load_never_modifies_its_base(saved):
    base = tiny_deit().eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    student = replacer.load(saved, base=base)
    assert student is not base and type(base.blocks[0].attn).__name__ == "Attention"
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_replace_out_never_overwrites_the_users_files(tmp_path):
    folder = _model_dir(tmp_path, "hf-model")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert_one_line_error(
        invoke("replace", "conftest:tiny_bert", "--out", folder, "--pretrained"),
        r"holds files that are not a replacer checkpoint \(config.json, model.safetensors\)",
    )
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    (tmp_path / "file").write_text("x")
    assert_one_line_error(invoke("replace", "conftest:tiny_bert", "--out", tmp_path / "file"), r"file is a file")


def test_kill_in_the_middle_of_a_checkpoint_resumes_exactly(tmp_path):
    """Tensors and step counter are one file: a kill mid-save resumes from the previous checkpoint, and the
    resumed site equals an uninterrupted run's."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    results = {}
    for kind in ("uninterrupted", "killed"):
        folder = tmp_path / kind
        folder.mkdir()
        path = tiny_text_recipe(folder, distill_steps=12, tune_steps=1, checkpoint_every=3)
        if kind == "killed":  # the second checkpoint of the first site (step 6) dies before its rename
            died = subprocess.run([sys.executable, "-m", "kill_in_save", "2", "run", str(path)], env=env,
                                  capture_output=True, timeout=600)
            assert died.returncode < 0, died.stderr.decode()[-2000:]
            assert list((folder / "run" / "distill").glob("*.partial-write"))
        done = subprocess.run([sys.executable, "-m", "replacer", "run", str(path)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        results[kind] = load_file(str(folder / "run" / "distill" / "encoder.layer.0.attention.self.safetensors"))
        assert not list((folder / "run").rglob("*.partial-write"))
    for name, value in results["uninterrupted"].items():
        torch.testing.assert_close(results["killed"][name], value, rtol=0, atol=1e-6)
