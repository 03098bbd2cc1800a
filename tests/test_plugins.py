"""Plugin discovery through entry points: built-ins, a third party's distribution, a broken plugin."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from typer.testing import CliRunner

import replacer
from replacer.cli import app
from conftest import tiny_bert, tiny_gpt2

THIRD_PARTY = '''
import torch
from pydantic import BaseModel, ConfigDict
from replacer import Mixer, MixerSpec, hookimpl


class MeanOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = 1.0


class RunningMean(Mixer):
    """Each position gets the (masked) mean of the positions it may see."""

    def __init__(self, site, options):
        super().__init__(site)
        self.proj = torch.nn.Linear(site.d_model, site.out_dim)
        self.scale = options.scale

    def forward(self, x, padding_mask=None):
        return self.forward_stateful(x, None, padding_mask)[0] if self.causal else self._bidirectional(x, padding_mask)

    def _bidirectional(self, x, padding_mask):
        keep = torch.ones(x.shape[:2], dtype=x.dtype) if padding_mask is None else padding_mask.to(x.dtype)
        v = self.proj(x) * keep[..., None]
        return self.scale * v.sum(1, keepdim=True) / keep.sum(1)[:, None, None] * keep[..., None]

    def forward_stateful(self, x, state, padding_mask=None):
        keep = torch.ones(x.shape[:2], dtype=x.dtype) if padding_mask is None else padding_mask.to(x.dtype)
        total, count = state if state is not None else (x.new_zeros(x.shape[0], self.out_dim), x.new_zeros(x.shape[0], 1))
        sums = total[:, None] + (self.proj(x) * keep[..., None]).cumsum(1)
        counts = count[:, None] + keep[..., None].cumsum(1)
        return self.scale * sums / counts.clamp(min=1), (sums[:, -1], counts[:, -1])


@hookimpl
def replacer_mixers():
    return [MixerSpec("running-mean", MeanOptions, lambda site, opts, value: RunningMean(site, opts), "test mixer")]
'''


def _distribution(root, dist: str, version: str, entry: str, module: str, source: str) -> None:
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[replacer]\n{entry} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


@pytest.fixture
def third_party(tmp_path):
    _distribution(tmp_path, "acme-mixers", "1.2.3", "acme", "acme_mixers", THIRD_PARTY)
    _distribution(tmp_path, "broken-plugin", "0.1.0", "broken", "broken_plugin", "raise ImportError('needs libfoo')\n")
    sys.path.insert(0, str(tmp_path))
    yield replacer.get_registry(refresh=True)
    sys.path.remove(str(tmp_path))
    for name in ("acme_mixers", "broken_plugin"):
        sys.modules.pop(name, None)
    replacer.get_registry(refresh=True)


def test_builtins_register_through_entry_points():
    registry = replacer.get_registry()
    by_name = {p.name: p for p in registry.plugins}
    assert {"lstm", "timm", "transformers"} <= set(by_name)
    assert by_name["lstm"].distribution == "replacer" and by_name["lstm"].provides == ["mixer:lstm"]
    assert "adapter:timm-attention" in by_name["timm"].provides
    assert "adapter:hf-attention" in by_name["transformers"].provides
    assert "adapter:hf-gpt2-attention" in by_name["transformers"].provides


def test_third_party_mixer_is_used_by_name(third_party, tmp_path):
    info = third_party.provider("mixer:running-mean")
    assert (info.distribution, info.version) == ("acme-mixers", "1.2.3")
    student = replacer.replace(tiny_gpt2().eval(), plugin="running-mean", options={"scale": 0.5})
    ids = torch.randint(1, 100, (1, 5))
    out = student.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, 8)
    replacer.save(student, tmp_path / "ck")
    again = replacer.load(tmp_path / "ck")
    torch.testing.assert_close(again(ids).logits, student(ids).logits)
    bert = replacer.replace(tiny_bert().eval(), plugin="running-mean")
    assert bert(input_ids=ids).last_hidden_state.shape == (1, 5, 32)


def test_broken_plugin_is_named_and_does_not_break_others(third_party):
    broken = next(p for p in third_party.plugins if p.name == "broken")
    assert broken.error == "ImportError: needs libfoo" and broken.provides == []
    assert "lstm" in third_party.mixer_names and "running-mean" in third_party.mixer_names
    result = CliRunner().invoke(app, ["plugins"])
    assert result.exit_code == 0
    assert "broken-plugin" in result.output and "needs libfoo" in result.output
    assert "acme-mixers" in result.output and "1.2.3" in result.output


def test_unknown_plugin_lists_installed_ones():
    with pytest.raises(replacer.UnknownPluginError, match="unknown mixer plugin 'lstn'; installed: gru, lstm, ssm"):
        replacer.replace(tiny_bert(), plugin="lstn")


@pytest.fixture
def install(tmp_path):
    """Make fake distributions visible as entry points; returns a function that installs and refreshes."""
    modules = []

    def add(*dists: tuple[str, str, str, str, str]):
        for dist, version, entry, module, source in dists:
            _distribution(tmp_path, dist, version, entry, module, source)
            modules.append(module)
        return replacer.get_registry(refresh=True)

    sys.path.insert(0, str(tmp_path))
    yield add
    sys.path.remove(str(tmp_path))
    for name in modules:
        sys.modules.pop(name, None)
    replacer.get_registry(refresh=True)


IMPOSTOR = THIRD_PARTY.replace('MixerSpec("running-mean"', 'MixerSpec("lstm"')


def test_a_plugin_never_silently_takes_a_built_in_name(install, caplog):
    from replacer_lstm.mixer import MultiHeadLSTM

    with caplog.at_level("WARNING", logger="replacer"):
        registry = install(("evil-lstm", "6.6.6", "aaa", "evil_lstm", IMPOSTOR))  # sorts before the built-in
    impostor = next(p for p in registry.plugins if p.name == "aaa")
    assert "mixer:lstm" in impostor.provides
    problem = " ".join(impostor.problems)
    assert "evil-lstm 6.6.6" in problem and "replacer 0.1.0" in problem and "the built-in is used" in problem
    assert "evil-lstm 6.6.6" in caplog.text
    assert registry.mixer_provider("lstm").distribution == "replacer"
    with caplog.at_level("WARNING", logger="replacer"):
        student = replacer.replace(tiny_bert().eval(), plugin="lstm")
    assert isinstance(student.encoder.layer[0].attention.self.mixer, MultiHeadLSTM)
    assert "'evil-lstm:lstm'" in caplog.text and "using the built-in" in caplog.text
    chosen = replacer.replace(tiny_bert().eval(), plugin="evil-lstm:lstm")  # asked for by name: allowed
    assert type(chosen.encoder.layer[0].attention.self.mixer).__name__ == "RunningMean"
    assert chosen.replacer_record["replacements"][0]["distribution"] == "evil-lstm"
    listing = CliRunner().invoke(app, ["plugins"])
    assert listing.exit_code == 0 and "evil-lstm" in listing.output and "several distributions" in listing.output


def test_two_third_parties_with_one_name_are_both_named(install):
    registry = install(
        ("acme-mixers", "1.2.3", "acme", "acme_mixers", THIRD_PARTY),
        ("other-mixers", "0.9.0", "other", "other_mixers", THIRD_PARTY),
    )
    with pytest.raises(replacer.UnknownPluginError, match=r"'acme-mixers:running-mean', 'other-mixers:running-mean'"):
        replacer.replace(tiny_bert(), plugin="running-mean")
    assert registry.mixer_provider("other-mixers:running-mean").version == "0.9.0"
    result = CliRunner().invoke(app, ["replace", "conftest:tiny_bert", "--out", "unused", "--plugin", "running-mean"])
    assert result.exit_code == 2 and "other-mixers:running-mean" in result.output


MISSPELT = '''
from replacer import hookimpl


@hookimpl
def replacer_mixer():
    return []
'''


def test_a_misspelt_hook_is_reported(install, caplog):
    with caplog.at_level("WARNING", logger="replacer"):
        registry = install(("typo-plugin", "0.1.0", "typo", "typo_plugin", MISSPELT))
    info = next(p for p in registry.plugins if p.name == "typo")
    assert info.problems == [
        "implements unknown hook 'replacer_mixer', which is never called (did you mean 'replacer_mixers'?)"
    ]
    assert "replacer_mixer'" in caplog.text
    listing = CliRunner().invoke(app, ["plugins"], env={"COLUMNS": "250"})
    assert "unknown hook 'replacer_mixer'" in listing.output
