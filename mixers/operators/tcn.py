"""Dilated temporal convolution (TCNCA, arXiv 2312.05605): a stack of depthwise causal convolutions.

Per channel d, with kernel size K, dilation base f and layers i = 0 .. depth−1 (dilation f^i):

    conv_i(h)_t = bias_i + Σ_{k<K} w_i[k] · h_{t−(K−1−k)·f^i}   zero left padding of (K−1)·f^i
    layer_i(h) = act(conv_i(h))  for i < depth−1,  conv_i(h) for the last layer
    h_0 = x,  h_{i+1} = h_i + layer_i(h_i)  (residual)  or  layer_i(h_i)
    out = SiLU(h_depth + omega ⊙ x)                          as the EMA, so it drops into its slot

Output t sees inputs t−RF+1 .. t, with receptive field RF = 1 + (K−1)·(f^depth − 1)/(f − 1)
(1 + depth·(K−1) for f = 1). With f = K it is K^depth and every past offset is reached exactly
once; with f > K some offsets inside the field are never reached.

Causal only. The streaming state keeps, per layer, the last (K−1)·f^i inputs of that layer.

Four compute paths of the same sum:
- ``conv``: ``nn.Conv1d`` with groups = D on (B, D, T) rows, one transposed copy of x in and of
  y out (the reference);
- ``channels_last`` (the default): eagerly, the same depthwise convolution as a 2-D one over
  (B, D, 1, T) views of the (B, T, D) rows in channels-last layout, so no transposes at all
  (oneDNN's channels-last depthwise kernel also beats its channel-major one). With no autograd
  recording the activations and sums run in place; while autograd records, out of place, with
  each convolution's backward written out in the same layout (``_DepthwiseConvRows``: torch's
  backward of that kernel takes about twenty times its forward); while traced, ``conv``'s computation;
- ``taps``: K shifted, weighted copies of the layer input. Compiled with Inductor, the taps of a
  layer fuse into one kernel forward and backward, while a convolution stays a library call whose
  backward costs several forwards, so ``compile.compile_model`` switches to ``taps``;
- ``native``: each layer as one pass of C++ over the (B, T, D) rows (tcn_native.cpp, built on first
  use with the machine's compiler by ``seqmix.native``): the convolution, activation, residual sum
  and mask in one read of the layer's input and one write of its output, the last layer writing the
  mixer's output; its backward one such pass per layer. CPU only, float32 and float64, computed
  in x's dtype (autocast does not lower it). The fastest eager path on a CPU; while compiled or
  exported it runs ``taps`` and ``conv`` as the other paths do, as tracers cannot see into native code.
Exporters take ``conv``: ONNX Runtime's ``Conv`` beats the K slices and products.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqmix import native as native_code
from seqmix.contract import Mixer, Stages, parameter_reads, transposed_rows
from seqmix.errors import INT_LIMIT, SeqmixError, require_choice, require_bool, require_int
from seqmix.operators.first_order import first_order
from seqmix.registry import register_mixer
from seqmix.timing import device_memory_bytes

ACTIVATIONS = {"none": lambda h: h, "silu": F.silu, "gelu": F.gelu}
# The activations' codes in tcn_native.cpp.
NATIVE_ACTIVATIONS = {"none": 0, "silu": 1, "gelu": 2}
# The path that computes what ``native`` does on a device its C++ cannot read.
NATIVE_ELSEWHERE = "channels_last"


class TCNState(NamedTuple):
    """Streaming state of the TCN: ``tcn[i]``, layer i's last (K−1)·f^i inputs, (B, D, (K−1)·f^i)."""

    tcn: tuple[Tensor, ...]


