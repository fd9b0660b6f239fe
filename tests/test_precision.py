"""Precision by capability: ``auto`` is bf16-mixed exactly where the device multiplies bfloat16 natively,
one decision for the Trainer and the sketch pass, an explicit precision wins, and a fit records what
it ran in. The decision is tested on each capability answer (no hardware needed); the fit end to end on
the tiny model, on both branches."""

from __future__ import annotations

import warnings

import pytest
import torch
import yaml
from helpers import run_crossling, tiny_fit_args

from callbacks.checkpoints import list_checkpoints, load_checkpoint
from callbacks.sketching import resolve_precision
from lightning_modules import precision as precision_module
from lightning_modules.precision import (
    DeviceFacts,
    PrecisionError,
    _cpu_flags,
    accelerator_device_type,
    native_bf16,
    resolve_trainer_precision,
)

AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"avx2", "avx512f", "avx512_bf16"})
AVX512_ONLY = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl"})  # Skylake-X: bf16 emulated
AVX2 = frozenset({"avx", "avx2", "fma"})  # Zen 3, most laptops and older cloud VMs


@pytest.mark.parametrize(
    ("facts", "native"),
    [
        (DeviceFacts("cpu", "x86_64", AMX, None, True), True),
        (DeviceFacts("cpu", "x86_64", AVX512_BF16, None, True), True),
        (DeviceFacts("cpu", "x86_64", AVX512_ONLY, None, True), False),  # oneDNN takes bf16, but emulates it
        (DeviceFacts("cpu", "x86_64", AVX2, None, False), False),
        (DeviceFacts("cpu", "x86_64", AMX, "AVX2", False), False),  # oneDNN capped below its bf16 instructions
        (DeviceFacts("cpu", "x86_64", AMX, "avx512_core_amx", True), True),  # the cap's name, any case
        (DeviceFacts("cpu", "x86_64", AMX, None, False), False),  # a torch build without oneDNN bf16
        (DeviceFacts("cpu", "aarch64", frozenset({"asimd", "bf16"}), None, True), True),
        (DeviceFacts("cpu", "aarch64", frozenset({"asimd", "bf16"}), None, False), False),
        (DeviceFacts("cpu", "arm64", frozenset({"asimd"}), None, False), False),
        (DeviceFacts("cpu", "riscv64", frozenset(), None, True), False),
        (DeviceFacts("cuda", cuda_capability=(9, 0)), True),  # H100
        (DeviceFacts("cuda", cuda_capability=(8, 0)), True),  # A100
        (DeviceFacts("cuda", cuda_capability=(7, 5)), False),  # T4: bf16 emulated
        (DeviceFacts("cuda", cuda_capability=(7, 0)), False),  # V100
        (DeviceFacts("cuda", cuda_capability=None), False),
        (DeviceFacts("mps"), False),
    ],
)
def test_auto_is_bf16_mixed_exactly_where_bfloat16_is_native(facts, native):
    found, reason = native_bf16(facts)
    assert found is native and reason
    choice = resolve_trainer_precision("auto", facts.device_type, facts)
    assert choice.precision == ("bf16-mixed" if native else "32-true")
    assert choice.requested == "auto" and choice.precision in choice.describe()


