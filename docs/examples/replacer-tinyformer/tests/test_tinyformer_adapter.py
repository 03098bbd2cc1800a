"""The TinyFormer adapter passes replacer's adapter kit, and converted TinyFormers save, reload and train."""

import pytest
import torch

import replacer
from replacer.testing import check_adapter
from replacer_tinyformer import TinyFormer, TinyFormerConfig


def inputs():
    ids = torch.randint(1, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 7:] = 0
    return (), {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("causal", [False, True])
def test_the_adapter_passes_the_kit(causal, tmp_path):
    check_adapter(lambda: TinyFormer(TinyFormerConfig(causal=causal)), inputs, adapter="tinyformer", tmp_dir=str(tmp_path))


def test_every_attention_is_found_and_replaced():
    model = TinyFormer(TinyFormerConfig(depth=3))
    found = replacer.scan(model)
    assert [s.name for s in found.sites] == [f"blocks.{i}.attention" for i in range(3)]
    assert all(s.adapter == "tinyformer" and s.num_heads == 4 and s.head_dim == 8 for s in found.sites)
    student = replacer.replace(model, plugin="lstm")
    assert not replacer.scan(student).sites and len(replacer.scan(student).replaced) == 3


def test_a_saved_student_reloads_without_base_and_trains(tmp_path):
    torch.manual_seed(0)
    student = replacer.replace(TinyFormer(TinyFormerConfig()), plugin="gru").eval()
    args, kwargs = inputs()
    replacer.save(student, tmp_path / "student")
    loaded = replacer.load(tmp_path / "student")  # rebuilt from the origin the describe hook recorded
    torch.testing.assert_close(loaded(*args, **kwargs), student(*args, **kwargs), atol=0, rtol=0)
    loaded.train()
    loaded(*args, **kwargs).pow(2).mean().backward()
    assert all(p.grad is not None for p in loaded.blocks[0].attention.mixer.parameters())
