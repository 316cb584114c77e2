"""Reference (Mega, Megalodon) state dicts convert to seqmix ones that load strictly and compute
what the reference formulas, written out here from the reference-named tensors, compute."""
import math

import pytest
import torch
import torch.nn.functional as F

from seqmix.operators.cema import CEMA
from seqmix.model.convert import (
    CONVERTERS,
    mega_ema_to_seqmix,
    mega_gated_attention_to_seqmix,
    megalodon_cema_to_seqmix,
    megalodon_gated_attention_to_seqmix,
    megalodon_timestep_norm_to_seqmix,
)
from seqmix.operators.ema import EMA
from seqmix.errors import SeqmixError
from seqmix.operators.gated_attention import GatedAttention
from seqmix.layers.norms import TimestepNorm
from seqmix.layers.positions import rotary

D, N, S, E, C = 8, 4, 6, 12, 5
GEN = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=GEN, dtype=torch.float64)


def mega_ema_sd(rows):
    return {"delta": rand(rows, N, 1), "alpha": rand(rows, N, 1), "beta": rand(rows, N, 1),
            "gamma": rand(rows, N), "omega": rand(D)}


def cema_sd():
    return {"alpha": rand(D, N, 1), "delta": rand(D, N, 1), "theta": rand(D, 1, 1),
            "gamma": rand(D, N, 2), "omega": rand(D, 1)}


def timestep_norm_sd(groups=2):
    return {"weight": rand(D), "bias": rand(D), "prior_count": torch.tensor(0),
            "prior_mean": torch.zeros(groups), "prior_logv": torch.zeros(groups)}


def loaded(module, sd):
    module.load_state_dict(sd, strict=True)
    return module


def reference_ema_kernel(sd, length):
    """Mega's code: p = σ(delta), q = 1 − p·σ(alpha), k[d, j] = Σ_n p·beta·q^j·gamma/√N -> (K, length)."""
    p = torch.sigmoid(sd["delta"])
    q = 1.0 - p * torch.sigmoid(sd["alpha"])
    powers = q ** torch.arange(length, dtype=torch.float64)  # (K, N, length)
    return (p * sd["beta"] * powers * sd["gamma"].unsqueeze(-1)).sum(1) / math.sqrt(N)


# --- EMA -------------------------------------------------------------------------------------


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mega_ema_values_land_in_the_right_parameters(bidirectional):
    rows = 2 * D if bidirectional else D
    sd = mega_ema_sd(rows)
    ema = loaded(EMA(D, order=N, causal=not bidirectional).double(), mega_ema_to_seqmix(sd))
    assert torch.equal(ema.alpha, sd["delta"].squeeze(-1))
    assert torch.equal(ema.delta, sd["alpha"].squeeze(-1))
    assert torch.equal(ema.beta, sd["beta"].squeeze(-1))
    assert torch.equal(ema.eta, sd["gamma"])
    assert torch.equal(ema.omega, sd["omega"])


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mega_ema_kernel_matches_the_reference_formula(bidirectional):
    rows = 2 * D if bidirectional else D
    sd = mega_ema_sd(rows)
    ema = loaded(EMA(D, order=N, causal=not bidirectional).double(), mega_ema_to_seqmix(sd))
    expected = reference_ema_kernel(sd, 11)
    torch.testing.assert_close(ema.kernel(11), expected[:D], rtol=1e-12, atol=1e-12)
    if bidirectional:
        torch.testing.assert_close(ema.kernel(11, backward=True), expected[D:], rtol=1e-12, atol=1e-12)


def test_mega_ema_kernel_tells_alpha_from_delta():
    """The check above is sharp: mapping the names straight across gives another kernel."""
    sd = mega_ema_sd(D)
    straight = {"alpha": sd["alpha"].squeeze(-1), "delta": sd["delta"].squeeze(-1),
                "beta": sd["beta"].squeeze(-1), "eta": sd["gamma"], "omega": sd["omega"]}
    ema = loaded(EMA(D, order=N).double(), straight)
    assert (ema.kernel(11) - reference_ema_kernel(sd, 11)).abs().max() > 1e-3