class _DepthwiseConvRows(torch.autograd.Function):
    """A layer's depthwise convolution on (B, window + T, D) rows, with its backward written out in
    that layout, for ``channels_last`` while autograd records: the forward is the channels-last 2-D
    kernel inference runs; the backward is one more such convolution and the taps' products summed,
    where torch's own backward of that kernel took twenty times its forward (D = 256, T = 4096, one
    thread).

    - input: the adjoint of a correlation is a correlation of the gradient, padded by the window on
      both sides, with the flipped kernel: one more forward convolution;
    - weight: tap k meets the context shifted by k·dilation, a product summed over batch and time
      (``_tap_sums``);
    - bias: the gradient summed over batch and time.
    """

    @staticmethod
    def forward(ctx, context: Tensor, weight: Tensor, bias: Tensor, dilation: int) -> Tensor:
        """context (B, window + T, D), weight (D, 1, K), bias (D,) -> (B, T, D)."""
        ctx.save_for_backward(context, weight)
        ctx.dilation = dilation
        return _channels_last_conv(context, weight, bias, dilation)

    @staticmethod
    @first_order("impl='channels_last' of the TCN", "impl='conv' or impl='taps'")
    def backward(ctx, grad: Tensor):
        context, weight = ctx.saved_tensors
        dilation = ctx.dilation
        width, _, taps = weight.shape
        window = (taps - 1) * dilation
        # Under autocast the convolution ran in a lower precision; the gradients are the operands'.
        grad = grad.to(context.dtype)
        batch, length, _ = grad.shape
        grad_context = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            padded = grad.new_empty(batch, window + length + window, width)
            padded[:, :window].zero_()
            padded[:, window + length :].zero_()
            padded[:, window : window + length].copy_(grad)
            grad_context = _channels_last_conv(padded, weight.to(grad.dtype).flip(-1), None, dilation)
        if ctx.needs_input_grad[1]:
            grad_weight = _tap_sums(context, grad, taps, dilation).t().unsqueeze(1).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 1)).to(weight.dtype)
        return grad_context, grad_weight, grad_bias, None


# Bytes of the products ``_tap_sums`` makes at a time, so that a slab of every tap's products stays
# in cache while it is summed: at 2 MiB the sums took 1.6x as long on one thread, at 512 KiB 1.25x
# as long on two (D = 256, T = 16384). A slab holds at least TAP_SLAB_MIN_ROWS steps, so that the
# loop's cost per slab stays small beside a slab's work however many channels there are.
TAP_SLAB_BYTES = 2**20
TAP_SLAB_MIN_ROWS = 16


def _tap_sums(context: Tensor, grad: Tensor, taps: int, dilation: int) -> Tensor:
    """sum over batch and time of context shifted by k·dilation times grad, for every tap k:
    context (B, window + T, D), grad (B, T, D) -> (K, D).

    The taps' shifted contexts are one view (K, B, T, D), multiplied by grad and summed a slab of
    steps at a time, so that each slab's products are summed while in cache, and grad and the
    context are read from memory about once, not once per tap with a (B, T, D) product written and
    read back in between (the weight gradient 2.2-2.5x faster, D = 256, T = 4096 and 16384, one and two
    threads)."""
    batch, length, width = grad.shape
    shifted = context.unfold(1, length, dilation).permute(1, 0, 3, 2)  # (K, B, T, D), a view
    rows = max(TAP_SLAB_MIN_ROWS, TAP_SLAB_BYTES // (taps * batch * width * grad.element_size()))
    product = grad.new_empty(taps, batch, min(rows, length), width)
    sums = []
    for start in range(0, length, rows):
        end = min(length, start + rows)
        slab = product[:, :, : end - start]
        sums.append(torch.mul(shifted[:, :, start:end], grad[:, start:end], out=slab).sum((1, 2)))
    return torch.stack(sums).sum(0)


def _channels_last_conv(context: Tensor, weight: Tensor, bias: Tensor | None, dilation: int) -> Tensor:
    """The depthwise correlation of (B, window + T, D) rows with weight (D, 1, K) -> (B, T, D): a
    2-D convolution over the (B, D, 1, window + T) view, which is a channels-last image as it is,
    and whose output is one too (contiguous (B, T, D) rows once transposed back)."""
    out = F.conv2d(context.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), bias, dilation=(1, dilation),
                   groups=weight.shape[0])  # (B, D, 1, T)
    return out.squeeze(2).transpose(1, 2)


