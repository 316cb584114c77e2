"""The streaming contract every token mixer honours.

Shape vocabulary, used in every docstring of the package:
B batch · L sequence length · T tokens in one streaming call · D model width · N EMA order
(states per channel) · S shared query/key width ("z") · E value width · F FFN hidden width ·
H heads · C chunk size · K kernel size. The parallel layout is (B, L, D); a padding mask is
(B, L) bool with True marking padding.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from seqmix.errors import INT_LIMIT, SeqmixError, require_available_device, require_bool, require_choice, require_int, kind_of

State = Any
"""A (possibly nested) tuple of batch-first tensors whose shapes never depend on tokens seen."""


_ANY_TOKEN_COUNT = False


@contextmanager
def any_token_count() -> Iterator[None]:
    """While tracing ``step`` for a token count T known only at run time (one graph that serves
    prefill, T = prompt length, and decode, T = 1): every mixer must take one path whatever T is,
    with no Python branch on T (``token_count_is_dynamic`` tells it)."""
    global _ANY_TOKEN_COUNT
    previous, _ANY_TOKEN_COUNT = _ANY_TOKEN_COUNT, True
    try:
        yield
    finally:
        _ANY_TOKEN_COUNT = previous


def token_count_is_dynamic() -> bool:
    """Whether ``step`` is being traced for any token count (``any_token_count``)."""
    return _ANY_TOKEN_COUNT


def assert_in_compiled_graph(holds: Callable[[], Tensor], message: str) -> None:
    """In a ``torch.compile`` graph, fail the call with ``message`` (a RuntimeError) unless ``holds()``
    (a boolean scalar tensor) is true: the checks that read values raise a SeqmixError on eager calls
    only, and without them a compiled model streamed past its attention cache into wrong logits.
    Nothing eagerly (the caller raises there) and nothing while exporting: ONNX and ExecuTorch
    graphs carry no assertions, and their runners check the inputs before a graph runs."""
    if torch.compiler.is_compiling() and not torch.compiler.is_exporting():
        torch._assert_async(holds(), message)


def traceable_contiguous(t: Tensor) -> Tensor:
    """``t.contiguous()``; while tracing, always a copy.

    Whether a permuted tensor is already contiguous depends on sizes of 1 (B = 1, T = 1), a
    question that torch.export would answer by fixing that size in the graph; a copy asks nothing.
    """
    return t.clone(memory_format=torch.contiguous_format) if torch.compiler.is_compiling() else t.contiguous()


def transposed_rows(t: Tensor) -> Tensor:
    """(B, M, N) -> (B, N, M), contiguous: ``traceable_contiguous(t.transpose(1, 2))``.

    Eagerly one 2-D copy per row: torch copies a transposed 2-D matrix in cache-sized blocks, and a
    transposed 3-D tensor element by element, about twice as slow for a (16384, 256) row.
    """
    if torch.compiler.is_compiling():
        return traceable_contiguous(t.transpose(1, 2))
    return _TransposedRows.apply(t)


def _copy_transposed_rows(t: Tensor) -> Tensor:
    out = t.new_empty(t.shape[0], t.shape[2], t.shape[1])
    for row in range(t.shape[0]):
        out[row].copy_(t[row].t())
    return out


class _TransposedRows(torch.autograd.Function):
    """``transposed_rows`` as one autograd node: its gradient is the gradient's transposed rows."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        return _copy_transposed_rows(t)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _copy_transposed_rows(grad)


def traceable_reshape(t: Tensor, *shape) -> Tensor:
    """``t.reshape(*shape)`` for a permuted ``t``, without the question ``traceable_contiguous`` avoids."""
    return traceable_contiguous(t).view(*shape)


