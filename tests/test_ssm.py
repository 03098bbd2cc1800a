"""The ssm mixer: its scans against the plain recurrence, padding, carried state and whole replaced models."""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

import replacer
from conftest import tiny_deit, tiny_llama
from replacer.graph.site import LinearWeights, Site
from replacer.testing import check_mixer
from replacer_ssm import SSMOptions, build, chunked_scan, reference_scan
from replacer_ssm import mixer as mixer_module
from replacer_ssm import scan as ssm_scan


def site(causal: bool = False) -> Site:
    return Site(name="s", cls="X", adapter="a", layer_index=0, d_model=12, num_heads=3, head_dim=4,
                num_kv_heads=3, causal=causal)


def mixer(causal: bool = False, value: LinearWeights | None = None, **options):
    torch.manual_seed(0)
    return build(site(causal), SSMOptions(**options), value).eval()


def scan_inputs(l: int, dtype=torch.float32, b: int = 2, h: int = 3, p: int = 4, n: int = 5, dt_max: float = 0.5,
                A: torch.Tensor | None = None):
    g = torch.Generator().manual_seed(l)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    dt = torch.rand(b, l, h, generator=g, dtype=dtype) * dt_max
    A = -(1 + 15 * torch.rand(h, generator=g, dtype=dtype)) if A is None else A.to(dtype)
    return dict(x=r(b, l, h, p), dt=dt, A=A, B=r(b, l, h, n), C=r(b, l, h, n), D=r(h), initial_state=r(b, h, n, p))


def test_conformance_with_default_options():
    check_mixer("ssm")


def test_conformance_without_conv_or_gate_and_with_partial_chunks():
    check_mixer("ssm", {"conv_kernel": 0, "gate": False, "state_size": 4, "chunk_size": 3})
    check_mixer("ssm", {"conv_kernel": 2, "chunk_size": 4})


@pytest.mark.parametrize("length", [1, 5, 64, 130])
@pytest.mark.parametrize("chunk", [64, 7])
def test_chunked_scan_equals_the_recurrence(length, chunk):
    inputs = scan_inputs(length)
    y, state = chunked_scan(**inputs, chunk_size=chunk)
    y_ref, state_ref = reference_scan(**inputs)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("length", [5, 130])
def test_chunked_scan_equals_the_recurrence_in_float64(length):
    inputs = scan_inputs(length, torch.float64)
    y, state = chunked_scan(**inputs, chunk_size=16)
    y_ref, state_ref = reference_scan(**inputs)
    assert y.dtype == state.dtype == torch.float64
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(state, state_ref, atol=1e-12, rtol=1e-12)


def test_strong_decay_stays_finite_and_exact():
    inputs = scan_inputs(150, dt_max=5.0, A=torch.full((3,), -16.0))
    for t in inputs.values():
        t.requires_grad_(True)
    y, state = chunked_scan(**inputs, chunk_size=64)
    y_ref, state_ref = reference_scan(**inputs)
    assert torch.isfinite(y).all() and torch.isfinite(state).all()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(state, state_ref, atol=1e-5, rtol=1e-5)
    (y.square().mean() + state.square().mean()).backward()
    assert all(torch.isfinite(t.grad).all() for t in inputs.values()), "gradients must stay finite under strong decay"


def test_mixer_scan_matches_the_recurrence_token_by_token(monkeypatch):
    """The whole mixer, with its scan swapped for the plain recurrence, computes the same outputs."""
    m = mixer(False, chunk_size=4)
    x = torch.randn(2, 11, 12)
    fast = m(x)
    shapes = []

    def slow(x, dt, A, B, C, D, chunk_size, initial_state=None):
        shapes.append(tuple(x.shape))
        return reference_scan(x, dt, A, B, C, D, initial_state)

    monkeypatch.setattr(mixer_module, "ssd_scan", slow)
    torch.testing.assert_close(m(x), fast, atol=1e-5, rtol=1e-5)
    assert shapes == [(2, 11, 6, 4)], "both directions run as one scan over directions x heads"


@pytest.mark.parametrize("causal", [False, True])
def test_rows_with_different_padding_equal_each_row_alone(causal):
    m = mixer(causal, chunk_size=3)
    x = torch.randn(3, 10, 12) * 10
    keep = torch.tensor([
        [1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 0, 1, 1, 0, 1],
    ]).bool()
    x.requires_grad_(True)
    out = m(x, keep)
    for row in range(3):
        alone = m(x[row : row + 1, keep[row]])
        torch.testing.assert_close(out[row, keep[row]], alone[0], atol=1e-5, rtol=1e-4)
    assert out[~keep].abs().max() == 0
    out[keep].sum().backward()
    assert x.grad[~keep].abs().max() == 0, "padded tokens must not influence real outputs, even through gradients"


