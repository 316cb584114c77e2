"""A readable description of a model: layers, parameters, streaming state, receptive fields, cost in L."""
from __future__ import annotations

from torch import nn
from torch.utils._pytree import tree_flatten

from seqmix.errors import SeqmixError, kind_of
from seqmix.model.sequence_model import SequenceModel


def _parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _size(count: int) -> str:
    """``count`` bytes in the largest binary unit below it: a model of trillions of parameters says
    what it would take (describe builds it on the meta device, so any size is described)."""
    for unit in ("TiB", "GiB", "MiB", "KiB"):
        scale = 1 << (10 * ("KMGT".index(unit[0]) + 1))
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:,} bytes"


def _field(value: int | None) -> str:
    return "unbounded" if value is None else f"{value:,}"


def describe_model(model: SequenceModel, title: str = "model") -> str:
    """The architecture of ``model`` as text: one row per layer, then totals.

    Shared (tied) weights are counted once in the total.
    """
    if not isinstance(model, SequenceModel):
        raise SeqmixError(f"describe_model: model is {kind_of(model)}, not a seqmix SequenceModel (from seqmix.build_model "
                          "or seqmix.instantiate_model); a mixer alone reports its state_size() and receptive_field")
    lines = [
        f"{title}: {len(model.blocks)} layers, d_model={model.d_model}, vocab_size={model.vocab_size}, "
        f"positions={model.positions}, head={type(model.head).__name__}, "
        f"{'causal (streams with step)' if model.causal else 'bidirectional'}",
        "",
    ]
    header = f"{'layer':>5}  {'mixer':<30} {'residual':<8} {'parameters':>11} {'state/seq':>10} {'local RF':>10}  time in L"
    lines += [header, "-" * (len(header) + 20)]
    for index, block in enumerate(model.blocks):
        mixer = block.mixer
        name = getattr(mixer, "registered_name", type(mixer).__name__)
        local = getattr(mixer, "local", None)
        if local is not None:
            name += f" (local {getattr(local, 'registered_name', type(local).__name__)})"
        field = local.receptive_field if local is not None else mixer.receptive_field
        lines.append(
            f"{index:>5}  {name:<30} {block.residual:<8} {_parameters(block):>11,} {mixer.state_size():>10,} "
            f"{_field(field):>10}  {mixer.complexity()}"
        )
    state_numbers = 0
    if model.causal:
        state_numbers = sum(t[0].numel() for t in tree_flatten(model.init_state(1))[0])
    total = _parameters(model)
    embeddings = _parameters(model.embed) + _parameters(model.pos_embed)
    lines += [
        "",
        f"embeddings {embeddings:,} · final norm {_parameters(model.final_norm):,} · head "
        f"{'tied to the embedding' if model.head_is_tied else f'{_parameters(model.head):,}'}",
        f"total parameters: {total:,} ({_size(total * 4)} in float32)",
        f"streaming state per sequence: {state_numbers:,} numbers ({state_numbers * 4 / 1024:,.1f} KiB in float32)"
        if model.causal
        else "streaming state: none (bidirectional model)",
    ]
    return "\n".join(lines)