def test_an_explicit_precision_wins_and_bf16_where_emulated_warns_with_its_cost():
    avx2 = DeviceFacts("cpu", "x86_64", AVX2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_trainer_precision("32-true", "cpu", avx2).precision == "32-true"
        assert resolve_trainer_precision(None, "cpu", avx2).precision == "32-true"  # Lightning's default
        amx = DeviceFacts("cpu", "x86_64", AMX, None, True)
        assert resolve_trainer_precision("bf16-mixed", "cpu", amx).precision == "bf16-mixed"
    with pytest.warns(UserWarning, match="trainer.precision bf16-mixed .* slower than float32"):
        assert resolve_trainer_precision("bf16-mixed", "cpu", avx2).precision == "bf16-mixed"


@pytest.mark.parametrize("bad", ["bf17", "fp32", "AUTO", "half"])
def test_an_unknown_precision_names_the_key_and_what_is_allowed(bad):
    with pytest.raises(PrecisionError, match=rf"trainer.precision: expected auto or one of 32-true.*found '{bad}'"):
        resolve_trainer_precision(bad, "cpu", DeviceFacts("cpu", "x86_64", AVX2))


def test_the_sketch_pass_decides_as_the_trainer_does(monkeypatch):
    for facts, expected in ((DeviceFacts("cpu", "x86_64", AMX, None, True), "bf16"),
                            (DeviceFacts("cpu", "x86_64", AVX512_ONLY, None, True), "32")):
        monkeypatch.setattr(precision_module, "device_facts", lambda device_type, f=facts: f)
        assert resolve_precision("auto", "cpu") == expected
        assert resolve_trainer_precision("auto", "cpu").precision == {"bf16": "bf16-mixed", "32": "32-true"}[expected]
        assert resolve_precision("32", "cpu") == "32"


def test_cpu_flags_are_read_from_x86_and_arm_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n\n"
                   "processor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\nCPU implementer\t: 0x41\n")
    assert _cpu_flags(x86) == {"fpu", "avx2", "avx512_bf16", "amx_bf16"}
    assert _cpu_flags(arm) == {"fp", "asimd", "bf16", "i8mm"}
    assert _cpu_flags(tmp_path / "missing") == frozenset()


def test_the_accelerator_names_the_device_it_runs_on():
    from pytorch_lightning.accelerators import CPUAccelerator

    assert accelerator_device_type("cpu") == "cpu"
    assert accelerator_device_type("cuda") == "cuda"
    assert accelerator_device_type(CPUAccelerator()) == "cpu"
    if not torch.cuda.is_available():
        assert accelerator_device_type("auto") in ("cpu", "mps")


def _fit(run_dir, precision: str, **env):
    result = run_crossling(tiny_fit_args(run_dir, "--trainer.precision", precision), **env)
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return result.stdout, config["trainer"]["precision"]


def test_a_fit_on_auto_without_native_bf16_runs_and_records_float32(tmp_path):
    # ONEDNN_MAX_CPU_ISA=AVX2 takes oneDNN's bfloat16 instructions away on any x86 CPU
    out, recorded = _fit(tmp_path / "auto", "auto", ONEDNN_MAX_CPU_ISA="AVX2")
    assert recorded == "32-true"
    assert "precision auto -> 32-true (" in out
    _, explicit = _fit(tmp_path / "explicit", "32-true", ONEDNN_MAX_CPU_ISA="AVX2")
    assert explicit == "32-true"
    for (_, a), (_, b) in zip(list_checkpoints(tmp_path / "auto"), list_checkpoints(tmp_path / "explicit"), strict=True):
        weights_a, weights_b = load_checkpoint(a)["state_dict"], load_checkpoint(b)["state_dict"]
        assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)  # the same fit, bit for bit


def test_a_fit_on_auto_with_native_bf16_trains_in_bf16_mixed(tmp_path, monkeypatch):
    from helpers import REPO  # noqa: F401  (tests/ on the path for the CLI's helpers)

    from lightning_modules.cli import run_cli

    monkeypatch.setattr(precision_module, "device_facts",
                        lambda device_type: DeviceFacts("cpu", "x86_64", AMX, None, True))
    cli = run_cli(tiny_fit_args(tmp_path / "run", "--trainer.precision", "auto"))
    assert cli.trainer.precision == "bf16-mixed"
    assert cli.trainer.precision_choice.requested == "auto"
    config = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert config["trainer"]["precision"] == "bf16-mixed"
    assert [epoch for epoch, _ in list_checkpoints(tmp_path / "run")] == [0, 1]
