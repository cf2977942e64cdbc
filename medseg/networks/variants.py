"""The network variants: one registry, one entry per variant ``medseg plan --variants`` offers.

An entry holds the :class:`~medseg.plans.schema.Blocks` that ``plans.json`` records for the variant
and, when the variant introduces an encoder block, that block's class, registered under the name
the Blocks give it (``encoder_block``). The planner (variant names, presets, the Blocks it plans
with) and the CLI help read the registry; the builder and the cost model find encoder blocks in it.

A new encoder-block variant is its block class (what a block provides: :mod:`medseg.networks.blocks`)
plus one entry here, e.g. ``"dense": Variant(Blocks(encoder_block="dense"), DenseBlock)``; nothing
else changes. The other variants switch on, by a Blocks field, a part that
:func:`medseg.networks.unet.stage_specs` places: attention gates, squeeze–excitation, reversible
stages, the graph bottleneck.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from torch import nn

from medseg.errors import MedsegError, PlanError
from medseg.networks.blocks import PlainBlock, ResidualBlock
from medseg.plans.schema import Blocks
from medseg.utils import look_up


@dataclass(frozen=True)
class Variant:
    """``blocks``: what ``plans.json`` records for the variant; ``encoder_block``: the block class it
    introduces under the name ``blocks.encoder_block`` (None when it only switches a Blocks field)."""

    blocks: Blocks
    encoder_block: type[nn.Module] | None = None


VARIANTS: dict[str, Variant] = {
    "plain": Variant(Blocks(), PlainBlock),
    "residual": Variant(Blocks(encoder_block="residual"), ResidualBlock),
    "attention": Variant(Blocks(attention_gates=True)),
    "se": Variant(Blocks(squeeze_excitation="scse")),
    "reversible": Variant(Blocks(reversible=True)),
    "graph": Variant(Blocks(bottleneck="graph")),
}


def presets() -> dict[str, list[str]]:
    """Names that stand for several variants: ``all`` is every registered one, in registry order."""
    return {"all": list(VARIANTS)}


def encoder_block(name: str) -> type[nn.Module]:
    """The encoder block class a plan's ``blocks.encoder_block`` names; a one-line PlanError with a
    'did you mean' hint for a name no variant registers."""
    classes = {v.blocks.encoder_block: v.encoder_block for v in VARIANTS.values() if v.encoder_block is not None}
    try:
        return classes[look_up(name, classes, "encoder_block")]
    except MedsegError as exc:
        raise PlanError(str(exc)) from None


class _BlocksByVariant(Mapping[str, Blocks]):
    """Variant name → the Blocks it records, read through to :data:`VARIANTS` (so a variant
    registered later, or only inside a test, is seen)."""

    def __getitem__(self, name: str) -> Blocks:
        return VARIANTS[name].blocks

    def __iter__(self) -> Iterator[str]:
        return iter(VARIANTS)

    def __len__(self) -> int:
        return len(VARIANTS)


BLOCKS_BY_VARIANT: Mapping[str, Blocks] = _BlocksByVariant()
