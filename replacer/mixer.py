"""The contract every sequence-module plugin fulfils, and the record a plugin registers it with."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable

import torch
from pydantic import BaseModel, ValidationError
from torch import nn

from replacer.errors import OptionsError
from replacer.graph.site import LinearWeights, Site

MixerState = tuple[torch.Tensor, ...]
"""A causal mixer's carried state: a tuple of tensors, each with the batch on dimension 0."""


@dataclass(frozen=True)
class PruneGroup:
    """The smallest structure a mixer can lose: parameter slices that only make sense together.

    `slices` are `(parameter name, dim, indices)` triples into the mixer's current tensors (for an
    LSTM unit: its gate columns of the input and recurrent weights, its row of the recurrent weights
    and its row of the merge map). Removing a group deletes exactly those rows and columns. Groups of
    one `family` (for example the units of one head and direction) are never all removed, so every
    structure keeps at least one member. Families of one `kind` (the unit families of every head and
    direction of a site) can be cut in lockstep, which keeps their widths equal.
    """

    name: str
    family: str
    slices: tuple[tuple[str, int, tuple[int, ...]], ...]
    kind: str = ""


class Mixer(nn.Module, abc.ABC):
    """Replaces the attention core of one site: `(B, N, site.d_model) -> (B, N, site.out_dim)`.

    The site's own output projection (when it has one) is kept outside the mixer, so a mixer only
    has to produce merged head outputs. `padding_mask` is `(B, N)` with True at real tokens; padded
    tokens must never change the outputs at real tokens. A mixer built for a causal site must make
    position t depend only on positions <= t and implement `forward_stateful`.
    """

    def __init__(self, site: Site) -> None:
        super().__init__()
        self.causal = site.causal
        self.d_model = site.d_model
        self.out_dim = site.out_dim

    @abc.abstractmethod
    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mix a whole sequence."""

    def forward_stateful(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        """Causal mixers: continue from `state` (None = start), return outputs and the new state.

        Running a sequence in pieces must give the same outputs as running it whole; this is what
        lets `generate()` decode one token at a time at constant cost.
        """
        raise TypeError(f"{type(self).__name__} is not causal and has no state to carry")

    def prunable_groups(self) -> list[PruneGroup]:
        """Structures `replacer.pruning` may physically remove; none by default.

        A mixer that declares groups must read every size it depends on from its tensors' current
        shapes at call time, so it keeps working after rows and columns are cut out of them.
        """
        return []


class ScanMixer(Mixer):
    """A mixer whose whole-sequence forward is a scan from the empty state: one shape for recurrences.

    Subclasses implement `scan`; with one direction the scan's state carries across calls, with two
    (a backward scan reads the future) there is no state to carry.
    """

    directions: int = 1

    @abc.abstractmethod
    def scan(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, MixerState]:
        """Outputs and the final state, starting from `state` (None = the empty state)."""

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.scan(x, None, padding_mask)[0]

    def forward_stateful(
        self, x: torch.Tensor, state: MixerState | None, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, MixerState]:
        if self.directions != 1:
            raise TypeError(f"a bidirectional {type(self).__name__} reads the future and cannot carry state")
        return self.scan(x, state, padding_mask)


def select_state(state: MixerState, index: torch.Tensor) -> MixerState:
    """Keep the batch rows in `index` (beam search reordering, finished sequences dropped)."""
    return tuple(s.index_select(0, index.to(s.device)) for s in state)


def repeat_state(state: MixerState, repeats: int) -> MixerState:
    """Repeat each batch row `repeats` times (num_return_sequences, beam expansion)."""
    return tuple(s.repeat_interleave(repeats, dim=0) for s in state)


MixerFactory = Callable[[Site, BaseModel, "LinearWeights | None"], Mixer]


@dataclass(frozen=True)
class MixerSpec:
    """What a mixer plugin registers: a name, its options model and how to build one for a site.

    The factory receives the site, validated options and the site's value projection laid out per
    query head (None when the adapter cannot provide one), so mixers can start from the teacher.
    """

    name: str
    options_model: type[BaseModel]
    factory: MixerFactory
    summary: str = ""

    def validate_options(self, raw: BaseModel | dict | None) -> BaseModel:
        """Validated options, or an OptionsError naming the field, the problem and the accepted fields."""
        if isinstance(raw, self.options_model):
            return raw
        if raw is not None and not isinstance(raw, (dict, BaseModel)):
            raise OptionsError(
                f"plugin '{self.name}' options must be a mapping of option names to values, not {type(raw).__name__} "
                f"{raw!r}; accepted options: {', '.join(self.options_model.model_fields)}"
            )
        if isinstance(raw, BaseModel):
            raw = raw.model_dump()
        try:
            return self.options_model.model_validate(dict(raw or {}))
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"]) or "(options)"
            accepted = ", ".join(self.options_model.model_fields)
            raise OptionsError(
                f"plugin '{self.name}' option '{field}': {first['msg']} (got {first.get('input')!r}); "
                f"accepted options: {accepted}"
            ) from None

    def build(self, site: Site, options: BaseModel, value: LinearWeights | None) -> Mixer:
        mixer = self.factory(site, options, value)
        if not isinstance(mixer, Mixer):
            raise TypeError(f"plugin '{self.name}' built a {type(mixer).__name__}, not a replacer.Mixer")
        return mixer
