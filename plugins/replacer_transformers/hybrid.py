"""Head-level hybrids of transformers attention (RecurFormer): in one layer the kept heads run attention
and the replaced heads run a mixer; both are joined in head order before the output projection.

The kept heads' query rows and the key/value rows of the kv heads they read are sliced out of the
original projections, so with grouped-query attention a kv head whose query heads are all replaced
disappears, and the layer's KV cache holds only the kept kv heads. The mixer's state rides in the
same cache slot. Whole-model pruning can cut kept kv heads, each with the query heads that read it
(`prunable_groups`), so the cache shrinks further; which heads remain is kept in two buffers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
import inspect
import sys

import torch
import torch.nn.functional as F
from torch import nn

from replacer.errors import ReplacerError, UnsupportedCallError
from replacer.graph.adapter import Target, Unsupported, padding_from_attention_mask
from replacer.graph.site import Site, head_rows
from replacer.mixer import Mixer, PruneGroup
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
    take rotary position embeddings cannot run from their input alone (`mix`), yet their mixer learns
    block-wise from the teacher's head outputs (`target_in`, `predict`).
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
        kept = [h for h in range(site.num_heads) if h not in set(self.replaced)]
        kept_kv = sorted({h // group for h in kept})
        q, k, v = (getattr(original, name) for name in projections)
        self.q_proj, self.k_proj, self.v_proj = _rows(q, kept, hd), _rows(k, kept_kv, hd), _rows(v, kept_kv, hd)
        self.register_buffer("kept_heads", torch.tensor(kept, dtype=torch.long))  # original ids, in q_proj's row order
        self.register_buffer("kv_heads", torch.tensor(kept_kv, dtype=torch.long))  # original ids, in k/v_proj's order
        self.scaling = getattr(original, "scaling", hd**-0.5)
        takes_rope = "position_embeddings" in inspect.signature(original.forward).parameters
        self._rotary = getattr(sys.modules[type(original).__module__], "apply_rotary_pos_emb", None) if takes_rope else None
        self.mixes_alone = not takes_rope

    @property
    def kept(self) -> list[int]:
        return self.kept_heads.tolist()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, attention heads={self.kept}, mixer heads={self.replaced}, kv heads kept={self.kv_heads.tolist()}"

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("kept_heads", "kv_heads"):  # saved before kept heads could be pruned: all heads kept
            state_dict.setdefault(prefix + name, getattr(self, name))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(kv slot each kept head reads, kept heads' and mixer heads' places among the heads the output
        projection reads, how many heads it reads): what pruning kept heads changes. Worked out once per
        state of the two buffers (pruning and `.to()` replace them), not on every decoding step."""
        key = tuple((t.data_ptr(), t._version, len(t)) for t in (self.kept_heads, self.kv_heads))  # _version: in-place loads
        cached = self.__dict__.get("_layout_cache")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_layout_cache"] = (key, self._work_out_layout())
        return cached[1]

    def _work_out_layout(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        group = self.site.num_heads // self.site.num_kv_heads
        kv_of_kept = (self.kept_heads[:, None] // group == self.kv_heads[None, :]).int().argmax(1)
        replaced = torch.tensor(self.replaced, dtype=torch.long, device=self.kept_heads.device)
        order = torch.cat([self.kept_heads, replaced]).sort().values
        return kv_of_kept, torch.searchsorted(order, self.kept_heads), torch.searchsorted(order, replaced), len(order)

    def _projection_in(self, layer: nn.Module) -> str | None:
        """The name of the output projection `layer` (this hybrid or its teacher layer) holds as a linear layer;
        None where it lives outside the layer (BERT's is a sibling module)."""
        name = self._tail[0] if self._tail else None
        return name if name is not None and isinstance(getattr(layer, name, None), nn.Linear) else None

    def prunable_groups(self) -> list[PruneGroup]:
        """One group per kept kv head: its key and value rows, the query rows of the kept heads that read it,
        and their columns of the output projection (absent when the projection lives outside the site, as in
        BERT, whose kept heads then stay)."""
        out = self._projection_in(self)
        if out is None:
            return []
        hd = self.site.head_dim
        kv_of_kept, kept_slots, _, _ = self._layout()
        groups = []
        for slot, kv in enumerate(self.kv_heads.tolist()):
            members = [i for i, k in enumerate(kv_of_kept.tolist()) if k == slot]
            q_rows = tuple(r for i in members for r in range(i * hd, (i + 1) * hd))
            kv_rows = tuple(range(slot * hd, (slot + 1) * hd))
            columns = tuple(c for i in members for c in range(int(kept_slots[i]) * hd, (int(kept_slots[i]) + 1) * hd))
            slices = [("q_proj.weight", 0, q_rows), ("k_proj.weight", 0, kv_rows), ("v_proj.weight", 0, kv_rows),
                      (f"{out}.weight", 1, columns), ("kept_heads", 0, tuple(members)), ("kv_heads", 0, (slot,))]
            slices += [(f"{name}.bias", 0, rows) for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows))
                       if getattr(self, name).bias is not None]
            groups.append(PruneGroup(f"kv head {kv}", f"{self.site.name} kept heads", tuple(slices), "kept heads"))
        return groups

    distills_alone = True
    """Each replaced head learns its own teacher head's output, which needs no position embeddings."""

    def target_in(self, teacher_site: nn.Module) -> tuple[nn.Module, Target]:
        """The replaced heads' outputs before the output projection (LoLCATs' attention transfer): the
        projection's input where the layer holds one, else the layer's own output, which is the heads'
        context when the projection lives outside it (BERT)."""
        columns = head_rows(self.replaced, self.site.head_dim)
        projection = self._projection_in(teacher_site)
        if projection is not None:
            return getattr(teacher_site, projection), lambda inputs, output: inputs[0][..., columns]
        return teacher_site, lambda inputs, output: self.read_output(output)[..., columns]

    def predict(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """The replaced heads' outputs, head after head: the mixer alone."""
        return self.mixer(x, padding)

    def projection(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The replaced heads' columns of the output projection, without its bias (which the kept heads share):
        their contribution to the layer's output. Refused where the projection lives outside the layer (BERT)."""
        out = self._projection_in(self)
        if out is None:
            raise ReplacerError(
                f"site {self.site.name}: its output projection lives outside the layer, so its heads cannot be "
                "matched after it; set distill.head_target to heads"
            )
        _, _, replaced_slots, _ = self._layout()
        weight = getattr(self, out).weight.detach()[:, head_rows(replaced_slots.tolist(), self.site.head_dim)]
        return lambda heads: F.linear(heads, weight)

    def mix(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        if not self.mixes_alone:
            raise UnsupportedCallError(
                f"site '{self.site.name}' is a head-level hybrid: its kept heads need the layer's position "
                "embeddings, so the layer runs only in the model's forward (block-wise distillation trains its "
                "heads with `predict`)"
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
        kv_of_kept, kept_slots, replaced_slots, width = self._layout()
        k, v = k.index_select(1, kv_of_kept), v.index_select(1, kv_of_kept)
        length = k.shape[-2]
        mask = attention_mask
        if mask is not None:
            mask = mask[..., :length]
        elif self.site.causal and N > 1 and length > N:  # a later chunk of a causal prefill
            mask = torch.ones(N, length, dtype=torch.bool, device=x.device).tril(length - N)
        attended = attend(q, k, v, mask, causal=self.site.causal and mask is None and N > 1, scale=self.scaling)
        heads = x.new_zeros(B, N, width, hd)
        heads[:, :, kept_slots] = attended
        if self.replaced:
            padding = padding_from_attention_mask(attention_mask, B, N)
            if layer is not None:
                mixed, layer.state = self.mixer.forward_stateful(x, layer.state, padding)
            else:
                mixed = self.mixer(x, padding)
            heads[:, :, replaced_slots] = mixed.view(B, N, len(self.replaced), hd)
        return self.project(heads.reshape(B, N, -1))
