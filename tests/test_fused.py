"""The fused recurrences (replacer.fused) against the reference loop they must equal, and the path choice."""

from __future__ import annotations

import pytest
import torch

import replacer
from conftest import tiny_bert
from replacer import fused
from replacer.graph.site import Site
from replacer.plugins import get_registry
from replacer.recurrent import MultiHeadRecurrence
from replacer.testing import check_mixer
from replacer_lstm.mixer import MultiHeadLSTM

PLUGINS = ["lstm", "gru"]


def _site(causal: bool) -> Site:
    return Site(name="s", cls="X", adapter="a", layer_index=0, d_model=48, num_heads=3, head_dim=16, num_kv_heads=3,
                causal=causal)


def _mixer(plugin: str, causal: bool, hidden: int = 8):
    spec = get_registry().mixer(plugin)
    torch.manual_seed(0)
    return spec.build(_site(causal), spec.validate_options({"hidden_per_head": hidden}), None)


def _mask(batch: int, length: int) -> torch.Tensor:
    """Padding on the right, on the left and in the middle of different sequences."""
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, length - 3 :] = False
    if batch > 1:
        mask[1, :4] = False
    if batch > 2:
        mask[2, 5:8] = False
    if batch > 5:  # a second block of sequences in the kernels (replacer.fused.numba_kernels.BLOCK)
        mask[5, :2] = False
        mask[5, length - 2 :] = False
    return mask


def _run(mixer, path: str, x: torch.Tensor, mask: torch.Tensor | None, state=None):
    """Outputs, final state, and gradients of the input and every parameter, on one path."""
    mixer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    with fused.recurrence(path):
        y, new = mixer.scan(x, state, mask)
    (y.pow(2).sum() + sum(s.pow(2).sum() for s in new)).backward()
    grads = {n: p.grad.clone() for n, p in mixer.named_parameters() if p.grad is not None}
    return y.detach(), [s.detach() for s in new], x.grad.clone(), grads


def _assert_same(fast, slow) -> None:
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-5)
    for a, b in zip(fast[1], slow[1]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[2], slow[2], atol=1e-4, rtol=1e-4)
    assert set(fast[3]) == set(slow[3]) and fast[3]
    for name in slow[3]:
        torch.testing.assert_close(fast[3][name], slow[3][name], atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("batch", [1, 6, 32])
@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("hidden", [8, 7])  # 7: recurrent weights' rows not a multiple of the kernels' four per pass
def test_fused_equals_reference(plugin, causal, batch, padded, hidden):
    mixer = _mixer(plugin, causal, hidden)
    x = torch.randn(batch, 13, 48)
    mask = _mask(batch, 13) if padded else None
    _assert_same(_run(mixer, "fused", x, mask), _run(mixer, "reference", x, mask))


@pytest.mark.parametrize("plugin", PLUGINS)
def test_fused_with_a_carried_state_equals_reference(plugin):
    mixer = _mixer(plugin, causal=True)
    x = torch.randn(3, 9, 48)
    state = tuple(torch.randn(3, 3, 8) * 0.5 for _ in range(mixer.state_size))  # (B, G, h) as the mixer carries it
    _assert_same(_run(mixer, "fused", x, _mask(3, 9), state), _run(mixer, "reference", x, _mask(3, 9), state))


@pytest.mark.parametrize("plugin", PLUGINS)
def test_state_carried_in_pieces_equals_the_whole(plugin):
    mixer = _mixer(plugin, causal=True).eval()
    x = torch.randn(2, 12, 48)
    with torch.no_grad(), fused.recurrence("reference"):
        whole, _ = mixer.forward_stateful(x, None)
    with torch.no_grad(), fused.recurrence("fused"):
        first, state = mixer.forward_stateful(x[:, :5], None)
        pieces = [first]
        for t in range(5, 12):  # then token by token, as decoding does
            step, state = mixer.forward_stateful(x[:, t : t + 1], state)
            pieces.append(step)
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=1e-5)