@pytest.mark.parametrize("impl", EMA.impls)
def test_mega_bidirectional_ema_forward_matches_the_reference(impl):
    """y_t = Σ_s k_f[s] x_{t−s} + Σ_s k_b[s] x_{t+s} (rows [0, D) and [D, 2D)), out = SiLU(y + omega·x)."""
    L = 9
    sd = mega_ema_sd(2 * D)
    ema = loaded(EMA(D, order=N, causal=False, impl=impl, chunk_size=4).double(), mega_ema_to_seqmix(sd))
    x = rand(2, L, D)
    k = reference_ema_kernel(sd, L)
    k_f, k_b = k[:D], k[D:]
    y = torch.zeros_like(x)
    for t in range(L):
        for s in range(t + 1):
            y[:, t] += k_f[:, s] * x[:, t - s]
        for s in range(L - t):
            y[:, t] += k_b[:, s] * x[:, t + s]
    expected = F.silu(y + sd["omega"] * x)
    torch.testing.assert_close(ema(x), expected, rtol=1e-10, atol=1e-10)


def test_mega_ema_rejects_mismatched_rows():
    sd = mega_ema_sd(D)
    sd["omega"] = rand(D + 1)
    with pytest.raises(SeqmixError, match="gamma"):
        mega_ema_to_seqmix(sd)


# --- CEMA ------------------------------------------------------------------------------------


def test_megalodon_cema_values_land_in_the_right_parameters():
    sd = cema_sd()
    cema = loaded(CEMA(D, order=N).double(), megalodon_cema_to_seqmix(sd))
    assert torch.equal(cema.alpha, sd["alpha"].squeeze(-1))
    assert torch.equal(cema.delta, sd["delta"].squeeze(-1))
    assert torch.equal(cema.theta, sd["theta"].view(D))
    assert torch.equal(cema.eta_re, sd["gamma"][..., 0])
    assert torch.equal(cema.eta_im, sd["gamma"][..., 1])
    assert torch.equal(cema.omega, sd["omega"].view(D))


@pytest.mark.parametrize("impl", CEMA.impls)
def test_megalodon_cema_forward_matches_the_reference(impl):
    """Megalodon's math in complex128: h_t = p·x_t + q·h_{t−1}, y = Re Σ_n gamma_c·h + omega·x."""
    L = 9
    sd = cema_sd()
    cema = loaded(CEMA(D, order=N, impl=impl, chunk_size=4).double(), megalodon_cema_to_seqmix(sd))
    x = rand(2, L, D)

    theta = torch.sigmoid(sd["theta"]) * (2 * math.pi / N)  # (D, 1, 1)
    phase = torch.arange(1, N + 1, dtype=torch.float64).view(1, N, 1) * theta  # (D, N, 1)
    p = torch.sigmoid(sd["alpha"])
    q = torch.polar(1.0 - p * torch.sigmoid(sd["delta"]), phase)
    gamma = torch.view_as_complex(sd["gamma"].contiguous()) * math.sqrt(1.0 / N)  # (D, N)
    h = torch.zeros(2, D, N, dtype=torch.complex128)
    expected = torch.empty_like(x)
    for t in range(L):
        h = p[..., 0] * x[:, t, :, None] + q[..., 0] * h
        expected[:, t] = (gamma * h).sum(-1).real + sd["omega"][:, 0] * x[:, t]
    torch.testing.assert_close(cema(x), expected, rtol=1e-10, atol=1e-10)


# --- TimestepNorm ----------------------------------------------------------------------------


def test_megalodon_timestep_norm_converts_and_drops_the_prior_buffers():
    sd = timestep_norm_sd()
    out = megalodon_timestep_norm_to_seqmix(sd)
    assert set(out) == {"weight", "bias"}
    norm = loaded(TimestepNorm(D, groups=2).double(), out)
    assert torch.equal(norm.weight, sd["weight"]) and torch.equal(norm.bias, sd["bias"])


def test_megalodon_timestep_norm_refuses_a_prior():
    sd = timestep_norm_sd()
    sd["prior_count"] = torch.tensor(2)
    with pytest.raises(SeqmixError, match="prior_count"):
        megalodon_timestep_norm_to_seqmix(sd)


def test_missing_and_unexpected_keys_are_named():
    sd = timestep_norm_sd()
    del sd["bias"]
    with pytest.raises(SeqmixError, match=r"missing reference key\(s\) \['bias'\]"):
        megalodon_timestep_norm_to_seqmix(sd)
    sd = timestep_norm_sd()
    sd["running_var"] = rand(D)
    with pytest.raises(SeqmixError, match=r"unexpected reference key\(s\) \['running_var'\]"):
        megalodon_timestep_norm_to_seqmix(sd)
    sd = mega_ema_sd(D)
    del sd["delta"]
    with pytest.raises(SeqmixError, match=r"missing reference key\(s\) \['delta'\]"):
        mega_ema_to_seqmix(sd)