@dataclass(frozen=True)
class _NativeStack:
    """What the native kernels need of a TCN besides its tensors: per layer its dilation and window."""

    taps: int
    dilations: tuple[int, ...]
    windows: tuple[int, ...]
    activation: int
    residual: bool


@dataclass(frozen=True)
class _NativeKernels:
    """tcn_native.cpp's entry points for one dtype: a layer's forward pass and its backward pass."""

    forward: object
    backward: object


@functools.lru_cache(maxsize=None)
def _native_kernels(dtype: torch.dtype) -> _NativeKernels:
    """The native layer forward and backward passes for ``dtype`` (float32 or float64), built on first use."""
    suffix = native_code.dtype_suffix(dtype, "tcn impl='native'")
    library = native_code.load("seqmix.operators", "tcn_native.cpp")
    return _NativeKernels(native_code.function(library, f"seqmix_tcn_forward_{suffix}", 8, 5, 4, status=True),
                          native_code.function(library, f"seqmix_tcn_backward_{suffix}", 16, 7, 3, status=True))


def _check_status(status: int, pass_: str, length: int, width: int, window: int) -> None:
    """Raise MemoryError when a native layer ``pass_`` could not allocate its per-thread scratch
    (the backward's: min(window, T) + 1 rows of D values per thread)."""
    if status:
        raise MemoryError(f"tcn impl='native': the {pass_} of a layer (T={length}, D={width}, window {window}) could not "
                          f"allocate its scratch memory on {torch.get_num_threads()} threads")


def _last_window(h: Tensor, past: Tensor | None, window: int, channel_major: bool) -> Tensor:
    """The last ``window`` rows of a layer's context, its past (zeros when None) then its input h
    (B, T, D): the layer's next streaming state, a copy. Past and result (B, window, D), or the
    state's own (B, D, window) when ``channel_major``."""
    batch, length, width = h.shape
    if length >= window:
        tail = h[:, length - window:]
        return (tail.transpose(1, 2) if channel_major else tail).clone(memory_format=torch.contiguous_format)
    if past is None:
        past = h.new_zeros((batch, width, window) if channel_major else (batch, window, width))
    if channel_major:
        return torch.cat([past[..., length:], h.transpose(1, 2)], dim=-1)
    return torch.cat([past[:, length:], h], dim=1)


