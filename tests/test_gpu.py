"""On a CUDA device: every compute path gives the CPU's outputs, final state and gradients, and a
CPU-only one refuses the device, in a mixer and in training; streams keep their state on the device;
bf16 autocast stays near float32; presets train there, reload there with the CPU's logits and
generate greedily through ``step``.

Every test is marked ``gpu``: where torch sees no CUDA device it is skipped with that reason.
``tools/gpu_check.sh`` runs them on a GPU machine (``python -m pytest -m gpu``).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._pytree import tree_flatten

import seqmix
from seqmix import SeqmixError
from seqmix.model.generation import generate
from seqmix.training.experiment import build_experiment
from seqmix.training.loop import train

from mixer_cases import WIDTH, build, causal_cases, impl_cases, mixer_cases
from test_parity import GRAD_TOLERANCE, TOLERANCE, assert_bf16_autocast_is_finite_and_close, ids
from test_training import small

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
LENGTH = 130  # past two chunks of 64 and not a multiple of any chunk size the cases use
PRESETS = ["mega", "megalodon", "tcnca", "transformer"]


@pytest.fixture(autouse=True, scope="module")
def full_float32():
    """Turn TF32 off: cuDNN convolutions use it by default (a 10-bit mantissa), which is not what the
    CPU computes and would hide a real difference inside a tolerance wide enough for TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def inputs(dtype, batch: int = 2, length: int = LENGTH, seed: int = 1) -> torch.Tensor:
    """(batch, length, WIDTH) on the CPU."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, WIDTH, generator=generator, dtype=dtype)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy on the CPU. ``.cpu()`` of a CPU tensor is the tensor itself, and a later ``module.to()``
    moves a parameter's gradient in place, so a kept ``.cpu()`` of it would follow it to the GPU."""
    return t.detach().to("cpu", copy=True)


def outputs_state_grads(mixer, x: torch.Tensor):
    """Outputs, final state (None when bidirectional) and the gradients of x and every parameter,
    each a copy on the CPU; the loss weights every output differently, so no gradient is a plain sum."""
    mixer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = mixer(x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype, device=y.device).view_as(y)
    (y * weights).sum().backward()
    grads = {"x": host_copy(x.grad)}
    grads.update({name: host_copy(p.grad) for name, p in mixer.named_parameters() if p.grad is not None})
    state = None
    if mixer.causal:
        with torch.no_grad():
            _, state = mixer.step(x.detach(), mixer.init_state(x.shape[0]))
        assert all(t.device.type == x.device.type for t in tree_flatten(state)[0])
        state = [host_copy(t) for t in tree_flatten(state)[0]]
    return host_copy(y), state, grads


def cpu_only(case) -> bool:
    """Whether the case's path runs on the CPU only (its mixer's ``cpu_only_impls``: seqmix's C++ paths)."""
    return case[3] in seqmix.mixer_class(case[1]).cpu_only_impls


