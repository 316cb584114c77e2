"""Norms against their formulas; TimestepNorm against a naive loop, in pieces, and under bf16."""
import pytest
import torch

from seqmix.errors import SeqmixError
from seqmix.layers.norms import NORMS, RMSNorm, ScaleNorm, TimestepNorm, build_norm


def naive_timestep_norm(x, padding_mask, groups, eps, weight, bias):
    """Loop over t: gather every valid value of the group so far, torch.mean / torch.var."""
    B, L, D = x.shape
    y = torch.zeros_like(x)
    xg, yg = x.view(B, L, groups, D // groups), y.view(B, L, groups, D // groups)
    for b in range(B):
        for t in range(L):
            if padding_mask[b, t]:
                continue
            seen = xg[b, : t + 1][~padding_mask[b, : t + 1]]  # (steps, G, D/G)
            for g in range(groups):
                vals = seen[:, g].reshape(-1)
                mean, var = torch.mean(vals), torch.var(vals, unbiased=False)
                yg[b, t, g] = (xg[b, t, g] - mean) / torch.sqrt(var + eps)
    return y * (weight + 1) + bias


def random_mask(B, L, gen):
    mask = torch.rand(B, L, generator=gen) < 0.3
    mask[0] = False
    mask[1, :4] = True  # a row whose first steps are padded
    return mask


def test_rmsnorm_matches_formula_and_normalises():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(2, 5, 16, dtype=torch.float64) + 2.0
    norm = RMSNorm(16).double()
    y = norm(x)
    # weight 1: every output row has root-mean-square 1 (a no-op norm would keep RMS ≈ 3.6)
    torch.testing.assert_close(y.pow(2).mean(-1).sqrt(), torch.ones(2, 5, dtype=torch.float64), rtol=0, atol=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    expected = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert RMSNorm(16, affine=False).weight is None


def test_scalenorm_matches_formula():
    torch.manual_seed(0)
    x = 3.0 * torch.randn(2, 5, 16, dtype=torch.float64)
    norm = ScaleNorm(16).double()
    with torch.no_grad():
        norm.scalar.fill_(0.7)
    expected = x * 0.7 / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in norm.parameters()) == 1


def make_timestep_norm(D, groups, dtype=torch.float64):
    norm = TimestepNorm(D, groups=groups).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(0, 0.5)
        norm.bias.normal_(0, 0.5)
    return norm


@pytest.mark.parametrize("groups", [1, 4])
def test_timestep_norm_matches_naive_loop(groups):
    gen = torch.Generator().manual_seed(groups)
    B, L, D = 3, 13, 8
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64) * 2 + 1
    mask = random_mask(B, L, gen)
    norm = make_timestep_norm(D, groups)
    y = norm(x, mask)
    expected = naive_timestep_norm(x, mask, groups, norm.eps, norm.weight.detach(), norm.bias.detach())
    assert torch.equal(y[mask], torch.zeros_like(y[mask]))
    torch.testing.assert_close(y, expected.masked_fill(mask.unsqueeze(-1), 0.0), rtol=1e-10, atol=1e-10)
    # padded content never matters, NaN included
    torch.testing.assert_close(norm(x.masked_fill(mask.unsqueeze(-1), float("nan")), mask), y, rtol=0, atol=0)


def test_timestep_norm_large_offset_float32():
    """x + 1e4 in float32: without the shift, Σx² − N·M² loses the unit variance entirely."""
    gen = torch.Generator().manual_seed(5)
    B, L, D = 2, 64, 16
    x = (torch.randn(B, L, D, generator=gen) + 1e4).float()
    mask = random_mask(B, L, gen)
    norm = make_timestep_norm(D, 2, torch.float32)
    y = norm(x, mask)
    expected = naive_timestep_norm(
        x.double(), mask, 2, norm.eps, norm.weight.detach().double(), norm.bias.detach().double()
    ).masked_fill(mask.unsqueeze(-1), 0.0)
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=1e-4)