class _NativeTCN(torch.autograd.Function):
    """The TCN's stack as native code (tcn_native.cpp), one kernel call per layer: one autograd node.

    Inputs: whether autograd records this call (inside ``forward`` grad mode is always off, and
    parameters require grad under ``torch.no_grad()`` too, so the caller decides); x (B, T, D)
    contiguous; omega (D,); mask (B, T) uint8, nonzero where padded, or None;
    then per layer its weight (K, D) (tap k multiplies the input (K−1−k)·f^i steps back), per layer
    its bias (D,), per layer its past window or None for zeros.
    Outputs: y (B, T, D), then per layer its next window.
    Windows are (B, window_i, D) while autograd records (the backward reads them so), else the
    state's own (B, D, window_i), which the forward kernel gathers from: a decoding step then
    copies each window once instead of transposing it in and out.
    Keeps every layer's input for backward (which recomputes the pre-activations from them) when
    autograd records; otherwise each layer's input is freed once the next is written.
    """

    @staticmethod
    def forward(ctx, stack: _NativeStack, records: bool, x: Tensor, omega: Tensor, mask: Tensor | None,
                *operands: Tensor | None):
        depth = len(stack.dilations)
        weights, biases, pasts = operands[:depth], operands[depth : 2 * depth], operands[2 * depth :]
        kernels = _native_kernels(x.dtype)
        batch, length, width = x.shape
        h = x if mask is None else x.masked_fill(mask.bool().unsqueeze(-1), 0.0)
        inputs, windows = [], []
        channel_major = not records
        for i, (dilation, window) in enumerate(zip(stack.dilations, stack.windows)):
            windows.append(_last_window(h, pasts[i], window, channel_major))
            last = i == depth - 1
            out = torch.empty_like(x)
            status = kernels.forward(*native_code.pointers(h, pasts[i], out, weights[i], biases[i], mask, x if last else None,
                                                           omega if last else None),
                                     batch, length, width, stack.taps, dilation, stack.activation, int(stack.residual),
                                     int(channel_major), torch.get_num_threads())
            _check_status(status, "forward", length, width, window)
            if records:
                inputs.append(h)
            h = out
        ctx.set_materialize_grads(False)
        ctx.stack = stack
        if records:
            ctx.save_for_backward(x, omega, mask, *inputs, *operands)
        return (h, *windows)

    @staticmethod
    @first_order("impl='native' of the TCN", "impl='conv' or impl='taps'")
    def backward(ctx, grad_y: Tensor | None, *grad_windows: Tensor | None):
        stack = ctx.stack
        depth = len(stack.dilations)
        x, omega, mask, *rest = ctx.saved_tensors
        inputs, weights, biases, pasts = (rest[i * depth : (i + 1) * depth] for i in range(4))
        kernels = _native_kernels(x.dtype)
        batch, length, width = x.shape
        keep = None if mask is None else (mask == 0).unsqueeze(-1)  # (B, T, 1)
        threads = torch.get_num_threads()
        g, g_strides = native_code.gradient_rows(grad_y, x)
        grad_weights = [torch.zeros_like(w) for w in weights]
        grad_biases = [torch.zeros_like(b) for b in biases]
        grad_omega = torch.zeros_like(omega)
        grad_pasts: list[Tensor | None] = [None] * depth
        grad_x = None
        # dl/d(next + omega·x) of the last layer, kept when x needs its gradient: omega times it is x's direct term.
        output_grad = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        for i in reversed(range(depth)):
            last, first = i == depth - 1, i == 0
            wants_input = not first or ctx.needs_input_grad[2]
            wants_past = pasts[i] is not None and ctx.needs_input_grad[5 + 2 * depth + i]
            grad_h = torch.empty_like(x) if wants_input else None
            grad_past = x.new_empty(batch, stack.windows[i], width) if wants_past else None
            extra = output_grad if first else None  # x's own term: omega times the output's gradient
            status = kernels.backward(
                *native_code.pointers(inputs[i], pasts[i]), native_code.row_pointer(g), *native_code.pointers(
                    weights[i], biases[i], mask, x if last else None, omega if last else None, extra,
                    omega if extra is not None else None, grad_h, grad_past, output_grad if last else None,
                    grad_weights[i], grad_biases[i], grad_omega if last else None),
                batch, length, width, stack.taps, stack.dilations[i], *g_strides, stack.activation, int(stack.residual),
                threads)
            _check_status(status, "backward", length, width, stack.windows[i])
            if grad_windows[i] is not None:
                _add_window_grad(grad_windows[i].to(x.dtype), length, grad_h, grad_past, keep)
            grad_pasts[i] = grad_past
            g, g_strides = grad_h, (length * width, width)  # empty_like(x): contiguous
            if first:
                grad_x = grad_h
        return (None, None, grad_x, grad_omega, None, *grad_weights, *grad_biases, *grad_pasts)


def _add_window_grad(grad_window: Tensor, length: int, grad_h: Tensor | None, grad_past: Tensor | None,
                     keep: Tensor | None) -> None:
    """Add the gradient of a layer's next window (B, window, D), ``_last_window`` of its context,
    to its input's gradient grad_h (B, T = ``length``, D) (not where ``keep`` (B, T, 1) is False:
    the input was masked there) and to its past's, grad_past (B, window, D); either may be None
    (not wanted)."""
    window = grad_window.shape[1]
    if grad_h is not None:
        start = max(length - window, 0)
        tail = grad_window[:, window - (length - start):]
        grad_h[:, start:] += tail if keep is None else tail * keep[:, start:]
    if grad_past is not None and length < window:
        grad_past[:, length:] += grad_window[:, : window - length]


