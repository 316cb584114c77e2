"""Numerical robustness at the edges: decays next to 1 over very long sequences, bf16 training of
every preset, and timestep norm over mostly-padded long rows.

Measured single-threaded on a 2-core CPU: the long-decay test ~4 s (the float64 recurrent loop
over 65536 steps is the reference: ~1 s EMA, ~2 s CEMA), 200 bf16 steps of every preset ~10 s
in all, the timestep-norm test <1 s.
"""
from __future__ import annotations

import math

import pytest
import torch
from omegaconf import open_dict

import seqmix
from seqmix.configs import compose_config, config_groups
from seqmix.training.experiment import build_experiment
from seqmix.layers.norms import TimestepNorm
from seqmix.training.loop import train

LONG = 65536
DECAY = 1 - 1e-4
# Relative error (norm of the difference over the norm of the reference) of float32 paths
# against the float64 reference. CEMA's is looser: its phase angle j·φ reaches ~4e5 radians
# here and float32 holds such an angle to ~0.03 rad, so powers of q carry that much rounding.
FLOAT32_RELATIVE_ERROR = {"ema": 1e-4, "cema": 2e-3}
FLOAT64_RELATIVE_ERROR = 1e-10
BF16_STEPS = 200


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


@pytest.mark.parametrize("name", ["ema", "cema"])
def test_decay_next_to_one_over_65536_steps_stays_finite_and_matches_the_recurrence(name):
    """Every channel decays by q = 1 − 1e−4 per step (p = σ(0) = ½, σ(δ) = 2e−4), B = 1, D = 4, N = 2.

    The literal recurrence in float64 is the reference; the FFT and chunked paths, in float64 and
    float32, give the same outputs (forward and step) and the same final state.
    """
    torch.manual_seed(0)
    mixer = seqmix.build_mixer(name, 4, order=2).double()
    with torch.no_grad():
        mixer.alpha.zero_()
        mixer.delta.fill_(math.log(2e-4 / (1 - 2e-4)))
    p = torch.sigmoid(mixer.alpha)
    assert torch.allclose(1 - p * torch.sigmoid(mixer.delta), torch.full_like(p, DECAY), rtol=0, atol=1e-12)
    x = torch.randn(1, LONG, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mixer.impl = "recurrent"
        reference, reference_state = mixer.step(x, mixer.init_state(1))
        assert torch.isfinite(reference).all()
        for dtype, tolerance in ((torch.float64, FLOAT64_RELATIVE_ERROR), (torch.float32, FLOAT32_RELATIVE_ERROR[name])):
            mixer.to(dtype)
            for impl in ("fft", "chunked"):
                mixer.impl = impl
                y = mixer(x.to(dtype))
                y_step, state = mixer.step(x.to(dtype), mixer.init_state(1))
                what = f"{name} {impl} in {dtype}"
                assert torch.isfinite(y).all() and torch.isfinite(y_step).all(), what
                assert _relative_error(y, reference) < tolerance, f"{what}: forward {_relative_error(y, reference):.2e}"
                assert _relative_error(y_step, reference) < tolerance, f"{what}: step {_relative_error(y_step, reference):.2e}"
                for got, want in zip(state, reference_state):
                    assert _relative_error(got, want) < tolerance, f"{what}: final state {_relative_error(got, want):.2e}"


@pytest.fixture(scope="module")
def byte_cache(tmp_path_factory):
    """One small stdlib byte corpus cache for every preset's run."""
    return tmp_path_factory.mktemp("bytes")


@pytest.mark.parametrize("preset", config_groups()["model"])
def test_every_preset_trains_200_bf16_steps_without_nan(preset, tmp_path, byte_cache):
    """D = 16, one layer (three for hybrid_tcn_attention, whose pattern has three), L = 64, B = 2,
    the default learning rate and schedule, bf16 autocast; a NaN or inf loss would stop the run.
    B is small because bfloat16 products are emulated, and slow, on CPUs without native bfloat16."""
    task = "masked_segment" if preset == "mega_encoder" else "byte_lm"
    depth = 3 if preset == "hybrid_tcn_attention" else 1
    config = compose_config([
        f"model={preset}", "model.d_model=16", f"model.depth={depth}", f"task={task}", "task.seq_len=64",
        "train.batch_size=2", f"train.max_steps={BF16_STEPS}", "train.warmup_steps=20", "train.bf16=true",
        f"train.eval_every={BF16_STEPS}", "train.eval_batches=1", f"train.checkpoint_every={BF16_STEPS}", "train.log_every=1",
        "train.progress=false", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}",
    ])
    with open_dict(config):
        config.task.cache_dir = str(byte_cache)
        config.task.max_bytes = 200_000
    experiment = build_experiment(config)
    result = train(experiment.model, experiment.task, experiment.train, {"model": experiment.model_config, "task": experiment.task_config})
    losses = [row["loss"] for row in result.history if row["split"] == "train"]
    assert len(losses) == BF16_STEPS and all(math.isfinite(loss) for loss in losses)
    assert losses[-1] < losses[0], "the loss should fall over 200 steps"
    assert math.isfinite(result.final_eval["loss"])
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in experiment.model.parameters())


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 2e-4)], ids=["float64", "float32"])
def test_timestep_norm_over_mostly_padded_long_rows_equals_the_unpadded_rows(dtype, tolerance):
    """L = 4096 with 90% of each row padded (right, left, scattered; NaN and huge values at the
    padding) and data far from zero mean: outputs stay finite, padded steps are 0, and the valid
    steps equal the norm of the row with its padding removed."""
    length, width = 4096, 16
    generator = torch.Generator().manual_seed(0)
    norm = TimestepNorm(width, groups=4).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(generator=generator)
        norm.bias.normal_(generator=generator)
    x = 1e3 + 3 * torch.randn(3, length, width, generator=generator, dtype=dtype)
    valid = torch.zeros(3, length, dtype=torch.bool)
    valid[0, : length // 10] = True
    valid[1, -(length // 10) :] = True
    valid[2, torch.randperm(length, generator=generator)[: length // 10]] = True
    padding = ~valid
    poisoned = x.clone()
    poisoned[0][padding[0]] = float("nan")
    poisoned[1][padding[1]] = 1e30
    poisoned[2][padding[2]] = -float("inf")
    with torch.no_grad():
        y = norm(poisoned, padding)
        assert torch.isfinite(y).all()
        assert (y[padding] == 0).all()
        for row in range(3):
            unpadded = norm(x[row, valid[row]].unsqueeze(0))[0]
            torch.testing.assert_close(y[row, valid[row]], unpadded, rtol=tolerance, atol=tolerance)