def test_padded_single_token_step_leaves_the_state_untouched():
    m = mixer(True)
    x = torch.randn(2, 5, 12)
    _, state = m.forward_stateful(x, None)
    y, after = m.forward_stateful(torch.randn(2, 1, 12), state, torch.tensor([[False], [True]]))
    assert y[0].abs().max() == 0
    for s, a in zip(state, after):
        torch.testing.assert_close(a[0], s[0], atol=0, rtol=0)
        assert not torch.equal(a[1], s[1])


def test_state_shapes():
    m = mixer(True, state_size=6, conv_kernel=3)
    _, (conv_state, ssm_state) = m.forward_stateful(torch.randn(2, 5, 12), None)
    assert conv_state.shape == (2, 12, 2)
    assert ssm_state.shape == (2, 3, 6, 4)


def test_initialisation_follows_the_teacher_and_mamba():
    value = LinearWeights(torch.randn(12, 12), torch.randn(12))
    m = mixer(False, value)
    torch.testing.assert_close(m.in_proj.weight, value.weight, atol=0, rtol=0)
    torch.testing.assert_close(m.in_proj.bias, value.bias, atol=0, rtol=0)
    dt = F.softplus(m.dt_bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 1e-1 * 1.001
    A = torch.exp(m.A_log)
    assert A.min() >= 1 and A.max() <= 16
    assert m.directions == 2 and m.A_log.shape == (2, 3)
    assert not torch.equal(mixer(False, value, init_from_value=False).in_proj.weight, value.weight)


def test_bidirectional_option_and_state_errors():
    with pytest.raises(replacer.OptionsError, match="impossible at causal site.*set it to false"):
        build(site(True), SSMOptions(bidirectional=True), None)
    assert mixer(False, bidirectional=False).directions == 1
    with pytest.raises(TypeError, match="cannot carry state"):
        mixer(False).forward_stateful(torch.randn(1, 3, 12), None)
    spec = replacer.get_registry().mixer("ssm")
    with pytest.raises(replacer.OptionsError, match="option 'state_sise': Extra inputs.*accepted options: state_size"):
        spec.validate_options({"state_sise": 3})


def test_the_path_taken_is_logged_once(caplog):
    ssm_scan._log_path.cache_clear()
    m = mixer(True)
    with caplog.at_level(logging.INFO, logger="replacer.ssm"):
        m(torch.randn(1, 6, 12))
        m(torch.randn(1, 6, 12))
    assert [r.getMessage() for r in caplog.records] == ["ssm: chunked PyTorch scan (on cpu)"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for mamba-ssm's kernels")
@pytest.mark.skipif(importlib.util.find_spec("mamba_ssm") is None, reason="mamba-ssm is not installed")
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_path_equals_cpu_path(causal):
    cpu = mixer(causal)
    gpu = mixer(causal).cuda()
    x = torch.randn(2, 150, 12)
    keep = torch.ones(2, 150, dtype=torch.bool)
    keep[1, :7] = False
    keep[0, 100:] = False
    torch.testing.assert_close(gpu(x.cuda(), keep.cuda()).cpu(), cpu(x, keep), atol=1e-3, rtol=1e-3)
    if causal:
        y1, state = gpu.forward_stateful(x[:, :70].cuda(), None)
        y2, _ = gpu.forward_stateful(x[:, 70:].cuda(), state)
        torch.testing.assert_close(torch.cat((y1, y2), 1).cpu(), cpu(x), atol=1e-3, rtol=1e-3)
    ref = gpu(x.cuda().requires_grad_(True))
    ref.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def roundtrip(student, tmp_path, inputs: dict) -> None:
    replacer.save(student, tmp_path / "ck")
    loaded = replacer.load(tmp_path / "ck")
    with torch.no_grad():
        a, b = student(**inputs), loaded(**inputs)
    a = a if isinstance(a, torch.Tensor) else a.logits
    b = b if isinstance(b, torch.Tensor) else b.logits
    torch.testing.assert_close(b, a, atol=0, rtol=0)


def test_replaced_deit_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    student = replacer.replace(tiny_deit().eval(), plugin="ssm")
    assert [type(m).__name__ for m in student.modules()].count("MultiHeadSSM") == 2
    images = torch.randn(2, 3, 32, 32)
    out = student(images)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.square().mean().backward()
    ssm = next(m for m in student.modules() if type(m).__name__ == "MultiHeadSSM")
    assert ssm.A_log.grad is not None and ssm.B_weight.grad.abs().sum() > 0
    roundtrip(student.eval(), tmp_path, {"x": images})


def test_replaced_llama_trains_and_round_trips(tmp_path):
    torch.manual_seed(0)
    student = replacer.replace(tiny_llama().eval(), plugin="ssm")
    ids = torch.randint(1, 100, (2, 7))
    logits = student(ids).logits
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    roundtrip(student, tmp_path, {"input_ids": ids})