def test_prefix_selects_and_strips():
    sd = {f"layers.0.ema.{key}": value for key, value in mega_ema_sd(D).items()}
    sd["layers.1.ema.omega"] = rand(D)  # another module's entry is ignored
    out = mega_ema_to_seqmix(sd, prefix="layers.0.ema.")
    assert torch.equal(out["omega"], sd["layers.0.ema.omega"])
    loaded(EMA(D, order=N).double(), out)


def test_a_prefix_names_a_module_with_or_without_its_dot():
    """'layers.0.ema' selected keys 'layers.0.emaalpha' and named them so in its messages."""
    sd = {f"layers.0.ema.{key}": value for key, value in mega_ema_sd(D).items()}
    without_dot = mega_ema_to_seqmix(sd, prefix="layers.0.ema")
    assert without_dot.keys() == mega_ema_to_seqmix(sd, prefix="layers.0.ema.").keys()
    sd["layers.0.emax.omega"] = rand(D)  # a sibling whose name starts the same is not selected
    assert torch.equal(mega_ema_to_seqmix(sd, prefix="layers.0.ema")["omega"], sd["layers.0.ema.omega"])
    with pytest.raises(SeqmixError, match=r"no key of state_dict starts with prefix='layers.1.'; its modules are \['layers.0.ema.', 'layers.0.emax.'\]"):
        mega_ema_to_seqmix(sd, prefix="layers.1")
    with pytest.raises(SeqmixError, match=r"its keys have no module path: pass prefix=''"):
        mega_ema_to_seqmix(mega_ema_sd(D), prefix="mega")


# --- Mega gated attention --------------------------------------------------------------------


def mega_attention_sd(position_bias, norm_keys=("weight", "bias"), bidirectional=False):
    sd = {f"move.{key}": value for key, value in mega_ema_sd(2 * D if bidirectional else D).items()}
    sd.update({
        "v_proj.weight": rand(E, D), "v_proj.bias": rand(E),
        "mx_proj.weight": rand(2 * D + S + E, D), "mx_proj.bias": rand(2 * D + S + E),
        "h_proj.weight": rand(D, E), "h_proj.bias": rand(D),
        "gamma": rand(2, S), "beta": rand(2, S),
    })
    sd.update({f"norm.norm.{key}": rand(1 if key == "scalar" else D) for key in norm_keys})
    if position_bias == "simple":
        sd["rel_pos_bias.rel_pos_bias"] = rand(2 * C - 1)
    else:
        sd.update({"rel_pos_bias.alpha": rand(1, S), "rel_pos_bias.beta": rand(1, S),
                   "rel_pos_bias._float_tensor": torch.zeros(1)})
    return sd


def mega_attention(position_bias, norm="layernorm", bidirectional=False):
    return GatedAttention(D, local="ema", local_options={"order": N}, z_dim=S, v_dim=E, heads=1, chunk_size=C,
                          position_bias=position_bias, causal=not bidirectional, norm=norm).double()


@pytest.mark.parametrize("position_bias", ["simple", "rotary"])
@pytest.mark.parametrize("norm, norm_keys", [("layernorm", ("weight", "bias")), ("rmsnorm", ("weight",)),
                                             ("scalenorm", ("scalar",))])
def test_mega_gated_attention_loads_and_runs(position_bias, norm, norm_keys):
    sd = mega_attention_sd(position_bias, norm_keys)
    layer = loaded(mega_attention(position_bias, norm), mega_gated_attention_to_seqmix(sd))
    assert torch.equal(layer.local.alpha, sd["move.delta"].squeeze(-1))
    assert torch.equal(layer.mx_proj.weight, sd["mx_proj.weight"])
    assert torch.equal(layer.h_proj.bias, sd["h_proj.bias"])
    for key in norm_keys:
        assert torch.equal(getattr(layer.norm, key), sd[f"norm.norm.{key}"])
    if position_bias == "simple":
        assert torch.equal(layer.bias.weight, sd["rel_pos_bias.rel_pos_bias"])
    else:
        assert torch.equal(layer.bias.a, sd["rel_pos_bias.alpha"][0])
        assert torch.equal(layer.bias.b, sd["rel_pos_bias.beta"][0])
    y = layer(rand(2, 2 * C + 1, D))
    assert y.shape == (2, 2 * C + 1, D) and torch.isfinite(y).all()


def test_mega_bidirectional_gated_attention_loads_and_runs():
    sd = mega_attention_sd("simple", bidirectional=True)
    layer = loaded(mega_attention("simple", bidirectional=True), mega_gated_attention_to_seqmix(sd))
    assert torch.equal(layer.local.delta, sd["move.alpha"].squeeze(-1))
    assert torch.isfinite(layer(rand(2, 7, D))).all()