@register_mixer("tcn")
class TCN(Mixer):
    """TCNCA's stack of dilated depthwise causal convolutions with output SiLU(y + omega ⊙ x).

    Args:
        d_model: D.
        kernel_size: K, taps per layer.
        dilation_base: f; layer i is dilated by f^i.
        depth: number of layers.
        activation: ``none``, ``silu`` or ``gelu``, applied after every layer but the last.
        residual: h = h + layer(h) instead of h = layer(h).
        causal: must be True; the TCN has no bidirectional form.
        impl: ``conv`` (reference), ``channels_last`` (default: the channels-last kernel on the
            (B, T, D) rows, in place without autograd, with its own backward while autograd
            records), ``taps`` (fuses when compiled) or ``native`` (one pass of C++ per
            layer; needs a C++ compiler, CPU, float32 or float64).
    """

    impls = ("conv", "channels_last", "taps", "native")
    default_impl = "channels_last"
    # ONNX Runtime runs one Conv node per layer faster than K slices and products; Inductor fuses the
    # taps into one kernel per layer, forward and backward, where the convolution stays a library call.
    lowered_impls = {"export": {"taps": "conv", "channels_last": "conv", "native": "conv"},
                     "inductor": {"conv": "taps", "channels_last": "taps", "native": "taps"}}
    cpu_only_impls = {"native": NATIVE_ELSEWHERE}

    def __init__(
        self,
        d_model: int,
        kernel_size: int = 4,
        dilation_base: int = 4,
        depth: int = 4,
        activation: str = "silu",
        residual: bool = True,
        causal: bool = True,
        impl: str | None = None,
    ):
        require_bool("tcn", "causal", causal)
        require_bool("tcn", "residual", residual)
        if not causal:
            raise SeqmixError(
                f"tcn: causal={causal!r} is not valid; the TCN is causal only (its convolutions look "
                "back, never ahead), so build it with causal=True"
            )
        super().__init__(d_model, causal=True, impl=impl)
        require_int("tcn", "kernel_size", kernel_size, 2, "K, taps per layer")
        require_int("tcn", "dilation_base", dilation_base, 1, "f, layer i is dilated by f**i")
        require_int("tcn", "depth", depth, 1, "number of convolution layers")
        require_choice("tcn.activation", activation, ACTIVATIONS)
        window = (kernel_size - 1) * dilation_base ** (depth - 1)
        if window > INT_LIMIT // d_model:
            # Sizes torch cannot hold: init_state and state_size failed inside torch ("Overflow when unpacking long long").
            raise SeqmixError(f"tcn: kernel_size={kernel_size}, dilation_base={dilation_base} and depth={depth} give the last "
                              f"layer a window of {window:,} steps, whose D={d_model} channels no tensor can hold; lower them")
        self.kernel_size = kernel_size
        self.dilation_base = dilation_base
        self.depth = depth
        self.activation = activation
        self.residual = residual
        # Padding is done by hand (zeros in mix, the state's window in mix_step), hence padding=0.
        self.convs = nn.ModuleList(
            nn.Conv1d(d_model, d_model, kernel_size, dilation=dilation_base**i, groups=d_model)
            for i in range(depth)
        )
        self.omega = nn.Parameter(torch.empty(d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's default Conv1d initialisation; omega ~ N(0, 1) as in the EMA."""
        for conv in self.convs:
            conv.reset_parameters()
        with torch.no_grad():
            nn.init.normal_(self.omega, mean=0.0, std=1.0)

    def _require_context_fits(self, x: Tensor) -> None:
        """Raise unless a layer's context, its window then x (B, window + T, D), fits the memory of x's
        device: a dilation_base of 10**12 asked the allocator for 192 TB at T = 10, and torch's error
        named no option."""
        batch, length, width = x.shape
        context = batch * (max(self.windows) + length) * width * x.element_size()
        memory = device_memory_bytes(x.device)
        if memory is not None and context > memory:
            raise SeqmixError(
                f"tcn: a layer's context for (B, T) = ({batch}, {length}) is {context / 2**30:,.1f} GiB (a window of "
                f"{max(self.windows):,} steps from kernel_size={self.kernel_size}, dilation_base={self.dilation_base}, "
                f"depth={self.depth}), more than the {memory / 2**30:,.1f} GiB of {x.device.type} memory here; lower them")

    @property
    def windows(self) -> list[int]:
        """Past inputs each layer needs: (K−1)·f^i for layer i."""
        return [(self.kernel_size - 1) * conv.dilation[0] for conv in self.convs]

    @property
    def receptive_field(self) -> int:
        """RF: output t depends on inputs t−RF+1 .. t."""
        return 1 + sum(self.windows)

    def complexity(self) -> str:
        return "O(L·K·depth·D)"

    def stages(self, batch_size: int, length: int, pass_: str) -> Stages:
        """One stage per layer, on every path (the same K multiply-adds per output): it reads the
        layer's input and writes its output (B, L, D), so every hidden sequence between two layers is
        written once and read once; the last reads x once more for the output's ω·x term."""
        sequence = batch_size * length * self.d_model
        layer = Stages(2 * sequence * self.kernel_size, sequence, sequence)
        return layer * self.depth + Stages(reads=sequence) + parameter_reads(self)

    @classmethod
    def search_knobs(cls, options: dict) -> dict[str, int]:
        return {"tcn_kernel": 2, "tcn_depth": 1}

    @classmethod
    def apply_search_knobs(cls, options: dict, knobs: dict[str, int]) -> None:
        if "tcn_kernel" in knobs:
            # Dilation base = kernel size: every past offset is reached exactly once (receptive field K^depth).
            options.update(kernel_size=knobs["tcn_kernel"], dilation_base=knobs["tcn_kernel"])
        if "tcn_depth" in knobs:
            options["depth"] = knobs["tcn_depth"]

    def _run(self, x: Tensor, padding_mask: Tensor | None, state: TCNState | None) -> tuple[Tensor, TCNState]:
        """The stack on x (B, T, D) after the windows in ``state`` (zeros when None) -> (B, T, D), windows."""
        if not torch.compiler.is_compiling():
            self._require_context_fits(x)
        if self.impl == "channels_last" and not torch.compiler.is_compiling():
            if self._in_place_allowed(x, state):
                return self._run_channels_last(x, padding_mask, state)
            return self._run_channels_last_recorded(x, padding_mask, state)
        if self.impl == "native" and not torch.compiler.is_compiling():
            return self._run_native(x, padding_mask, state)
        act = ACTIVATIONS[self.activation]
        mask = None if padding_mask is None else padding_mask.unsqueeze(1)  # (B, 1, T)
        # One transposed copy in and one out: every pad, convolution and residual sum between them
        # reads and writes contiguous (B, D, T) rows, where a transposed view made each one a strided pass.
        x_rows = transposed_rows(x)  # (B, D, T)
        h = x_rows
        new_state = []
        for i, (conv, window) in enumerate(zip(self.convs, self.windows)):
            # Zeroing every layer's input, not just x, keeps padding out of later outputs even
            # where a padded position's hidden value is nonzero (biases, earlier tokens).
            if mask is not None:
                h = h.masked_fill(mask, 0.0)
            if state is None:
                ctx = F.pad(h, (window, 0))  # (B, D, window + T)
            else:
                ctx = torch.cat([state.tcn[i].to(h.dtype), h], dim=-1)  # (B, D, window + T)
            new_state.append(ctx[..., -window:])
            out = self._taps(conv, ctx) if self.impl == "taps" else conv(ctx)  # (B, D, T)
            if i < self.depth - 1:
                out = act(out)
            h = h + out if self.residual else out
        y = F.silu(torch.addcmul(h, self.omega.unsqueeze(-1), x_rows))  # (B, D, T)
        return transposed_rows(y).to(x.dtype), TCNState(tuple(new_state))

    def _in_place_allowed(self, x: Tensor, state: TCNState | None) -> bool:
        """Whether ``channels_last`` may run in place: with autograd not recording (grad mode off,
        or nothing of x, the parameters and the state requiring grad).

        Traced (torch.compile, torch.export) it runs ``conv``'s computation: aot_eager traced the
        in-place writes into slices of each fresh context wrongly, giving different outputs for a
        padded depth-4 stack."""
        if not torch.is_grad_enabled():
            return True
        tensors = [x, *self.parameters(), *(state.tcn if state is not None else ())]
        return not any(t.requires_grad for t in tensors)

    def _run_channels_last(self, x: Tensor, padding_mask: Tensor | None,
                           state: TCNState | None) -> tuple[Tensor, TCNState]:
        """``_run`` on the (B, T, D) rows themselves, with no autograd recording: each layer's
        context (B, window + T, D) is contiguous, and its (B, D, 1, window + T) transposed view is a
        channels-last image that a 2-D depthwise convolution (1 × K kernel, dilation f^i) reads as
        it is. The activation runs in place and each residual sum is written straight into the
        next layer's context: nothing is copied between layers."""
        act = ACTIVATIONS[self.activation]
        mask = None if padding_mask is None else padding_mask.unsqueeze(-1)  # (B, T, 1)
        ctx = self._context(0, x, None, mask, state)
        new_state = []
        for i, (conv, window) in enumerate(zip(self.convs, self.windows)):
            h = ctx[:, window:]  # the layer's input, (B, T, D)
            # A copy, not a view: a view would keep the whole context alive in the state.
            new_state.append(ctx[:, -window:].transpose(1, 2).contiguous())  # (B, D, window)
            out = _channels_last_conv(ctx, conv.weight, conv.bias, conv.dilation[0])  # (B, T, D)
            if i < self.depth - 1:
                out = F.silu(out, inplace=True) if self.activation == "silu" else act(out)
                ctx = self._context(i + 1, h if self.residual else None, out, mask, state)
            else:
                h = h + out if self.residual else out
        y = F.silu(torch.addcmul(h, self.omega, x))
        return y.to(x.dtype), TCNState(tuple(new_state))

    def _run_channels_last_recorded(self, x: Tensor, padding_mask: Tensor | None,
                                    state: TCNState | None) -> tuple[Tensor, TCNState]:
        """``_run`` on the (B, T, D) rows while autograd records: each layer's context (B, window + T, D)
        a new tensor, its convolution ``_DepthwiseConvRows``, the activation and sum out of place.
        Forward + backward ran 1.15-1.4x faster than ``conv``'s computation with its convolution
        backward written out on (B, D, T) rows, the earlier training path (D = 256; B × T of 1 × 4096,
        1 × 16384, 8 × 1024 and 16 × 256; 1 and 2 threads), most of it in the forward, which
        transposes neither x nor y."""
        act = ACTIVATIONS[self.activation]
        mask = None if padding_mask is None else padding_mask.unsqueeze(-1)  # (B, T, 1)
        batch, _, width = x.shape
        h = x
        new_state = []
        for i, (conv, window) in enumerate(zip(self.convs, self.windows)):
            if mask is not None:
                h = h.masked_fill(mask, 0.0)
            past = h.new_zeros(batch, window, width) if state is None else state.tcn[i].to(h.dtype).transpose(1, 2)
            ctx = torch.cat([past, h], dim=1)  # (B, window + T, D)
            new_state.append(ctx[:, -window:].transpose(1, 2).contiguous())  # (B, D, window)
            out = _DepthwiseConvRows.apply(ctx, conv.weight, conv.bias, conv.dilation[0])
            if i < self.depth - 1:
                out = act(out)
            h = h + out if self.residual else out
        y = F.silu(torch.addcmul(h, self.omega, x))
        return y.to(x.dtype), TCNState(tuple(new_state))

    def _run_native(self, x: Tensor, padding_mask: Tensor | None, state: TCNState | None) -> tuple[Tensor, TCNState]:
        """``_run`` as native code (``_NativeTCN``), on the (B, T, D) rows in x's dtype."""
        if x.device.type != "cpu":
            raise SeqmixError(f"tcn impl='native' runs on the CPU, and x is on {x.device}; use impl={NATIVE_ELSEWHERE!r} there")
        _native_kernels(x.dtype)
        for name, parameter in self.named_parameters():
            if parameter.dtype != x.dtype or parameter.device != x.device:
                raise SeqmixError(f"tcn impl='native': parameter {name} is {parameter.dtype} on {parameter.device}, "
                                  f"x is {x.dtype} on {x.device}; native code needs them alike (convert the model or x)")
        stack = _NativeStack(self.kernel_size, tuple(conv.dilation[0] for conv in self.convs), tuple(self.windows),
                             NATIVE_ACTIVATIONS[self.activation], self.residual)
        weights = [conv.weight.squeeze(1).t().contiguous() for conv in self.convs]  # (K, D) each
        biases = [conv.bias.contiguous() for conv in self.convs]
        omega = self.omega.contiguous()
        mask = None if padding_mask is None else padding_mask.to(device=x.device, dtype=torch.uint8).contiguous()
        records = torch.is_grad_enabled() and any(
            t.requires_grad for t in (x, omega, *weights, *biases, *(state.tcn if state is not None else ())))
        if state is None:
            pasts = [None] * self.depth
        else:  # (B, D, window) as the state keeps them; (B, window, D) for the backward
            pasts = [w.to(x.dtype).transpose(1, 2) if records else w.to(x.dtype) for w in state.tcn]
            pasts = [w.contiguous() for w in pasts]
        y, *windows = _NativeTCN.apply(stack, records, x.contiguous(), omega, mask, *weights, *biases, *pasts)
        return y, TCNState(tuple(w.transpose(1, 2).contiguous() if records else w for w in windows))

    def _context(self, layer: int, h: Tensor | None, out: Tensor | None, mask: Tensor | None,
                 state: TCNState | None) -> Tensor:
        """Layer ``layer``'s context (B, window + T, D) for ``_run_channels_last``, written into one
        new tensor: its past window (the state's, zeros when None), then its input h + out (h alone
        when ``out`` is None, out alone when ``h`` is None), zeroed where ``mask`` (B, T, 1) is True."""
        window = self.windows[layer]
        first = h if h is not None else out
        dtype = first.dtype if h is None or out is None else torch.promote_types(h.dtype, out.dtype)
        batch, length, width = first.shape
        ctx = first.new_empty(batch, window + length, width, dtype=dtype)
        if state is None:
            ctx[:, :window].zero_()
        else:
            ctx[:, :window].copy_(state.tcn[layer].transpose(1, 2))
        body = ctx[:, window:]
        if h is None or out is None:
            body.copy_(first)
        else:
            torch.add(h, out, out=body)
        if mask is not None:
            body.masked_fill_(mask, 0.0)
        return ctx

    def _taps(self, conv: nn.Conv1d, ctx: Tensor) -> Tensor:
        """``conv(ctx)`` as Σ_k w[k] · (ctx shifted by k·dilation): (B, D, window + T) -> (B, D, T)."""
        weight = conv.weight.squeeze(1)  # (D, K)
        dilation = conv.dilation[0]
        length = ctx.shape[-1] - (self.kernel_size - 1) * dilation
        out = conv.bias.unsqueeze(-1) + weight[:, :1] * ctx[..., :length]
        for k in range(1, self.kernel_size):
            out = out + weight[:, k : k + 1] * ctx[..., k * dilation : k * dilation + length]
        return out

    def mix(self, x: Tensor, padding_mask: Tensor | None) -> Tensor:
        return self._run(x, padding_mask, None)[0]

    def mix_step(self, x: Tensor, state: TCNState) -> tuple[Tensor, TCNState]:
        y, windows = self._run(x, None, state)
        # Keep the state's dtype fixed whatever autocast made of the activations.
        return y, TCNState(tuple(w.to(s.dtype) for w, s in zip(windows.tcn, state.tcn)))

    def empty_state(self, batch_size: int, device, dtype) -> TCNState:
        device, dtype = self.param_dtype_device(device, dtype)
        return TCNState(tuple(torch.zeros(batch_size, self.d_model, w, device=device, dtype=dtype) for w in self.windows))
