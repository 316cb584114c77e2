"""Convert state dicts of the reference implementations (Mega, Megalodon) into seqmix ones.

Each converter takes the reference module's state dict (keys relative to that module; ``prefix``
selects and strips an outer prefix such as ``"layers.0.mega."``) and returns a new dict that loads
with ``load_state_dict(strict=True)`` into the seqmix module below. Values may be views of the input
tensors; dtypes are kept. Input that does not fit raises ``SeqmixError`` naming the keys.

facebookresearch/mega ``MultiHeadEMA(D, ndim=N, bidirectional)`` -> ``EMA(D, order=N,
causal=not bidirectional)``; K = D, or 2D when bidirectional (rows [D, 2D) the backward kernel):

    reference   shape       seqmix   shape
    delta       (K, N, 1)   alpha    (K, N)    σ(·) is the input weight p (the paper's α)
    alpha       (K, N, 1)   delta    (K, N)    the damping (the paper's δ)
    beta        (K, N, 1)   beta     (K, N)
    gamma       (K, N)      eta      (K, N)
    omega       (D,)        omega    (D,)

Mega's code swaps the paper's names: it computes p = σ(delta), q = 1 − p·σ(alpha), while seqmix
uses the paper's p = σ(alpha), q = 1 − p·σ(delta); hence the swap above. This is the revision of
``exponential_moving_average.py`` whose ``_calc_coeffs`` reads ``p = torch.sigmoid(self.delta)``.

XuezheMax/megalodon ``MultiHeadComplexEMA(D, ndim=N)`` -> ``CEMA(D, order=N)``:

    alpha       (D, N, 1)   alpha    (D, N)
    delta       (D, N, 1)   delta    (D, N)
    theta       (D, 1, 1)   theta    (D,)
    gamma       (D, N, 2)   eta_re   (D, N)    gamma[..., 0], the real part
                            eta_im   (D, N)    gamma[..., 1], the imaginary part
    omega       (D, 1)      omega    (D,)

megalodon ``TimestepNorm(D, num_groups=G, prior_count=0)`` -> ``TimestepNorm(D, groups=G)``:

    weight      (D,)        weight   (D,)      both apply (weight + 1)
    bias        (D,)        bias     (D,)
    prior_count ()          -         must be 0: seqmix statistics start empty
    prior_mean  (G,)        -         dropped (unused when prior_count is 0)
    prior_logv  (G,)        -         dropped

mega ``MovingAverageGatedAttention(D, zdim=S, hdim=E, ndim=N, chunk_size=C, rel_pos_bias=...,
norm_type=..., prenorm=..., bidirectional=...)`` -> ``GatedAttention(D, local="ema",
local_options={"order": N}, z_dim=S, v_dim=E, heads=1, chunk_size=C, position_bias=...,
norm=norm_type, prenorm=prenorm, causal=not bidirectional)``; for C < 0 use chunk_size=None and
max_len=max_positions:

    move.*                   local.*              as MultiHeadEMA above
    v_proj.{weight,bias}     v_proj.*             (E, D), (E,)
    mx_proj.{weight,bias}    mx_proj.*            (2D + S + E, D): the split [D, S + E, D] is the same
    h_proj.{weight,bias}     h_proj.*             (D, E), (D,)
    gamma, beta  (2, S)      gamma, beta
    rel_pos_bias.rel_pos_bias  (2C − 1,)          bias.weight  (2C − 1,)     position_bias="simple"
    rel_pos_bias.alpha, .beta  (1, S)             bias.a, bias.b  (S,)       position_bias="rotary"
    rel_pos_bias._float_tensor                    dropped (a dtype buffer)
    norm.norm.weight, .bias  (D,)                 norm.weight, norm.bias     layernorm
    norm.norm.weight         (D,)                 norm.weight                rmsnorm
    norm.norm.scalar         (1,)                 norm.scalar                scalenorm

megalodon ``MovingAverageGatedAttention(D, zdim=S, hdim=E, ndim=N, num_heads=H, chunk_size=C,
norm_num_groups=G)`` -> ``GatedAttention(D, local="cema", local_options={"order": N},
normalized=True, heads=H, z_dim=S, v_dim=E, chunk_size=C, norm_groups=G)``:

    timenorm.*               timestep_norm.*      as TimestepNorm above
    cema.*                   local.*              as MultiHeadComplexEMA above
    rmsnorm.weight  (D,)     local_norm.weight    plus 1: Megalodon applies (weight + 1), seqmix weight
    wv.{weight,bias}         v_proj.*             (E, D), (E,)
    wz.{weight,bias}         z_proj.*             (S, D), (S,)   features reordered, see below
    wr.{weight,bias}         r_proj.*             (E, D), (E,)
    wh1.{weight,bias}        h1_proj.*            (D, D), (D,)
    wh2.weight               h2_proj.weight       (D, E)
    gamma, beta  (2, S)      gamma, beta                         features reordered, see below

Megalodon rotates q and k in interleaved pairs (2i, 2i + 1) of each head, seqmix in half-split
pairs (i, i + S/2H) with the same frequencies. Reordering each head's z features from
[0, 1, 2, 3, ...] to [0, 2, 4, ..., 1, 3, 5, ...] (rows of wz, columns of gamma and beta) turns one
into the other and leaves the per-head z norm and every q·k unchanged, so this converter needs H.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from seqmix.errors import SeqmixError, kind_of, require_int


def _select(owner: str, state_dict: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries under ``prefix`` (a module path; its trailing dot may be left out), with the prefix
    stripped; each must be a tensor with a string key, and a prefix must select at least one.

    A list, a string or None in a state dict (or a non-string key, or the dict not a mapping) ended
    in an AttributeError from inside the converter."""
    if not isinstance(state_dict, Mapping):
        raise SeqmixError(f"{owner}: state_dict is {kind_of(state_dict)}; expected a mapping of names to tensors "
                          "(a reference module's state_dict())")
    if not isinstance(prefix, str):
        raise SeqmixError(f"{owner}: prefix={prefix!r} is not valid; expected a string such as 'layers.0.mega.' (or '')")
    keys = [key for key in state_dict if not isinstance(key, str)]
    if keys:
        raise SeqmixError(f"{owner}: state_dict key {keys[0]!r} is not a string; a state dict's keys are parameter names")
    if prefix and not prefix.endswith("."):
        # A module's path names whole modules: 'layers.0.mega' means the module, never keys 'layers.0.megaalpha'.
        prefix += "."
    selected = {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}
    if prefix and not selected:
        modules = sorted({key.rpartition(".")[0] + "." for key in state_dict if "." in key})
        raise SeqmixError(f"{owner}: no key of state_dict starts with prefix={prefix!r}; "
                          + (f"its modules are {modules[:8]}{' ...' if len(modules) > 8 else ''}" if modules
                             else "its keys have no module path: pass prefix=''"))
    for key, value in selected.items():
        if not isinstance(value, Tensor):
            raise SeqmixError(f"{owner}: {prefix}{key} is {kind_of(value)}; expected a torch.Tensor")
    return selected