def test_mega_gated_attention_rejects_unknown_and_missing_keys():
    sd = mega_attention_sd("simple")
    sd["norm.norm.running_mean"] = rand(D)  # a batch norm: no seqmix equivalent
    with pytest.raises(SeqmixError, match="norm.norm.running_mean"):
        mega_gated_attention_to_seqmix(sd)
    sd = mega_attention_sd("simple")
    del sd["rel_pos_bias.rel_pos_bias"]
    with pytest.raises(SeqmixError, match="rel_pos_bias.rel_pos_bias"):
        mega_gated_attention_to_seqmix(sd)
    sd = mega_attention_sd("simple")
    del sd["move.gamma"]
    with pytest.raises(SeqmixError, match=r"\['move.gamma'\]"):
        mega_gated_attention_to_seqmix(sd)


# --- Megalodon gated attention ---------------------------------------------------------------

H, SZ = 2, 8  # Megalodon: heads, z width (two heads of width 4)


def megalodon_attention_sd():
    sd = {f"timenorm.{key}": value for key, value in timestep_norm_sd().items()}
    sd.update({f"cema.{key}": value for key, value in cema_sd().items()})
    sd.update({
        "rmsnorm.weight": rand(D),
        "wv.weight": rand(E, D), "wv.bias": rand(E),
        "wz.weight": rand(SZ, D), "wz.bias": rand(SZ),
        "wr.weight": rand(E, D), "wr.bias": rand(E),
        "wh1.weight": rand(D, D), "wh1.bias": rand(D),
        "wh2.weight": rand(D, E),
        "gamma": rand(2, SZ), "beta": rand(2, SZ),
    })
    return sd


def megalodon_attention():
    return GatedAttention(D, local="cema", local_options={"order": N}, normalized=True, heads=H, z_dim=SZ,
                          v_dim=E, chunk_size=C, norm_groups=2).double()


def test_megalodon_gated_attention_loads_and_runs():
    sd = megalodon_attention_sd()
    layer = loaded(megalodon_attention(), megalodon_gated_attention_to_seqmix(sd, heads=H))
    assert torch.equal(layer.timestep_norm.weight, sd["timenorm.weight"])
    assert torch.equal(layer.local.eta_im, sd["cema.gamma"][..., 1])
    assert torch.equal(layer.local_norm.weight, sd["rmsnorm.weight"] + 1)  # they apply (weight + 1)
    assert torch.equal(layer.v_proj.weight, sd["wv.weight"])
    assert torch.equal(layer.r_proj.bias, sd["wr.bias"])
    assert torch.equal(layer.h1_proj.weight, sd["wh1.weight"])
    assert torch.equal(layer.h2_proj.weight, sd["wh2.weight"])
    # z features are only reordered within each head (0 2 1 3 | 4 6 5 7)
    assert torch.equal(layer.z_proj.bias, sd["wz.bias"][[0, 2, 1, 3, 4, 6, 5, 7]])
    y = layer(rand(2, 2 * C + 1, D))
    assert y.shape == (2, 2 * C + 1, D) and torch.isfinite(y).all()