def check_state_request(owner: str, batch_size, device, dtype):
    """Raise unless ``init_state``'s arguments are a positive batch size, a device this machine has
    (or None) and a floating torch.dtype (or None); returns the device as a ``torch.device`` or None."""
    require_int(owner, "batch_size", batch_size, meaning="B, the number of streams")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise SeqmixError(f"{owner}: dtype={dtype!r} is not valid; expected a floating torch.dtype or None (the parameters')")
    return None if device is None else require_available_device(f"{owner}: device", device)


def require_state_fits(owner: str, per_sequence_bytes: int, batch_size: int, device) -> None:
    """Raise unless a streaming state of ``per_sequence_bytes`` per sequence, for ``batch_size``
    sequences, fits the memory of ``device``: an attention cache sized by a huge ``max_len`` (a config
    someone edited) or a huge batch was an allocator's error naming neither, or took the machine's memory."""
    from seqmix.timing import device_memory_bytes

    memory = device_memory_bytes(device)
    needed = per_sequence_bytes * batch_size
    if memory is not None and needed > memory:
        raise SeqmixError(f"{owner}: a streaming state for B={batch_size} holds {needed / 2**30:,.1f} GiB "
                          f"({per_sequence_bytes:,} bytes per sequence), more than the {memory / 2**30:,.1f} GiB of "
                          f"{torch.device(device).type} memory here; lower the batch size or what sizes the state "
                          "(an attention cache's max_len, a state's order)")


def state_bytes(state) -> int:
    """Bytes held by the tensors of a state (any nesting)."""
    return sum(leaf.numel() * leaf.element_size() for leaf in tree_flatten(state)[0] if isinstance(leaf, Tensor))


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype recurrences and statistics run in: float32 at least, float64 kept."""
    return torch.float64 if dtype == torch.float64 else torch.float32


PASSES = ("forward", "fwd+bwd")
"""The passes a cost is stated for: ``forward`` in eval mode without autograd (as the benchmark
runs it), ``fwd+bwd`` in train mode, back to the input and to every parameter."""


@dataclass(frozen=True)
class Cost:
    """The minimum work of one pass of an algorithm: FLOPs and bytes moved (``Mixer.cost`` says what counts)."""

    flops: float
    bytes: float

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass(frozen=True)
class Stages:
    """The forward work of an algorithm's stages, summed: FLOPs and elements read and written.

    A stage is one step of linear algebra (a matrix product, a convolution layer, an FFT, a
    recurrence or the carry between chunks) that reads its operands once and writes its results
    once; pointwise work (activations, gates, norms, residuals, masks, softmax's exponentials) is
    fused into the stage beside it and moves nothing of its own. ``cost`` turns the sum into the
    Cost of a pass.
    """

    flops: float = 0
    reads: float = 0
    writes: float = 0

    def __add__(self, other: Stages) -> Stages:
        return Stages(self.flops + other.flops, self.reads + other.reads, self.writes + other.writes)

    def __mul__(self, count: int) -> Stages:
        """The same stages run ``count`` times (directions, layers)."""
        return Stages(self.flops * count, self.reads * count, self.writes * count)

    def cost(self, pass_: str, itemsize: int) -> Cost:
        """The Cost of a pass with elements of ``itemsize`` bytes.

        ``fwd+bwd`` adds the backward: each stage's backward does two of its products (the
        gradient of its inputs and of its weights), so three times the forward's FLOPs in all; it
        reads the gradient of what the stage wrote and what the stage read, and writes the
        gradients of what it read, so it moves the forward's elements plus those read once more.
        """
        require_choice("pass_", pass_, PASSES)
        if pass_ == "forward":
            return Cost(self.flops, (self.reads + self.writes) * itemsize)
        return Cost(3 * self.flops, (3 * self.reads + 2 * self.writes) * itemsize)


def linear_stages(layers: Iterable[nn.Linear], rows: int) -> Stages:
    """Each linear layer applied to ``rows`` rows (B·L): its product, reading its input and
    writing its output once (its weights are counted with the parameters, ``parameter_reads``)."""
    total = Stages()
    for layer in layers:
        total += Stages(2 * rows * layer.in_features * layer.out_features, rows * layer.in_features, rows * layer.out_features)
    return total


def parameter_reads(module: nn.Module, *excluded: nn.Module) -> Stages:
    """Reading ``module``'s parameters once, those of the ``excluded`` submodules left out (they count their own)."""
    skip = {id(p) for inner in excluded for p in inner.parameters()}
    return Stages(reads=sum(p.numel() for p in module.parameters() if id(p) not in skip))