def _narrow(mixer: MultiHeadRecurrence, group: int, width: int) -> None:
    """Keep the first `width` hidden units of one group, as a pruning cut does (its gate columns, rows, merge rows)."""
    k, h = mixer.gate_blocks, mixer.widths[group]
    gates = [b * h + u for b in range(k) for u in range(width)]
    with torch.no_grad():
        mixer.weight_ih[group] = torch.nn.Parameter(mixer.weight_ih[group][:, gates].clone())
        mixer.weight_hh[group] = torch.nn.Parameter(mixer.weight_hh[group][:width][:, gates].clone())
        mixer.merge_weight[group] = torch.nn.Parameter(mixer.merge_weight[group][:width].clone())
        for name in mixer.gate_vectors:
            getattr(mixer, name)[group] = torch.nn.Parameter(getattr(mixer, name)[group][gates].clone())


@pytest.mark.parametrize("plugin", PLUGINS)
def test_fused_on_uneven_pruned_widths(plugin):
    from replacer.pruning import prune

    student = replacer.replace(tiny_bert().eval(), plugin=plugin, options={"hidden_per_head": 8})
    prune(student, params=0.8)  # in place: input channels and units, ranked across sites
    mixers = [m for m in student.modules() if isinstance(m, MultiHeadRecurrence)]
    for group, width in ((0, 3), (5, 6), (2, 1)):
        _narrow(mixers[0], group, width)
    assert len(set(mixers[0].widths)) > 2
    ids = torch.randint(1, 100, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    results = {}
    for path in ("fused", "reference"):
        student.zero_grad(set_to_none=True)
        with fused.recurrence(path):
            out = student(input_ids=ids, attention_mask=mask).last_hidden_state
        out.pow(2).sum().backward()
        results[path] = out.detach(), {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    torch.testing.assert_close(results["fused"][0], results["reference"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["reference"][1].items():
        torch.testing.assert_close(results["fused"][1][name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_conformance_kit_on_the_fused_path(plugin):
    with fused.recurrence("fused"):
        check_mixer(plugin, {"hidden_per_head": 5})


@pytest.mark.parametrize("plugin", PLUGINS)
def test_default_cpu_path_is_fused_and_never_the_loop(plugin, monkeypatch):
    assert fused.get_recurrence() == "auto" and fused.unavailable_reason() is None
    monkeypatch.setattr(MultiHeadRecurrence, "_reference_loop", lambda *a: pytest.fail("the default path ran the loop"))
    mixer = _mixer(plugin, causal=False)
    x = torch.randn(2, 6, 48, requires_grad=True)
    assert mixer.takes_fused_path(x)
    mixer(x, _mask(2, 6)).sum().backward()
    with torch.no_grad():
        mixer(x)


def test_a_third_party_cell_keeps_the_reference_loop():
    class Doubled(MultiHeadLSTM):
        def cell(self, gates_x, state, weights):
            h, c = super().cell(gates_x, state, weights)
            return 2 * h, c

    mixer = Doubled(_site(False), 8, True)
    x = torch.randn(2, 5, 48)
    assert not mixer.takes_fused_path(x)
    plain = MultiHeadLSTM(_site(False), 8, True)
    plain.load_state_dict(mixer.state_dict())
    assert not torch.allclose(mixer(x), plain(x))


def test_fused_insists_where_it_cannot_run():
    mixer = _mixer("lstm", causal=False).double()
    x = torch.randn(1, 4, 48, dtype=torch.float64)
    with fused.recurrence("fused"), pytest.raises(RuntimeError, match="compute in float32"):
        mixer(x)
    with fused.recurrence("auto"):
        assert not mixer.takes_fused_path(x) and mixer(x).dtype == torch.float64


def test_choice_is_restored_and_checked():
    before = fused.get_recurrence()
    with fused.recurrence("reference"):
        assert fused.get_recurrence() == "reference"
        assert fused.describe() == "reference loop (REPLACER_RECURRENCE=reference)"
    assert fused.get_recurrence() == before
    with pytest.raises(ValueError, match="use one of auto, fused, reference"):
        fused.set_recurrence("fast")


@pytest.mark.parametrize("plugin", PLUGINS)
def test_recurrent_weight_gradients_do_not_depend_on_the_thread_count(plugin):
    """The kernels sum weight and bias gradients in a fixed order, so a one-thread rank (torchrun) and a
    two-thread process compute the same bits."""
    mixer = _mixer(plugin, causal=False, hidden=7)
    x = torch.randn(6, 13, 48)
    mask = _mask(6, 13)
    threads = torch.get_num_threads()
    grads = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            grads.append(_run(mixer, "fused", x, mask)[3])
    finally:
        torch.set_num_threads(threads)
    kernel_summed = [n for n in grads[0] if n.startswith(("weight_hh", "bias"))]
    assert kernel_summed
    for name in kernel_summed:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.fixture
def flashrnn_on_cpu(monkeypatch):
    """The CUDA path's mapping onto FlashRNN, run on the CPU through FlashRNN's pure-torch backend."""
    pytest.importorskip("flashrnn")
    from replacer.fused import flashrnn_scan

    monkeypatch.setattr(flashrnn_scan, "BACKEND", "vanilla")
    monkeypatch.setattr(fused, "kernels", lambda tensor: flashrnn_scan)
    return flashrnn_scan


@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("batch", [1, 4])
def test_flashrnn_mapping_equals_reference(flashrnn_on_cpu, plugin, causal, batch):
    mixer = _mixer(plugin, causal)
    x = torch.randn(batch, 11, 48)
    _assert_same(_run(mixer, "fused", x, None), _run(mixer, "reference", x, None))


@pytest.mark.parametrize("plugin", PLUGINS)
def test_flashrnn_mapping_with_a_carried_state_and_uneven_widths(flashrnn_on_cpu, plugin):
    mixer = _mixer(plugin, causal=True)
    for group, width in ((0, 3), (2, 6)):
        _narrow(mixer, group, width)
    x = torch.randn(2, 9, 48)
    state = tuple(torch.randn(2, 3, 8) * 0.5 for _ in range(mixer.state_size))
    _assert_same(_run(mixer, "fused", x, None, state), _run(mixer, "reference", x, None, state))


def test_flashrnn_refuses_padded_batches_and_the_loop_takes_them(flashrnn_on_cpu, monkeypatch):
    mixer = _mixer("lstm", causal=False)
    x, mask = torch.randn(3, 13, 48), _mask(3, 13)
    _assert_same(_run(mixer, "auto", x, mask), _run(mixer, "reference", x, mask))
    with pytest.raises(RuntimeError, match="no step mask"):
        _run(mixer, "fused", x, mask)
    called, kernel = [], flashrnn_on_cpu._call
    monkeypatch.setattr(flashrnn_on_cpu, "_call", lambda *a: called.append(a) or kernel(*a))
    full = torch.ones(3, 13, dtype=torch.bool)  # a mask without padding is no mask
    _assert_same(_run(mixer, "fused", x, full), _run(mixer, "reference", x, full))
    assert called


def test_a_flashrnn_failure_is_remembered_and_the_loop_runs(flashrnn_on_cpu, monkeypatch):
    import flashrnn

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("nvcc not found")

    monkeypatch.setattr(flashrnn, "flashrnn", broken)
    monkeypatch.setattr(flashrnn_on_cpu, "_failed", {})
    mixer = _mixer("gru", causal=True)
    x = torch.randn(2, 7, 48)
    for _ in range(2):
        _assert_same(_run(mixer, "auto", x, None), _run(mixer, "reference", x, None))
    assert len(calls) == 1
    with pytest.raises(RuntimeError, match="nvcc not found"):
        _run(mixer, "fused", x, None)


def test_cuda_path_needs_flashrnn_and_says_so(monkeypatch):
    from replacer.fused import autograd, flashrnn_scan

    monkeypatch.setattr(flashrnn_scan, "unavailable_reason", lambda: "flashrnn is not installed (pip install 'replacer[cuda]')")
    assert "replacer[cuda]" in fused.path_reason("cuda", torch.float32)
    assert fused.describe("cuda").startswith("reference loop (flashrnn is not installed")
    monkeypatch.setattr(flashrnn_scan, "unavailable_reason", lambda: None)
    assert fused.path_reason("cuda", torch.bfloat16) is None and fused.describe("cuda") == "FlashRNN CUDA kernels"
    assert "float16 or bfloat16" in fused.path_reason("cuda", torch.float64)
    assert "on meta" in fused.fused_reason(torch.empty(1, device="meta"))
    assert fused.kernels(torch.zeros(1)) is autograd and fused.describe() == "fused numba kernels"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("plugin", PLUGINS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_flashrnn_cuda_kernels_equal_reference(plugin, causal):
    pytest.importorskip("flashrnn")
    mixer = _mixer(plugin, causal, hidden=16).cuda()
    x = torch.randn(4, 33, 48, device="cuda")
    _assert_same(_run(mixer, "fused", x, None), _run(mixer, "reference", x, None))
