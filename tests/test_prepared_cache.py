"""In eval mode the FFT path keeps its kernel's spectrum, the chunked path its chunk weights and
the native path its laid-out operands, and none ever serves a stale one."""
from __future__ import annotations

import pytest
import torch

import seqmix
from seqmix.operators import recurrence

BUILDERS = {"fft": "kernel_spectrum", "chunked": "chunk_weights", "native": "native_operands"}
"""The function that computes each path's parameter-only part, which the cache saves."""


@pytest.fixture
def computed(monkeypatch):
    """impl -> the calls of its builder made so far (the FFT's record the length, the chunked path's the chunk
    size, the native path's the width)."""
    calls = {impl: [] for impl in BUILDERS}
    for impl, name in BUILDERS.items():
        original = getattr(recurrence, name)

        def counted(coef, size, *rest, _impl=impl, _original=original):
            calls[_impl].append(size)
            return _original(coef, size, *rest)

        monkeypatch.setattr(recurrence, name, counted)
    return calls


@pytest.mark.parametrize("impl", BUILDERS)
@pytest.mark.parametrize("name, options", [("ema", {}), ("ema", {"causal": False}), ("cema", {})])
def test_eval_mode_computes_the_parameters_part_once_and_matches_the_recurrence(name, options, impl, computed):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, 8, impl=impl, chunk_size=8, **options).double().eval()
    directions = 1 if mixer.causal else 2
    x, y = torch.randn(2, 40, 8, dtype=torch.float64), torch.randn(1, 40, 8, dtype=torch.float64)
    with torch.no_grad():
        first = mixer(x)
        assert len(computed[impl]) == directions
        again, other_batch = mixer(x), mixer(y)
        assert len(computed[impl]) == directions, "a second call at the same length recomputed it"
        shorter = mixer(x[:, :17])
        # The FFT's spectrum is per length; the chunk weights and native operands serve every length.
        assert len(computed[impl]) == (2 * directions if impl == "fft" else directions)
        if impl != "fft" and mixer.causal:
            # Fewer tokens than a chunk: the chunked path runs the loop, native code its own kernel.
            mixer.step(x[:, :3], mixer.init_state(2))
            assert len(computed[impl]) == directions
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    reference = seqmix.build_mixer(name, 8, impl="recurrent", **options).double().eval()
    reference.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(first, reference(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(other_batch, reference(y), rtol=1e-9, atol=1e-9)
        if mixer.causal:
            torch.testing.assert_close(shorter, reference(x[:, :17]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("impl", BUILDERS)
def test_changed_parameters_training_and_autograd_never_use_a_cached_part(impl, computed):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("ema", 8, impl=impl, chunk_size=8).double().eval()
    x = torch.randn(1, 32, 8, dtype=torch.float64)
    with torch.no_grad():
        before = mixer(x)
        mixer.alpha.add_(0.5)  # an in-place change, as an optimizer step makes
        after = mixer(x)
        mixer.omega.mul_(2.0)  # the skip rides on the chunk weights' Toeplitz diagonal
        doubled = mixer(x)
    assert len(computed[impl]) == 3 and not torch.allclose(before, after)
    fresh = seqmix.build_mixer("ema", 8, impl="recurrent").double().eval()
    fresh.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(doubled, fresh(x), rtol=1e-9, atol=1e-9)
    # With autograd the part belongs to the graph: computed on every call, gradients reach the parameters.
    out = mixer(x).sum()
    out.backward()
    assert mixer.alpha.grad is not None and len(computed[impl]) == 4
    mixer.train()
    with torch.no_grad():
        mixer(x)
        mixer(x)
    assert len(computed[impl]) == 6


def _write_through_data(mixer, values):
    for parameter, value in zip(mixer.parameters(), values):
        parameter.data.copy_(value)


def _assign_data(mixer, values):
    for parameter, value in zip(mixer.parameters(), values):
        parameter.data = value.clone()


def _vector_to_parameters(mixer, values):
    torch.nn.utils.vector_to_parameters(torch.cat([v.flatten() for v in values]), mixer.parameters())


def _load_assigned(mixer, values):
    names = [name for name, _ in mixer.named_parameters()]
    mixer.load_state_dict(dict(zip(names, (v.clone() for v in values))), assign=True)


@pytest.mark.parametrize("change", [_write_through_data, _assign_data, _vector_to_parameters, _load_assigned])
@pytest.mark.parametrize("impl", BUILDERS)
def test_parameters_changed_without_a_version_bump_are_seen(impl, change):
    """Writes through ``.data`` (weight averaging, ``vector_to_parameters``) leave a parameter's
    version counter as it was; the cache must still see the new values."""
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("cema", 8, impl=impl, chunk_size=8).double().eval()
    other = seqmix.build_mixer("cema", 8, impl="recurrent").double().eval()
    x = torch.randn(1, 32, 8, dtype=torch.float64)
    with torch.no_grad():
        mixer(x)
        change(mixer, [p.detach() for p in other.parameters()])
        torch.testing.assert_close(mixer(x), other(x), rtol=1e-9, atol=1e-9)
