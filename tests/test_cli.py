"""The command line: scan, plugins, replace; one-line errors and non-zero exit codes."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from replacer.cli import app

runner = CliRunner()


def test_scan_timm_name():
    result = runner.invoke(app, ["scan", "deit_tiny_patch16_224"])
    assert result.exit_code == 0, result.output
    assert "12 attention sites" in result.output and "blocks.11.attn" in result.output


def test_scan_module_callable():
    result = runner.invoke(app, ["scan", "conftest:tiny_llama"])
    assert result.exit_code == 0, result.output
    assert "model.layers.1.self_attn" in result.output and "LlamaAttention" in result.output


def test_scan_hf_dir(tmp_path):
    from conftest import tiny_bert

    tiny_bert().save_pretrained(tmp_path)
    result = runner.invoke(app, ["scan", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "encoder.layer.1.attention.self" in result.output


def test_scan_errors_are_one_line_with_exit_code_2():
    unknown = runner.invoke(app, ["scan", "no-such-model"])
    assert unknown.exit_code == 2
    assert "cannot resolve model source 'no-such-model'" in unknown.output
    no_attention = runner.invoke(app, ["scan", "resnet18"])
    assert no_attention.exit_code == 2 and "has no attention modules" in no_attention.output
    bad_import = runner.invoke(app, ["scan", "no_such_module:build"])
    assert bad_import.exit_code == 2 and "cannot import 'no_such_module:build'" in bad_import.output


def test_replace_saves_a_loadable_model(tmp_path):
    out = tmp_path / "student"
    result = runner.invoke(
        app, ["replace", "conftest:tiny_bert", "--out", str(out), "--site", "1", "--option", "hidden_per_head=8"]
    )
    assert result.exit_code == 0, result.output
    assert "replaced 1 attention sites" in result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["origin"] == {"family": "callable", "target": "conftest:tiny_bert"}
    assert manifest["replacements"][0]["options"]["hidden_per_head"] == 8


def test_replace_rejects_bad_options(tmp_path):
    result = runner.invoke(app, ["replace", "conftest:tiny_bert", "--out", str(tmp_path), "--option", "hidden_per_head=-2"])
    assert result.exit_code == 2
    assert "option 'hidden_per_head'" in result.output
    assert not (tmp_path / "manifest.json").exists()


def test_scan_lists_each_unsupported_site_with_its_reason():
    result = runner.invoke(app, ["scan", "xcit_nano_12_p16_224"])
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "0 attention sites, 0 already replaced, 14 unsupported" in text  # 12 XCA blocks, 2 class-attention blocks
    assert text.count("channel attention") >= 12 and "class attention" in text
