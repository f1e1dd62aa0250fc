"""The fused, chunked SoftTriple similarity equals the simple composition (values, gradients)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from reference_losses import center_regularizer
from softtriple.losses import SoftTripleLoss
from softtriple.losses._fused import smoothed_max_similarity
from softtriple.losses._triton import interpreting, triton_smoothed_max_similarity, usable
from softtriple.losses.softtriple import relaxed_class_similarity


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,c,k,d,chunk,gamma", [
    (5, 7, 3, 8, 2, 0.1),      # 7 classes in chunks of 2: a ragged last chunk
    (1, 1, 1, 4, 256, 0.5),
    (16, 33, 10, 16, 8, 0.1),
    (9, 100, 4, 32, 256, 0.05),
    (4, 11, 5, 6, 11, 2.0),
    (8, 9, 3, 8, 4, 0.01),    # small gamma: the per-row max is subtracted, not a fixed shift
])
def test_fused_equals_simple(dtype, tol, b, c, k, d, chunk, gamma):
    g = torch.Generator().manual_seed(b * 1000 + c)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).requires_grad_(True)
    w = torch.randn(c, k, d, generator=g, dtype=dtype).requires_grad_(True)
    upstream = torch.randn(b, c, generator=g, dtype=dtype)
    fused = smoothed_max_similarity(x, w, gamma, chunk)
    simple = relaxed_class_similarity(x, F.normalize(w, dim=2), gamma)
    gf = torch.autograd.grad(fused, [x, w], upstream)
    gs = torch.autograd.grad(simple, [x, w], upstream)
    torch.testing.assert_close(fused, simple, rtol=tol, atol=tol)
    for a, e in zip(gf, gs, strict=True):
        torch.testing.assert_close(a, e, rtol=tol * 10, atol=tol * 10)


def test_fused_gradcheck():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_, w_: smoothed_max_similarity(F.normalize(x_, dim=1), w_, 0.2, 3), (x, w))


def test_loss_with_fused_path_equals_simple_composition():
    torch.manual_seed(1)
    loss_fn = SoftTripleLoss(37, 16, 10).double()
    loss_fn.chunk = 5
    x = torch.randn(12, 16, dtype=torch.float64)
    y = torch.randint(0, 37, (12,))
    ours = loss_fn(x, y)
    w = F.normalize(loss_fn.centers, dim=2)
    sim = relaxed_class_similarity(F.normalize(x, dim=1), w, loss_fn.gamma)
    logits = loss_fn.la * (sim - loss_fn.margin * F.one_hot(y, 37).double())
    simple = F.cross_entropy(logits, y) + loss_fn.tau * center_regularizer(w)
    assert float(ours) == pytest.approx(float(simple), rel=1e-12)


def test_fused_rejects_zero_gamma():
    with pytest.raises(ValueError, match="gamma > 0"):
        smoothed_max_similarity(torch.randn(2, 3), torch.randn(2, 2, 3), 0.0)


def test_compiled_path_equals_eager():
    """The optional torch.compile path computes the same values and gradients."""
    g = torch.Generator().manual_seed(2)
    x = F.normalize(torch.randn(6, 8, generator=g), dim=1).requires_grad_(True)
    w = torch.randn(9, 4, 8, generator=g).requires_grad_(True)
    upstream = torch.randn(6, 9, generator=g)
    results = []
    for compiled in (False, True):
        out = smoothed_max_similarity(x, w, 0.1, chunk=4, compiled=compiled)
        results.append((out, *torch.autograd.grad(out, [x, w], upstream)))
    for a, e in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("c,k", [(1, 2), (5, 3), (7, 10)])
def test_fused_regularizer_equals_simple(c, k):
    from softtriple.losses._fused import center_regularizer_fused
    w = torch.randn(c, k, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(c))
    w1, w2 = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    fused, simple = center_regularizer_fused(w1), center_regularizer(F.normalize(w2, dim=2))
    (3.0 * fused).backward()
    (3.0 * simple).backward()
    assert float(fused) == pytest.approx(float(simple), rel=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(center_regularizer_fused, (w.clone().requires_grad_(True),))


# the GPU twin: Triton kernels (losses/_triton.py), interpreted on CPU tensors where no GPU is
# visible (conftest sets TRITON_INTERPRET=1), compiled on CUDA tensors where one is
triton = pytest.importorskip("triton")
KERNEL_DEVICES = ["cpu"] if interpreting() else ["cuda"] if torch.cuda.is_available() else []


@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("b,c,k,d,gamma", [
    (5, 7, 3, 8, 0.1),
    (1, 1, 1, 4, 0.5),
    (16, 33, 10, 16, 0.1),    # K = 10 padded to 16 lanes
    (9, 100, 4, 32, 0.05),
    (4, 11, 5, 6, 2.0),
    (8, 9, 3, 8, 0.01),       # small gamma: exp(-2 / gamma) underflows without the row max
    (3, 300, 2, 8, 0.1),      # several class blocks a row
])
def test_triton_kernels_equal_the_simple_composition(device, dtype, tol, b, c, k, d, gamma):
    g = torch.Generator().manual_seed(b * 1000 + c)
    x = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=1).to(device)
    w = torch.randn(c, k, d, generator=g, dtype=dtype).to(device)
    upstream = torch.randn(b, c, generator=g, dtype=dtype).to(device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    fast = triton_smoothed_max_similarity(x, w, gamma)
    simple = relaxed_class_similarity(x, F.normalize(w, dim=2), gamma)
    torch.testing.assert_close(fast, simple, rtol=tol, atol=tol)
    for a, e in zip(torch.autograd.grad(fast, [x, w], upstream),
                    torch.autograd.grad(simple, [x, w], upstream), strict=True):
        torch.testing.assert_close(a, e, rtol=tol * 10, atol=tol * 10)


@pytest.mark.parametrize("device", KERNEL_DEVICES)
def test_triton_kernels_gradcheck(device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    w = torch.randn(4, 3, 5, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x_, w_: triton_smoothed_max_similarity(F.normalize(x_, dim=1), w_, 0.2), (x, w))


def test_triton_serves_cuda_tensors_only():
    """Training on a CPU keeps the chunked path; CUDA tensors take the kernels (compiled)."""
    assert not usable(torch.zeros(2, 2))
    if torch.cuda.is_available() and not interpreting():
        assert usable(torch.zeros(2, 2, device="cuda"))


HOPPER = """
import inspect
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from softtriple.losses import _triton_kernels as kernels
sizes = {"K": 10, "BLOCK_C": 128, "BLOCK_K": 16}
by_index = "constexprs" in inspect.signature(ASTSource.__init__).parameters  # Triton >= 3.3
for dtype in ("fp32", "fp64"):
    for fn in (kernels.forward, kernels.backward):
        signature = {n: f"*{dtype}" if n.endswith("_ptr") else "i32"
                     for n in fn.arg_names if n not in sizes}
        if by_index:
            signature |= dict.fromkeys(sizes, "constexpr")
            source = ASTSource(fn=fn, signature=signature, constexprs={
                (fn.arg_names.index(n),): v for n, v in sizes.items()})
        else:  # Triton 3.2 (torch 2.6): the constants by name, apart from the signature
            source = ASTSource(fn=fn, signature=signature, constants=dict(sizes))
        out = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert out.asm["cubin"], fn
print("compiled")
"""


def test_triton_kernels_compile_for_hopper():
    """The kernels go through Triton's whole compiler to a cubin for sm_90 (H100/H200) without
    a GPU: the interpreter does not check what only the compiler refuses (in a fresh process,
    since this one may interpret)."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    done = subprocess.run([sys.executable, "-c", HOPPER], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the dispatch to Triton")
def test_softtriple_loss_on_cuda_equals_the_cpu_loss():
    torch.manual_seed(3)
    loss_fn = SoftTripleLoss(300, 32, 10)
    x = torch.randn(64, 32, requires_grad=True)
    y = torch.randint(0, 300, (64,))
    cpu = loss_fn(x, y)
    cpu_grads = torch.autograd.grad(cpu, [x, loss_fn.centers])
    gpu_fn = loss_fn.cuda()
    xc = x.detach().cuda().requires_grad_(True)
    gpu = gpu_fn(xc, y.cuda())
    gpu_grads = torch.autograd.grad(gpu, [xc, gpu_fn.centers])
    torch.testing.assert_close(gpu.cpu(), cpu.detach(), rtol=1e-5, atol=1e-6)
    for a, e in zip(gpu_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a.cpu(), e, rtol=1e-4, atol=1e-6)