def _check_values(owner: str, sd: Mapping[str, Tensor], prefix: str, keys) -> None:
    """Raise unless each ``sd[key]`` (its shape already checked) holds finite real floating-point values:
    an integer, boolean or complex tensor was cast by load_state_dict without a word, and NaN loaded
    as weights every output of which was NaN."""
    for key in keys:
        value = sd[key]
        if not value.is_floating_point():
            raise SeqmixError(f"{owner}: {prefix}{key} holds {str(value.dtype).removeprefix('torch.')} values; a weight is "
                              "real floating point (float32, float16, bfloat16 or float64)")
        if not bool(torch.isfinite(value).all()):
            raise SeqmixError(f"{owner}: {prefix}{key} holds NaN or infinite values; these weights are damaged")


def _check_keys(owner: str, sd: Mapping[str, Tensor], prefix: str, required, optional=()) -> None:
    """Raise unless ``sd`` holds every key of ``required`` and nothing outside ``required``/``optional``."""
    missing = sorted(set(required) - sd.keys())
    unexpected = sorted(sd.keys() - set(required) - set(optional))
    if missing or unexpected:
        problems = [f"{what} reference key(s) {[prefix + k for k in keys]}"
                    for what, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
        raise SeqmixError(f"{owner}: {'; '.join(problems)}; expected {sorted(prefix + k for k in required)}")


def _check_shapes(owner: str, sd: Mapping[str, Tensor], prefix: str, shapes: dict[str, tuple]) -> None:
    """Raise unless each ``sd[key]`` has shape ``shapes[key]``."""
    wrong = [f"{prefix}{key} {tuple(sd[key].shape)} (expected {shape})"
             for key, shape in shapes.items() if tuple(sd[key].shape) != shape]
    if wrong:
        raise SeqmixError(f"{owner}: wrong shape(s): {', '.join(wrong)}")


def _leading(owner: str, sd: Mapping[str, Tensor], prefix: str, key: str, rank: int) -> tuple[int, ...]:
    """The shape of ``sd[key]``, which must have ``rank`` dims; the other shapes are checked against it."""
    if sd[key].dim() != rank:
        raise SeqmixError(f"{owner}: {prefix}{key} has shape {tuple(sd[key].shape)}, expected {rank} dims")
    return tuple(sd[key].shape)


def _nest(prefix: str, sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` with ``prefix`` put before every key."""
    return {prefix + key: value for key, value in sd.items()}


def mega_ema_to_seqmix(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Mega ``MultiHeadEMA`` -> ``EMA``: delta, alpha, beta (K, N, 1), gamma (K, N), omega (D,) -> (K, N), (D,).

    K = D for ``EMA(D, order=N)``, K = 2D for ``EMA(D, order=N, causal=False)``.
    """
    owner = "mega_ema"
    sd = _select(owner, state_dict, prefix)
    _check_keys(owner, sd, prefix, ("delta", "alpha", "beta", "gamma", "omega"))
    rows, order = _leading(owner, sd, prefix, "gamma", 2)
    d_model = sd["omega"].numel()
    if rows not in (d_model, 2 * d_model):
        raise SeqmixError(f"{owner}: {prefix}gamma has {rows} rows; expected D={d_model} or 2D={2 * d_model} (omega is (D,))")
    shape = (rows, order, 1)
    _check_shapes(owner, sd, prefix, {"delta": shape, "alpha": shape, "beta": shape, "omega": (d_model,)})
    _check_values(owner, sd, prefix, sd)
    return {
        "alpha": sd["delta"].squeeze(-1),
        "delta": sd["alpha"].squeeze(-1),
        "beta": sd["beta"].squeeze(-1),
        "eta": sd["gamma"],
        "omega": sd["omega"],
    }


def megalodon_cema_to_seqmix(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Megalodon ``MultiHeadComplexEMA`` -> ``CEMA``: alpha, delta (D, N, 1), theta (D, 1, 1),
    gamma (D, N, 2), omega (D, 1) -> alpha, delta, eta_re, eta_im (D, N), theta, omega (D,)."""
    owner = "megalodon_cema"
    sd = _select(owner, state_dict, prefix)
    _check_keys(owner, sd, prefix, ("alpha", "delta", "theta", "gamma", "omega"))
    d_model, order, _ = _leading(owner, sd, prefix, "alpha", 3)
    _check_shapes(owner, sd, prefix, {
        "alpha": (d_model, order, 1), "delta": (d_model, order, 1), "theta": (d_model, 1, 1),
        "gamma": (d_model, order, 2), "omega": (d_model, 1),
    })
    _check_values(owner, sd, prefix, sd)
    return {
        "alpha": sd["alpha"].squeeze(-1),
        "delta": sd["delta"].squeeze(-1),
        "theta": sd["theta"].reshape(d_model),
        "eta_re": sd["gamma"][..., 0],
        "eta_im": sd["gamma"][..., 1],
        "omega": sd["omega"].reshape(d_model),
    }


def megalodon_timestep_norm_to_seqmix(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Megalodon ``TimestepNorm`` -> ``TimestepNorm``: weight, bias (D,) kept; prior_count must be 0,
    and the prior buffers prior_mean, prior_logv (G,) are dropped."""
    owner = "megalodon_timestep_norm"
    sd = _select(owner, state_dict, prefix)
    _check_keys(owner, sd, prefix, ("weight", "bias", "prior_count", "prior_mean", "prior_logv"))
    width = _leading(owner, sd, prefix, "weight", 1)
    groups = _leading(owner, sd, prefix, "prior_mean", 1)
    _check_shapes(owner, sd, prefix, {"bias": width, "prior_logv": groups})
    _check_values(owner, sd, prefix, ("weight", "bias"))
    prior_count = sd["prior_count"]
    if prior_count.numel() != 1 or prior_count.item() != 0:
        raise SeqmixError(
            f"{owner}: {prefix}prior_count is {prior_count.tolist()}; seqmix's TimestepNorm starts from empty "
            "statistics and has no learned prior, so only prior_count=0 can be converted"
        )
    return {"weight": sd["weight"], "bias": sd["bias"]}


_MEGA_NORMS = {
    ("norm.norm.bias", "norm.norm.weight"): "layernorm",
    ("norm.norm.weight",): "rmsnorm",
    ("norm.norm.scalar",): "scalenorm",
}


def mega_gated_attention_to_seqmix(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Mega ``MovingAverageGatedAttention`` -> ``GatedAttention`` (Mega form, heads=1).

    move.* (as ``mega_ema_to_seqmix``), v_proj/mx_proj/h_proj, gamma/beta (2, S), the relative bias
    (rel_pos_bias.rel_pos_bias (2C − 1,), or rel_pos_bias.alpha/.beta (1, S) -> (S,)) and norm.norm.*.
    """
    owner = "mega_gated_attention"
    sd = _select(owner, state_dict, prefix)
    out = _nest("local.", mega_ema_to_seqmix(state_dict, prefix + "move."))
    rest = {key: value for key, value in sd.items() if not key.startswith("move.")}

    norm_keys = tuple(sorted(key for key in rest if key.startswith("norm.")))
    if norm_keys not in _MEGA_NORMS:
        forms = "; ".join(f"{name}: {list(keys)}" for keys, name in _MEGA_NORMS.items())
        raise SeqmixError(f"{owner}: norm keys {[prefix + k for k in norm_keys]} fit no seqmix norm; expected one of {forms}")
    rotary = "rel_pos_bias.rel_pos_bias" not in rest and any(
        key in rest for key in ("rel_pos_bias.alpha", "rel_pos_bias.beta"))
    bias_keys = ("rel_pos_bias.alpha", "rel_pos_bias.beta") if rotary else ("rel_pos_bias.rel_pos_bias",)
    linear = tuple(f"{name}.{part}" for name in ("v_proj", "mx_proj", "h_proj") for part in ("weight", "bias"))
    _check_keys(owner, rest, prefix, linear + ("gamma", "beta") + bias_keys + norm_keys,
                optional=("rel_pos_bias._float_tensor",))

    d_model = out["local.omega"].numel()
    z_dim = _leading(owner, rest, prefix, "gamma", 2)[1]
    v_dim = _leading(owner, rest, prefix, "v_proj.weight", 2)[0]
    mixed = 2 * d_model + z_dim + v_dim
    shapes = {"v_proj.weight": (v_dim, d_model), "v_proj.bias": (v_dim,), "mx_proj.weight": (mixed, d_model),
              "mx_proj.bias": (mixed,), "h_proj.weight": (d_model, v_dim), "h_proj.bias": (d_model,),
              "gamma": (2, z_dim), "beta": (2, z_dim)}
    shapes.update({key: (1,) if key.endswith("scalar") else (d_model,) for key in norm_keys})
    if rotary:
        shapes.update({"rel_pos_bias.alpha": (1, z_dim), "rel_pos_bias.beta": (1, z_dim)})
    else:
        _leading(owner, rest, prefix, "rel_pos_bias.rel_pos_bias", 1)
    _check_shapes(owner, rest, prefix, shapes)
    _check_values(owner, rest, prefix, [key for key in rest if key != "rel_pos_bias._float_tensor"])
    out.update({key: rest[key] for key in linear + ("gamma", "beta")})
    out.update({"norm." + key[len("norm.norm."):]: rest[key] for key in norm_keys})
    if rotary:
        out["bias.a"] = rest["rel_pos_bias.alpha"].reshape(z_dim)
        out["bias.b"] = rest["rel_pos_bias.beta"].reshape(z_dim)
    else:
        out["bias.weight"] = rest["rel_pos_bias.rel_pos_bias"]
    return out


def _half_split_order(z_dim: int, heads: int) -> Tensor:
    """Indices taking each head's features from interleaved rotary pairs to half-split pairs:
    per head of width w, [0, 2, ..., w − 2, 1, 3, ..., w − 1]."""
    width = z_dim // heads
    return torch.arange(z_dim).view(heads, width // 2, 2).transpose(1, 2).reshape(z_dim)


def megalodon_gated_attention_to_seqmix(
    state_dict: Mapping[str, Tensor], prefix: str = "", *, heads: int
) -> dict[str, Tensor]:
    """Megalodon ``MovingAverageGatedAttention`` -> ``GatedAttention(normalized=True, heads=H)``.

    timenorm.* and cema.* (as the converters above), rmsnorm.weight (D,) + 1, wv/wz/wr/wh1 weight and
    bias, wh2.weight, gamma/beta (2, S); z features reordered per head for seqmix's rotary layout,
    which is why ``heads`` (H, the reference ``num_heads``) is needed.
    """
    owner = "megalodon_gated_attention"
    sd = _select(owner, state_dict, prefix)
    out = _nest("timestep_norm.", megalodon_timestep_norm_to_seqmix(state_dict, prefix + "timenorm."))
    out.update(_nest("local.", megalodon_cema_to_seqmix(state_dict, prefix + "cema.")))
    rest = {key: value for key, value in sd.items() if not key.startswith(("timenorm.", "cema."))}

    names = {"wv": "v_proj", "wz": "z_proj", "wr": "r_proj", "wh1": "h1_proj"}
    linear = tuple(f"{name}.{part}" for name in names for part in ("weight", "bias"))
    _check_keys(owner, rest, prefix, linear + ("wh2.weight", "rmsnorm.weight", "gamma", "beta"))
    d_model = out["local.omega"].numel()
    z_dim = _leading(owner, rest, prefix, "wz.weight", 2)[0]
    v_dim = _leading(owner, rest, prefix, "wv.weight", 2)[0]
    # Every shape before any arithmetic: rmsnorm.weight + 1 of a tensor expanded to 2**31 values
    # allocated 8 GiB, and a wrong wv.weight was load_state_dict's "size mismatch".
    _check_shapes(owner, rest, prefix, {
        "wz.weight": (z_dim, d_model), "wz.bias": (z_dim,), "gamma": (2, z_dim), "beta": (2, z_dim),
        "wv.weight": (v_dim, d_model), "wv.bias": (v_dim,), "wr.weight": (v_dim, d_model), "wr.bias": (v_dim,),
        "wh1.weight": (d_model, d_model), "wh1.bias": (d_model,), "wh2.weight": (d_model, v_dim), "rmsnorm.weight": (d_model,),
    })
    _check_shapes(owner, sd, prefix, {"timenorm.weight": (d_model,)})
    _check_values(owner, rest, prefix, rest)
    require_int(owner, "heads", heads, meaning="the reference num_heads")
    if z_dim % (2 * heads):
        raise SeqmixError(f"{owner}: heads={heads!r} must divide z_dim={z_dim} into heads of even width")

    for ref, ours in names.items():
        out[f"{ours}.weight"], out[f"{ours}.bias"] = rest[f"{ref}.weight"], rest[f"{ref}.bias"]
    order = _half_split_order(z_dim, heads)
    out["z_proj.weight"] = rest["wz.weight"][order]
    out["z_proj.bias"] = rest["wz.bias"][order]
    out["gamma"] = rest["gamma"][:, order]
    out["beta"] = rest["beta"][:, order]
    out["h2_proj.weight"] = rest["wh2.weight"]
    out["local_norm.weight"] = rest["rmsnorm.weight"] + 1.0
    return out


CONVERTERS = {
    "mega_ema": mega_ema_to_seqmix,
    "megalodon_cema": megalodon_cema_to_seqmix,
    "megalodon_timestep_norm": megalodon_timestep_norm_to_seqmix,
    "mega_gated_attention": mega_gated_attention_to_seqmix,
    "megalodon_gated_attention": megalodon_gated_attention_to_seqmix,
}
"""Converter by reference module; ``megalodon_gated_attention`` also needs ``heads=``."""
