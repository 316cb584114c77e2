"""impl=fft keeps its kernel's spectrum in eval mode, and never serves a stale one."""
from __future__ import annotations

import pytest
import torch

import seqmix
from seqmix.operators import recurrence


@pytest.fixture
def kernels_computed(monkeypatch):
    """Counts the kernel spectra computed."""
    calls = []
    original = recurrence.kernel_spectrum

    def counted(coef, length, device):
        calls.append(length)
        return original(coef, length, device)

    monkeypatch.setattr(recurrence, "kernel_spectrum", counted)
    return calls


@pytest.mark.parametrize("name, options", [("ema", {}), ("ema", {"causal": False}), ("cema", {})])
def test_eval_mode_computes_the_spectrum_once_per_length_and_matches_the_uncached_path(name, options, kernels_computed):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, 8, impl="fft", **options).eval()
    directions = 1 if mixer.causal else 2
    x, y = torch.randn(2, 40, 8, dtype=torch.float64), torch.randn(1, 40, 8, dtype=torch.float64)
    mixer.double()
    with torch.no_grad():
        first = mixer(x)
        assert len(kernels_computed) == directions
        again, other_batch = mixer(x), mixer(y)
        assert len(kernels_computed) == directions, "a second call at the same length recomputed the kernel"
        mixer(x[:, :17])
        assert kernels_computed[-1] == 17
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    reference = seqmix.build_mixer(name, 8, impl="recurrent", **options).double().eval()
    reference.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(first, reference(x), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(other_batch, reference(y), rtol=1e-9, atol=1e-9)


def test_changed_parameters_training_and_autograd_never_use_a_cached_spectrum(kernels_computed):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("ema", 8, impl="fft").double().eval()
    x = torch.randn(1, 32, 8, dtype=torch.float64)
    with torch.no_grad():
        before = mixer(x)
        mixer.alpha.add_(0.5)  # an in-place change, as an optimizer step makes
        after = mixer(x)
    assert len(kernels_computed) == 2 and not torch.allclose(before, after)
    fresh = seqmix.build_mixer("ema", 8, impl="recurrent").double().eval()
    fresh.load_state_dict(mixer.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(after, fresh(x), rtol=1e-9, atol=1e-9)
    # With autograd the spectrum is part of the graph: computed on every call, gradients reach the parameters.
    out = mixer(x).sum()
    out.backward()
    assert mixer.alpha.grad is not None and len(kernels_computed) == 3
    mixer.train()
    with torch.no_grad():
        mixer(x)
        mixer(x)
    assert len(kernels_computed) == 5
