"""Head-level hybrids of transformers attention (RecurFormer): in one layer the kept heads run attention
and the replaced heads run a mixer; both are joined in head order before the output projection.

The kept heads' query rows and the key/value rows of the kv heads they read are sliced out of the
original projections, so with grouped-query attention a kv head whose query heads are all replaced
disappears, and the layer's KV cache holds only the kept kv heads. The mixer's state rides in the
same cache slot.
"""

from __future__ import annotations

import functools
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from replacer.errors import UnsupportedCallError
from replacer.graph.adapter import Unsupported, padding_from_attention_mask
from replacer.graph.site import Site, head_rows
from replacer.mixer import Mixer
from replacer_transformers.convention import HFReplacedAttention
from replacer_transformers.cache import HybridCacheLayer, cache_from_call, state_slot


@functools.cache
def _xformers_ops():
    try:
        import xformers.ops
    except ImportError:
        return None
    return xformers.ops


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool, scale: float) -> torch.Tensor:
    """Attention of the kept heads, `(B, heads, N, hd)` in, `(B, N, heads, hd)` out: xformers' memory-efficient
    kernel on CUDA when it is installed and no mask is needed, PyTorch SDPA otherwise (and always on the CPU)."""
    ops = _xformers_ops() if q.is_cuda and mask is None else None
    if ops is not None:
        bias = ops.LowerTriangularMask() if causal else None
        return ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale).transpose(1, 2)


def _rows(linear: nn.Linear, heads: list[int], head_dim: int) -> nn.Linear:
    """A copy of `linear` with only the output rows of `heads`."""
    index = head_rows(heads, head_dim)
    sliced = nn.Linear(linear.in_features, len(index), bias=linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        sliced.weight.copy_(linear.weight[index])
        if linear.bias is not None:
            sliced.bias.copy_(linear.bias[index])
    return sliced


class HFHybridAttention(HFReplacedAttention):
    """One layer with `replaced` heads on a mixer and the other heads on attention.

    `projections` names the layer's query, key and value projections; `kept` its output path inside
    the module (empty for BERT-style layers, whose output projection is a sibling module). Layers that
    take rotary position embeddings cannot run from their input alone, so they train end to end only.
    """

    def __init__(
        self, site: Site, mixer: Mixer, original: nn.Module, replaced: list[int],
        projections: tuple[str, str, str] = ("q_proj", "k_proj", "v_proj"), kept: tuple[str, ...] = ("o_proj",),
    ) -> None:
        super().__init__(site, mixer, original, kept)
        if getattr(original, "q_norm", None) is not None or getattr(original, "sliding_window", None):
            raise Unsupported(f"{site.name}: head-level hybrids do not support q/k norms or sliding windows yet")
        hd, group = site.head_dim, site.num_heads // site.num_kv_heads
        self.replaced = sorted(replaced)
        self.kept = [h for h in range(site.num_heads) if h not in set(self.replaced)]
        self.kept_kv = sorted({h // group for h in self.kept})
        q, k, v = (getattr(original, name) for name in projections)
        self.q_proj, self.k_proj, self.v_proj = _rows(q, self.kept, hd), _rows(k, self.kept_kv, hd), _rows(v, self.kept_kv, hd)
        self.register_buffer("kv_of_kept", torch.tensor([self.kept_kv.index(h // group) for h in self.kept]), persistent=False)
        self.scaling = getattr(original, "scaling", hd**-0.5)
        takes_rope = "position_embeddings" in inspect.signature(original.forward).parameters
        self._rotary = getattr(sys.modules[type(original).__module__], "apply_rotary_pos_emb", None) if takes_rope else None
        self.mixes_alone = not takes_rope

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attention heads={self.kept}, mixer heads={self.replaced}, kv heads kept={self.kept_kv}"

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        if not self.mixes_alone:
            raise UnsupportedCallError(
                f"site '{self.site.name}' is a head-level hybrid: its kept heads need the layer's position "
                "embeddings, so it trains end to end only; set distill.enabled to false"
            )
        mask = None if padding is None else padding[:, None, None, :].to(x.device, torch.bool)
        return self._hybrid(x, mask, None, None)

    def forward(self, hidden_states: torch.Tensor, position_embeddings=None, attention_mask=None, **kwargs):
        return self._hybrid(hidden_states, attention_mask, position_embeddings, cache_from_call(kwargs)), None

    def _hybrid(self, x: torch.Tensor, attention_mask, position_embeddings, cache) -> torch.Tensor:
        B, N, _ = x.shape
        hd = self.site.head_dim
        q = self.q_proj(x).view(B, N, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(B, N, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(B, N, -1, hd).transpose(1, 2)
        if position_embeddings is not None and self._rotary is not None:
            q, k = self._rotary(q, k, *position_embeddings)
        layer = state_slot(cache, self.cache_index, HybridCacheLayer) if cache is not None and self.site.causal else None
        if layer is not None:
            k, v = layer.update(k, v)
        k, v = k.index_select(1, self.kv_of_kept), v.index_select(1, self.kv_of_kept)
        length = k.shape[-2]
        mask = attention_mask
        if mask is not None:
            mask = mask[..., :length]
        elif self.site.causal and N > 1 and length > N:  # a later chunk of a causal prefill
            mask = torch.ones(N, length, dtype=torch.bool, device=x.device).tril(length - N)
        attended = attend(q, k, v, mask, causal=self.site.causal and mask is None and N > 1, scale=self.scaling)
        heads = x.new_zeros(B, N, self.site.num_heads, hd)
        heads[:, :, self.kept] = attended
        if self.replaced:
            padding = padding_from_attention_mask(attention_mask, B, N)
            if layer is not None:
                mixed, layer.state = self.mixer.forward_stateful(x, layer.state, padding)
            else:
                mixed = self.mixer(x, padding)
            heads[:, :, self.replaced] = mixed.view(B, N, len(self.replaced), hd)
        return self.project(heads.reshape(B, N, -1))
