"""Tests for fdsl.py: one test per promise the code makes. CPU only, a few minutes on 2 cores.

    python -m pytest -q test_fdsl.py
"""

import argparse
import json
import math
import os
import re
import shlex
import socket
import subprocess
import sys
import urllib.error

import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from torch.utils._python_dispatch import TorchDispatchMode

import fdsl

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(2)


def correlated(n, d, seed=0, dtype=torch.float64):
    """n samples of d strongly correlated, unevenly scaled axes with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype) + 2.0 * torch.ones(d, d, dtype=dtype)
    return torch.randn(n, d, generator=g, dtype=dtype) @ mix + 3.0


def block_covariances(y, groups):
    """Per-group covariance (biased) of y: N x D -> G x S x S."""
    n, d = y.shape
    yg = (y - y.mean(0)).reshape(n, groups, d // groups).transpose(0, 1)
    return yg.transpose(1, 2) @ yg / n


# ---------------------------------------------------------------------------------------------
# GroupWhitening
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,shuffle", [(1, False), (4, False), (4, True), (16, True)])
def test_whitening_makes_each_group_covariance_identity(groups, shuffle):
    torch.manual_seed(0)
    layer = fdsl.GroupWhitening(64, groups=groups, shuffle=shuffle, eps=1e-9)
    x = correlated(512, 64)
    y = layer(x)
    # The groups are formed in the permuted order: look at the output in that order.
    perm = layer.last_perm if shuffle else torch.arange(64)
    cov = block_covariances(y[:, perm], groups)
    eye = torch.eye(64 // groups, dtype=torch.float64).expand_as(cov)
    assert (cov - eye).abs().max() < 1e-3
    assert y.mean(0).abs().max() < 1e-6
    # ...and with groups > 1 the input really was strongly correlated across groups,
    # so the identity above is the layer's doing, not the data's.
    assert block_covariances(x, 1)[0].abs().max() > 10


def test_shuffle_draws_a_new_permutation_every_call():
    torch.manual_seed(0)
    layer = fdsl.GroupWhitening(64, groups=4, shuffle=True)
    x = correlated(256, 64)
    layer(x)
    p1 = layer.last_perm.clone()
    layer(x)
    assert not torch.equal(p1, layer.last_perm)
    assert torch.equal(p1.sort().values, torch.arange(64))


def test_unpermute_puts_every_axis_back():
    # Whitening an already white batch is the identity for any grouping, so with shuffling on,
    # the output equals the input exactly when every axis is returned to its own place.
    torch.manual_seed(0)
    n, d = 256, 64
    xc = torch.randn(n, d, dtype=torch.float64)
    xc -= xc.mean(0)
    white = torch.linalg.qr(xc).Q * math.sqrt(n)  # orthonormal centred columns: covariance = I
    layer = fdsl.GroupWhitening(d, groups=8, shuffle=True, eps=0.0)
    for _ in range(3):
        y = layer(white)
        assert not torch.equal(layer.last_perm, torch.arange(d))
        torch.testing.assert_close(y, white, atol=1e-8, rtol=0)


def authors_shuffled_group_whitening(x, groups, shuffle=True):
    """The authors' layer, written from their algorithm for this test: a permutation from the default
    CPU generator, groups, centring, biased covariance, eigh, U diag(l^-1/2) U^T, the permutation undone."""
    n, d = x.shape
    perm = torch.randperm(d) if shuffle else torch.arange(d)
    h = x[:, perm].reshape(n, groups, d // groups)
    h = (h - h.mean(0, keepdim=True)).transpose(0, 1)  # G x N x S
    evals, u = torch.linalg.eigh(h.transpose(1, 2) @ h / n)
    y = h @ u @ torch.diag_embed(evals.rsqrt()) @ u.transpose(1, 2)
    return y.transpose(0, 1).reshape(n, d)[:, torch.argsort(perm)]


@pytest.mark.parametrize("groups,shuffle", [(16, True), (4, True), (1, False), (8, False)])
def test_the_layer_is_the_authors_algorithm(groups, shuffle):
    # Same seed, same permutation; eps=0 leaves only the float64 floor (S x 2.2e-16) between them.
    # Correlated axes with a covariance of condition number about 2e3: eigh itself is then exact to
    # about 1e-12 (at the 1e7 of correlated(256, 128), 1e-9, for the authors' layer as for this one).
    g = torch.Generator().manual_seed(0)
    mix = torch.eye(128, dtype=torch.float64) + 0.08 * torch.randn(128, 128, generator=g, dtype=torch.float64)
    x = torch.randn(256, 128, generator=g, dtype=torch.float64) @ mix + 3.0
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(256, 128, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    y = fdsl.GroupWhitening(128, groups=groups, shuffle=shuffle, eps=0.0)(ours)
    torch.manual_seed(3)
    ref = authors_shuffled_group_whitening(theirs, groups, shuffle)
    assert (y - ref).abs().max() < 1e-10 * ref.abs().max()
    (y * target).sum().backward()
    (ref * target).sum().backward()
    assert (ours.grad - theirs.grad).abs().max() < 1e-10 * theirs.grad.abs().max()
    with pytest.raises(ValueError, match="one view per call"):  # both views stacked: refused, not mixed
        fdsl.GroupWhitening(128, groups=groups)(torch.stack([x, x]))


@pytest.mark.parametrize("arch,predictor", [("small", False), ("small", True), ("resnet18", False)])
def test_each_view_is_normalized_with_its_own_statistics(arch, predictor):
    # One call per view: view 1's outputs do not depend on view 2 (a joint call on both views
    # would mix their BatchNorm statistics), and they are what a lone call of that view gives.
    cfg = fdsl.build_parser().parse_args(["--arch", arch, "--proj-dim", "64", "--proj-hidden", "128", "--groups",
                                          "8", "--pred-hidden", "32"] + ["--predictor"] * predictor)
    torch.manual_seed(0)
    net = fdsl.build_model(cfg)
    x1, x2 = fdsl.augment(torch.cat([images(16)] * 2), torch.Generator().manual_seed(0)).chunk(2)
    outs = []
    for other in (x2, x2.flip(0) * 2):
        torch.manual_seed(1)  # the same permutations in the paper's layer
        outs.append(net(x1, other))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][2], outs[1][2])  # p1, z1
    assert not torch.allclose(outs[0][1], outs[1][1])  # p2 did change
    torch.manual_seed(1)
    p1, z1 = net.embed(x1)
    assert torch.equal(p1, outs[0][0]) and torch.equal(z1, outs[0][2])
    with torch.no_grad():  # ...and it matters: one call on both views gives view 1 other outputs
        assert not torch.allclose(net.project(torch.cat([x1, x2]))[:16], net.project(x1), atol=1e-4)


def test_bn_is_batch_standardization_without_affine():
    x = correlated(128, 32).float()
    ref = torch.nn.BatchNorm1d(32, affine=False, eps=1e-30).train()(x)  # the authors' BatchNorm: eps 0
    torch.testing.assert_close(ref, F.batch_norm(x, None, None, training=True, eps=1e-30))
    layer = fdsl.Standardize(32)
    assert not list(layer.buffers())  # no running averages
    torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.eval()(x), ref, atol=1e-5, rtol=1e-5)  # eval mode: the batch's too
    assert layer(x).dtype == torch.float32  # computed in float64, returned in the input's dtype
    # Standardized, yet still correlated: exactly the dimensional-collapse loophole.
    assert fdsl.collapse_metrics(layer(x))["corr_strength"] > 0.5
    with pytest.raises(ValueError, match="at least 2 samples"):
        layer(x[:1])


@pytest.mark.parametrize("kind,groups,method", [("zca", 4, "eigh"), ("zca", 4, "newton"), ("zca", 1, "newton"),
                                                ("bn", None, "eigh")])
def test_shrinking_the_input_cannot_change_the_output_or_the_loss(kind, groups, method):
    x1, x2 = correlated(64, 32, seed=1), correlated(64, 32, seed=2)
    layer = fdsl.Standardize(32) if kind == "bn" else fdsl.GroupWhitening(32, groups=groups, method=method)

    def out(c):
        torch.manual_seed(0)  # the same permutations for every scale
        z1, z2 = layer(c * x1), layer(c * x2)
        return z1, fdsl.siamese_loss(z1, z2, z1, z2)
    ref, ref_loss = out(1.0)
    for c in (1e-6, 1e-3, 1e3, 1e6):
        z, loss = out(c)
        torch.testing.assert_close(z, ref, atol=1e-9, rtol=1e-7)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    # An absolute eps (what the layer used to do, and what F.batch_norm does) is not invariant:
    # a 1000x smaller input gives a visibly smaller output, the route to a lower loss.
    small = F.batch_norm(1e-4 * x1, None, None, training=True, eps=1e-5)
    assert (small.std(0) < 0.5).all()


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_constant_axes_give_zeros_and_finite_gradients(method):
    x = correlated(64, 16).clone()
    x[:, 3] = 2.0  # one constant axis in group 0 (axes 0-3)
    x[:, 12:] = -1.0  # group 3 entirely constant
    x.requires_grad_()
    layer = fdsl.GroupWhitening(16, groups=4, shuffle=False, method=method)
    y = layer(x)
    assert torch.isfinite(y).all()
    assert y[:, 3].abs().max() == 0 and y[:, 12:].abs().max() == 0  # nothing to whiten: 0
    cov = block_covariances(y[:, :3], 1)[0]  # the rest of group 0 is still whitened
    torch.testing.assert_close(cov, torch.eye(3, dtype=cov.dtype), atol=1e-3, rtol=0)
    (y * torch.randn(64, 16, dtype=y.dtype)).sum().backward()
    assert torch.isfinite(x.grad).all()
    bn = fdsl.Standardize(16)(x.detach())
    assert torch.isfinite(bn).all() and bn[:, 3].abs().max() == 0


def spectrum_case(n, size, cond, rank=None, seed=0):
    """n samples whose covariance has eigenvalues spread log-evenly over `cond` (condition
    number), the last size - rank of them exactly 0; random orientation, mean and scale."""
    g = torch.Generator().manual_seed(seed)
    q = torch.linalg.qr(torch.randn(size, size, generator=g, dtype=torch.float64)).Q
    evals = torch.logspace(0, -math.log10(cond), size, dtype=torch.float64)
    if rank:
        evals[rank:] = 0
    white = torch.randn(n, size, generator=g, dtype=torch.float64)
    white = torch.linalg.qr(white - white.mean(0)).Q * math.sqrt(n)  # covariance exactly I
    return (white * evals.sqrt()) @ q.T * 3.0 + 1.0


def whiten_with_grad(x, method, dtype, eps=1e-8, seed=1):
    """Output and input gradient of full-group whitening (one group of all axes) of x."""
    target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    layer = fdsl.GroupWhitening(x.shape[1], groups=1, shuffle=False, method=method, dtype=dtype, eps=eps)
    xi = x.to(dtype).clone().requires_grad_()
    y = layer(xi)
    (y * target.to(dtype)).sum().backward()
    return y.detach().double(), xi.grad.double()


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# (group size, condition number, rank): full-rank and rank-deficient groups, 8 to 256 axes
GRID = [(8, 1, None), (8, 1e5, None), (32, 1e3, None), (32, 1e5, None), (32, 1e5, 10),
        (128, 1e5, 40), (256, 1e5, None), (256, 1e2, 100)]


@pytest.mark.parametrize("size,cond,rank", GRID)
def test_newton_equals_eigh_in_float64(size, cond, rank):
    x = spectrum_case(max(2 * size, 64), size, cond, rank)
    y_ref, g_ref = whiten_with_grad(x, "eigh", torch.float64)
    y, g = whiten_with_grad(x, "newton", torch.float64)
    assert rel_err(y, y_ref) < 1e-6 and rel_err(g, g_ref) < 1e-5


@pytest.mark.parametrize("size,cond,rank", GRID)
def test_newton_in_float32_against_eigh_in_float32(size, cond, rank):
    # Both against the float64 reference at the eps float32 can honor (whitening_eps). At the
    # default eps (raised to that floor): always finite, errors bounded.
    x = spectrum_case(max(2 * size, 64), size, cond, rank)
    y_ref, g_ref = whiten_with_grad(x, "eigh", torch.float64, eps=fdsl.whitening_eps(1e-8, size, torch.float32))
    for method in ("eigh", "newton"):
        y, g = whiten_with_grad(x, method, torch.float32)
        assert torch.isfinite(y).all() and torch.isfinite(g).all()
        assert rel_err(y, y_ref) < 1e-2 and rel_err(g, g_ref) < 5e-2
    # At eps = 1e-5, measured (README): on full-rank groups newton is as accurate as eigh to
    # float32's rounding (1e-6), and more accurate on the ill-conditioned ones. On rank-deficient
    # groups its outputs are as good along the data's own directions, but it leaks about 3e-3
    # (relative) into the directions where the data has no variance, where eigh leaks about
    # 3e-4; their gradients are alike there.
    eps = fdsl.whitening_eps(1e-5, size, torch.float32)
    y_ref, g_ref = whiten_with_grad(x, "eigh", torch.float64, eps=eps)
    y_e, g_e = whiten_with_grad(x, "eigh", torch.float32, eps=eps)
    y_n, g_n = whiten_with_grad(x, "newton", torch.float32, eps=eps)
    if rank is None:
        assert rel_err(y_n, y_ref) <= max(rel_err(y_e, y_ref), 1e-6)
        assert rel_err(g_n, g_ref) <= max(rel_err(g_e, g_ref), 1e-6)
    else:
        xc = x - x.mean(0)
        evals, evecs = torch.linalg.eigh(xc.T @ xc)
        data_dirs = evecs[:, size - rank:]  # the directions where the data varies
        assert rel_err(y_n @ data_dirs, y_ref @ data_dirs) <= rel_err(y_e @ data_dirs, y_ref @ data_dirs)
        assert rel_err(y_n, y_ref) < 1e-2
        assert rel_err(g_n, g_ref) < 1.5 * rel_err(g_e, g_ref)


def repeated_eigenvalue_cases():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 3, generator=g, dtype=torch.float64)
    white = torch.linalg.qr(base - base.mean(0)).Q * 4  # covariance exactly I: one eigenvalue, 3 times
    return {"white": white, "duplicated axes": torch.cat([base, base, base[:, :2]], 1),  # rank 3 of 8
            "condition 1e3": spectrum_case(32, 8, 1e3)}  # and a plain full-rank group


@pytest.mark.parametrize("case", ["white", "duplicated axes", "condition 1e3"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_repeated_eigenvalues_give_correct_gradients(case, method):
    # Autograd through torch.linalg.eigh divides by l_i - l_j and gave inf/NaN gradients for
    # the white case, in float32 and float64 (torch 2.14); the closed form and Newton do not.
    # eps 1e-5: the rank-deficient case has derivatives of order (eps m)^(-1/2) off its span,
    # and at the default 1e-8 the finite differences themselves are no longer accurate.
    x = repeated_eigenvalue_cases()[case]
    layer = fdsl.GroupWhitening(x.shape[1], groups=1, shuffle=False, method=method, eps=1e-5)
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)
    _, g64 = whiten_with_grad(x, method, torch.float64, eps=1e-5)
    _, g32 = whiten_with_grad(x, method, torch.float32, eps=1e-5)
    assert torch.isfinite(g32).all() and rel_err(g32, g64) < 1e-2


def test_the_newton_layer_compiles_without_a_graph_break():
    # torch.compile(fullgraph=True) refuses a graph break, such as a Python branch on a
    # tensor's value, which a CUDA graph could not hold either. Tracing (backend "eager":
    # nothing is compiled) checks the whole Newton layer on the CPU. It is not a proof that a
    # CUDA graph can hold the layer (recent dynamo traces .item() without a break, and eigh's
    # host-side error check only shows on a GPU): the GPU check captures it for real.
    torch._dynamo.reset()
    layer = fdsl.GroupWhitening(64, groups=4, shuffle=True, method="newton")
    x = correlated(32, 64, dtype=torch.float32)
    traced = torch.compile(layer, fullgraph=True, backend="eager")
    torch.manual_seed(0)
    y = traced(x)
    torch.manual_seed(0)
    torch.testing.assert_close(y, layer(x))
    with pytest.raises(Exception):  # the same check catches a branch on the data
        torch._dynamo.reset()
        torch.compile(lambda t: layer(t) if t.sum() > 0 else -layer(t), fullgraph=True, backend="eager")(x)
    torch._dynamo.reset()


def test_newton_steps_cover_the_worst_conditioned_group():
    # The schedule comes from the bound on the condition number that the relative eps gives
    # (every eigenvalue >= eps); a group at that bound must have converged.
    size, eps = 64, 1e-8
    scales = fdsl.newton_scales(size, eps, torch.float64)
    evals = torch.full((size,), eps, dtype=torch.float64)
    evals[0] = size  # one direction holds all the variance: the largest spread possible
    q = torch.linalg.qr(torch.randn(size, size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)).Q
    a = (q * evals) @ q.T
    exact = (q * evals.rsqrt()) @ q.T
    w = lambda s: fdsl.inverse_sqrt_newton(a[None], s)[0]
    assert rel_err(w(scales), w(scales + [1.0] * 10)) < 1e-10  # converged: more steps change nothing
    # ...to the right matrix, as far as its condition number (6e9) lets any method: eigh on the
    # same rounded matrix is 1.8e-7 from `exact` too.
    assert rel_err(w(scales), exact) < 1e-6
    assert rel_err(w(scales[:-4]), exact) > 1e-2  # fewer is not enough
    assert rel_err(w([1.0] * len(scales)), exact) > 1e-3  # as many unscaled steps are not either


def test_newton_whitening_of_16_groups_of_32_takes_at_most_56_matrix_products():
    from torch.overrides import TorchFunctionMode

    class CountProducts(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.n += func in (torch.Tensor.__matmul__, torch.matmul, torch.bmm, torch.Tensor.matmul)
            return func(*args, **(kwargs or {}))
    layer = fdsl.GroupWhitening(512, groups=16, method="newton")
    with torch.no_grad(), CountProducts() as count:
        y = layer(torch.randn(64, 512))  # one view: each product is batched over the 16 groups
    assert count.n == 3 * len(fdsl.newton_scales(32, 1e-8, torch.float64)) + 2 <= 56  # + C and xc W
    assert torch.isfinite(y).all()


def test_whitening_gradients_are_finite():
    torch.manual_seed(0)
    layer = fdsl.GroupWhitening(64, groups=16, shuffle=True)
    x = correlated(64, 64, dtype=torch.float32).requires_grad_()
    target = torch.randn(64, 64)
    ((layer(x) - target) ** 2).sum().backward()
    assert x.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def readme_block(after, lang):
    """The first ```lang block of README.md after the line containing `after`."""
    text = open(os.path.join(HERE, "README.md")).read()
    at = re.search(r"\s+".join(map(re.escape, after.split())), text).end()  # across line breaks
    return re.search(rf"```{lang}\n(.*?)```", text[at:], re.S).group(1)


COPY_IMPORTS = "Put these imports at the top of your file"  # README's instruction, word for word
COPY_COMMAND = "writes both blocks, with these imports, to whitening.py"


def copied_whitening_layer():
    """What a reader gets by following README: its import lines, then fdsl.py's copy blocks."""
    lines = open(os.path.join(HERE, "fdsl.py")).read().splitlines(keepends=True)
    starts = [i for i, l in enumerate(lines) if l.startswith("# --- copy from here")]
    ends = [i for i, l in enumerate(lines) if l.startswith("# --- copy to here")]
    assert len(starts) == len(ends) == 2
    blocks = "".join("".join(lines[s:e + 1]) for s, e in zip(starts, ends))
    imports = readme_block(COPY_IMPORTS, "python")
    assert set(re.findall(r"^import (\S+)", imports, re.M)) <= {"contextlib", "math", "torch", "torch.nn",
                                                                "torch.nn.functional", "torch.distributed"}
    namespace = {}
    exec(compile(imports + blocks, "copied.py", "exec"), namespace)
    return namespace, blocks


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_the_whitening_layer_copies_out_and_runs_alone(method):
    ns, blocks = copied_whitening_layer()
    assert "U diag(l^-1/2) U^T" in blocks  # the ZCA formula is in what a reader copies
    x = correlated(256, 64)
    for shuffle in (True, False):
        for training in (True, False):
            layer = ns["GroupWhitening"](64, groups=4, shuffle=shuffle, eps=1e-8, dtype=torch.float64,
                                         method=method).train(training)
            xi = x.clone().requires_grad_()
            torch.manual_seed(0)
            y = layer(xi)
            torch.manual_seed(0)
            assert torch.equal(y, fdsl.GroupWhitening(64, 4, shuffle, 1e-8, torch.float64, method).train(training)(x))
            perm = layer.last_perm if shuffle else torch.arange(64)
            cov = block_covariances(y[:, perm].detach(), 4)
            assert (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 1e-3
            (y * torch.randn_like(y)).sum().backward()
            assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0
    # The layer leaves autocast itself: under bf16 autocast its float32 math stays float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer = ns["GroupWhitening"](64, groups=4, dtype=torch.float32, method=method)
        y = layer(x.float())
    cov = block_covariances(y.double()[:, layer.last_perm], 4)
    assert y.dtype == torch.float32 and (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 1e-3
    # A group not smaller than the batch is refused by the copied layer too, not whitened badly.
    with pytest.raises(ValueError, match="need more than 64 samples, got 32"):
        ns["GroupWhitening"](64, groups=1, method=method)(torch.randn(32, 64))
    # The paper's "BN" comes with it.
    torch.testing.assert_close(ns["Standardize"](64)(x), fdsl.Standardize(64)(x), atol=0, rtol=0)


def toy_siamese_training(norm, steps=30):
    """A student's toy: an MLP on two noisy views of 2-d points, `norm` after it, the paper's loss."""
    g = torch.Generator().manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = torch.randn(512, 8, generator=g)
    losses = []
    for i in range(steps):
        x = data[torch.randint(0, 512, (64,), generator=g)]
        z1 = norm(net(x + 0.3 * torch.randn(x.shape, generator=g)))
        z2 = norm(net(x + 0.3 * torch.randn(x.shape, generator=g)))
        loss = (z1 - z2).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        return losses, norm(net(data))


def test_readmes_command_writes_a_whitening_module_a_student_trains_with(tmp_path):
    import shutil
    shutil.copy(os.path.join(HERE, "fdsl.py"), tmp_path / "fdsl.py")
    subprocess.run(["bash", "-c", readme_block(COPY_COMMAND, "bash")], cwd=tmp_path, check=True)
    source = (tmp_path / "whitening.py").read_text()
    assert not re.search(r"^(import|from) (torchvision|PIL|tqdm)", source, re.M)  # the layers need none of it
    sys.path.insert(0, str(tmp_path))
    try:
        import whitening
    finally:
        sys.path.remove(str(tmp_path))
    for make in (lambda: whitening.GroupWhitening(16, groups=4), lambda: whitening.Standardize(16)):
        losses, z = toy_siamese_training(make())
        assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
        assert z.std(0).mean().item() == pytest.approx(1.0, abs=0.05)  # no complete collapse: the layer forbids it


def test_every_misuse_of_the_copied_layer_is_answered_in_words():
    ns, _ = copied_whitening_layer()
    GW, ST = ns["GroupWhitening"], ns["Standardize"]
    x = correlated(64, 16).float()
    nan = x.clone()
    nan[5, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or inf"):  # eigh: not LAPACK's "failed to converge"
        GW(16, groups=4)(nan)
    # newton cannot look without waiting for the device every call: its docstring says what happens
    assert torch.isnan(GW(16, groups=4, method="newton")(nan)).any()
    assert re.search(r"a NaN in x makes its\s+group's outputs NaN", ns["GroupWhitening"].__doc__)
    for half in (torch.float16, torch.bfloat16):
        for layer in (lambda: GW(16, groups=4, dtype=half), lambda: ST(16, dtype=half)):
            with pytest.raises(ValueError, match="float32 or float64.*half-precision inputs are fine"):
                layer()
        assert GW(16, groups=4, dtype=torch.float32)(x.to(half)).dtype == half  # half inputs: fine
    for layer in (GW(16, groups=4), ST(16)):
        with pytest.raises(TypeError, match="floating-point features, got torch.int64.*x.float"):
            layer(torch.randint(-2, 3, (64, 16)))
        with pytest.raises(ValueError, match="a batch of 1.*at least 2 samples"):
            layer(x[:1])
    with pytest.raises(ValueError, match="fewer than 8 axes"):
        GW(16, groups=2)(x[:8])
    with pytest.raises(TypeError, match=re.escape("'auto' is fdsl's command-line rule, groups = ceil(2 D / N)")):
        GW(16, groups="auto")
    with pytest.raises(TypeError, match="must be an int"):
        GW(16, groups=4.0)
    assert repr(GW(16, groups=4, shuffle=False, eps=1e-6, method="newton")) == (
        "GroupWhitening(16, groups=4, shuffle=False, eps=1e-06, dtype=torch.float64, method='newton', "
        "global_batch=False)")
    assert repr(ST(16)) == "Standardize(16, dtype=torch.float64, global_batch=False)"


def test_a_group_not_smaller_than_the_batch_is_refused():
    # 32 samples span 31 directions: a 64-axis group cannot be white (it came out 0.72 off).
    for n, groups in ((32, 1), (16, 4), (2, 32)):
        with pytest.raises(ValueError, match="samples"):
            fdsl.GroupWhitening(64, groups=groups)(torch.randn(n, 64))
    fdsl.GroupWhitening(64, groups=2)(torch.randn(33, 64))  # 32 axes, 33 samples: fine
    fdsl.GroupWhitening(64, groups=64)(torch.randn(2, 64))  # groups of one axis (bn) need 2


def test_groups_of_one_axis_get_the_same_eps_floor_as_larger_groups():
    x = correlated(64, 8).float()
    floor = fdsl.whitening_eps(0.0, 1, torch.float32)
    assert floor == torch.finfo(torch.float32).eps
    y = fdsl.GroupWhitening(8, groups=8, eps=0.0, dtype=torch.float32)(x)
    xc = x - x.mean(0)
    torch.testing.assert_close(y, xc / (xc.square().mean(0) * (1 + floor)).sqrt(), atol=1e-6, rtol=1e-6)


def test_whitening_rejects_bad_configurations():
    with pytest.raises(ValueError):
        fdsl.GroupWhitening(64, groups=5)
    with pytest.raises(ValueError):
        fdsl.GroupWhitening(64, groups=0)
    with pytest.raises(ValueError):
        fdsl.GroupWhitening(64, groups=4)(torch.randn(32, 48))
    with pytest.raises(ValueError):
        fdsl.GroupWhitening(64, groups=4, method="svd")
    with pytest.raises(ValueError):
        fdsl.GroupWhitening(64, groups=4, eps=-1e-3)
    with pytest.raises(ValueError, match="one view per call"):
        fdsl.GroupWhitening(64, groups=4)(torch.randn(2, 32, 64))


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------

def images(n=8, size=32, seed=0):
    return fdsl.make_synthetic(n, size, seed)[0]


def unnormalize(x):
    mean = torch.tensor(fdsl.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(fdsl.IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def test_augment_shapes_and_ranges():
    x = images(16)
    out = fdsl.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    pixels = unnormalize(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    # uint8 and float [0, 1] input are the same image to augment
    same = fdsl.augment(x.float() / 255, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, same)


def test_every_image_gets_its_own_crop():
    x = images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = fdsl.random_resized_crop_flip(fdsl.to_float(x), generator=torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert all((flat[i] - flat[j]).abs().max() > 0.05 for i in range(6) for j in range(i))


def test_augment_reproduces_with_a_seed():
    x = images(8)
    a = fdsl.augment(x, torch.Generator().manual_seed(3))
    b = fdsl.augment(x, torch.Generator().manual_seed(3))
    c = fdsl.augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_of_the_whole_image_is_exact_and_flip_is_a_mirror(mode):
    x = fdsl.to_float(images(4))
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), mode=mode)
    torch.testing.assert_close(fdsl.random_resized_crop_flip(x, flip_p=0.0, **whole), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(fdsl.random_resized_crop_flip(x, flip_p=1.0, **whole), x.flip(-1), atol=1e-5, rtol=0)
    crops = fdsl.random_resized_crop_flip(x, scale=(0.08, 1.0), mode=mode, generator=torch.Generator().manual_seed(0))
    assert crops.min() >= 0 and crops.max() <= 1  # bicubic overshoots; the probe's crop is clamped


def test_eval_transform_is_the_authors_resize_and_centre_crop():
    # The authors evaluate on PIL images after Resize(36, bicubic) and CenterCrop(32).
    from PIL import Image
    import torchvision.transforms as T
    x = images(16)
    pil = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32)])
    ref = torch.stack([TF.pil_to_tensor(pil(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in x])
    ours = fdsl.eval_transform(x)
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert (ours.int() - ref.int()).abs().max() <= 1  # PIL's rounding, at most one grey level
    assert (ours.int() - x.int()).abs().float().mean() > 5  # and it is not the raw image


def test_eval_transform_resizes_by_the_authors_rule_at_every_size():
    # int(size x 8/7): 36 for 32 px, 73 for 64 px (round(size x 9/8) would give 72)
    from PIL import Image
    import torchvision.transforms as T
    x = images(4, size=64)
    pil = T.Compose([T.Resize(73, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(64)])
    ref = torch.stack([TF.pil_to_tensor(pil(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in x])
    assert (fdsl.eval_transform(x).int() - ref.int()).abs().max() <= 1


def test_hue_shift_matches_torchvision():
    x = fdsl.to_float(images(4))
    h, s, v = fdsl._rgb_to_hsv(x)
    for shift in (0.0, 0.07, -0.1):
        mine = fdsl._hsv_to_rgb((h + shift) % 1.0, s, v)
        torch.testing.assert_close(mine, TF.adjust_hue(x, shift), atol=2e-5, rtol=0)


def test_color_jitter_off_is_identity_and_on_changes_colours():
    x = fdsl.to_float(images(8))
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(fdsl.color_jitter(x, p=0.0, generator=g), x, atol=1e-5, rtol=0)
    jittered = fdsl.color_jitter(x, p=1.0, generator=g)
    assert ((jittered - x).abs().flatten(1).amax(1) > 0.02).all()
    gray = fdsl.random_grayscale(x, p=1.0, generator=g)
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


# ---------------------------------------------------------------------------------------------
# Collapse metrics and k-NN
# ---------------------------------------------------------------------------------------------

def test_metrics_of_constant_features():
    m = fdsl.collapse_metrics(torch.ones(100, 16) * 3)
    assert m["std"] == 0 and m["std_l2"] == 0 and m["corr_strength"] == 0


def test_metrics_of_rank_one_features():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 1, generator=g) * torch.randn(1, 32, generator=g) + 0.5
    m = fdsl.collapse_metrics(z)
    assert m["corr_strength"] > 0.999
    assert m["eff_rank"] < 1.01
    assert m["spectrum"][0] == 1.0 and max(m["spectrum"][1:]) < 1e-6


def test_metrics_of_isotropic_gaussian():
    d = 32
    z = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    m = fdsl.collapse_metrics(z)
    assert abs(m["std_l2"] - 1 / math.sqrt(d)) < 0.02 / math.sqrt(d)
    assert abs(m["std"] - 1) < 0.02
    assert m["corr_strength"] < 0.02
    assert m["eff_rank"] > 0.98 * d
    assert len(m["spectrum"]) == d and m["spectrum"] == sorted(m["spectrum"], reverse=True)


def test_knn_is_perfect_on_separable_clusters_and_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 5
    ytr, yte = torch.arange(2000) % 10, torch.arange(1000) % 10
    ftr = centres[ytr] + torch.randn(2000, 64, generator=g)
    fte = centres[yte] + torch.randn(1000, 64, generator=g)
    assert fdsl.knn_accuracy(ftr, ytr, fte, yte, k=200, t=0.1, chunk=128) == 100.0
    noise_tr, noise_te = torch.randn(5000, 64, generator=g), torch.randn(2000, 64, generator=g)
    acc = fdsl.knn_accuracy(noise_tr, torch.randint(0, 10, (5000,), generator=g), noise_te,
                            torch.randint(0, 10, (2000,), generator=g))
    assert 6.0 < acc < 14.0


# ---------------------------------------------------------------------------------------------
# Data loading
# ---------------------------------------------------------------------------------------------

COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def write_image_folder(root, per_class=4):
    from PIL import Image
    for split in ("train", "test"):
        for name, rgb in COLOURS.items():
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                size = (32, 32) if i % 2 == 0 else (48, 40)  # some need resizing
                ext = "png" if i % 3 == 0 else "jpg"
                Image.new("RGB", size, rgb).save(os.path.join(root, split, name, f"{i}.{ext}"))


def test_image_folder_loads_through_the_real_path(tmp_path):
    write_image_folder(tmp_path)
    data = fdsl.load_image_folder(str(tmp_path), 32, progress=False)
    assert data.classes == ["blue", "green", "red"]  # ImageFolder order: sorted
    assert data.train_x.shape == (12, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (12, 3, 32, 32)
    assert data.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for label, rgb in enumerate(COLOURS.values()):  # each class has its colour in the right channel
        mean = data.train_x[data.train_y == label].float().mean((0, 2, 3))
        assert int(mean.argmax()) == max(range(3), key=lambda c: rgb[c])


def test_cifar_offline_gives_one_clear_message(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        fdsl.main(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dataset folder" in err and "--dataset synthetic" in err


def test_synthetic_data_is_deterministic_and_balanced():
    x1, y1 = fdsl.make_synthetic(200, 32, seed=5)
    x2, y2 = fdsl.make_synthetic(200, 32, seed=5)
    x3, _ = fdsl.make_synthetic(200, 32, seed=6)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.bincount(y1).tolist() == [20] * 10
    # Classes differ in shape, not in colour: mean colours of classes are alike.
    means = torch.stack([x1[y1 == c].float().mean((0, 2, 3)) for c in range(10)])
    assert (means.amax(0) - means.amin(0)).max() < 40


def test_balanced_subset():
    y = torch.arange(1000) % 10
    x = torch.arange(1000)
    xs, ys = fdsl.balanced_subset(x, y, 300, seed=0)
    assert torch.bincount(ys).tolist() == [30] * 10 and torch.equal(y[xs], ys)
    assert len(set(xs.tolist())) == 300


# ---------------------------------------------------------------------------------------------
# The paper's findings in miniature, end to end through main()
# ---------------------------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--arch", "small", "--train-subset", "1024", "--test-subset", "500",
        "--proj-dim", "128", "--proj-hidden", "256", "--groups", "4", "--batch-size", "64",
        "--lr", "0.1", "--warmup-epochs", "0", "--epochs", "4", "--eval-every", "0",
        "--metric-samples", "512", "--linear-epochs", "0", "--no-progress"]


def run_tiny(tmp_path, name, *extra):
    out = str(tmp_path / name)
    results = fdsl.main(TINY + ["--out", out, *extra])
    return results, fdsl.read_log(os.path.join(out, "log.jsonl"))


@pytest.fixture(scope="module")
def findings_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("findings")


@pytest.fixture(scope="module")
def findings(findings_dir):
    return {d: run_tiny(findings_dir, d, "--decorr", d) for d in ("none", "bn", "zca")}


def test_no_normalization_collapses_completely(findings):
    results, log = findings["none"]
    start, end = log[0]["collapse"]["projector"], results["collapse"]["projector"]
    assert end["std"] < start["std"] / 10
    assert end["std_l2"] < start["std_l2"] / 2


def test_standardization_and_whitening_prevent_complete_collapse(findings):
    for d in ("bn", "zca"):
        norm = findings[d][0]["collapse"]["normalized"]
        assert norm["std"] > 0.9  # the layer's output keeps unit scale by construction
        proj = findings[d][0]["collapse"]["projector"]
        assert proj["std"] > findings["none"][0]["collapse"]["projector"]["std"] * 10


def test_standardization_collapses_dimensions_and_whitening_does_not(findings):
    bn = findings["bn"][0]["collapse"]["projector"]
    zca = findings["zca"][0]["collapse"]["projector"]
    assert bn["corr_strength"] > 0.8 and bn["eff_rank"] < 5
    assert zca["corr_strength"] < bn["corr_strength"] - 0.3
    assert zca["eff_rank"] > 3 * bn["eff_rank"]


def test_groups_auto_is_the_authors_rule():
    groups = lambda *a: fdsl.resolve_config(["--groups", "auto", *a]).groups
    assert groups() == 16 and groups("--batch-size", "512") == 2 and groups("--batch-size", "32") == 32
    assert groups("--batch-size", "128", "--proj-dim", "2") == 1  # ceil(2 x D / N): groups of about N / 2


def test_run_writes_its_files(findings, findings_dir):
    results, log = findings["zca"]
    assert [row["epoch"] for row in log] == list(range(5))
    assert set(log[0]["collapse"]) == {"backbone", "projector", "normalized"}
    assert log[0]["loss"] is None and log[1]["loss"] > 0 and log[-1]["images_per_s"] > 0
    assert set(results["collapse"]) == {"backbone", "projector", "normalized"}
    assert 0 <= results["knn_acc"] <= 100 and results["epochs"] == 4
    assert results["knn_curve"][0][0] == 0 and results["knn_curve"][-1] == [4, results["knn_acc"]]
    assert results["train_step"] == "eager" and results["whiten_method"] == "eigh"  # CPU: eager, eigh
    config = json.loads((findings_dir / "zca" / "config.json").read_text())
    assert config["train_step"] == "eager" and config["whiten"] == "auto" and config["decorr"] == "zca"
    assert config["command"].startswith("python fdsl.py --dataset synthetic") and "--decorr zca" in config["command"]
    for made in (results, config):  # what made the numbers: libraries, device, this file's version
        assert made["torch"] == torch.__version__ and made["torchvision"] == torchvision.__version__
        assert "CPUs" in made["device_name"]
        assert re.fullmatch(r"[0-9a-f]{40}(\+modified sha256:[0-9a-f]{16})?", made["fdsl_version"])


def test_outside_a_checkout_the_version_is_the_files_hash(tmp_path, monkeypatch):
    import hashlib
    import shutil
    copied = tmp_path / "fdsl.py"  # a copy of the file, outside any git checkout
    shutil.copy(os.path.join(HERE, "fdsl.py"), copied)
    monkeypatch.setattr(fdsl, "__file__", str(copied))
    assert fdsl.code_version() == "sha256:" + hashlib.sha256(copied.read_bytes()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Command line: bad input, interruption, resume
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--decorr", "pca"], "invalid choice"),
    (["--groups", "5"], "does not divide"),
    (["--groups", "2"], "smaller than the batch"),
    (["--batch-size", "1"], "at least 2"),
    (["--dataset", "folder", "--data-dir", "/nonexistent/fdsl"], "no image folder"),
    (["--resume", "/nonexistent/run"], "no checkpoint"),
    (["--epochs", "0"], "at least 1"),
    (["--eps", "-1"], "must be 0 or more"),
    (["--proj-dim", "2"], "--groups 16 does not divide --proj-dim 2"),
    (["--groups", "auto", "--batch-size", "48"], "--groups auto (ceil(2 x 512 / 48) = 22) does not divide"),
    (["--groups", "two"], "invalid group_count value"),
    (["--device", "cpu", "--precision", "fp16"], "not supported on cpu"),
])
def test_bad_input_exits_2_with_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        fdsl.main(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "\n" not in err and "Traceback" not in err


def test_bad_input_from_the_shell_has_no_traceback():
    p = subprocess.run([sys.executable, os.path.join(HERE, "fdsl.py"), "--groups", "3"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("fdsl: error:") and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


SHORT = ["--dataset", "synthetic", "--arch", "small", "--train-subset", "256", "--test-subset", "200",
         "--proj-dim", "64", "--proj-hidden", "128", "--groups", "4", "--batch-size", "32",
         "--epochs", "3", "--eval-every", "1", "--metric-samples", "64", "--linear-epochs", "1", "--no-progress"]


def ctrl_c_in_epoch(monkeypatch, n):
    """train_one_epoch raises KeyboardInterrupt in epoch n, as Ctrl-C would. -> the real one."""
    real, calls = fdsl.train_one_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(fdsl, "train_one_epoch", interrupted)
    return real


def test_resume_after_interruption_continues_exactly(tmp_path, monkeypatch, capsys):
    straight = fdsl.main(SHORT + ["--out", str(tmp_path / "a")])
    real = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--out", str(tmp_path / "b")])
    assert e.value.code == 130
    assert f"continue with: python fdsl.py --resume {tmp_path / 'b'}" in capsys.readouterr().err
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "b" / "results.json").exists()
    monkeypatch.setattr(fdsl, "train_one_epoch", real)

    resumed = fdsl.main(["--resume", str(tmp_path / "b")])
    log = fdsl.read_log(tmp_path / "b" / "log.jsonl")
    command = json.loads((tmp_path / "b" / "config.json").read_text())["command"]
    assert f"--out {tmp_path / 'b'}" in command and "--resume" not in command  # the command that started it
    assert [row["epoch"] for row in log] == [0, 1, 2, 3]
    # Every random stream is a function of (seed, epoch): the resumed run is the same run.
    assert resumed["knn_acc"] == straight["knn_acc"]
    assert resumed["linear_acc"] == straight["linear_acc"]
    assert resumed["collapse"]["projector"]["std"] == pytest.approx(straight["collapse"]["projector"]["std"], rel=1e-6)
    straight_log = fdsl.read_log(tmp_path / "a" / "log.jsonl")
    assert log[0]["loss"] is None  # epoch 0 is the untrained baseline
    assert [r["loss"] for r in log[1:]] == pytest.approx([r["loss"] for r in straight_log[1:]], rel=1e-6)
    with pytest.raises(SystemExit) as e:  # the run is there: a new run may not overwrite it
        fdsl.main(SHORT + ["--out", str(tmp_path / "b")])
    assert e.value.code == 2


def test_resume_right_after_the_epoch_0_checkpoint_logs_every_epoch_once(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):  # Ctrl-C in the first training epoch
        raise KeyboardInterrupt
    monkeypatch.setattr(fdsl, "train_one_epoch", interrupted)
    with pytest.raises(SystemExit):
        fdsl.main(SHORT + ["--linear-epochs", "0", "--out", str(tmp_path / "r")])
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    fdsl.main(["--resume", str(tmp_path / "r")])
    assert [row["epoch"] for row in fdsl.read_log(tmp_path / "r" / "log.jsonl")] == [0, 1, 2, 3]


def test_a_whitened_output_that_is_not_white_is_reported(tmp_path, monkeypatch, capsys):
    # How a too-large eps shows itself: the network collapses below it and the layer damps
    # those directions (README, "Why eps is small"). Simulated here by the metric itself.
    real = fdsl.measure_collapse

    def damped(*args, **kwargs):
        m = real(*args, **kwargs)
        m["normalized"]["std"] = 0.25
        return m
    monkeypatch.setattr(fdsl, "measure_collapse", damped)
    fdsl.main(SHORT + ["--epochs", "1", "--linear-epochs", "0", "--out", str(tmp_path / "w")])
    out = capsys.readouterr().out
    assert "not white" in out and "smaller --eps" in out
    assert "never reaches its peak" in out  # a 5-epoch warm-up in a 1-epoch run is said
    # At float32's floor (3.8e-6 for groups of 32) a smaller --eps cannot help: float64 can.
    assert "float64" in fdsl.eps_advice(fdsl.GroupWhitening(512, 16, eps=1e-6, dtype=torch.float32))
    assert "smaller --eps" in fdsl.eps_advice(fdsl.GroupWhitening(512, 16, eps=1e-5, dtype=torch.float32))


def test_nan_loss_stops_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real, calls = fdsl.siamese_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) > 10 else loss  # 8 steps per epoch: NaN in epoch 2
    monkeypatch.setattr(fdsl, "siamese_loss", poisoned)
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--out", str(tmp_path / "nan")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert ("nan" in err or "non-finite" in err) and str(tmp_path / "nan" / "checkpoint.pt") in err and "(epoch 1)" in err


@pytest.mark.parametrize("where,words", [("encode", "the backbone's features"),
                                         ("project", "the projector's outputs")])
def test_non_finite_outputs_at_an_evaluation_stop_the_run(tmp_path, monkeypatch, capsys, where, words):
    # A network can pass the weight check yet give NaN features (an overflow in eval mode, say):
    # k-NN, the metrics (eigvalsh) and the probe must never see them. Two calls per evaluation
    # (the k-NN bank and test set; the two metric batches): NaN from epoch 2's evaluation on.
    owner = fdsl if where == "encode" else fdsl.SiameseNet
    real, calls = getattr(owner, where), []

    def diverged(*args, **kwargs):
        out = real(*args, **kwargs)
        if where == "encode" or not torch.is_grad_enabled():  # the evaluations, not the training steps
            calls.append(1)
            return out * float("nan") if len(calls) > 4 else out
        return out
    monkeypatch.setattr(owner, where, diverged)
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--out", str(tmp_path / "nan")])
    err = capsys.readouterr().err.strip()
    checkpoint = tmp_path / "nan" / "checkpoint.pt"
    assert e.value.code == 1 and "\n" not in err and "Traceback" not in err
    assert f"{words} are not finite; the last good checkpoint is {checkpoint} (epoch 1)" in err
    assert torch.load(checkpoint, weights_only=True)["epoch"] == 1
    assert [row["epoch"] for row in fdsl.read_log(tmp_path / "nan" / "log.jsonl")] == [0, 1]


def test_bf16_on_a_cpu_runs_to_the_end(tmp_path):
    results = fdsl.main(SHORT + ["--precision", "bf16", "--epochs", "2", "--out", str(tmp_path / "bf16")])
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["precision"] == "bf16" and 0 <= results["linear_acc"] <= 100
    assert results["collapse"]["normalized"]["std"] > 0.99  # the whitening stays in float64 under bf16


def test_newton_path_to_a_nan_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys):
    # No eigh on this path (the graph step's): only the loss check can stop it.
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--whiten", "newton", "--lr", "1e8", "--out", str(tmp_path / "n")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "loss is nan" in err and "eigendecomposition" not in err
    assert str(tmp_path / "n" / "checkpoint.pt") in err and "(epoch 0)" in err
    state = torch.load(tmp_path / "n" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_non_finite_weights_behind_a_finite_loss_are_never_saved_as_good(tmp_path, monkeypatch, capsys):
    real, calls = fdsl.train_step, []

    def poisoned(tr, x):
        loss = real(tr, x)
        calls.append(1)
        if len(calls) == 16:  # the last step of epoch 2 (8 steps per epoch): its loss was finite
            with torch.no_grad():
                next(tr.net.projector.parameters())[0, 0] = float("inf")
        return loss
    monkeypatch.setattr(fdsl, "train_step", poisoned)
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--out", str(tmp_path / "w")])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "weights after epoch 2 are not finite" in err and "(epoch 1)" in err
    assert torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)["epoch"] == 1


# ---------------------------------------------------------------------------------------------
# Several processes (gloo on CPU): whitening over the global batch, torchrun end to end
# ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLD_CASES = [dict(groups=4, shuffle=True), dict(groups=1, shuffle=False), dict(groups=32, shuffle=False),
               dict(groups=4, shuffle=True, method="newton"), "bn"]


def world_case(case, global_batch=False):
    """The layer of a case, its input x: N x D and the target its output is multiplied with."""
    target = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = fdsl.Standardize(32, global_batch=global_batch) if case == "bn" else \
        fdsl.GroupWhitening(32, **case, global_batch=global_batch)
    return layer, correlated(64, 32, seed=1), target


def _whitening_worker(rank, world, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    # A file store has no server process: with tcp://, rank 0 hosts the store, and a rank that
    # exits first can leave the other waiting in destroy_process_group (seen on torch 2.4).
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    for i, case in enumerate(WORLD_CASES):  # one process group for every case
        layer, x, target = world_case(case, global_batch=True)
        torch.manual_seed(0)  # the same permutation on every process
        xs = x[rank::world].clone().requires_grad_()
        y = layer(xs)
        (y * target[rank::world]).sum().backward()
        torch.save({"y": y.detach(), "grad": xs.grad}, os.path.join(out_dir, f"case{i}-rank{rank}.pt"))
    dist.barrier()  # every result is on disk
    # Leave without gloo's teardown: on torch 2.4 it sometimes hung (destroy_process_group) or
    # aborted (at exit) once the peer had gone. The worker has nothing left to do.
    os._exit(0)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    import torch.multiprocessing as mp
    out = tmp_path_factory.mktemp("world")
    mp.spawn(_whitening_worker, args=(2, str(out)), nprocs=2)
    return out


@pytest.mark.parametrize("case", range(len(WORLD_CASES)))
def test_whitening_over_two_processes_equals_one_process(case, two_processes):
    layer, x, target = world_case(WORLD_CASES[case])
    torch.manual_seed(0)
    xr = x.clone().requires_grad_()
    y = layer(xr)
    (y * target).sum().backward()
    for rank in range(2):
        part = torch.load(two_processes / f"case{case}-rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(part["y"], y.detach()[rank::2], atol=1e-5, rtol=0)
        torch.testing.assert_close(part["grad"], xr.grad[rank::2], atol=1e-5, rtol=0)


def test_torchrun_two_processes_one_log_and_the_same_knn(tmp_path):
    out = tmp_path / "ddp"
    args = ["--dataset", "synthetic", "--arch", "small", "--train-subset", "256", "--test-subset", "200",
            "--proj-dim", "64", "--proj-hidden", "128", "--groups", "4", "--batch-size", "32",
            "--epochs", "1", "--eval-every", "1", "--metric-samples", "64", "--linear-epochs", "0",
            "--no-progress", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", os.path.join(HERE, "fdsl.py"), *args],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.count("epoch       loss") == 1  # one table: the other process stays quiet
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "log.jsonl", "results.json"]
    assert [row["epoch"] for row in fdsl.read_log(out / "log.jsonl")] == [0, 1]
    results = json.loads((out / "results.json").read_text())
    assert results["device"] == "cpu x2"

    # One process, from the saved checkpoint, computes the same k-NN accuracy.
    cfg = fdsl.build_parser().parse_args(args)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    net = fdsl.build_model(cfg)
    net.load_state_dict(state["model"])
    data = fdsl.load_data(cfg)
    mach = fdsl.Machine(torch.device("cpu"), None)
    view = fdsl.eval_transform  # the authors' Resize + CenterCrop, as the run evaluated
    acc = fdsl.knn_accuracy(fdsl.encode(net.backbone, view(data.train_x), mach), data.train_y,
                            fdsl.encode(net.backbone, view(data.test_x), mach), data.test_y)
    assert acc == results["knn_acc"]


# ---------------------------------------------------------------------------------------------
# Benchmark mode (the figures themselves are for README, never asserted)
# ---------------------------------------------------------------------------------------------

def test_benchmark_times_the_step_and_keeps_its_table_only_when_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    r = fdsl.main(["--benchmark", "--arch", "small", "--proj-dim", "64", "--proj-hidden", "128", "--groups", "4",
                   "--batch-size", "32", "--image-size", "16", "--benchmark-steps", "2", "--out", "bench"])
    t = r["seconds"]
    assert set(t) == {"eager full step"}
    assert all(v > 0 for v in t.values())
    assert r["images_per_s"] == pytest.approx(32 / t["eager full step"])
    assert r["train_step"] == "eager" and r["whiten_method"] == "eigh"
    out = capsys.readouterr().out
    assert out.count("needs CUDA") == 1 and "50,000-image epoch" in out
    assert "fp32, channels_last" in out  # the precision and layout it measured
    assert os.listdir(tmp_path) == ["bench"]  # its table only: no run folder, no data download
    command, table = (tmp_path / "bench" / "benchmark.md").read_text().split("\n\n```\n")
    assert command == "`python fdsl.py --benchmark --arch small --proj-dim 64 --proj-hidden 128 --groups 4 " \
                      "--batch-size 32 --image-size 16 --benchmark-steps 2 --out bench`"
    assert table.startswith("benchmark: small, batch 32") and table[:-4] in out  # as printed
    saved = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert saved["seconds"] == t and saved["torch"] == torch.__version__ and saved["device_name"]
    # Without --out the same table is printed and nothing is written.
    fdsl.main(["--benchmark", "--arch", "small", "--proj-dim", "64", "--proj-hidden", "128", "--groups", "4",
               "--batch-size", "32", "--image-size", "16", "--benchmark-steps", "1"])
    assert "eager full step (eigh)" in capsys.readouterr().out and os.listdir(tmp_path) == ["bench"]