def on_device_cases():
    return [case for case in impl_cases(mixer_cases()) if not cpu_only(case)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", on_device_cases(), ids=ids(on_device_cases()))
def test_every_path_on_the_gpu_gives_the_cpus_outputs_state_and_gradients(case, dtype):
    _, name, options, impl = case
    mixer = build(name, options, dtype=dtype)
    mixer.impl = impl
    x = inputs(dtype)
    y_cpu, state_cpu, grads_cpu = outputs_state_grads(mixer, x)
    y, state, grads = outputs_state_grads(mixer.to(DEVICE), x.to(DEVICE))
    torch.testing.assert_close(y, y_cpu, **TOLERANCE[dtype])
    if state_cpu is not None:
        for got, want in zip(state, state_cpu, strict=True):
            torch.testing.assert_close(got, want, **TOLERANCE[dtype])
    assert grads.keys() == grads_cpu.keys()
    for key in grads_cpu:
        torch.testing.assert_close(grads[key], grads_cpu[key], **GRAD_TOLERANCE[dtype], msg=lambda m: f"gradient of {key}: {m}")


CPU_ONLY_CASES = [case for case in impl_cases(mixer_cases()) if cpu_only(case)]


@pytest.mark.parametrize("case", CPU_ONLY_CASES, ids=ids(CPU_ONLY_CASES))
def test_a_cpu_only_path_refuses_a_gpu_tensor_naming_the_path_to_use(case):
    _, name, options, impl = case
    mixer = build(name, options).to(DEVICE)
    mixer.impl = impl
    elsewhere = type(mixer).cpu_only_impls[impl]
    with pytest.raises(SeqmixError, match=f"runs on the CPU, and x is on cuda.*use impl='{elsewhere}' there"):
        mixer(inputs(torch.float32).to(DEVICE))


STREAMING_CASES = [case for case in impl_cases(causal_cases()) if not cpu_only(case)]


@pytest.mark.parametrize("case", STREAMING_CASES, ids=ids(STREAMING_CASES))
def test_streaming_on_the_gpu_keeps_its_state_there_and_gives_the_cpus_forward(case):
    _, name, options, impl = case
    mixer = build(name, options, dtype=torch.float64, seed=2)
    mixer.impl = impl
    x = inputs(torch.float64, seed=3)
    with torch.no_grad():
        y_cpu = mixer(x)
        mixer.to(DEVICE)
        state = mixer.init_state(x.shape[0])
        pieces = []
        for start, size in [(0, 1), (1, 1), (2, 40), (42, 63), (105, LENGTH - 105)]:
            y_piece, state = mixer.step(x[:, start : start + size].to(DEVICE), state)
            assert all(t.device.type == "cuda" for t in tree_flatten(state)[0])
            pieces.append(y_piece.cpu())
    torch.testing.assert_close(torch.cat(pieces, dim=1), y_cpu, **TOLERANCE[torch.float64])


@pytest.mark.parametrize("case", mixer_cases(), ids=ids(mixer_cases()))
def test_bf16_autocast_on_the_gpu_stays_finite_and_near_float32(case):
    _, name, options = case
    assert_bf16_autocast_is_finite_and_close(build(name, options).to(DEVICE), inputs(torch.float32).to(DEVICE))


@pytest.mark.parametrize("model", PRESETS)
def test_a_preset_trains_on_the_gpu_and_its_checkpoint_reloads_there_with_the_cpus_logits(tmp_path, model):
    experiment = build_experiment(small(tmp_path, f"model={model}", "task.seq_len=64", "train.max_steps=6",
                                        "train.lr=1e-2", "train.device=cuda"))
    initial = {name: p.detach().clone() for name, p in experiment.model.named_parameters()}
    result = train(experiment.model, experiment.task, experiment.train,
                   {"model": experiment.model_config, "task": experiment.task_config})
    rows = [row for row in result.history if row["split"] == "train"]
    assert len(rows) == 6 and all(torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.3  # from ln 256 ≈ 5.5 nats a byte LM's loss falls fast
    assert all(p.device.type == "cuda" for p in experiment.model.parameters())
    unchanged = [name for name, p in experiment.model.named_parameters() if torch.equal(p.cpu(), initial[name].cpu())]
    assert not unchanged, f"parameters never updated on the GPU: {unchanged}"

    on_gpu = seqmix.load_model(tmp_path / "run", device="cuda").eval()
    on_cpu = seqmix.load_model(tmp_path / "run", device="cpu").eval()
    assert all(p.device.type == "cuda" for p in on_gpu.parameters())
    tokens = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(on_gpu(tokens.to(DEVICE)).cpu(), on_cpu(tokens), rtol=1e-4, atol=1e-4)
    # Greedy tokens through the streaming state on the GPU are the argmax of the full forward there.
    generated = generate(on_gpu, torch.tensor([list(b"def "), list(b"for ")], device=DEVICE), 12, temperature=0)
    assert generated.device.type == "cuda"
    with torch.no_grad():
        for position in range(4, generated.shape[1]):
            assert torch.equal(on_gpu(generated[:, :position])[:, -1].argmax(-1), generated[:, position])


def test_bf16_training_on_the_gpu_keeps_float32_weights_and_finite_losses(tmp_path):
    experiment = build_experiment(small(tmp_path, "model=megalodon", "train.bf16=true", "train.grad_accum=2",
                                        "train.max_steps=3", "train.device=cuda"))
    result = train(experiment.model, experiment.task, experiment.train,
                   {"model": experiment.model_config, "task": experiment.task_config})
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in result.history)
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in experiment.model.parameters())


def test_training_on_the_gpu_with_a_cpu_only_path_is_refused_before_anything_is_written(tmp_path):
    experiment = build_experiment(small(tmp_path, "model=ema_conv", "model.depth=2", "model.mixers.ema.impl=native",
                                        "train.device=cuda", "train.max_steps=1"))
    with pytest.raises(SeqmixError, match=r"train.device='cuda' puts the model on cuda, .*CPU only: "
                                          r"blocks.0.mixer \(EMA impl='native': use impl='chunked' there\)"):
        train(experiment.model, experiment.task, experiment.train,
              {"model": experiment.model_config, "task": experiment.task_config})
    assert not (tmp_path / "run").exists()