def test_megalodon_attention_scores_match_the_reference_rotary_layout():
    """Megalodon: per-head unit-RMS z, q = z·(gamma[0] + 1)/√w + beta[0] (k likewise), rotated in
    interleaved pairs (2i, 2i + 1) by position·10000^(−2i/w); the converted layer gives the same q·k."""
    sd = megalodon_attention_sd()
    layer = loaded(megalodon_attention(), megalodon_gated_attention_to_seqmix(sd, heads=H))
    B, L, w = 2, C, SZ // H
    m = rand(B, L, D)

    z = (m @ sd["wz.weight"].T + sd["wz.bias"]).view(B, L, H, w)
    z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5)
    gamma, beta = (sd["gamma"] + 1.0).view(2, H, w) / math.sqrt(w), sd["beta"].view(2, H, w)
    angles = torch.arange(L, dtype=torch.float64)[:, None] * 10000.0 ** (-torch.arange(0, w, 2, dtype=torch.float64) / w)
    turn = torch.polar(torch.ones_like(angles), angles)[:, None]  # (L, 1, w/2)

    def rotate(t):
        return torch.view_as_real(torch.view_as_complex(t.reshape(B, L, H, w // 2, 2).contiguous()) * turn).flatten(-2)

    q, k = rotate(z * gamma[0] + beta[0]), rotate(z * gamma[1] + beta[1])
    expected = torch.einsum("bihw,bjhw->bhij", q, k)

    ours_q, ours_k = layer._queries_keys(layer.z_proj(m))  # (B, H, L, w)
    positions = torch.arange(L)
    scores = rotary(ours_q, positions) @ rotary(ours_k, positions).transpose(-1, -2)
    torch.testing.assert_close(scores, expected, rtol=1e-10, atol=1e-10)


def test_megalodon_gated_attention_needs_valid_heads_and_keys():
    sd = megalodon_attention_sd()
    with pytest.raises(SeqmixError, match="heads"):
        megalodon_gated_attention_to_seqmix(sd, heads=3)
    sd["znorm.weight"] = rand(SZ // H)
    with pytest.raises(SeqmixError, match=r"unexpected reference key\(s\) \['znorm.weight'\]"):
        megalodon_gated_attention_to_seqmix(sd, heads=H)
    sd = megalodon_attention_sd()
    sd["timenorm.prior_count"] = torch.tensor(4)
    with pytest.raises(SeqmixError, match="timenorm.prior_count"):
        megalodon_gated_attention_to_seqmix(sd, heads=H)


def test_converters_registry():
    assert CONVERTERS == {
        "mega_ema": mega_ema_to_seqmix,
        "megalodon_cema": megalodon_cema_to_seqmix,
        "megalodon_timestep_norm": megalodon_timestep_norm_to_seqmix,
        "mega_gated_attention": mega_gated_attention_to_seqmix,
        "megalodon_gated_attention": megalodon_gated_attention_to_seqmix,
    }


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.__setitem__("cema.alpha", torch.full((D, N, 1), float("nan"), dtype=torch.float64)), r"cema.alpha holds NaN or infinite values"),
    (lambda sd: sd.__setitem__("wz.bias", torch.ones(SZ, dtype=torch.int64)), r"wz.bias holds int64 values; a weight is real floating point"),
    (lambda sd: sd.__setitem__("gamma", torch.ones(2, SZ, dtype=torch.bool)), r"gamma holds bool values"),
    (lambda sd: sd.__setitem__("wv.weight", rand(E + 1, D)), r"wrong shape\(s\): wv.bias \(12,\) \(expected \(13,\)\), wr.weight \(12, 8\) \(expected \(13, 8\)\)"),
    (lambda sd: sd.__setitem__("rmsnorm.weight", torch.zeros(1, dtype=torch.float64).expand(2**31)), r"rmsnorm.weight \(2147483648,\) \(expected \(8,\)\)"),
    (lambda sd: sd.__setitem__("timenorm.weight", rand(D + 1)), r"timenorm.bias \(8,\) \(expected \(9,\)\)"),
    (lambda sd: sd.__setitem__("wh1.bias", [0.0] * D), r"wh1.bias is a list; expected a torch.Tensor"),
    (lambda sd: sd.__setitem__(5, rand(D)), r"state_dict key 5 is not a string"),
], ids=["nan", "int", "bool", "wv shape", "expanded", "timenorm", "list", "int key"])
def test_a_converter_refuses_values_it_would_load_wrongly_naming_the_key(change, message):
    """NaN, integer, boolean and complex values loaded (cast) without a word; a wrong wv.weight was
    load_state_dict's 'size mismatch', an expanded rmsnorm.weight allocated 8 GiB, a list an AttributeError."""
    sd = megalodon_attention_sd()
    change(sd)
    with pytest.raises(SeqmixError, match=message):
        megalodon_gated_attention_to_seqmix(sd, heads=H)


def test_a_converter_refuses_input_that_is_no_state_dict():
    with pytest.raises(SeqmixError, match=r"state_dict is a list; expected a mapping"):
        mega_ema_to_seqmix([1, 2])
    with pytest.raises(SeqmixError, match=r"prefix=None is not valid"):
        mega_ema_to_seqmix(mega_ema_sd(D), prefix=None)
    sd = mega_ema_sd(D)
    sd["omega"] = torch.ones(D, dtype=torch.complex64)
    with pytest.raises(SeqmixError, match=r"omega holds complex64 values"):
        mega_ema_to_seqmix(sd)


def test_the_mega_converter_checks_the_shapes_of_its_projections_and_norm():
    sd = mega_attention_sd("simple")
    sd["mx_proj.weight"] = sd["mx_proj.weight"][:-1]
    sd["norm.norm.weight"] = rand(D + 2)
    with pytest.raises(SeqmixError, match=r"wrong shape\(s\): mx_proj.weight .* norm.norm.weight \(10,\) \(expected \(8,\)\)"):
        mega_gated_attention_to_seqmix(sd)
