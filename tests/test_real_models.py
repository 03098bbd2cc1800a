"""The real pretrained models that exist offline: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (slow)."""

from __future__ import annotations

import pytest
import torch

import replacer
from replacer_transformers.loading import SMOLLM2_GGUF, minilm_dir, smollm2_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm():
    return replacer.load_model("minilm").eval()


@pytest.fixture(scope="module")
def smollm2():
    return replacer.load_model("smollm2").eval()


def test_minilm_scan_replace_backward_roundtrip(minilm, tmp_path):
    from transformers import AutoTokenizer

    found = replacer.scan(minilm)
    assert [(s.num_heads, s.head_dim, s.causal) for s in found.sites] == [(12, 32, False)] * 6
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    batch = tok(["a short sentence", "a somewhat longer sentence with padding after the short one"], padding=True, return_tensors="pt")
    student = replacer.replace(minilm)
    out = student(**batch).last_hidden_state
    assert out.shape == minilm(**batch).last_hidden_state.shape
    alone = student(**tok(["a short sentence"], return_tensors="pt")).last_hidden_state
    n = alone.shape[1]
    torch.testing.assert_close(out[0, :n], alone[0], atol=1e-4, rtol=1e-4)
    student.train()
    student(**batch).last_hidden_state.pow(2).mean().backward()
    assert student.encoder.layer[0].attention.self.mixer.weight_hh[0].grad.abs().sum() > 0
    student.eval()
    replacer.save(student, tmp_path)
    again = replacer.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).last_hidden_state, student(**batch).last_hidden_state)


@pytest.mark.parametrize("plugin", ["lstm", "gru", "ssm"])
def test_smollm2_scan_replace_generate_roundtrip(smollm2, tmp_path, plugin):
    from transformers import AutoTokenizer

    found = replacer.scan(smollm2)
    assert len(found.sites) == 30
    assert {(s.num_heads, s.num_kv_heads, s.head_dim, s.causal) for s in found.sites} == {(9, 3, 64, True)}
    tok = AutoTokenizer.from_pretrained(str(smollm2_dir()), gguf_file=SMOLLM2_GGUF)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    student = replacer.replace(smollm2, plugin=plugin, sites=list(range(15, 30)))
    generated = student.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6)
    assert generated.shape[1] == ids.shape[1] + 6
    full = generated[:, :-1]
    with torch.no_grad():
        logits = student(full, use_cache=False).logits
    torch.testing.assert_close(logits[0, ids.shape[1] - 1 :].argmax(-1), generated[0, ids.shape[1] :])
    student.train()
    student(ids, labels=ids).loss.backward()
    assert student.model.layers[20].self_attn.mixer.in_proj.weight.grad is not None
    student.eval()
    replacer.save(student, tmp_path)
    again = replacer.load(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, student(ids).logits)
