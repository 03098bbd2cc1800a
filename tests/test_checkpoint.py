"""Checkpoints: safetensors + JSON only, clear errors for anything broken, nothing good overwritten."""

from __future__ import annotations

import json

import pytest
import torch

import replacer
import replacer.checkpoint as checkpoint
from conftest import tiny_bert, tiny_deit


@pytest.fixture
def saved(tmp_path):
    student = replacer.replace(tiny_deit().eval())
    replacer.save(student, tmp_path / "ck")
    return student, tmp_path / "ck"


def test_checkpoint_is_safetensors_and_json_only(saved):
    _, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["origin"]["architecture"] == "deit_tiny_patch16_224"
    assert manifest["replacements"][0]["plugin"] == "lstm"
    assert manifest["replacements"][0]["sites"][0]["name"] == "blocks.0.attn"


def test_missing_manifest(tmp_path):
    with pytest.raises(replacer.CheckpointError, match="not a replacer checkpoint: no manifest.json"):
        replacer.load(tmp_path)


def test_corrupt_manifest(saved):
    _, path = saved
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(replacer.CheckpointError, match="manifest.json is corrupt"):
        replacer.load(path)


def test_corrupt_weights(saved):
    _, path = saved
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(replacer.CheckpointError, match="cannot be loaded"):
        replacer.load(path)


def test_missing_weights(saved):
    _, path = saved
    (path / "model.safetensors").unlink()
    with pytest.raises(replacer.CheckpointError, match="is missing"):
        replacer.load(path)


def test_wrong_base_is_reported(saved):
    _, path = saved
    with pytest.raises(replacer.ReplacerError):
        replacer.load(path, base=tiny_bert())


def test_saving_an_unreplaced_model_is_an_error(tmp_path):
    with pytest.raises(replacer.CheckpointError, match="replacer.replace"):
        replacer.save(tiny_deit(), tmp_path)


def test_failed_save_keeps_the_previous_checkpoint(saved, monkeypatch):
    student, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_safetensors", explode)
    with torch.no_grad():
        student.blocks[0].attn.mixer.merge_bias.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        replacer.save(student, path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
