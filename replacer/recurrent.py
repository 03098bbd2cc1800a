"""The skeleton of per-head recurrent mixers (lstm, gru, a third party's cell), in one place.

Layout follows FAR: an input projection to heads (initialised from the teacher's value projection),
one recurrent cell per head and direction, the directions merged per head by a small linear map
back to the head width; the site's own output projection stays outside the mixer.

Heads and directions share one time loop: per step a single batched matmul over G = heads x
directions groups, several times faster than separate `nn.LSTM`/`nn.GRU` modules (which also have
no block-diagonal form and cannot skip padding in the middle or on the left of a sequence).
A subclass supplies only its cell: how many gate blocks it has and one step of its update.

Every group's weights are tensors of their own, so pruning (`replacer.pruning`) can give heads and
directions different widths; a call pads them with zeros to the widest group, and a zero-padded
unit stays exactly zero in both cells, so padding changes no output. The fused kernels run each
group's recurrence at its own width (the input and merge products stay padded).
"""

from __future__ import annotations

import abc
import math
from typing import Any, Callable, ClassVar, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from replacer.errors import OptionsError
from replacer.fused import GATE_BOUND, KernelUnavailable, fall_back, use_fused
from replacer.graph.site import LinearWeights, Site
from replacer.mixer import MixerState, PruneGroup, ScanMixer

R = TypeVar("R", bound="MultiHeadRecurrence")



class RecurrentOptions(BaseModel):
    """Options every per-head recurrent mixer takes."""

    model_config = ConfigDict(extra="forbid")

    hidden_per_head: int | None = Field(
        default=None, gt=0, description="hidden units per head and direction (default: the head width)"
    )
    bidirectional: bool | None = Field(
        default=None, description="run both directions; default: yes on bidirectional sites, no on causal ones"
    )
    init_from_value: bool = Field(
        default=True, description="initialise the input projection from the teacher's value projection"
    )


def resolve_bidirectional(plugin: str, site: Site, requested: bool | None) -> bool:
    """The direction count a site allows: both on encoders, forward-only on causal sites."""
    if requested is None:
        return not site.causal
    if requested and site.causal:
        raise OptionsError(
            f"{plugin} option 'bidirectional': True is impossible at causal site '{site.name}' "
            "(it would read future tokens); leave it unset or set it to false"
        )
    return requested


