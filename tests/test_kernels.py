"""The EMA and CEMA against the recurrences of the papers, written out here independently."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import seqmix

LENGTH = 45


def literal_ema(mixer, x: torch.Tensor, backward: bool = False) -> torch.Tensor:
    """y_t = Σ_n (eta/√N) h_t with h_t = p·beta·x_t + q·h_{t−1}, p = σ(alpha), q = 1 − p·σ(delta)."""
    d = mixer.d_model
    rows = slice(d, 2 * d) if backward else slice(0, d)
    p = torch.sigmoid(mixer.alpha[rows])
    q = 1 - p * torch.sigmoid(mixer.delta[rows])
    beta, eta = mixer.beta[rows], mixer.eta[rows]
    h = torch.zeros(x.shape[0], d, mixer.order, dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        h = p * beta * x[:, t, :, None] + q * h
        ys.append((eta / math.sqrt(mixer.order) * h).sum(-1))
    return torch.stack(ys, dim=1)


def complex_cema(mixer, x: torch.Tensor) -> torch.Tensor:
    """The CEMA with complex numbers: q = r·e^{iφ}, h_t = p·x_t + q·h_{t−1}, y = Re Σ (eta/√N) h + omega·x."""
    n = mixer.order
    p = torch.sigmoid(mixer.alpha).to(torch.complex128)
    r = 1 - torch.sigmoid(mixer.alpha) * torch.sigmoid(mixer.delta)
    phase = torch.arange(1, n + 1, dtype=torch.float64) * torch.sigmoid(mixer.theta).unsqueeze(-1) * 2 * math.pi / n
    q = r * torch.exp(1j * phase)
    eta = torch.complex(mixer.eta_re, mixer.eta_im) / math.sqrt(n)
    h = torch.zeros(x.shape[0], mixer.d_model, n, dtype=torch.complex128)
    ys = []
    for t in range(x.shape[1]):
        h = p * x[:, t, :, None] + q * h
        ys.append((eta * h).sum(-1).real)
    return torch.stack(ys, dim=1) + mixer.omega * x


@pytest.mark.parametrize("impl", ["recurrent", "fft", "chunked"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_ema_equals_literal_recurrence(impl, causal):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("ema", 6, order=5, causal=causal, impl=impl, chunk_size=8).double()
    x = torch.randn(2, LENGTH, 6, dtype=torch.float64)
    with torch.no_grad():
        y = literal_ema(mixer, x)
        if not causal:
            y = y + literal_ema(mixer, x.flip(1), backward=True).flip(1)
        expected = F.silu(y + mixer.omega * x)
        torch.testing.assert_close(mixer(x), expected, rtol=1e-10, atol=1e-12)


def test_ema_kernel_is_the_impulse_response():
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("ema", 4, order=3).double()
    impulse = torch.zeros(1, 20, 4, dtype=torch.float64)
    impulse[0, 0] = 1.0
    with torch.no_grad():
        torch.testing.assert_close(mixer.kernel(20).T, literal_ema(mixer, impulse)[0], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("impl", ["recurrent", "fft", "chunked"])
def test_cema_real_arithmetic_equals_complex_reference(impl):
    torch.manual_seed(0)
    mixer = seqmix.build_mixer("cema", 6, order=4, impl=impl, chunk_size=8).double()
    with torch.no_grad():
        mixer.eta_im.normal_()  # a nonzero imaginary part exercises every term
        x = torch.randn(2, LENGTH, 6, dtype=torch.float64)
        torch.testing.assert_close(mixer(x), complex_cema(mixer, x), rtol=1e-10, atol=1e-12)


def test_recurrences_compute_in_float32_under_autocast():
    torch.manual_seed(0)
    for name in ("ema", "cema"):
        mixer = seqmix.build_mixer(name, 8)
        x = torch.randn(1, 300, 8)
        with torch.no_grad():
            exact = mixer(x.bfloat16().float())
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y = mixer(x.bfloat16())
        # Only the bf16 rounding of the output remains: about 2^-8 relative.
        torch.testing.assert_close(y.float(), exact, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["ema", "cema"])
def test_chunked_recurrence_steps_shorter_inputs_with_the_loop(name, monkeypatch):
    """Fewer tokens than one chunk (a streaming step) take the recurrent loop, not a padded chunk;
    a full chunk still takes the chunked path. Outputs and states equal the reference either way."""
    from seqmix.operators import recurrence

    torch.manual_seed(0)
    chunked_calls = []
    chunked = recurrence.chunked
    monkeypatch.setattr(recurrence, "chunked", lambda *a, **k: chunked_calls.append(a[0].shape[1]) or chunked(*a, **k))
    fast = seqmix.build_mixer(name, 6, order=4, impl="chunked", chunk_size=8).double()
    reference = seqmix.build_mixer(name, 6, order=4, impl="recurrent").double()
    reference.load_state_dict(fast.state_dict())
    for tokens in (1, 7, 8):
        x = torch.randn(2, tokens, 6, dtype=torch.float64)
        with torch.no_grad():
            y, state = fast.step(x, fast.init_state(2))
            y_ref, state_ref = reference.step(x, reference.init_state(2))
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(tuple(state), tuple(state_ref))
    assert chunked_calls == [8]
