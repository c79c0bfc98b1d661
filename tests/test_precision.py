"""The precision rule: bf16 autocast only where the hardware runs it natively, fp32 otherwise."""

import os
import subprocess
import sys

import pytest
import torch

from unlearning import precision as p
from unlearning.models import encode_text, load_model, trim_padding


@pytest.fixture(autouse=True)
def fresh_probe():
    p.native_bf16.cache_clear()
    yield
    p.native_bf16.cache_clear()


def test_avx2_only_cpu_trains_in_fp32(monkeypatch):
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx", "avx2", "fma"})
    choice = p.resolve_precision("auto", "cpu", "train")
    assert choice.dtype == "fp32" and "emulated" in choice.reason


def test_native_bf16_cpu_trains_in_bf16(monkeypatch):
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16", "amx_bf16"})
    monkeypatch.setattr(p, "_torch_cpu_bf16", lambda: (True, "ATen CPU capability AVX512"))
    assert p.resolve_precision("auto", "cpu", "train").dtype == "bf16"


def test_bf16_flags_capped_by_pytorch_stay_fp32(monkeypatch):
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(p, "_torch_cpu_bf16", lambda: (False, "ATen CPU capability AVX2"))
    assert p.resolve_precision("auto", "cpu", "train").dtype == "fp32"


def test_without_cpuinfo_a_measured_probe_decides(monkeypatch):
    monkeypatch.setattr(p, "cpu_flags", lambda: None)
    monkeypatch.setattr(p, "measured_cpu_bf16", lambda: False)
    choice = p.resolve_precision("auto", "cpu", "train")
    assert choice.dtype == "fp32" and "measured" in choice.reason


def test_cpuinfo_flags_are_parsed(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 avx512_bf16\n")
    assert p.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16"}
    assert p.cpu_flags(tmp_path / "missing") is None


def test_overrides_and_stages(monkeypatch):
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx512_bf16"})
    monkeypatch.setattr(p, "_torch_cpu_bf16", lambda: (True, "ATen CPU capability AVX512"))
    assert p.resolve_precision("fp32", "cpu", "train").dtype == "fp32"
    assert p.resolve_precision("auto", "cpu", "unlearn").dtype == "fp32"  # calibrated in fp32
    assert p.resolve_precision("bf16", "cpu", "evaluate").dtype == "bf16"
    monkeypatch.setattr(p, "cpu_flags", lambda: {"avx2"})
    p.native_bf16.cache_clear()
    forced = p.resolve_precision("bf16", "cpu", "train")
    assert forced.dtype == "bf16" and "EMULATED" in forced.reason  # the user asked; say it will be slow


def test_isa_limited_process_resolves_fp32():
    """ATEN_CPU_CAPABILITY / DNNL_MAX_CPU_ISA capped at AVX2 reproduce an AVX2-only CPU, where bf16 is emulated."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", "from unlearning.precision import resolve_precision as r; print(r('auto', 'cpu').dtype)"],
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "fp32"


def test_autocast_only_for_bf16():
    x = torch.randn(4, 4)
    with p.autocast(p.Precision(dtype="bf16", reason="test"), "cpu"):
        assert (x @ x).dtype == torch.bfloat16
    with p.autocast(p.Precision(dtype="fp32", reason="test"), "cpu"):
        assert (x @ x).dtype == torch.float32


def test_trimmed_text_encoding_matches_open_clip():
    bundle = load_model("TinyCLIP-RN32", seed=0)
    tokens = bundle.tokenizer(["red", "a photo of a small red circle", "an image of a large purple triangle on grey"])
    assert trim_padding(tokens).shape[1] == int((tokens != 0).sum(dim=1).max())
    with torch.no_grad():
        full = bundle.model.encode_text(tokens, normalize=True)
        trimmed = encode_text(bundle.model, tokens, normalize=True)
    torch.testing.assert_close(trimmed, full, atol=1e-5, rtol=1e-5)