class MultiHeadRecurrence(ScanMixer):
    """Input projection -> G = directions x heads recurrent cells in one loop -> per-head merge.

    `gate_blocks` is the number of hidden-sized blocks in a cell's gate pre-activations (4 for an
    LSTM, 3 for a GRU). `state_size` is how many `(G, B, hidden)` tensors the cell carries; the
    first one is the cell's output. `gate_vectors` names the per-group vectors laid out like the gate
    columns (biases). Group g is direction g // heads, head g % heads.
    """

    gate_blocks: int = 1
    state_size: int = 1
    gate_vectors: tuple[str, ...] = ("bias",)

    def __init__(self, site: Site, hidden: int, bidirectional: bool) -> None:
        super().__init__(site)
        self.heads, self.head_dim = site.num_heads, site.head_dim
        self.directions = 2 if bidirectional else 1
        groups, h, hd, k = self.directions * self.heads, hidden, self.head_dim, self.gate_blocks

        def per_group(*shape: int) -> nn.ParameterList:
            return nn.ParameterList(nn.Parameter(torch.zeros(*shape)) for _ in range(groups))

        self.in_proj = nn.Linear(site.d_model, self.heads * hd)
        self.weight_ih = per_group(hd, k * h)
        self.weight_hh = per_group(h, k * h)
        for name in self.gate_vectors:
            setattr(self, name, per_group(k * h))
        self.merge_weight = per_group(h, hd)
        self.merge_bias = nn.Parameter(torch.zeros(self.heads, hd))
        bound = 1.0 / math.sqrt(hidden)
        merge_bound = math.sqrt(6.0 / (hd + groups * h))  # Xavier over all groups' merge rows together
        for g in range(groups):
            nn.init.uniform_(self.weight_ih[g], -bound, bound)
            nn.init.uniform_(self.weight_hh[g], -bound, bound)
            nn.init.uniform_(self.merge_weight[g], -merge_bound, merge_bound)

    @classmethod
    def from_options(
        cls: type[R], plugin: str, site: Site, options: RecurrentOptions, value: LinearWeights | None, **cell_args: Any
    ) -> R:
        """What every recurrent plugin's factory does: directions from the site and options, hidden size
        from the options (default: the head width), input projection started from the teacher's values."""
        bidirectional = resolve_bidirectional(plugin, site, options.bidirectional)
        mixer = cls(site, options.hidden_per_head or site.head_dim, bidirectional, **cell_args)
        if options.init_from_value and value is not None:
            value.copy_to(mixer.in_proj)
        return mixer

    @abc.abstractmethod
    def cell(self, gates_x: torch.Tensor, state: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """One step for all groups: input gate part `(G, B, k*h)`, state `(G, B, h)` each -> new state.

        `weights` holds the groups' tensors padded to the widest group: `weight_hh` `(G, h, k*h)` and
        each of `gate_vectors` `(G, k*h)`.
        """

    @property
    def widths(self) -> list[int]:
        """Hidden units of each group (direction-major)."""
        return [w.shape[0] for w in self.weight_hh]

    @property
    def hidden(self) -> int:
        """Hidden units of the widest group (all groups, until pruned)."""
        return max(self.widths)

    @property
    def input_widths(self) -> list[int]:
        """Input channels of each head (the head width, until pruned)."""
        return [self.weight_ih[head].shape[0] for head in range(self.heads)]

    def extra_repr(self) -> str:
        widths = sorted(set(self.widths))
        hidden = widths[0] if len(widths) == 1 else f"{widths[0]}..{widths[-1]}"
        return f"heads={self.heads}, head_dim={self.head_dim}, hidden={hidden}, directions={self.directions}"

    def prunable_groups(self) -> list[PruneGroup]:
        """Hidden units of one head and direction, and input channels of one head (both directions)."""
        k, H = self.gate_blocks, self.heads
        groups = []
        for g, width in enumerate(self.widths):
            direction, head = divmod(g, H)
            for unit in range(width):
                gates = tuple(b * width + unit for b in range(k))
                slices = [
                    (f"weight_ih.{g}", 1, gates), (f"weight_hh.{g}", 0, (unit,)), (f"weight_hh.{g}", 1, gates),
                    (f"merge_weight.{g}", 0, (unit,)), *((f"{name}.{g}", 0, gates) for name in self.gate_vectors),
                ]
                groups.append(PruneGroup(f"unit {direction}.{head}.{unit}", f"units {direction}.{head}", tuple(slices), "units"))
        start = 0
        for head, channels in enumerate(self.input_widths):
            for i in range(channels):
                row = (start + i,)
                slices = [("in_proj.weight", 0, row), ("in_proj.bias", 0, row)]
                slices += [(f"weight_ih.{d * H + head}", 0, (i,)) for d in range(self.directions)]
                groups.append(PruneGroup(f"input {head}.{i}", f"inputs {head}", tuple(slices), "inputs"))
            start += channels
        return groups

    def _prepared(self) -> tuple[dict[str, torch.Tensor], list[int], list[int]]:
        """The per-group tensors stacked over groups (zero-padded to the widest group and head input),
        and (hidden widths of the groups, input widths of the heads), checked against the parameters once.

        The widths are kept until a group tensor changes in place or is replaced (training, pruning);
        so is the stack without autograd (inference, decoding token by token), which saves
        re-stacking on every call. Under autograd the stack is built anew, so gradients reach the
        parameters.
        """
        key = self._group_key()
        if getattr(self, "_prepared_key", None) != key:
            self._layout_cache, self._stack_cache, self._prepared_key = (self.widths, self.input_widths), None, key
        if torch.is_grad_enabled():
            return self._stack(), *self._layout_cache
        if self._stack_cache is None:
            self._stack_cache = self._stack()
        return self._stack_cache, *self._layout_cache

    def _group_key(self) -> tuple:
        """Identity and in-place version of every per-group tensor: changes when one is trained or pruned.

        Read from the ParameterLists' own dicts: going through `parameters()` costs more than the
        recurrence itself on short inputs."""
        lists = (self.weight_ih, self.weight_hh, self.merge_weight, *(getattr(self, n) for n in self.gate_vectors))
        return tuple((p.data_ptr(), p._version) for plist in lists for p in plist._parameters.values())

    def _stack(self) -> dict[str, torch.Tensor]:
        k, widths = self.gate_blocks, self.widths
        hm, cm = max(widths), max(self.input_widths)

        def pad(t: torch.Tensor, width: int, gate_dim: bool, rows: int) -> torch.Tensor:
            if gate_dim and width < hm:  # (..., k*width) -> (..., k*hm)
                t = F.pad(t.unflatten(-1, (k, width)), (0, hm - width)).flatten(-2)
            return F.pad(t, (0, 0, 0, rows - t.shape[0])) if t.shape[0] < rows else t

        padded = {
            "weight_ih": torch.stack([pad(w, n, True, cm) for w, n in zip(self.weight_ih, widths)]),
            "weight_hh": torch.stack([pad(w, n, True, hm) for w, n in zip(self.weight_hh, widths)]),
            "merge_weight": torch.stack([pad(w, n, False, hm) for w, n in zip(self.merge_weight, widths)]),
        }
        for name in self.gate_vectors:
            padded[name] = torch.stack([pad(v, n, True, 0) for v, n in zip(getattr(self, name), widths)])
        return padded

    def _head_inputs(self, x: torch.Tensor, widths: list[int]) -> torch.Tensor:
        """The input projection, laid out `(B, N, heads, widest head input)` with zeros in pruned channels
        (`widths`: each head's input channels)."""
        u = self.in_proj(x)
        cm = max(widths)
        if all(c == cm for c in widths):
            return u.unflatten(-1, (self.heads, cm))
        index = torch.cat([head * cm + torch.arange(c, device=u.device) for head, c in enumerate(widths)])
        return u.new_zeros(*u.shape[:-1], self.heads * cm).index_copy(-1, index, u).unflatten(-1, (self.heads, cm))

    def scan(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        # Saturated gates make states and gradients decay into denormal floats, which slow CPU ops
        # about 20x. Bounding the input part of the gate pre-activations (the recurrent part is
        # bounded by |h| <= 1) keeps them out; sigmoid(-15) is already 3e-7, so little is lost.
        torch.set_flush_denormal(True)
        if self.takes_fused_path(x):
            try:
                return self._fused_scan(x, state, padding_mask)
            except KernelUnavailable as exc:  # e.g. a padded batch on a kernel without step masks
                fall_back(str(exc))
        B, N, _ = x.shape
        weights, _, input_widths = self._prepared()
        d, H, k = self.directions, self.heads, self.gate_blocks
        h = weights["weight_hh"].shape[1]
        u = self._head_inputs(x, input_widths)
        # Input contributions to the gates for every step at once: (N, d, H, B, k*h).
        w_ih = weights["weight_ih"].unflatten(0, (d, H))
        gates_x = torch.einsum("bnhi,dhio->ndhbo", u, w_ih) + weights["bias"].unflatten(0, (d, H))[None, :, :, None, :]
        gates_x = F.hardtanh(gates_x, -GATE_BOUND, GATE_BOUND)  # a clamp whose backward is one fused kernel
        if d == 2:  # the backward direction runs over the reversed sequence in the same loop
            gates_x = torch.cat((gates_x[:, :1], gates_x[:, 1:].flip(0)), dim=1)
        gates_x = gates_x.reshape(N, d * H, B, k * h)
        keep = None if padding_mask is None else self._group_mask(padding_mask.to(x.device, torch.bool))
        # steps where some group of some sequence reads padding (length-bucketed batches have few)
        padded = [False] * N if keep is None else (~keep).flatten(1).any(1).tolist()
        carried = self._initial_state(x, state, h)
        steps, carried = self._reference_loop(gates_x, carried, weights, keep, padded)
        hs = steps.view(N, d, H, B, h)
        if d == 2:
            hs = torch.cat((hs[:, :1], hs[:, 1:].flip(0)), dim=1)
        merge = weights["merge_weight"].unflatten(0, (d, H))
        y = torch.einsum("ndhbu,dhuo->bnho", hs, merge) + self.merge_bias
        return self._outputs(y, padding_mask), tuple(s.transpose(0, 1) for s in carried)

    def _initial_state(self, x: torch.Tensor, state: MixerState | None, hidden: int) -> tuple[torch.Tensor, ...]:
        """The state the time loop starts from, as `(G, B, h)` tensors (zeros without a carried state)."""
        if state is None:
            return tuple(x.new_zeros(self.directions * self.heads, x.shape[0], hidden) for _ in range(self.state_size))
        return tuple(s.transpose(0, 1) for s in state)

    def _outputs(self, y: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        """Merged per-head outputs `(B, N, heads, head_dim)` as `(B, N, width)`, zero at padded positions."""
        y = y.reshape(*y.shape[:2], self.heads * self.head_dim)
        return y if padding_mask is None else y * padding_mask.to(y.dtype)[..., None]

    def _reference_loop(
        self, gates_x: torch.Tensor, carried: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor],
        keep: torch.Tensor | None, padded: list[bool],
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The definition of the recurrence: `cell` step by step, padded steps keeping their state."""
        outputs = []
        # unbind, not gates_x[t]: indexing's backward writes a zero tensor of the whole sequence
        # per step (quadratic in length, half of a training step's time at 40 tokens)
        for t, step_gates in enumerate(gates_x.unbind(0)):
            new = self.cell(step_gates, carried, weights)
            if padded[t]:  # padded steps leave the state untouched, in either direction
                new = tuple(torch.where(keep[t], n, o) for n, o in zip(new, carried))
            carried = new
            outputs.append(new[0])
        return torch.stack(outputs), carried

    fused_cell: ClassVar[Callable[..., Any] | None] = None
    """The `cell` that `fused_kernel` computes; a subclass that replaces `cell` takes the reference loop."""

    def fused_kernel(
        self, gx: torch.Tensor, bias: torch.Tensor, carried: tuple[torch.Tensor, ...], weights: dict[str, torch.Tensor],
        widths: list[int], padding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The whole time loop in one compiled kernel (layouts in `replacer.fused.numba_kernels`); `widths`
        are the groups' own hidden widths, so a pruned group costs its width, not the widest group's."""
        raise TypeError(f"{type(self).__name__} has no fused kernel")

    def takes_fused_path(self, x: torch.Tensor) -> bool:
        """Whether this recurrence runs the fused kernel on `x` (its cell has one, and the choice in
        `replacer.fused` and the tensor allow it)."""
        fused_cell = type(self).fused_cell
        return fused_cell is not None and type(self).cell is fused_cell and use_fused(x)

    def _fused_scan(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        """`scan` as three large operations: one batched product for every head's gate inputs (both
        directions), the kernel (bias, bound, direction and padding handled inside), one batched product
        for the merge. Nothing is flipped, stacked or indexed step by step."""
        B, N, _ = x.shape
        weights, widths, input_widths = self._prepared()
        d, H, h, cm = self.directions, self.heads, max(widths), max(input_widths)
        K = self.gate_blocks * h
        heads_in = self._head_inputs(x, input_widths).permute(2, 0, 1, 3).reshape(H, B * N, cm)
        w_ih = weights["weight_ih"].view(d, H, cm, K).permute(1, 2, 0, 3).reshape(H, cm, d * K)
        bias = weights["bias"].view(d, H, K).permute(1, 0, 2).reshape(H, d * K)
        mask = None if padding_mask is None else padding_mask.to(x.device, torch.bool)
        gx = torch.bmm(heads_in, w_ih)
        hs, carried = self.fused_kernel(gx, bias, self._initial_state(x, state, h), weights, widths, mask)
        merge = weights["merge_weight"].view(d, H, h, self.head_dim).permute(1, 0, 2, 3).reshape(H, d * h, self.head_dim)
        y = torch.bmm(hs, merge).view(H, B, N, self.head_dim).permute(1, 2, 0, 3) + self.merge_bias
        return self._outputs(y, padding_mask), tuple(s.transpose(0, 1) for s in carried)

    def _group_mask(self, padding_mask: torch.Tensor) -> torch.Tensor:
        """(B, N) -> (N, d*H, B, 1), with the backward direction's mask reversed like its inputs."""
        d, H = self.directions, self.heads
        keep = padding_mask.t()[:, None, :, None].expand(-1, d, -1, 1)
        if d == 2:
            keep = torch.stack((keep[:, 0], keep[:, 1].flip(0)), dim=1)
        return keep.repeat_interleave(H, dim=1)