# ---------------------------------------------------------------------------------------------
# The fast path: the step as one CUDA graph. Everything but the capture itself runs on the CPU.
# ---------------------------------------------------------------------------------------------

GRAPH_ARGS = ["--dataset", "synthetic", "--arch", "small", "--proj-dim", "64", "--proj-hidden", "128",
              "--groups", "4", "--batch-size", "32", "--epochs", "2", "--warmup-epochs", "1", "--whiten", "newton"]


def trainer_run(graph_ready, steps=6, amp_dtype=None):
    cfg = fdsl.build_parser().parse_args(GRAPH_ARGS)
    tr = fdsl.build_trainer(cfg, fdsl.Machine(torch.device("cpu"), amp_dtype), 8, fdsl.whitening_method(cfg, "eager"))
    xs = torch.randint(0, 256, (steps, 32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    step = lambda x: fdsl.train_step(tr, x)
    if graph_ready:  # warm-up steps (undone), tensor learning rate, static input buffer
        step = fdsl.cuda_graph(fdsl.train_step, tr, xs[0], capture=False)
    tr.aug_gen.manual_seed(5)
    torch.manual_seed(7)
    losses, tr.host_reads = [], HostReads()
    for x in xs:
        with tr.host_reads:  # inside the step only: the loss is read below, as the loop reads it now and then
            loss = step(x)
        loss = loss.item()
        tr.sched.step()
        losses.append((loss, fdsl.current_lr(tr.opt)))
    return losses, tr


class HostReads(TorchDispatchMode):
    """Counts reads of a tensor's value by the host (.item(), bool(), a Python branch on a
    tensor): each makes a GPU step wait for the GPU, and a CUDA graph cannot hold one."""
    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


@pytest.mark.filterwarnings("ignore:Detected call of")  # a skipped fp16 step looks to torch like a missing one
def test_the_graph_ready_step_never_waits_for_the_device_and_fp16_would():
    # What a CUDA graph needs of the step, checked on the CPU: no value read by the host, in fp32
    # and bf16. fp16's public loss scaler reads its inf flag on the host every step, so fp16
    # (7.x GPUs) trains eagerly (test_the_plan_on_each_gpu_generation).
    for amp_dtype in (None, torch.bfloat16):
        _, tr = trainer_run(True, steps=3, amp_dtype=amp_dtype)
        assert tr.host_reads.count == 0
    _, te = trainer_run(False, amp_dtype=torch.float16)
    assert te.scaler.is_enabled() and te.host_reads.count == 6


def test_channels_last_on_the_cpu_trains_as_contiguous_does(monkeypatch):
    assert fdsl.Machine(torch.device("cpu"), None).memory_format == torch.channels_last
    # Float rounding differs (other kernels), and the whitening amplifies it from step 4 on (7e-4)
    channels_last, _ = trainer_run(False, steps=3)
    monkeypatch.setattr(fdsl.Machine, "memory_format", property(lambda self: torch.contiguous_format))
    contiguous, _ = trainer_run(False, steps=3)
    assert [loss for loss, _ in channels_last] == pytest.approx([loss for loss, _ in contiguous], rel=1e-4)


@pytest.mark.parametrize("capability,precision", [((6, 1), "fp32"), ((7, 0), "fp16"), ((7, 5), "fp16"),
                                                  ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_precision_follows_the_gpus_compute_capability(monkeypatch, capability, precision):
    # V100 7.0, T4 7.5: no bf16 units, although torch.cuda.is_bf16_supported() says True (emulation)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    machine = fdsl.setup_machine(fdsl.build_parser().parse_args(["--device", "cuda"]))
    assert machine.amp_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    assert fdsl.autocast_precision(torch.device("cpu")) == "fp32"  # the CPU stays exact by default


@pytest.mark.parametrize("capability,precision,step", [((7, 0), torch.float16, "eager"),
                                                     ((7, 5), torch.float16, "eager"),
                                                     ((8, 0), torch.bfloat16, "graph"),
                                                     ((9, 0), torch.bfloat16, "graph")])
def test_the_plan_on_each_gpu_generation(monkeypatch, capsys, capability, precision, step):
    # V100 and T4 (7.x): torch's public fp16 autocast and GradScaler, eager, one line why. A100 and
    # H100/H200: bf16 and the CUDA graph (which proves itself before training: test_graph_self_check_*).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(fdsl, "graphs_replay_generators", lambda: True)
    cfg = fdsl.build_parser().parse_args(["--device", "cuda"])
    machine = fdsl.setup_machine(cfg)
    assert machine.amp_dtype == precision
    assert fdsl.choose_step(cfg, machine) == step
    out = capsys.readouterr().out
    assert out == "" if step == "graph" else out.count("\n") == 1 and "fp16" in out and "GradScaler" in out
    assert fdsl.whitening_method(cfg, step) == ("newton" if step == "graph" else "eigh")
    # No private torch attribute anywhere: a torch release may change any of them.
    assert not re.findall(r"\._[a-z]\w*", open(os.path.join(HERE, "fdsl.py")).read())


def test_graph_ready_step_trains_exactly_like_train_step():
    eager, te = trainer_run(False)
    graph, tg = trainer_run(True)
    assert [loss for loss, _ in graph] == [loss for loss, _ in eager]  # the warm-up left no trace
    for p, q in zip(te.net.parameters(), tg.net.parameters()):
        assert torch.equal(p, q)
    buffers = dict(tg.net.named_buffers())  # BatchNorm running statistics and num_batches_tracked
    assert any("num_batches_tracked" in k for k in buffers)
    for k, b in te.net.named_buffers():
        assert torch.equal(b, buffers[k]), k
    momentum = lambda tr: [tr.opt.state[p]["momentum_buffer"] for p in tr.net.parameters()]
    for a, b in zip(momentum(te), momentum(tg)):
        assert torch.equal(a, b)
    lr = tg.opt.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.dim() == 0  # filled in place by the schedule, between replays
    for step, (_, value) in enumerate(graph, start=1):
        assert value == pytest.approx(0.02 * 32 / 256 * fdsl.lr_factor(step, 16, 8), rel=1e-6)  # 2 epochs of 8


def test_the_graph_step_refuses_a_batch_of_another_shape():
    _, tr = trainer_run(False, steps=1)
    step = fdsl.cuda_graph(fdsl.train_step, tr, torch.zeros(32, 3, 32, 32, dtype=torch.uint8), capture=False)
    with pytest.raises(ValueError, match="recorded for batches of") as e:
        step(torch.zeros(16, 3, 32, 32, dtype=torch.uint8))  # copy_ would have broadcast it
    assert "\n" not in str(e.value)


def test_graph_inputs_are_the_tensors_the_model_and_optimizer_hold(tmp_path):
    _, tr = trainer_run(True)
    tr.cfg.out = str(tmp_path)
    run = fdsl.Run(tr.cfg, tr.machine, None, None, tr)
    fdsl.save_checkpoint(run, 1)  # nothing was replaced while training
    tr.opt.load_state_dict(tr.opt.state_dict())  # a resume done after capture: new momentum tensors
    with pytest.raises(RuntimeError, match="replaced after capture"):
        fdsl.save_checkpoint(run, 2)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["epoch"] == 1


def test_step_choice_follows_the_machine_and_flags(monkeypatch, capsys):
    cfg = lambda *a: fdsl.build_parser().parse_args(list(a))
    cuda = fdsl.Machine(torch.device("cuda"), torch.bfloat16)  # choose_step only reads the description
    # Whether this torch replays a custom generator in a graph is a property of its CUDA build
    # (CPU-only wheels have a dummy CUDAGraph class): both answers are checked here.
    monkeypatch.setattr(fdsl, "graphs_replay_generators", lambda: True)
    assert fdsl.choose_step(cfg(), cuda) == "graph"
    assert fdsl.choose_step(cfg(), fdsl.Machine(torch.device("cpu"), None)) == "eager"
    assert fdsl.choose_step(cfg("--no-graph"), cuda) == "eager"
    assert capsys.readouterr().out == ""  # nothing to explain: the graph was used or not wanted
    for machine, args, words in [(fdsl.Machine(torch.device("cuda"), torch.bfloat16, 0, 2), [], "torchrun"),
                                 (cuda, ["--whiten", "eigh"], "eigh"),
                                 (fdsl.Machine(torch.device("cuda"), torch.float16), [], "GradScaler")]:
        assert fdsl.choose_step(cfg(*args), machine) == "eager"
        out = capsys.readouterr().out
        assert words in out and out.count("\n") == 1
    assert fdsl.choose_step(cfg("--decorr", "bn", "--whiten", "eigh"), cuda) == "graph"  # bn has no eigh
    monkeypatch.setattr(fdsl, "graphs_replay_generators", lambda: False)
    assert fdsl.choose_step(cfg(), cuda) == "eager" and "generator" in capsys.readouterr().out


def test_resume_through_the_graph_ready_step_equals_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    # main() as on one CUDA GPU, with the captured graph replaced by its eager double
    # (capture=False: the same warm-up undone, tensor learning rate, fixed input buffer).
    real_graph = fdsl.cuda_graph
    monkeypatch.setattr(fdsl, "choose_step", lambda cfg, machine: "graph")
    monkeypatch.setattr(fdsl, "cuda_graph", lambda *args: real_graph(*args, capture=False))
    args = SHORT + ["--linear-epochs", "0"]
    straight = fdsl.main(args + ["--out", str(tmp_path / "a")])
    assert straight["whiten_method"] == "newton"  # --whiten auto, resolved for the graph step

    real_epoch = ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        fdsl.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.setattr(fdsl, "train_one_epoch", real_epoch)
    resumed = fdsl.main(["--resume", str(tmp_path / "b")])
    losses = lambda name: [r["loss"] for r in fdsl.read_log(tmp_path / name / "log.jsonl")]
    assert losses("b") == losses("a") and resumed["knn_acc"] == straight["knn_acc"]


def test_a_failed_capture_continues_eagerly_from_the_same_state(eager_newton_run, tmp_path, monkeypatch, capsys):
    eager, eager_dir = eager_newton_run

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(fdsl, "choose_step", lambda cfg, machine: "graph")
    monkeypatch.setattr(fdsl, "capture_graph", broken)  # fails after the warm-up steps ran
    capsys.readouterr()
    fell_back = fdsl.main(SHORT + ["--whiten", "newton", "--out", str(tmp_path / "fallback")])
    notes = [line for line in capsys.readouterr().out.splitlines() if "CUDA graph" in line]
    assert len(notes) == 1 and "stream is capturing" in notes[0] and "eager step" in notes[0]
    assert fell_back["train_step"] == "eager" and fell_back["whiten_method"] == "newton"
    assert fell_back["knn_acc"] == eager["knn_acc"] and fell_back["linear_acc"] == eager["linear_acc"]
    losses = lambda d: [r["loss"] for r in fdsl.read_log(d / "log.jsonl")]
    assert losses(tmp_path / "fallback") == losses(eager_dir)  # no step lost, the warm-up undone
    assert json.loads((tmp_path / "fallback" / "config.json").read_text())["train_step"] == "eager"


def fake_capture(replay_does):
    """capture_graph's stand-in on a CPU: the "replay" runs the step eagerly (what a good graph does),
    does nothing, or steps twice while reporting the first loss (an update applied otherwise)."""
    def capture(fn, generators=()):
        out = fn()  # a real capture records without running: cuda_graph undoes this call

        def replay():
            if replay_does != "nothing":
                out.copy_(fn())
                if replay_does == "twice":
                    fn()
        return out, replay
    return capture


@pytest.fixture(scope="module")
def eager_newton_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eager") / "run"
    return fdsl.main(SHORT + ["--whiten", "newton", "--out", str(out)]), out


def test_graph_self_check_keeps_a_replay_that_does_what_the_eager_step_does(eager_newton_run, tmp_path,
                                                                           monkeypatch, capsys):
    eager, eager_dir = eager_newton_run
    monkeypatch.setattr(fdsl, "choose_step", lambda cfg, machine: "graph")
    monkeypatch.setattr(fdsl, "capture_graph", fake_capture("the step"))
    checked, real_check = [], fdsl.graph_self_check
    monkeypatch.setattr(fdsl, "graph_self_check", lambda *a, **k: checked.append(real_check(*a, **k)))
    capsys.readouterr()
    graphed = fdsl.main(SHORT + ["--out", str(tmp_path / "graph")])
    assert checked == [None] and "not used" not in capsys.readouterr().out
    assert graphed["train_step"] == "graph" and graphed["whiten_method"] == "newton"
    losses = lambda d: [r["loss"] for r in fdsl.read_log(d / "log.jsonl")]
    assert losses(tmp_path / "graph") == losses(eager_dir)  # the check left no trace on the run
    assert graphed["knn_acc"] == eager["knn_acc"] and graphed["linear_acc"] == eager["linear_acc"]


@pytest.mark.parametrize("replay_does", ["nothing", "twice"])
def test_graph_self_check_refuses_a_replay_that_differs_and_the_eager_step_trains_on(
        eager_newton_run, tmp_path, monkeypatch, capsys, replay_does):
    eager, eager_dir = eager_newton_run
    monkeypatch.setattr(fdsl, "choose_step", lambda cfg, machine: "graph")
    monkeypatch.setattr(fdsl, "capture_graph", fake_capture(replay_does))
    capsys.readouterr()
    refused = fdsl.main(SHORT + ["--out", str(tmp_path / "refused")])
    notes = [line for line in capsys.readouterr().out.splitlines() if "CUDA graph" in line]
    assert len(notes) == 1 and "replay differs from the eager step" in notes[0] and "eager step" in notes[0]
    assert "parameter update off by" in notes[0]
    assert refused["train_step"] == "eager" and refused["whiten_method"] == "newton"
    losses = lambda d: [r["loss"] for r in fdsl.read_log(d / "log.jsonl")]
    assert losses(tmp_path / "refused") == losses(eager_dir)  # from the restored state, no step lost
    assert refused["knn_acc"] == eager["knn_acc"] and refused["linear_acc"] == eager["linear_acc"]


# ---------------------------------------------------------------------------------------------
# Plots (--plot); matplotlib is optional
# ---------------------------------------------------------------------------------------------

def test_plot_draws_every_run_and_tables_them_in_the_papers_order(findings, findings_dir, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install matplotlib); --plot needs it")
    dirs = [str(findings_dir / d) for d in ("zca", "none", "bn")]
    out = tmp_path / "fig.png"
    assert fdsl.main(["--plot", *dirs, "--out", str(out)]) == str(out)
    from PIL import Image
    with Image.open(out) as im:
        assert im.size[0] > 1000 and im.size[1] > 300
        pixels = im.convert("RGB").resize((400, 100)).tobytes()
    colours = {pixels[i:i + 3] for i in range(0, len(pixels), 3) if max(pixels[i:i + 3]) - min(pixels[i:i + 3]) > 100}
    assert len(colours) > 20  # saturated pixels: the runs' coloured curves, not an empty frame
    table = (tmp_path / "fig.md").read_text().splitlines()
    assert table[0].startswith("| setting | runs | k-NN % | linear % | projector std | projector corr")
    rows = [row for row in table[2:] if row.startswith("| ")]
    assert [row.split("|")[2].strip() for row in rows] == ["none", "bn", "zca"]  # the paper's order
    knn = findings["zca"][0]["knn_acc"]
    assert rows[2].startswith(f"| zca, 4 shuffled groups | zca | {knn:.2f} |")
    assert "Spearman's rank correlation" in table[-2] and "(4 points)" in table[-2]  # one epoch-0 network, 3 x epoch 4
    assert table[-1].startswith("Over the runs' final correlation (3 runs): with final k-NN accuracy")
    assert not (tmp_path / "fig-2d.png").exists()  # Figure 2 is drawn for 2-d outputs only


def test_plot_without_out_writes_beside_the_runs_and_ignores_a_half_written_line(findings_dir, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is optional")
    import shutil
    run = tmp_path / "runs" / "zca"
    shutil.copytree(findings_dir / "zca", run)
    with open(run / "log.jsonl", "a") as f:
        f.write('{"epoch": 5, "loss": 71')  # what a running run's log can end with
    (run / "results.json").unlink()  # not finished
    monkeypatch.chdir(tmp_path)
    assert fdsl.main(["--plot", str(run)]) == str(tmp_path / "runs" / "comparison.png")
    assert (tmp_path / "runs" / "comparison.png").exists() and not (tmp_path / "plot.png").exists()
    assert "| 4 of 4 |" in (tmp_path / "runs" / "comparison.md").read_text()


def fake_run(root, name, knn, corr, linear=None, **settings):
    """A run folder as fdsl writes one, with made-up numbers: an evaluation per epoch 0, 1, ..."""
    d = root / name
    d.mkdir()
    config = {**{k: v for k, (v, _) in fdsl.RECIPE.items()}, "train_subset": 0, "test_subset": 0, "image_size": 32,
              "precision": "auto", **settings}
    (d / "config.json").write_text(json.dumps(config))
    stage = lambda c: {"std": 1.0, "std_l2": 0.1, "corr_strength": c, "eff_rank": 10.0, "spectrum": [1.0, 0.5]}
    rows = [{"epoch": e, "knn_acc": k, "collapse": {"backbone": stage(c), "projector": stage(c), "normalized": stage(0)}}
            for e, (k, c) in enumerate(zip(knn, corr))]
    (d / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if linear is not None:
        (d / "results.json").write_text(json.dumps({"knn_acc": knn[-1], "linear_acc": linear,
                                                    "collapse": rows[-1]["collapse"]}))
    return str(d)


def test_plot_merges_the_seeds_of_a_setting_and_nothing_else(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional")
    runs = [fake_run(tmp_path, "zca-s0", [30, 40], [0.5, 0.3], 41.0, seed=0),
            fake_run(tmp_path, "zca-s1", [30, 44], [0.5, 0.2], 45.0, seed=1),
            fake_run(tmp_path, "zca-lr", [30, 35], [0.5, 0.4], 36.0, seed=0, lr=0.1)]  # another setting
    fdsl.plot_runs(runs, str(tmp_path / "cmp.png"))
    table = (tmp_path / "cmp.md").read_text()
    rows = [row for row in table.splitlines() if row.startswith("| zca")]
    assert len(rows) == 2
    merged, other = sorted(rows, key=lambda row: "(n=2)" not in row)
    assert "| zca-s0, zca-s1 (n=2) | 42.00 ± 2.83 | 43.00 ± 2.83 |" in merged  # mean ± sample standard deviation
    assert "| zca-lr | 35.00 | 36.00 |" in other
    # Correlation ranks the accuracies perfectly here, ties included; zca-s0 and zca-lr share seed 0, so
    # their epoch-0 network is one point: 5 points, not 6.
    assert "every evaluation of every run, each network once (5 points): -1.00." in table
    assert "Over the runs' final correlation (3 runs): with final k-NN accuracy -1.00, with linear accuracy -1.00." \
        in table


def test_a_random_network_that_runs_share_counts_once_in_the_metric(tmp_path):
    # Runs of one seed start from the same random encoder and evaluate it on the same images: its
    # epoch-0 point is one network, whatever layer follows; another seed is another network.
    dirs = [fake_run(tmp_path, f"{d}-s0", [30, k], [0.5, c], decorr=d)
            for d, k, c in (("none", 20, 0.6), ("bn", 28, 0.8), ("zca", 43, 0.2))]
    dirs.append(fake_run(tmp_path, "zca-s1", [31, 44], [0.45, 0.19], decorr="zca", seed=1))
    points = fdsl.metric_points([fdsl.read_run(d) for d in dirs])
    assert len(points) == 2 + 4 and points.count((0.5, 30)) == 1 and (0.45, 31) in points
    assert fdsl.metric_points([fdsl.read_run(d) for d in dirs[:1]]) == [(0.5, 30), (0.6, 20)]


def test_spearman_is_the_correlation_of_ranks_with_ties_averaged():
    assert fdsl.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert fdsl.spearman([0.9, 0.5, 0.2], [10, 20, 30]) == pytest.approx(-1.0)
    assert fdsl.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(math.sqrt(3) / 2)  # ranks 0.5, 0.5, 2
    assert fdsl.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)  # 1 - 6 * 4 / (5 * 24)


@pytest.fixture(scope="module")
def two_d_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_d")
    args = SHORT + ["--proj-dim", "2", "--groups", "auto", "--epochs", "2", "--linear-epochs", "0"]
    linear = ["--linear-projector", "--proj-hidden", "4"]  # the authors' 2-d projector, for zca
    return {d: (fdsl.main(args + ["--decorr", d, "--out", str(root / d)] + linear * (d == "zca")), root / d)
            for d in ("bn", "zca")}


def test_the_linear_projector_is_two_linear_maps_and_nothing_between():
    cfg = fdsl.build_parser().parse_args(["--arch", "small", "--decorr", "none", "--linear-projector",
                                          "--proj-hidden", "4", "--proj-dim", "2"])
    projector = fdsl.build_model(cfg).projector
    assert [type(m) for m in projector] == [torch.nn.Linear, torch.nn.Linear]
    assert (projector[0].in_features, projector[0].out_features, projector[1].out_features) == (256, 4, 2)
    default = fdsl.build_model(fdsl.build_parser().parse_args(["--arch", "small"])).projector
    assert [type(m) for m in default] == [torch.nn.Linear, torch.nn.BatchNorm1d, torch.nn.ReLU, torch.nn.Linear]


def test_a_2d_run_keeps_the_layers_output_white_for_zca_and_standardized_for_bn(two_d_runs, findings, findings_dir):
    for decorr, (_, d) in two_d_runs.items():
        assert json.loads((d / "config.json").read_text())["groups"] == 1  # auto: ceil(2 x 2 / 32)
        rows = fdsl.read_log(d / "log.jsonl")
        assert [row["epoch"] for row in rows if "projection" in row] == [0, 1, 2]
        first = rows[0]["projection"]
        assert len(first["points"]) == len(first["labels"]) == 192  # 200 test images, in full batches of 32
        assert all(row["projection"]["labels"] == first["labels"] for row in rows)  # the same images each time
        assert all(isinstance(v, int) for p in first["points"] for v in p)  # integer units of its scale
        z = torch.tensor(rows[-1]["projection"]["points"], dtype=torch.float64) * rows[-1]["projection"]["scale"]
        cov = torch.cov(z.T, correction=0)  # each batch centred and whitened: the pooled covariance too
        if decorr == "zca":
            torch.testing.assert_close(cov, torch.eye(2, dtype=torch.float64), atol=2e-3, rtol=0)
        else:
            torch.testing.assert_close(cov.diagonal(), torch.ones(2, dtype=torch.float64), atol=2e-3, rtol=0)
            assert abs(cov[0, 1]) > 0.1  # standardized, not decorrelated
    assert all("projection" not in row for row in fdsl.read_log(findings_dir / "zca" / "log.jsonl"))  # 128 axes


def test_plot_draws_figure_2_for_2d_runs_only(two_d_runs, findings, findings_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="matplotlib is optional")
    dirs = [str(d) for _, d in two_d_runs.values()] + [str(findings_dir / "zca")]  # a 128-d run too
    fdsl.plot_runs(dirs, str(tmp_path / "cmp.png"))
    assert "the 2-d projection spaces of 2 in" in capsys.readouterr().out
    from PIL import Image
    with Image.open(tmp_path / "cmp-2d.png") as im:  # two rows (runs), three columns (epochs 0, 1, 2)
        assert im.size[0] > im.size[1] > 300
    with Image.open(tmp_path / "cmp-2d.gif") as gif:  # in motion: the two side by side, a frame per epoch
        assert gif.n_frames == 3 and gif.size[0] > 1.5 * gif.size[1]


def test_plot_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import builtins
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit) as e:
        fdsl.main(["--plot", str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "pip install matplotlib" in err and "\n" not in err


@pytest.mark.parametrize("make,words", [(lambda d: d / "missing", "no such folder"),
                                        (lambda d: d, "not a run folder")])
def test_plot_of_something_that_is_not_a_run_is_one_line(tmp_path, capsys, make, words):
    pytest.importorskip("matplotlib", reason="matplotlib is optional")
    with pytest.raises(SystemExit) as e:
        fdsl.main(["--plot", str(make(tmp_path))])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and words in err and "\n" not in err


# ---------------------------------------------------------------------------------------------
# A newcomer's first minutes: --help, damaged files, files read as data
# ---------------------------------------------------------------------------------------------

def lab_commands():
    """Every `python fdsl.py ...` line of docs/lab.md's shell blocks, its variables expanded as a shell would."""
    text, env, commands = open(os.path.join(HERE, "docs", "lab.md")).read(), {}, []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            expand = lambda s: re.sub(r"\$(\w+)", lambda m: env[m.group(1)], s)
            if m := re.match(r'(\w+)="([^"]*)"', line):
                env[m.group(1)] = expand(m.group(2))
            elif line.startswith("python fdsl.py"):
                commands.append((shlex.split(expand(line), comments=True)[2:], "# refused" in line))
    return commands


def test_every_command_of_the_lab_handout_runs_as_written(monkeypatch):
    commands = lab_commands()
    assert len(commands) >= 12 and len(re.findall(r"^## Exercise \d", open(os.path.join(
        HERE, "docs", "lab.md")).read(), re.M)) >= 6
    for args, refused in commands:
        if refused:  # the handout shows this one refused, in one line
            with pytest.raises(fdsl.UsageError, match="must be smaller than the batch"):
                fdsl.resolve_config(args)
        else:
            cfg = fdsl.resolve_config(args)  # the flags parse and pass every check a run makes first
            assert cfg.plot or (cfg.arch == "small" and cfg.out.startswith("runs/"))


def test_help_says_every_default_in_words_that_cannot_be_misread():
    parser = fdsl.build_parser()
    text = " ".join(parser.format_help().split())
    assert "(default: True)" not in text and "(default: False)" not in text
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert "default" in parser._get_formatter()._get_help_string(action), action.option_strings
    assert "a new random grouping of the axes at every call (Shuffled-DBN); off: fixed groups " \
           "(default: on; this flag turns it off)" in text  # --no-shuffle


def test_every_flag_of_help_is_in_readmes_flags_table():
    readme = open(os.path.join(HERE, "README.md")).read()
    table = readme[readme.index("## Flags"):]
    flags = [f for action in fdsl.build_parser()._actions for f in action.option_strings if f not in ("-h", "--help")]
    assert [f for f in flags if f"`{f}" not in table] == []


def test_a_float32_whitening_is_said_at_the_start_also_on_apple_mps():
    cfg = fdsl.build_parser().parse_args([])
    machine = lambda device: fdsl.Machine(torch.device(device), None)
    assert machine("mps").whitening_dtype("float64") == torch.float32  # MPS has no float64
    assert machine("cpu").whitening_dtype("float64") == torch.float64
    notes = lambda device, dtype: list(fdsl.settings_notes(cfg, machine(device), argparse.Namespace(
        net=argparse.Namespace(norm=fdsl.GroupWhitening(512, 16, dtype=dtype)))))
    assert not any("float32" in n for n in notes("cpu", torch.float64))  # the default: float64, nothing to say
    for device, dtype in (("mps", torch.float32), ("cpu", torch.float32)):
        (note,) = [n for n in notes(device, dtype) if "float32" in n]
        assert "3.8e-6 for groups of 32" in note and ("MPS" in note) == (device == "mps")


def expect_one_line_error(args, capsys, *words):
    with pytest.raises(SystemExit) as e:
        fdsl.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


def test_a_damaged_image_is_named_in_one_line(tmp_path, capsys):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "green" / "2.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # a truncated JPEG
    (tmp_path / "test" / "red" / "1.jpg").write_bytes(b"not an image at all")
    err = expect_one_line_error(["--dataset", "folder", "--data-dir", str(tmp_path), "--out", str(tmp_path / "r")],
                                capsys, str(bad), "cannot be read", "remove or replace")
    assert "1 of 12" in err  # the first damaged split stops the load: its count, its first file


def test_damaged_run_folders_give_one_line(tmp_path, capsys):
    fdsl.main(SHORT + ["--epochs", "1", "--linear-epochs", "0", "--out", str(tmp_path / "r")])
    (tmp_path / "r" / "config.json").rename(tmp_path / "config.json")
    err = expect_one_line_error(["--resume", str(tmp_path / "r")], capsys, "no config.json")
    assert str(tmp_path / "r") in err
    (tmp_path / "config.json").rename(tmp_path / "r" / "config.json")
    (tmp_path / "r" / "results.json").unlink()  # as if interrupted in the linear probe
    ckpt = tmp_path / "r" / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: len(ckpt.read_bytes()) // 2])
    expect_one_line_error(["--resume", str(tmp_path / "r")], capsys, str(ckpt), "damaged")


class _Planted:
    """An object whose unpickling would create a file: what a malicious checkpoint carries."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_is_read_as_data_and_code_in_it_never_runs(tmp_path, capsys):
    fdsl.main(SHORT + ["--epochs", "2", "--linear-epochs", "0", "--out", str(tmp_path / "r")])
    (tmp_path / "r" / "results.json").unlink()
    ckpt = tmp_path / "r" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    state["epoch"] = 1
    state["note"] = _Planted(str(tmp_path / "pwned"))
    torch.save(state, ckpt)
    expect_one_line_error(["--resume", str(tmp_path / "r")], capsys, str(ckpt), "refused")
    assert not (tmp_path / "pwned").exists()


def test_a_checkpoint_of_another_network_is_refused_in_one_line(findings, findings_dir, tmp_path, capsys):
    import shutil
    run = tmp_path / "old"
    shutil.copytree(findings_dir / "zca", run)
    (run / "results.json").unlink()  # an unfinished run, as if interrupted
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["model"] = {k.replace("backbone.", "encoder.", 1): v for k, v in state["model"].items()}  # older names
    torch.save(state, run / "checkpoint.pt")
    expect_one_line_error(["--resume", str(run)], capsys, "does not fit this network", "checkpoint.pt")
    assert not (run / "results.json").exists()  # refused before any training: nothing written as finished


def test_resuming_a_finished_run_says_so_in_one_line(findings, findings_dir, capsys):
    capsys.readouterr()
    results = fdsl.main(["--resume", str(findings_dir / "zca")])
    out = capsys.readouterr().out
    assert results["knn_acc"] == findings["zca"][0]["knn_acc"]
    assert "cannot be extended" in out and "epoch       loss" not in out


def part_one():
    """fdsl.py up to its first appendix: the method, as a reader meets it."""
    text = open(os.path.join(HERE, "fdsl.py")).read()
    return text[: re.search(r"^# Appendix A", text, re.M).start()]


# Sentences and names that readers of part one found untrue or misleading, each now said otherwise.
UNTRUE_IN_PART_ONE = [r"makes the batch\s+covariance\s+the identity", r"nothing here waits for the host",
                      r"the same computation", r"2 or 3 axes", r"each on its own images",
                      r"reshuffled (into new groups )?every step", r"512 -> 1024", r"batches are slices",
                      r"one uint8 tensor", r"BatchNorm1d\(affine=False\) in train mode", r"only under --precision fp16",
                      r"\"graph\" on one CUDA GPU, else", r"full_precision", r"batchnorm_per_view", r"step_kind=",
                      r"normalization_layer", r"V x N x D", r"\bin `?dtype`? \(MPS", r"device\.type == \"mps\""]


def test_part_one_says_what_its_code_does():
    text = part_one()
    found = [p for p in UNTRUE_IN_PART_ONE if re.search(p, text, re.I)]
    assert found == []
    for said in ("Each group is white; axes of different groups may stay correlated",  # not the whole batch
                 "e = max(eps, S x machine epsilon of dtype)", "l clamped at e",  # the floor, where the formula is
                 "Unlike nn.BatchNorm1d(affine=False)", "of at most 3 axes", "each in its own call (SiameseNet.forward)",
                 "(F -> proj_hidden -> D, F = 512 for ResNet-18,\n    256 for --arch small)"):
        assert said in text, said
    import inspect
    forward = inspect.getsource(fdsl.GroupWhitening.forward).splitlines()
    assert len(forward) <= 20 and "dim() not in" not in "".join(forward)  # one view; the algorithm only
    assert not hasattr(fdsl, "batchnorm_per_view") and not hasattr(fdsl, "normalization_layer")
