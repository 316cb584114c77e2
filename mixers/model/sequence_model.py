"""One model type for every architecture: embedding → blocks → final norm → head.

Named architectures (Mega, Megalodon, TCNCA, Transformer, GPT-2, hybrids) are config presets in
``conf/model/``, never classes: they differ only in the parts injected here.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from seqmix.contract import Mixer, State, assert_in_compiled_graph, check_state_request, require_state_fits, state_bytes
from seqmix.errors import SeqmixError, require_bool, require_choice, require_int, kind_of
from seqmix.layers.blocks import Block, Recompute, check_part_width, require_recompute
from seqmix.layers.heads import CausalLMHead
from seqmix.layers.norms import LayerNorm, TimestepNorm
from seqmix.registry import NOT_INSTALLED_HINT, build_mixer, list_mixers
from seqmix.timing import device_memory_bytes

POSITIONS = ("none", "learned")


class ModelState(NamedTuple):
    """Streaming state of a model: one state per block, the final norm's, and tokens seen (B,)."""

    blocks: tuple
    final_norm: State
    pos: Tensor


class SequenceModel(nn.Module):
    """Token ids (B, L) -> head output, composed from injected parts.

    Args:
        vocab_size: V.
        d_model: D.
        blocks: the layers, each built for width D.
        head: built with (D, V); a causal LM head needs every block causal.
        final_norm: applied after the last block (a timestep norm streams with its own state).
        positions: ``none`` or ``learned`` absolute positions (GPT-2) up to ``max_len``.
        max_len: longest sequence with learned positions.
        tie_embeddings: share the LM head's weight with the token embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        blocks: Sequence[Block],
        head: nn.Module,
        final_norm: nn.Module | None = None,
        positions: str = "none",
        max_len: int = 2048,
        tie_embeddings: bool = False,
    ):
        super().__init__()
        require_int("model", "vocab_size", vocab_size, 2)
        require_int("model", "d_model", d_model)
        require_int("model", "max_len", max_len)
        require_bool("model", "tie_embeddings", tie_embeddings)
        require_choice("model.positions", positions, POSITIONS)
        if not isinstance(blocks, Sequence) or not all(isinstance(block, Block) for block in blocks):
            raise SeqmixError(f"model: blocks={blocks!r} is not valid; expected a list of seqmix.Block (build_model makes them)")
        if not isinstance(head, nn.Module):
            raise SeqmixError(f"model: head must be a torch.nn.Module, got {kind_of(head)}")
        if final_norm is not None and not isinstance(final_norm, nn.Module):
            raise SeqmixError(f"model: final_norm must be a torch.nn.Module or None, got {kind_of(final_norm)}")
        if not blocks:
            raise SeqmixError("model: layers is empty; a model needs at least one block")
        check_part_width("model: the head", head, d_model, keeps_width=False)
        if final_norm is not None:
            check_part_width("model: the final_norm", final_norm, d_model)
        for index, block in enumerate(blocks):
            if block.d_model != d_model:
                raise SeqmixError(f"model: layer {index} has d_model={block.d_model}, expected {d_model}")
            if getattr(head, "requires_causal", False) and not block.causal:
                raise SeqmixError(
                    f"model: layer {index} ({type(block.mixer).__name__}) is bidirectional (causal=False), but "
                    f"{type(head).__name__} predicts the next token and needs every layer causal; use a masked_lm "
                    "or classification head, or build the mixer with causal=True"
                )
            unit = block.mixer.length_unit() if isinstance(block.mixer, Mixer) else 1
            if positions == "learned" and unit > max_len:
                # A chunked EMA computes any length eagerly, but an exported graph takes multiples of the unit.
                raise SeqmixError(
                    f"model: layer {index} ({type(block.mixer).__name__}) runs in chunks of {unit} tokens, more than "
                    f"max_len={max_len} of the learned positions: exported graphs take lengths that are multiples of "
                    "the chunk, so none would fit the positions; lower chunk_size or raise max_len"
                )
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.positions = positions
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model) if positions == "learned" else None
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = final_norm
        self.head = head
        nn.init.normal_(self.embed.weight, std=0.02)
        if tie_embeddings:
            if not isinstance(head, CausalLMHead):
                raise SeqmixError(f"model: tie_embeddings=True needs a language-model head, got {kind_of(head)}")
            head.proj.weight = self.embed.weight

    @property
    def head_is_tied(self) -> bool:
        """True when the LM head shares its weight with the token embedding."""
        return getattr(getattr(self.head, "proj", None), "weight", None) is self.embed.weight

    @property
    def token_limit(self) -> int | None:
        """The most tokens one stream of ``step`` calls can take: the smallest attention cache
        (``Mixer.cache_capacity``) and, with learned positions, ``max_len`` (no embedding beyond it);
        None when nothing limits the length."""
        limits = [module.cache_capacity() for module in self.modules() if isinstance(module, Mixer)]
        limits = [limit for limit in limits if limit is not None]
        if self.pos_embed is not None:
            limits.append(self.max_len)
        return min(limits) if limits else None

    @property
    def causal(self) -> bool:
        """True when every block is causal, so the model can stream."""
        return all(block.causal for block in self.blocks)

    def _check_tokens(self, tokens: Tensor) -> None:
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32, torch.int64):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else kind_of(tokens)
            raise SeqmixError(f"model: tokens must be a (B, L) tensor of torch.int64 or torch.int32 ids (the embedding's "
                              f"index types), got {got}")
        if tokens.numel() == 0:
            raise SeqmixError(f"model: tokens has shape {tuple(tokens.shape)}; expected at least one row and one token")
        # The values: eagerly a SeqmixError naming the bounds, in a compiled graph an assertion, in an
        # exported one nothing (its runner checks them). The embedding would fail with "index out of
        # range in self" on a CPU, and a device-side assert on a GPU. One boolean is read, the bounds
        # only to name them.
        if not torch.compiler.is_exporting():
            low, high = torch.aminmax(tokens)
            assert_in_compiled_graph(lambda: (low >= 0) & (high < self.vocab_size),
                                     f"model: token ids must lie in [0, vocab_size={self.vocab_size})")
            if not torch.compiler.is_compiling() and not bool((low >= 0) & (high < self.vocab_size)):
                raise SeqmixError(f"model: token ids must lie in [0, vocab_size={self.vocab_size}), "
                                  f"got ids from {int(low)} to {int(high)}")
        self._check_positions(tokens.shape[1])

    def _check_output_index(self, output_index: Tensor, tokens: Tensor) -> None:
        """Reject an ``output_index`` that is not (N,) integer flat positions of ``tokens`` on its device."""
        if not getattr(self.head, "per_token", False):
            raise SeqmixError("model: output_index selects token positions; the classification head has none")
        if not isinstance(output_index, Tensor) or output_index.dim() != 1 or output_index.dtype not in (torch.int32, torch.int64):
            got = f"{tuple(output_index.shape)} {output_index.dtype}" if isinstance(output_index, Tensor) else kind_of(output_index)
            raise SeqmixError(f"model: output_index must be an (N,) integer tensor of flat positions b * L + t, got {got}")
        if output_index.device != tokens.device:
            raise SeqmixError(f"model: output_index is on {output_index.device} but tokens are on {tokens.device}")
        # The values, as for the token ids.
        if output_index.numel() and not torch.compiler.is_exporting():
            low, high = torch.aminmax(output_index)
            assert_in_compiled_graph(lambda: (low >= 0) & (high < tokens.numel()), "model: output_index must lie in [0, B * L)")
            if not torch.compiler.is_compiling() and not bool((low >= 0) & (high < tokens.numel())):
                raise SeqmixError(f"model: output_index must lie in [0, B * L = {tokens.numel()}), "
                                  f"got positions from {int(low)} to {int(high)}")

    def _check_positions(self, length: int, start: int = 0) -> None:
        """Raise when ``length`` tokens after ``start`` run past the learned positions."""
        if self.pos_embed is not None and start + length > self.max_len:
            raise SeqmixError(f"model: {start + length} tokens exceed max_len={self.max_len} of the learned positions")

    def _embed(self, tokens: Tensor, positions: Tensor) -> Tensor:
        h = self.embed(tokens)
        if self.pos_embed is not None:
            h = h + self.pos_embed(positions)
        return h

    def forward(self, tokens: Tensor, padding_mask: Tensor | None = None, output_index: Tensor | None = None) -> Tensor:
        """Token ids (B, L) and an optional padding mask (B, L) -> logits (B, L, V) or (B, classes).

        ``output_index`` (N,) long, for per-token heads only: logits (N, V) at those flat positions
        b * L + t. Training passes the positions that have targets, so tasks that predict a few tokens
        per sequence (recall, copying, masked segments) skip the vocabulary projection elsewhere. An
        index rather than a mask keeps the shape of the selection out of compiled graphs.
        """
        self._check_tokens(tokens)
        if output_index is not None:
            self._check_output_index(output_index, tokens)
        h = self._embed(tokens, torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            h = block(h, padding_mask)
        if isinstance(self.final_norm, TimestepNorm):
            h = self.final_norm(h, padding_mask)
        elif self.final_norm is not None:
            h = self.final_norm(h)
        if output_index is not None:
            return self.head(h.reshape(-1, h.shape[-1]).index_select(0, output_index))
        return self.head(h, padding_mask)

    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """The state before any token, for streaming with ``step``."""
        if not self.causal:
            raise SeqmixError("model: a model with bidirectional layers cannot stream; it has no state")
        device = check_state_request("model", batch_size, device, dtype) or self.embed.weight.device
        # All layers together: each may fit alone where their sum does not.
        per_sequence = sum(state_bytes(block.mixer.empty_state(1, torch.device("meta"), dtype)) for block in self.blocks)
        require_state_fits("model", per_sequence, batch_size, device)
        norm_state = self.final_norm.zero_state(batch_size, device, dtype) if isinstance(self.final_norm, TimestepNorm) else ()
        return ModelState(
            blocks=tuple(block.init_state(batch_size, device, dtype) for block in self.blocks),
            final_norm=norm_state,
            pos=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    def _check_state(self, state: ModelState, batch_size: int) -> None:
        """Reject a state built for another model, batch size or dtype before any layer reads it.

        Compares every tensor with this model's ``init_state(batch_size)`` (built on the meta
        device, so nothing is allocated): same layers, same tensors, same shapes, floating
        tensors where floats are expected and int64 where positions are.
        """
        if not isinstance(state, ModelState):
            raise SeqmixError(
                f"model: state must be the ModelState that init_state() or step() returned, got {kind_of(state)}"
            )
        if torch.compiler.is_compiling():
            # A traced batch size is symbolic; each mixer's own check_state still compares its part.
            return
        expected = self.init_state(batch_size, torch.device("meta"))
        if len(state.blocks) != len(expected.blocks):
            raise SeqmixError(
                f"model: state holds {len(state.blocks)} layer state(s) but this model has {len(expected.blocks)} layer(s); "
                "was it built by another model? Pass what this model's init_state() or step() returned"
            )
        parts = [(f"layer {i} ({type(block.mixer).__name__})", got, want)
                 for i, (block, got, want) in enumerate(zip(self.blocks, state.blocks, expected.blocks))]
        parts += [("final norm", state.final_norm, expected.final_norm), ("pos", state.pos, expected.pos)]
        for where, got, want in parts:
            got_leaves, want_leaves = tree_flatten(got)[0], tree_flatten(want)[0]
            if len(got_leaves) != len(want_leaves) or not all(isinstance(t, Tensor) for t in got_leaves):
                raise SeqmixError(
                    f"model: the state of {where} has {len(got_leaves)} tensors, expected {len(want_leaves)}; "
                    "was it built by another model?"
                )
            for index, (tensor, reference) in enumerate(zip(got_leaves, want_leaves)):
                if tuple(tensor.shape) != tuple(reference.shape):
                    raise SeqmixError(
                        f"model: state tensor {index} of {where} has shape {tuple(tensor.shape)}, expected "
                        f"{tuple(reference.shape)} for batch size {batch_size}; was it built by another model or batch size?"
                    )
                kind_matches = tensor.is_floating_point() if reference.is_floating_point() else tensor.dtype == reference.dtype
                if not kind_matches:
                    wanted = "a floating dtype" if reference.is_floating_point() else str(reference.dtype)
                    raise SeqmixError(f"model: state tensor {index} of {where} has dtype {tensor.dtype}, expected {wanted}")

    def step(self, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
        """Continue a stream by tokens (B, T) -> (logits (B, T, V), new state); equal to ``forward``'s logits.

        The state is checked against this model's (``_check_state``) and, eagerly, the token ids
        against the vocabulary, so a wrong input fails here with a SeqmixError.
        """
        if not getattr(self.head, "per_token", False):
            raise SeqmixError(f"model: step() needs a per-token head; {type(self.head).__name__} pools the whole sequence")
        if not self.causal:
            raise SeqmixError("model: a model with bidirectional layers cannot stream")
        self._check_tokens(tokens)
        self._check_state(state, tokens.shape[0])
        # These checks read tensor values: eager calls raise, a compiled graph asserts, an exported one cannot.
        if self.pos_embed is not None:
            assert_in_compiled_graph(lambda: state.pos.max() + tokens.shape[1] <= self.max_len,
                                     f"model: the stream would run past max_len={self.max_len} of the learned positions")
            if not torch.compiler.is_compiling():
                self._check_positions(tokens.shape[1], int(state.pos.max()))
        positions = state.pos.unsqueeze(1) + torch.arange(tokens.shape[1], device=tokens.device)
        h = self._embed(tokens, positions)
        block_states = []
        for block, block_state in zip(self.blocks, state.blocks):
            h, block_state = block.step(h, block_state)
            block_states.append(block_state)
        norm_state = state.final_norm
        if isinstance(self.final_norm, TimestepNorm):
            h, norm_state = self.final_norm.step(h, norm_state)
        elif self.final_norm is not None:
            h = self.final_norm(h)
        return self.head(h), ModelState(tuple(block_states), norm_state, state.pos + tokens.shape[1])

    # The Hugging Face convention: the model class saves and loads itself. The work is done by
    # seqmix.model.pretrained, which builds models from their descriptions, so it is imported here
    # when called rather than at module level.

    def save_pretrained(self, directory, training=None, task=None, files=None, evaluation=None):
        """Write this model to ``directory`` in the Hugging Face layout (``seqmix.save_pretrained``)."""
        from seqmix.model.pretrained import save_pretrained

        return save_pretrained(self, directory, training, task, files, evaluation)

    @classmethod
    def from_pretrained(cls, name, device: str = "cpu", allow_unverified: bool = False, revision: str | None = None):
        """The model in a pretrained directory or Hub repository ``name``, verified (``seqmix.from_pretrained``)."""
        from seqmix.model.pretrained import from_pretrained

        return from_pretrained(name, device=device, allow_unverified=allow_unverified, revision=revision)

    def push_to_hub(self, repo_id: str, **options) -> str:
        """Save this model in the pretrained layout and upload it to ``repo_id`` (``seqmix.push_to_hub``)."""
        from seqmix.model.pretrained import push_to_hub

        return push_to_hub(self, repo_id, **options)


def registered_mixer_factory(entry: Mapping, where: str = "mixer") -> Callable[[int], nn.Module]:
    """A factory taking D for ``{"mixer": <registered name>, <option>: <value>, ...}``, checked now."""
    options = dict(entry)
    name = options.pop("mixer", None)
    if name not in list_mixers():
        raise SeqmixError(f"{where}.mixer={name!r} is not a registered mixer; expected one of {list_mixers()}; "
                          f"{NOT_INSTALLED_HINT}")
    return partial(build_mixer, name, **options)


def _check_weights_fit(first: Sequence[nn.Module], layers: int) -> None:
    """Refuse a model whose ``layers`` blocks, at the bytes of the ``first`` ones built (the layer
    pattern once), would hold more weights than the memory of the device they are made on. Built,
    a deep model took memory block by block until the system killed it (model.depth=200000: 7 GiB
    after 45 s, heading for 56 GiB on a 24 GiB machine); a wide one fails at its first allocation."""
    tensors = {id(tensor): tensor for part in first for tensor in [*part.parameters(), *part.buffers()]}.values()
    device = next(iter(tensors)).device if tensors else torch.device("cpu")
    memory = device_memory_bytes(device)
    if memory is None:
        return
    needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors) * layers / len(first)
    if needed > memory:
        raise SeqmixError(f"model: {layers:,} layers need about {needed / 2**30:,.1f} GiB for their weights alone, more than "
                          f"the {memory / 2**30:,.1f} GiB of {device.type} memory here; lower model.depth or model.d_model")


def _refuse_module_as_factory(field: str, value) -> None:
    """Refuse a module where build_model takes a factory: called with D, a mixer instance ran its own
    forward on the integer ("x must be a torch.Tensor ..., got an int")."""
    if isinstance(value, nn.Module):
        example = ("a registered name or a factory, e.g. functools.partial(seqmix.build_mixer, 'ema', chunk_size=64)"
                   if field.startswith(("layers", "mixers")) else f"its class ({type(value).__name__}) or a function taking the sizes")
        raise SeqmixError(f"model: {field} is {kind_of(value)} module, not a factory: build_model makes a new part for "
                          f"every layer from a factory taking the sizes; give {example}")


def build_model(
    vocab_size: int,
    d_model: int,
    layers: Sequence[str | Callable[[int], nn.Module]],
    mixers: Mapping[str, Callable[[int], nn.Module]] | None = None,
    depth: int | None = None,
    block: Callable[..., Block] = Block,
    ffn: Callable[[int], nn.Module] | None = None,
    norm: Callable[[int], nn.Module] = LayerNorm,
    head: Callable[[int, int], nn.Module] = CausalLMHead,
    final_norm: Callable[[int], nn.Module] | None = None,
    positions: str = "none",
    max_len: int = 2048,
    tie_embeddings: bool = False,
    recompute: Recompute | None = None,
) -> SequenceModel:
    """Compose a model from factories: the Hydra target of every ``conf/model`` preset.

    Args:
        layers: the mixer of each layer: a key of ``mixers``, a registered mixer name (built with
            its default options), or a factory taking D.
            With ``depth``, the list is a pattern repeated until there are ``depth`` layers.
        mixers: the mixers the names in ``layers`` refer to: factories taking D, or
            ``{"mixer": <registered name>, <option>: <value>, ...}``.
        block: block factory taking (d_model, mixer, ffn, norm).
        ffn, norm, head, final_norm: factories taking D (the head: D and V); ffn and
            final_norm may be None.
        recompute: the activation recomputation of every block (``none``, ``mixer`` or ``block``;
            ``seqmix.Block``), passed to the block factory; None leaves each block's own.
        Others as in ``SequenceModel``.
    """
    # Before any part is built: the factories take these sizes first.
    require_int("model", "vocab_size", vocab_size, 2)
    require_int("model", "d_model", d_model)
    if recompute is not None:
        require_recompute("model.recompute", recompute)
    if isinstance(layers, str):
        raise SeqmixError(f"model: layers={layers!r} is a string; give a list of mixer names, e.g. layers={[layers]!r}")
    if not isinstance(layers, Sequence):
        raise SeqmixError(f"model: layers={layers!r} is not valid; give a list of mixer names, e.g. layers=['ema']")
    if mixers is not None and not isinstance(mixers, Mapping):
        raise SeqmixError(f"model: mixers={mixers!r} is not valid; expected {{name: factory or {{mixer: <registered name>, ...}}}}")
    for name, factory in {"block": block, "ffn": ffn, "norm": norm, "head": head, "final_norm": final_norm}.items():
        # Each is called with sizes below; only ffn and final_norm may be absent.
        _refuse_module_as_factory(name, factory)
        if not callable(factory) and not (factory is None and name in ("ffn", "final_norm")):
            raise SeqmixError(f"model: {name}={factory!r} is not valid; expected a factory taking the sizes (a class or function)")
    mixers = dict(mixers or {})
    for name, entry in mixers.items():
        _refuse_module_as_factory(f"mixers.{name}", entry)
        if not (callable(entry) or isinstance(entry, Mapping)):
            raise SeqmixError(f"model.mixers.{name}={entry!r} is not valid; expected a factory taking D or "
                              f"{{mixer: <registered name>, <option>: <value>, ...}}")
    pattern = list(layers)
    if not pattern:
        raise SeqmixError("model: layers is empty; name at least one mixer, e.g. layers=[ema]")
    if depth is not None:
        require_int("model", "depth", depth)
        if depth % len(pattern):
            raise SeqmixError(
                f"model: depth={depth} is not a multiple of the {len(pattern)} layers in the pattern {pattern}"
            )
        pattern = pattern * (depth // len(pattern))
    factories = []
    for index, layer in enumerate(pattern):
        _refuse_module_as_factory(f"layers[{index}]", layer)
        if not (isinstance(layer, str) or callable(layer)):
            raise SeqmixError(f"model: layers[{index}]={layer!r} is not valid; expected a mixer name or a factory taking D")
        if isinstance(layer, str):
            if layer in mixers:
                layer = mixers[layer]
                if isinstance(layer, Mapping):
                    layer = registered_mixer_factory(layer, f"model.mixers.{pattern[index]}")
            elif layer in list_mixers():
                layer = partial(build_mixer, layer)
            else:
                raise SeqmixError(
                    f"model: layer {index} names mixer {layer!r}, which is neither defined by this model "
                    f"({sorted(mixers)}) nor registered ({list_mixers()})"
                )
        factories.append(layer)
    every_block = {} if recompute is None else {"recompute": recompute}
    blocks = []
    for factory in factories:
        blocks.append(block(d_model=d_model, mixer=factory(d_model), ffn=None if ffn is None else ffn(d_model), norm=norm,
                            **every_block))
        if not isinstance(blocks[-1], Block):
            raise SeqmixError(f"model: block={block!r} built {kind_of(blocks[-1])}, not a seqmix Block; a block factory "
                              "takes (d_model, mixer, ffn, norm) and returns a Block (a subclass of seqmix.Block)")
        if len(blocks) == len(layers):
            _check_weights_fit(blocks, len(factories))
    return SequenceModel(
        vocab_size=vocab_size,
        d_model=d_model,
        blocks=blocks,
        head=head(d_model, vocab_size),
        final_norm=None if final_norm is None else final_norm(d_model),
        positions=positions,
        max_len=max_len,
        tie_embeddings=tie_embeddings,
    )