class Mixer(nn.Module):
    """Base class of a token mixer: (B, L, D) -> (B, L, D), in parallel or streamed.

    Subclasses implement ``mix`` (parallel), and for causal mixers ``mix_step`` and
    ``init_state``. The public ``forward``, ``step`` and ``init_state`` check their inputs first
    (shape, dtype, device, mask, state structure), so a wrong input fails here with a SeqmixError
    naming it instead of deep inside a matmul.

    Dtypes, one rule for every mixer: an input of any floating dtype is accepted and computed in
    the dtype of the mixer's parameters (recurrences and statistics in ``compute_dtype`` of it,
    float32 at least); the output is returned in the input's dtype. The state may be in any
    floating dtype (``init_state(dtype=...)``); its integer tensors (positions) must be int64.
    ``mix`` and ``mix_step`` therefore always see inputs in the parameters' dtype.

    A mixer also answers what the rest of seqmix would otherwise hard-code per mixer, so search,
    benchmarks, exporters and compilers ask it and never branch on its name or class:
    ``lowered_impls`` (the path each lowering runs), ``cpu_only_impls`` (the paths that run on the
    CPU only, and what to use elsewhere), ``impl_for_tokens`` (the path a call of T
    tokens takes), ``length_unit``, ``attention_scores``, ``cache_capacity`` and the search knobs
    (``search_knobs``, ``apply_search_knobs``).

    Class attributes:
        impls: the compute paths; the first one is the plain reference path.
        default_impl: the path used when none is asked for.
        includes_residual: True when the output already adds the input back (gated attention),
            so a block must not add it again.
        lowered_impls: {lowering: {impl: the impl that lowering runs instead}} for the lowerings in
            ``LOWERINGS``: ``export`` (ONNX, ExecuTorch, TensorRT graphs) and ``inductor``
            (torch.compile's default backend). An impl not listed is kept.
        cpu_only_impls: {impl that runs on the CPU only: the impl to use on other devices}
            (seqmix's C++ paths); ``require_runs_on`` reads it.
    """

    impls: ClassVar[tuple[str, ...]] = ("reference",)
    default_impl: ClassVar[str] = "reference"
    includes_residual: ClassVar[bool] = False
    lowered_impls: ClassVar[dict[str, dict[str, str]]] = {}
    cpu_only_impls: ClassVar[dict[str, str]] = {}

    def __init__(self, d_model: int, *, causal: bool, impl: str | None = None):
        super().__init__()
        if not isinstance(d_model, int) or isinstance(d_model, bool) or not 1 <= d_model <= INT_LIMIT:
            raise SeqmixError(f"d_model={d_model!r} is not valid; expected a positive integer (at most 2**63 - 1)")
        require_bool(type(self).__name__, "causal", causal)
        missing = [name for name in ("mix_step", "empty_state") if getattr(type(self), name) is getattr(Mixer, name)]
        if causal and missing:
            # Else a run trained, checkpointed, and failed at its sample with NotImplementedError.
            raise SeqmixError(f"{type(self).__name__} is built with causal=True but does not implement {' and '.join(missing)}, "
                              "which streaming (generation, the decoder graph) calls; implement them or build it with causal=False")
        self.d_model = d_model
        self.causal = causal
        self.impl = self.default_impl if impl is None else impl

    @property
    def impl(self) -> str:
        """The compute path in use; assign another name from ``impls`` to switch."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        require_choice(f"{type(self).__name__}.impl", value, self.impls)
        self._impl = value

    # --- the contract -------------------------------------------------------------------

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """Mix the whole sequence at once.

        Args:
            x: (B, L, D) inputs, any L >= 1.
            padding_mask: (B, L) bool, True at padding; padded inputs never change the
                outputs at unpadded positions.
        Returns:
            (B, L, D) outputs.
        """
        self.check_input(x, padding_mask)
        dtype = self.parameter_dtype()
        y = self.mix(x if dtype is None or x.dtype == dtype else x.to(dtype), padding_mask)
        self._check_output(y, x, "mix")
        return y if dtype is None or x.dtype == dtype else y.to(x.dtype)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Continue a stream by T >= 1 tokens.

        Args:
            x: (B, T, D) the next tokens.
            state: what ``init_state`` or the previous ``step`` returned.
        Returns:
            (B, T, D) outputs, identical to those of ``forward`` over the whole stream so far,
            and the new state.
        """
        if not self.causal:
            raise SeqmixError(
                f"{type(self).__name__} was built with causal=False: a bidirectional mixer needs "
                "the whole sequence, so it cannot step; use forward() or build it with causal=True"
            )
        self.check_input(x, None)
        self.check_state(state, x)
        dtype = self.parameter_dtype()
        y, new_state = self.mix_step(x if dtype is None or x.dtype == dtype else x.to(dtype), state)
        self._check_output(y, x, "mix_step")
        return (y if dtype is None or x.dtype == dtype else y.to(x.dtype)), self._state_like(new_state, state)

    def _state_like(self, new_state: State, state: State) -> State:
        """``new_state`` (what ``mix_step`` returned) in the structure and floating dtypes of ``state``
        (what it was given): a bfloat16 state came back float32 from the recurrences, so its dtype
        changed from one step to the next; and a mix_step returning another structure (a list for a
        tuple) was told only at the next step, as a state the caller had passed."""
        given, given_spec = tree_flatten(state)
        leaves, spec = tree_flatten(new_state)
        if spec != given_spec:
            raise SeqmixError(f"{type(self).__name__}.mix_step returned its state as a {type(new_state).__name__} of "
                              f"{len(leaves)} leaves, not in the structure it was given ({type(state).__name__} of {len(given)})")
        kept = [leaf.to(old.dtype) if isinstance(leaf, Tensor) and leaf.is_floating_point() and leaf.dtype != old.dtype else leaf
                for leaf, old in zip(leaves, given)]
        return tree_unflatten(kept, spec)

    def _check_output(self, y, x: Tensor, method: str) -> None:
        """Raise, naming the mixer and ``method``, unless ``y`` is a tensor of x's shape: a mixer's
        own code (a user's registered mixer) that returned another shape failed later inside the
        block, with torch's error naming neither. Shapes only; skipped while torch traces a graph,
        whose symbolic shapes a comparison would constrain."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(y, Tensor) or y.shape != x.shape:
            got = tuple(y.shape) if isinstance(y, Tensor) else kind_of(y)
            raise SeqmixError(f"{type(self).__name__}.{method} returned {got} for an input of shape {tuple(x.shape)}; "
                              f"a mixer returns (B, L, D) outputs, the shape of its input")

    def init_state(self, batch_size: int, device=None, dtype=None) -> State:
        """The state before any token: fixed-shape, batch-first tensors.

        Args:
            batch_size: B, a positive integer.
            device, dtype: where and in which floating dtype; default the parameters'.
        """
        name = type(self).__name__
        if not self.causal:
            raise SeqmixError(f"{name} was built with causal=False and has no streaming state")
        device = check_state_request(name, batch_size, device, dtype)
        where = device or next((p.device for p in self.parameters()), torch.device("cpu"))
        require_state_fits(name, state_bytes(self.empty_state(1, torch.device("meta"), dtype)), batch_size, where)
        return self.empty_state(batch_size, device, dtype)

    @property
    def receptive_field(self) -> int | None:
        """Positions one output can depend on, the current one included; None when unbounded."""
        return None

    def complexity(self) -> str:
        """Time of ``forward`` as a function of L with the current impl, for summaries."""
        return "O(L·D)"

    def state_size(self) -> int:
        """Numbers held per sequence by the streaming state (0 for bidirectional mixers)."""
        if not self.causal:
            return 0
        leaves, _ = tree_flatten(self.empty_state(1, torch.device("meta"), None))
        return sum(leaf.numel() for leaf in leaves)

    # --- what the rest of seqmix asks a mixer -------------------------------------------

    def impl_for_tokens(self, tokens: int) -> str:
        """The path a call on ``tokens`` tokens actually runs (a chunked path may loop on a short input)."""
        return self.impl

    def length_unit(self) -> int:
        """Lengths that are a multiple of this run without padding inside the mixer (its chunk size)."""
        return 1

    def attention_scores(self, batch_size: int, length: int, fused: bool) -> int:
        """Attention score elements one forward over (B, L) holds at once; 0 for mixers without scores.

        Args:
            fused: the runtime has fused attention kernels that never materialise the scores
                (eager PyTorch's ``scaled_dot_product_attention``); False for exported graphs.
        """
        return 0

    def cache_capacity(self) -> int | None:
        """The most tokens the streaming state can take in all; None when it takes any number."""
        return None

    def cost(self, batch_size: int, length: int, pass_: str = "forward") -> Cost | None:
        """The minimum FLOPs and bytes of one pass over (B, L, D) on the path ``impl_for_tokens(L)`` runs.

        What counts, for every mixer (``Stages``): FLOPs are those of the algorithm's linear
        algebra, 2 per multiply-add (matrix products, convolution taps, a recurrence's updates and
        readout, the carry between chunks, FFTs at 2.5·n·log2(n) per real transform of size n);
        pointwise work (activations, gates, norms, softmax) is counted in neither FLOPs nor bytes,
        as if fused into the stage beside it. Bytes are the input and the parameters read once,
        the output written once, and every intermediate the algorithm passes from one stage to
        the next written once and read once; caches, tiles and copies an implementation adds are
        not counted. So the time a machine needs at least is max(FLOPs / its matmul rate,
        bytes / its memory bandwidth), and measured / that time says how far a path is from it.
        ``fwd+bwd`` is ``Stages.cost``'s rule: three times the FLOPs, the stages' elements read
        three times and written twice. Each mixer's ``stages`` says which stages its paths have.

        Args:
            batch_size: B; length: L, both positive.
            pass_: ``forward`` (eval mode, no autograd) or ``fwd+bwd`` (train mode).
        Returns:
            The Cost, or None when the mixer does not state its stages (a plugin may not).
        """
        name = type(self).__name__
        require_int(name, "batch_size", batch_size, meaning="B, the number of sequences")
        require_int(name, "length", length, meaning="L, tokens per sequence")
        require_choice(f"{name}.cost pass_", pass_, PASSES)
        stages = self.stages(batch_size, length, pass_)
        if stages is None:
            return None
        dtype = self.parameter_dtype() or torch.float32
        return stages.cost(pass_, torch.finfo(dtype).bits // 8)

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages | None:
        """The forward stages of one pass over (B, L) on the path ``impl_for_tokens(L)``, reading the
        parameters included (``cost`` says what counts); None when not stated. ``pass_`` matters
        where a path caches something in eval mode (the FFT path's kernel spectrum)."""
        return None

    @classmethod
    def search_knobs(cls, options: dict) -> dict[str, int]:
        """The architecture-search knobs this mixer uses when built with ``options``: {knob: its smallest valid value}.

        Knob names are shared between mixers that mean the same thing by them (``chunk_size``),
        so one trial value sets every layer that uses it.
        """
        return {}

    @classmethod
    def apply_search_knobs(cls, options: dict, knobs: dict[str, int]) -> None:
        """Write the chosen knob values this mixer uses into ``options`` (its config), in place."""

    # --- what subclasses provide --------------------------------------------------------

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        raise NotImplementedError(f"{type(self).__qualname__} does not implement mix(x, padding_mask), which every mixer provides")

    def mix_step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        raise NotImplementedError(f"{type(self).__qualname__} does not implement mix_step(x, state), which a causal mixer "
                                  "provides to stream")

    def empty_state(self, batch_size: int, device, dtype) -> State:
        raise NotImplementedError(f"{type(self).__qualname__} does not implement empty_state(batch_size, device, dtype), "
                                  "which a causal mixer provides to stream")

    # --- shared checks and helpers ------------------------------------------------------

    def parameter_dtype(self) -> torch.dtype | None:
        """The dtype inputs are computed in: that of the first floating parameter (None without any)."""
        for parameter in self.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
        return None

    def check_input(self, x: Tensor, padding_mask: Tensor | None) -> None:
        """Reject inputs that are not floating (B, L, D) tensors with B, L >= 1 on the parameters' device,
        or a mask that is not a (B, L) bool tensor on x's device. Shapes, dtypes and devices only:
        nothing here reads a value, so exported graphs keep every check."""
        name = type(self).__name__
        if not isinstance(x, Tensor):
            raise SeqmixError(f"{name}: x must be a torch.Tensor of shape (B, L, D), got {kind_of(x)}")
        if x.dim() != 3:
            raise SeqmixError(f"{name}: x must have shape (B, L, D={self.d_model}), got rank {x.dim()} shape {tuple(x.shape)}")
        if x.shape[-1] != self.d_model:
            raise SeqmixError(f"{name}: x has width D={x.shape[-1]}, expected d_model={self.d_model}")
        if x.shape[0] < 1:
            raise SeqmixError(f"{name}: x has batch size B=0; expected at least one sequence")
        if x.shape[1] < 1:
            raise SeqmixError(f"{name}: x has length L=0; expected at least one token")
        if not x.is_floating_point():
            raise SeqmixError(f"{name}: x has dtype {x.dtype}; expected a floating dtype")
        weight = next((p for p in self.parameters() if p.is_floating_point()), None)
        if weight is not None and x.device != weight.device:
            raise SeqmixError(f"{name}: x is on {x.device} but the mixer's parameters are on {weight.device}; move one of them")
        if padding_mask is not None:
            if not isinstance(padding_mask, Tensor):
                raise SeqmixError(
                    f"{name}: padding_mask must be a (B, L) torch.bool tensor (True = padding) or None, got {kind_of(padding_mask)}"
                )
            if padding_mask.dtype != torch.bool:
                raise SeqmixError(f"{name}: padding_mask has dtype {padding_mask.dtype}; expected torch.bool (True = padding)")
            if tuple(padding_mask.shape) != tuple(x.shape[:2]):
                raise SeqmixError(
                    f"{name}: padding_mask has shape {tuple(padding_mask.shape)}, expected (B, L)={tuple(x.shape[:2])}"
                )
            if padding_mask.device != x.device:
                raise SeqmixError(f"{name}: padding_mask is on {padding_mask.device} but x is on {x.device}")

    def check_state(self, state: State, x: Tensor) -> None:
        """Reject a state that is not what ``init_state`` or ``step`` returns for x's batch size:
        another structure (a list, None, a tensor), another mixer's, another batch size's, a
        non-floating tensor where floats are held, floats where int64 positions are, or another device.

        Compared with ``init_state`` built on the meta device: nothing is allocated, no value is read.
        """
        name = type(self).__name__
        batch_size = x.shape[0]
        reference = self.empty_state(batch_size, torch.device("meta"), None)
        expected, expected_spec = tree_flatten(reference)
        leaves, spec = tree_flatten(state)
        if spec != expected_spec or not all(isinstance(t, Tensor) for t in leaves):
            held = sum(isinstance(t, Tensor) for t in leaves)  # None flattens to one leaf, and holds no tensor
            # The structure differs even where the counts agree (a list of one tensor for a tuple of one).
            given = "None" if state is None else f"{kind_of(state)} holding {held} tensor{'' if held == 1 else 's'}"
            raise SeqmixError(
                f"{name}: state is {given}; expected the {type(reference).__name__} "
                f"of {len(expected)} that {name}.init_state() or the previous step() returned (a mixer's mix_step returns "
                "its new state in that structure)"
            )
        for i, (got, want) in enumerate(zip(leaves, expected)):
            if got.dim() == 0 or got.shape[0] != batch_size:
                raise SeqmixError(
                    f"{name}: state tensor {i} was built for batch size {got.shape[0] if got.dim() else None}, "
                    f"but x has batch size {batch_size}"
                )
            if tuple(got.shape) != tuple(want.shape):
                raise SeqmixError(
                    f"{name}: state tensor {i} has shape {tuple(got.shape)}, expected {tuple(want.shape)}; "
                    "was it built by another mixer or with other options?"
                )
            if (got.is_floating_point() != want.is_floating_point()) or (not want.is_floating_point() and got.dtype != want.dtype):
                wanted = "a floating dtype" if want.is_floating_point() else str(want.dtype)
                raise SeqmixError(f"{name}: state tensor {i} has dtype {got.dtype}, expected {wanted}")
            if got.device != x.device:
                raise SeqmixError(f"{name}: state tensor {i} is on {got.device} but x is on {x.device}")

    def param_dtype_device(self, device, dtype) -> tuple[torch.device, torch.dtype]:
        """Defaults for ``init_state``: the device and dtype of this mixer's parameters."""
        first = next(self.parameters(), None)
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        if dtype is None:
            dtype = first.dtype if first is not None else torch.get_default_dtype()
        return torch.device(device), dtype


LOWERINGS = ("export", "inductor")


def switch_impls(model: nn.Module, lowering: str) -> dict[str, str]:
    """Switch every mixer in ``model`` to the path it runs under ``lowering`` (its ``lowered_impls``).

    Returns:
        {module name ("model" for the root): impl now in use} for every mixer.
    """
    require_choice("lowering", lowering, LOWERINGS)
    used = {}
    for name, module in model.named_modules():
        if not isinstance(module, Mixer):
            continue
        module.impl = type(module).lowered_impls.get(lowering, {}).get(module.impl, module.impl)
        used[name or "model"] = module.impl
    return used


def require_runs_on(model: nn.Module, device: torch.device, where: str) -> None:
    """Refuse to run ``model`` on ``device`` when a mixer in it is set to a path that runs on the
    CPU only (its class's ``cpu_only_impls``), naming each such mixer, its path and the path to use
    instead. ``where`` names what chose the device (``train.device='auto'``); callers ask before
    any work or file, where the mixer's own check would only fail at its first call.
    """
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise SeqmixError(f"{where}: device={device!r} is not a device torch knows") from None
    if device.type == "cpu":
        return
    refused = [f"{name or 'model'} ({type(module).__name__} impl={module.impl!r}: use impl="
               f"{type(module).cpu_only_impls[module.impl]!r} there)"
               for name, module in model.named_modules()
               if isinstance(module, Mixer) and module.impl in type(module).cpu_only_impls]
    if refused:
        raise SeqmixError(f"{where} puts the model on {device}, and these mixers are set to paths that run on the "
                          f"CPU only: {'; '.join(refused)}. Set their impl in the model's config, or run on the CPU")


def length_unit(model: nn.Module) -> int:
    """The least common multiple of the length units of every mixer in ``model`` (1 without any).

    A parallel graph whose length is a multiple of it pads nothing inside.
    """
    return math.lcm(1, *(module.length_unit() for module in model.modules() if isinstance(module, Mixer)))