def direct_state(x, mask, groups):
    """(count, mean, var) of all valid values of each row and group."""
    B, L, D = x.shape
    xg = x.view(B, L, groups, D // groups)
    rows = [[xg[b][~mask[b]][:, g].reshape(-1) for g in range(groups)] for b in range(B)]
    count = torch.tensor([[float(v.numel()) for v in r] for r in rows], dtype=x.dtype)
    mean = torch.stack([torch.stack([v.mean() for v in r]) for r in rows])
    var = torch.stack([torch.stack([v.var(unbiased=False) for v in r]) for r in rows])
    return count, mean, var


@pytest.mark.parametrize("groups", [1, 4])
def test_timestep_norm_step_in_pieces_equals_forward(groups):
    gen = torch.Generator().manual_seed(10 + groups)
    B, L, D = 2, 40, 8
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64) * 3 + 5
    norm = make_timestep_norm(D, groups)
    full = norm(x)

    state, outs, start = norm.init_state(B), [], 0
    while start < L:
        size = 1 if start < 3 else int(torch.randint(1, 9, (1,), generator=gen))
        y, state = norm.step(x[:, start : start + size], state)
        outs.append(y)
        start += size
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)

    _, whole = norm.step(x, norm.init_state(B))
    none = torch.zeros(B, L, dtype=torch.bool)
    for got, want, direct in zip(state, whole, direct_state(x, none, groups)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-12)


def test_timestep_norm_padded_pieces_keep_state():
    gen = torch.Generator().manual_seed(3)
    B, L, D = 3, 24, 8
    x = torch.randn(B, L, D, generator=gen, dtype=torch.float64)
    mask = random_mask(B, L, gen)
    mask[2, 10:16] = True  # a whole piece of padding in the middle
    norm = make_timestep_norm(D, 2)
    state, outs = norm.init_state(B), []
    for a, b in [(0, 1), (1, 10), (10, 16), (16, 24)]:
        y, state = norm.normalize(x[:, a:b], mask[:, a:b], state)
        outs.append(y)
    torch.testing.assert_close(torch.cat(outs, 1), norm(x, mask), rtol=1e-12, atol=1e-12)
    for got, direct in zip(state, direct_state(x, mask, 2)):
        torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-12)


def test_timestep_norm_bf16_autocast():
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(2, 32, 16, generator=gen) * 4 + 20).bfloat16()
    norm = make_timestep_norm(16, 4, torch.float32)
    reference = norm(x.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = norm(x)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    # same (bf16) inputs, so only the output rounding remains (2^-8 relative); bf16 statistics
    # would be off by far more (cumulative sums of values near 20 with an 8-bit mantissa)
    torch.testing.assert_close(y.float(), reference, rtol=8e-3, atol=8e-3)


def test_build_norm_and_errors():
    assert NORMS == ("layernorm", "rmsnorm", "scalenorm", "timestepnorm")
    for name in NORMS:
        assert build_norm(name, 8)(torch.randn(1, 3, 8)).shape == (1, 3, 8)
    assert isinstance(build_norm("layernorm", 8), torch.nn.LayerNorm)
    assert build_norm("timestepnorm", 8, groups=2).groups == 2
    with pytest.raises(SeqmixError, match="norm='batchnorm'.*layernorm.*rmsnorm.*scalenorm.*timestepnorm"):
        build_norm("batchnorm", 8)
    with pytest.raises(SeqmixError, match="groups=3.*d_model=8"):
        TimestepNorm(8, groups=3)
    norm = TimestepNorm(8)
    with pytest.raises(SeqmixError, match=r"\(2, 5, 6\).*D=8"):
        norm(torch.randn(2, 5, 6))
    with pytest.raises(SeqmixError, match="state"):
        norm.step(torch.randn(2, 1, 8), norm.init_state(3))


@pytest.mark.parametrize("name", NORMS)
@pytest.mark.parametrize("eps", [-1.0, 0, float("nan"), float("inf"), "a", None, True])
def test_every_norm_refuses_an_eps_that_is_no_positive_number(name, eps):
    """A negative or NaN eps gave NaN outputs without a word; a string torch's TypeError at the first forward."""
    with pytest.raises(SeqmixError, match=f"eps={eps!r} is not valid; expected a finite number > 0"):
        build_norm(name, 8, eps=eps)


@pytest.mark.parametrize("dim", [0, -1, 8.0, "8", None])
def test_layernorm_names_a_width_that_is_no_positive_integer(dim):
    """torch took 0, and raised its own RuntimeError or TypeError for the others."""
    with pytest.raises(SeqmixError, match=f"LayerNorm: dim={dim!r} is not valid; expected an integer >= 1"):
        build_norm("layernorm", dim)
