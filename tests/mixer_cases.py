"""The mixer configurations every parity test runs over.

Every registered mixer appears with its default options, so registering a mixer adds it to the
harness; the extra variants below cover the options that change the computation.
"""
from __future__ import annotations

import functools

import torch

import seqmix
from seqmix import native
from seqmix.errors import SeqmixError

WIDTH = 16

EXTRA_VARIANTS: dict[str, list[dict]] = {
    "ema": [{"causal": False}, {"chunk_size": 16, "order": 4}],
    "cema": [{"chunk_size": 16, "order": 4}],
    "tcn": [{"kernel_size": 3, "dilation_base": 2, "depth": 3, "activation": "gelu", "residual": False}],
    "softmax_attention": [{"window": 8}, {"use_rotary": False, "heads": 2}, {"causal": False}],
    "gated_attention": [
        {"chunk_size": 16},
        {"chunk_size": 16, "attention": "laplace", "position_bias": "rotary", "heads": 2},
        {"chunk_size": 16, "attention": "relu2", "norm": "scalenorm", "prenorm": False},
        {"chunk_size": None, "max_len": 256},
        {"chunk_size": 16, "normalized": True, "heads": 2, "norm_groups": 4},
        {"chunk_size": 16, "local": "tcn"},
        {"chunk_size": 16, "local": "cema", "norm": "rmsnorm"},
        {"chunk_size": 16, "local": "identity"},
        {"chunk_size": 16, "causal": False},
        {"chunk_size": None, "causal": False, "attention": "laplace"},
    ],
}


def _case_id(name: str, options: dict) -> str:
    if not options:
        return name
    return name + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


def mixer_cases() -> list[tuple[str, str, dict]]:
    """(id, registered name, options) for every case, defaults first."""
    cases = []
    for name in seqmix.list_mixers():
        for options in [{}] + EXTRA_VARIANTS.get(name, []):
            cases.append((_case_id(name, options), name, options))
    return cases


def causal_cases() -> list[tuple[str, str, dict]]:
    """The cases whose mixer can stream."""
    return [case for case in mixer_cases() if build(case[1], case[2]).causal]


def impl_cases(cases) -> list[tuple[str, str, dict, str]]:
    """(id, name, options, impl) for every compute path of every case."""
    out = []
    for case_id, name, options in cases:
        for impl in seqmix.mixer_class(name).impls:
            out.append((f"{case_id}-{impl}", name, options, impl))
    return out


def fast_impl_cases() -> list[tuple[str, str, dict, str]]:
    """(id, name, options, impl) for every path that is not the reference (the first impl)."""
    return [case for case in impl_cases(mixer_cases()) if case[3] != seqmix.mixer_class(case[1]).impls[0]]


def build(name: str, options: dict, seed: int = 0, dtype=None):
    """The mixer with deterministic parameters, in ``dtype`` when given."""
    import torch

    torch.manual_seed(seed)
    mixer = seqmix.build_mixer(name, WIDTH, **options)
    return mixer if dtype is None else mixer.to(dtype)


@functools.lru_cache(maxsize=None)
def native_unavailable() -> str | None:
    """Why seqmix's native code (``impl="native"``) cannot be built here (no C++ compiler), or None when it can."""
    try:
        native.compiler()
    except SeqmixError as error:
        return str(error)
    return None


def runnable_impls(name: str) -> tuple[str, ...]:
    """The paths of mixer ``name`` this machine can run: all but ``native`` without a C++ compiler.

    Strategies draw from these; parametrized tests take every path and conftest skips the native
    ones with the reason instead."""
    impls = seqmix.mixer_class(name).impls
    return tuple(impl for impl in impls if impl != "native" or native_unavailable() is None)


def assert_streams_alike(reference, fast, x, piece: int, **tolerance) -> None:
    """Step both mixers through x (B, L, D) in pieces of ``piece`` steps, each carrying its own state
    from ``init_state``: every piece's output and state agree within ``tolerance`` (assert_close's)."""
    states = [mixer.init_state(x.shape[0]) for mixer in (reference, fast)]
    for start in range(0, x.shape[1], piece):
        outs = []
        for i, mixer in enumerate((reference, fast)):
            out, states[i] = mixer.step(x[:, start : start + piece], states[i])
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], **tolerance)
        torch.testing.assert_close(tuple(states[1]), tuple(states[0]), **tolerance)
