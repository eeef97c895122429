"""The Triton W8A16 / W4A16 kernels against their references.

On a CPU machine they run under Triton's interpreter. TRITON_INTERPRET must be set before Triton is imported, so
those checks run in a child process and cannot change the state of other tests. The interpreter has no bfloat16
(numpy has none), so it checks float32 and float16; the GPU tests cover bfloat16.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from kernels.dispatch import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")

# Odd M, N and K on purpose: masking of partial tiles is where such kernels break.
INT8_CASES = [(1, 17, 40), (5, 70, 130), (20, 33, 64), (3, 128, 256)]
INT4_CASES = [(1, 17, 64, 32), (5, 70, 128, 64), (20, 33, 128, 128), (3, 96, 256, 32)]

CHILD = """
import json, sys, torch
from kernels.int4 import int4_matmul_ref, pack_int4
from kernels.int8 import int8_matmul_ref
from kernels.triton_int4 import int4_matmul_triton
from kernels.triton_int8 import int8_matmul_triton

int8_cases, int4_cases = json.loads(sys.argv[1])
generator = torch.Generator().manual_seed(0)
errors = {}
for dtype in (torch.float32, torch.float16):
    for rows, out_features, in_features in int8_cases:
        weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, generator=generator)
        scales = torch.rand(out_features, generator=generator) * 0.01 + 1e-3
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        ref, out = int8_matmul_ref(x, weight, scales), int8_matmul_triton(x, weight, scales)
        assert out.dtype == dtype and out.shape == ref.shape
        rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        errors[f"int8 {rows}x{out_features}x{in_features} {dtype}"] = rel
    for rows, out_features, in_features, group_size in int4_cases:
        packed = pack_int4(torch.randint(0, 16, (out_features, in_features), generator=generator))
        scales_and_zeros = torch.randn(in_features // group_size, out_features, 2, generator=generator) * 0.05
        x = torch.randn(rows, in_features, generator=generator).to(dtype)
        ref = int4_matmul_ref(x, packed, scales_and_zeros, group_size)
        out = int4_matmul_triton(x, packed, scales_and_zeros, group_size)
        assert out.dtype == dtype and out.shape == ref.shape
        rel = ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
        errors[f"int4 {rows}x{out_features}x{in_features} g{group_size} {dtype}"] = rel
# Through the quantized modules: dispatch, leading dims, the bias, and the int4 CPU tile layout converted back.
from multimodal.quantize import QuantSpec, quantize_linear, set_backend

for spec in (QuantSpec("int8"), QuantSpec("int4", 32)):
    module = quantize_linear(torch.nn.Linear(64, 48), spec)
    x = torch.randn(2, 3, 64, generator=generator)
    with torch.no_grad():
        out, ref = set_backend(module, "triton")(x), set_backend(module, "reference")(x)
    assert out.shape == (2, 3, 48)
    errors[f"module {spec.scheme} float32"] = ((out - ref).abs().max() / ref.abs().max()).item()
print(json.dumps(errors))
"""


@pytest.fixture(scope="module")
def interpreted_errors():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps([INT8_CASES, INT4_CASES])],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_triton_kernels_match_reference_under_interpreter(interpreted_errors):
    assert len(interpreted_errors) == 2 * (len(INT8_CASES) + len(INT4_CASES)) + 2
    for case, relative_error in interpreted_errors.items():
        bound = 1e-5 if "float32" in case else 3e-3
        assert relative_error <= bound, f"{case}: relative error {relative_error:.2e} > {bound:.0e}"


def test_interpreter_setting_did_not_leak():
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernels_match_reference_on_gpu(dtype):
    from kernels.int4 import int4_matmul_ref, pack_int4
    from kernels.int8 import int8_matmul_ref
    from kernels.triton_int4 import int4_matmul_triton
    from kernels.triton_int8 import int8_matmul_triton

    generator = torch.Generator(device="cuda").manual_seed(0)
    for rows, out_features, in_features in INT8_CASES + [(1, 4096, 4096), (64, 1000, 512)]:
        weight = torch.randint(-127, 128, (out_features, in_features), dtype=torch.int8, device="cuda",
                               generator=generator)
        scales = torch.rand(out_features, device="cuda", generator=generator) * 0.01 + 1e-3
        x = torch.randn(rows, in_features, device="cuda", generator=generator).to(dtype)
        ref, out = int8_matmul_ref(x, weight, scales), int8_matmul_triton(x, weight, scales)
        assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
    for rows, out_features, in_features, group_size in INT4_CASES + [(1, 4096, 4096, 128), (64, 1000, 512, 64)]:
        values = torch.randint(0, 16, (out_features, in_features), device="cuda", generator=generator)
        scales_and_zeros = torch.randn(in_features // group_size, out_features, 2, device="cuda",
                                       generator=generator) * 0.05
        x = torch.randn(rows, in_features, device="cuda", generator=generator).to(dtype)
        packed = pack_int4(values)
        ref = int4_matmul_ref(x, packed, scales_and_zeros, group_size)
        out = int4_matmul_triton(x, packed, scales_and_zeros, group_size)
        assert (out.float() - ref.float()).abs().max() <= 2e-2 * ref.float().abs().max()
