"""Tests for fdsl.py: one test per promise the code makes. CPU only, about a minute on 2 cores.

    python -m pytest -q test_fdsl.py
"""

import argparse
import ast
import contextlib
import hashlib
import io
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import traceback
import urllib.error

import pytest
import torch
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import fdsl

HERE = os.path.dirname(os.path.abspath(__file__))
FDSL = os.path.join(HERE, "fdsl.py")
# One thread: on a 2-core machine with another job running, two threads wait on each other (a run took 20x longer)
torch.set_num_threads(1)


def correlated(n, d, seed=0, dtype=torch.float64):
    """n samples of d strongly correlated, unevenly scaled axes with a non-zero mean."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=dtype) + 2.0 * torch.ones(d, d, dtype=dtype)
    return torch.randn(n, d, generator=g, dtype=dtype) @ mix + 3.0


def machine_layer(num_features, groups=16, shuffle=True, eps=1e-8, method="eigh", dtype=torch.float64,
                  global_batch=False, decorr="zca"):
    """The layer as fdsl builds it for a run (MachineWhitening): Newton-Schulz for the CUDA graph, the global
    batch under torchrun; decorr "bn": Standardize's settings."""
    cfg = argparse.Namespace(decorr=decorr, proj_dim=num_features, groups=groups, shuffle=shuffle, eps=eps,
                             whiten_method=method, whiten_dtype=str(dtype).split(".")[1],
                             world=2 if global_batch else 1)
    return fdsl.MachineWhitening(cfg)


def block_covariances(y, groups):
    """Per-group covariance (biased) of y: N x D -> G x S x S."""
    n, d = y.shape
    yg = (y - y.mean(0)).reshape(n, groups, d // groups).transpose(0, 1)
    return yg.transpose(1, 2) @ yg / n


def read_log(path):
    return [json.loads(line) for line in open(path)]


def assert_one_line_error(args, capsys, *words, code=2):
    """main(args) stops with `code` and one line on stderr holding every word, no traceback. -> the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fdsl.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == code and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ---------------------------------------------------------------------------------------------
# The paper's layers: GroupWhitening and Standardize
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("groups,shuffle", [(1, False), (4, False), (4, True), (16, True)])
def test_whitening_makes_each_group_covariance_identity(groups, shuffle):
    torch.manual_seed(0)
    layer = fdsl.GroupWhitening(64, groups=groups, shuffle=shuffle, eps=1e-9)
    x = correlated(512, 64)
    y = layer(x)
    perm = layer.last_perm if shuffle else torch.arange(64)  # the groups are formed in the shuffled order
    cov = block_covariances(y[:, perm], groups)
    eye = torch.eye(64 // groups, dtype=torch.float64).expand_as(cov)
    assert (cov - eye).abs().max() < 1e-3
    assert y.mean(0).abs().max() < 1e-6
    assert block_covariances(x, 1)[0].abs().max() > 10  # the input was far from white: the layer did it
    if groups > 1:  # axes of different groups are not decorrelated: each group is white, not the whole
        assert (block_covariances(y[:, perm], 1)[0] - torch.eye(64, dtype=torch.float64)).abs().max() > 0.1


def test_shuffle_draws_a_new_permutation_every_call_and_undoes_it():
    torch.manual_seed(0)
    layer = fdsl.GroupWhitening(64, groups=4, shuffle=True)
    x = correlated(256, 64)
    layer(x)
    p1 = layer.last_perm.clone()
    layer(x)
    assert not torch.equal(p1, layer.last_perm) and torch.equal(p1.sort().values, torch.arange(64))
    # Whitening an already white batch is the identity for any grouping: the output equals the
    # input exactly when every axis is put back in its own place.
    xc = torch.randn(256, 64, dtype=torch.float64)
    white = torch.linalg.qr(xc - xc.mean(0)).Q * math.sqrt(256)  # orthonormal centred columns: covariance I
    layer = fdsl.GroupWhitening(64, groups=8, shuffle=True, eps=0.0)
    for _ in range(3):
        y = layer(white)
        assert not torch.equal(layer.last_perm, torch.arange(64))
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


def test_standardize_is_an_eps_0_batchnorm_in_train_mode_and_in_eval_mode():
    x = correlated(128, 32)
    bn = torch.nn.BatchNorm1d(32, affine=False, eps=1e-30, dtype=torch.float64)  # the authors' BatchNorm: eps 0
    ref = bn.train()(x)
    layer = fdsl.Standardize(32)
    assert not list(layer.buffers()) and not list(layer.parameters())  # no running averages, no affine
    torch.testing.assert_close(layer(x), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(layer.eval()(x), ref, atol=1e-12, rtol=0)  # eval mode: the batch's too
    assert (bn.eval()(x) - ref).abs().max() > 1  # (BatchNorm's running averages are not)
    x = x.float()
    torch.testing.assert_close(layer(x), ref.float(), atol=1e-5, rtol=1e-5)
    assert layer(x).dtype == torch.float32  # computed in float64, returned in the input's dtype
    # nn.BatchNorm1d's default eps (1e-5) is not it: a small input comes out small
    assert (torch.nn.BatchNorm1d(32, affine=False)(1e-4 * x).std(0) < 0.5).all()
    assert (layer(1e-4 * x).std(0) > 0.99).all()
    # Standardized, yet still correlated: exactly the dimensional-collapse loophole.
    assert fdsl.collapse_metrics(layer(x))["corr_strength"] > 0.5


@pytest.mark.parametrize("kind,groups,method", [("zca", 4, "eigh"), ("zca", 4, "newton"), ("zca", 1, "newton"),
                                                ("bn", None, "eigh")])
def test_shrinking_the_input_cannot_change_the_output_or_the_loss(kind, groups, method):
    x1, x2 = correlated(64, 32, seed=1), correlated(64, 32, seed=2)
    layer = machine_layer(32, groups=groups, method=method, decorr=kind)

    def out(c):
        torch.manual_seed(0)  # the same permutations for every scale
        z1, z2 = layer(c * x1), layer(c * x2)
        return z1, fdsl.siamese_loss(z1, z2, z1, z2)
    ref, ref_loss = out(1.0)
    for c in (1e-6, 1e-3, 1e3, 1e6):
        z, loss = out(c)
        torch.testing.assert_close(z, ref, atol=1e-9, rtol=1e-7)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-9)
    assert ref_loss.item() > 1  # the two views differ: a loss that could have shrunk


@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_constant_axes_give_zeros_and_finite_gradients(method):
    x = correlated(64, 16).clone()
    x[:, 3] = 2.0  # one constant axis in group 0 (axes 0-3)
    x[:, 12:] = -1.0  # group 3 entirely constant
    x.requires_grad_()
    y = machine_layer(16, groups=4, shuffle=False, method=method)(x)
    assert torch.isfinite(y).all()
    assert y[:, 3].abs().max() == 0 and y[:, 12:].abs().max() == 0  # nothing to whiten: 0
    cov = block_covariances(y[:, :3].detach(), 1)[0]  # the rest of group 0 is still whitened
    torch.testing.assert_close(cov, torch.eye(3, dtype=cov.dtype), atol=1e-3, rtol=0)
    (y * torch.randn(64, 16, dtype=y.dtype)).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    xs = x.detach().clone().requires_grad_()
    bn = machine_layer(16, method=method, decorr="bn")(xs)
    assert torch.isfinite(bn).all() and bn[:, 3].abs().max() == 0 and bn[:, 12:].abs().max() == 0
    (bn * torch.randn(64, 16, dtype=bn.dtype)).sum().backward()
    assert torch.isfinite(xs.grad).all()


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
    layer = machine_layer(x.shape[1], groups=1, shuffle=False, method=method, dtype=dtype, eps=eps)
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
    assert rel_err(y, y_ref) < 1e-7 and rel_err(g, g_ref) < 1e-6


def repeated_eigenvalue_cases():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(16, 3, generator=g, dtype=torch.float64)
    white = torch.linalg.qr(base - base.mean(0)).Q * 4  # covariance exactly I: one eigenvalue, 3 times
    return {"white": white, "duplicated axes": torch.cat([base, base, base[:, :2]], 1),  # rank 3 of 8
            "condition 1e3": spectrum_case(32, 8, 1e3)}  # and a plain full-rank group


@pytest.mark.parametrize("case", ["white", "duplicated axes", "condition 1e3"])
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_repeated_eigenvalues_give_finite_correct_gradients(case, method):
    # Autograd through torch.linalg.eigh divides by l_i - l_j: inf/NaN for the white case. eps 1e-5: the
    # rank-deficient case has derivatives of order (eps m)^(-1/2) off its span, beyond finite differences at 1e-8.
    x = repeated_eigenvalue_cases()[case]
    layer = machine_layer(x.shape[1], groups=1, shuffle=False, method=method, eps=1e-5)
    assert torch.autograd.gradcheck(layer, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-5, rtol=1e-4)
    _, g64 = whiten_with_grad(x, method, torch.float64, eps=1e-5)
    _, g32 = whiten_with_grad(x, method, torch.float32, eps=1e-5)
    assert torch.isfinite(g64).all() and torch.isfinite(g32).all() and rel_err(g32, g64) < 1e-2


@pytest.mark.parametrize("n,d,groups", [(64, 512, 16), (64, 16, 4)])  # the paper's size, and a small one
@pytest.mark.parametrize("method", ["eigh", "newton"])
def test_nan_input_is_an_error_in_words_on_the_cpu(n, d, groups, method):
    x = correlated(n, d, dtype=torch.float32)
    for bad in (float("nan"), float("inf")):
        x[5, 3] = bad
        for layer in (machine_layer(d, groups=groups, method=method), machine_layer(d, method=method, decorr="bn")):
            with pytest.raises(FloatingPointError, match="the whitening's input holds NaN or inf"):
                layer(x)


def test_every_misuse_of_the_layers_is_answered_in_words():
    GW, ST = fdsl.GroupWhitening, fdsl.Standardize
    x = correlated(64, 16).float()
    for groups in (5, 0, 4.0, "auto", True, None):
        with pytest.raises(ValueError, match=f"groups: a whole number that divides 16; got {re.escape(repr(groups))}"):
            GW(16, groups=groups)
    import numpy
    assert GW(16, groups=numpy.int64(4)).groups == 4 and GW(16, groups=torch.tensor(4).item()).groups == 4
    with pytest.raises(ValueError, match="groups of 16 axes need over 16 samples, got 16: more groups or a larger "):
        GW(16, groups=1)(x[:16])  # 16 centred samples span 15 directions
    GW(16, groups=1)(x[:17])  # 17: fine
    for layer in (GW(16, groups=4), ST(16)):
        with pytest.raises(ValueError, match="need over [14] samples, got 1: a larger batch$"):  # no "more groups"
            layer(x[:1])
        with pytest.raises(ValueError, match="expected floating-point features N x 16"):
            layer(torch.randint(-2, 3, (64, 16)))  # integers would be truncated
        with pytest.raises(ValueError, match=re.escape("N x 16, one view per call; got torch.float32 (2, 64, 16)")):
            layer(torch.stack([x, x]))  # both views stacked: refused, not mixed
        with pytest.raises(ValueError, match="N x 16"):
            layer(x[:, :8])
    for half in (torch.float16, torch.bfloat16):
        for make in (lambda: GW(16, groups=4, dtype=half), lambda: ST(16, dtype=half)):
            with pytest.raises(ValueError, match=r"dtype float32 or float64 \(not half\)"):
                make()
        assert GW(16, groups=4, dtype=torch.float32)(x.to(half)).dtype == half  # half inputs: fine
    with pytest.raises(ValueError, match="eps >= 0"):
        GW(16, groups=4, eps=-1e-3)
    assert repr(GW(16, groups=4, shuffle=False, eps=1e-6)) == (
        "GroupWhitening(16, groups=4, shuffle=False, eps=1e-06, dtype=torch.float64)")
    assert repr(ST(16, dtype=torch.float32)) == "Standardize(16, groups=16, shuffle=False, eps=0.0, dtype=torch.float32)"
    assert "shuffle=False" in repr(GW(16, groups=1))  # one group: nothing to shuffle
    assert repr(machine_layer(16, groups=4, method="newton")) == (
        "MachineWhitening(16, groups=4, shuffle=True, eps=1e-08, dtype=torch.float64, method='newton', "
        "global_batch=False)")


def test_the_copied_layers_edges():
    """What a student who copies the layer meets: no second derivative, overflow named, no fdsl command line."""
    x = correlated(64, 16).requires_grad_()
    torch.manual_seed(0)
    y = fdsl.GroupWhitening(16, groups=4, shuffle=False)(x)
    (grad,) = torch.autograd.grad((y * y.detach().flip(0)).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):  # a second derivative would come out wrong
        grad.sum().backward()
    big = correlated(64, 16).float() * 1e19  # finite in float32, its covariance is not
    with pytest.raises(FloatingPointError, match="the covariance overflows torch.float32"):
        fdsl.GroupWhitening(16, groups=4, dtype=torch.float32)(big)
    assert torch.isfinite(fdsl.GroupWhitening(16, groups=4)(big)).all()  # in float64 it is fine
    _, block = copied_layers()
    assert "--" not in re.sub(r"# --- copy (from|to) here.*", "", block)  # no flag of fdsl's command line
    assert "gradcheck" in fdsl.GroupWhitening.__doc__ and "shuffle=False" in fdsl.GroupWhitening.__doc__


def readme_imports():
    """The imports README tells a reader to put above the copied block, word for word."""
    readme = open(os.path.join(HERE, "README.md")).read()
    block = re.search(r"Put these imports at the top of your\s+file.*?```python\n(.*?)```", readme, re.S).group(1)
    assert "import torch\n" in block and "import fdsl" not in block
    return block


def copied_layers():
    """What a reader gets who copies fdsl.py's block under README's imports. -> (namespace, block)"""
    lines = open(FDSL).read().splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.startswith("# --- copy from here")]
    ends = [i for i, line in enumerate(lines) if line.startswith("# --- copy to here")]
    assert len(starts) == len(ends) == 1 and starts[0] < ends[0]
    block = "".join(lines[starts[0]:ends[0] + 1])
    namespace = {}
    exec(compile(readme_imports() + block, "copied.py", "exec"), namespace)
    return namespace, block


def test_the_layers_copy_out_and_run_alone():
    ns, block = copied_layers()
    assert "U diag(l^-1/2) U^T" in block and not re.search(r"\b(F|TF|torchvision|tqdm|Image|dist)\.", block)
    assert len(block.splitlines()) + len(readme_imports().splitlines()) <= 110  # one device's layer, nothing more
    x = correlated(256, 64)
    for shuffle in (True, False):
        for training in (True, False):
            layer = ns["GroupWhitening"](64, groups=4, shuffle=shuffle).train(training)
            xi = x.clone().requires_grad_()
            torch.manual_seed(0)
            y = layer(xi)
            for same in (fdsl.GroupWhitening(64, 4, shuffle), machine_layer(64, 4, shuffle)):  # what a run uses
                torch.manual_seed(0)
                assert torch.equal(y, same.train(training)(x))
            perm = layer.last_perm if shuffle else torch.arange(64)
            cov = block_covariances(y[:, perm].detach(), 4)
            assert (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 1e-3
            (y * torch.randn_like(y)).sum().backward()
            assert torch.isfinite(xi.grad).all() and xi.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the layer leaves autocast: float32 math stays float32
        layer = ns["GroupWhitening"](64, groups=4, dtype=torch.float32)
        y = layer(x.float())
    cov = block_covariances(y.double()[:, layer.last_perm], 4)
    assert y.dtype == torch.float32 and (cov - torch.eye(16, dtype=cov.dtype)).abs().max() < 1e-3
    with pytest.raises(ValueError, match="groups of 64 axes need over 64 samples, got 32"):
        ns["GroupWhitening"](64, groups=1)(torch.randn(32, 64))
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        ns["GroupWhitening"](64, groups=4)(x.clone().index_fill_(0, torch.tensor([3]), math.nan))
    torch.testing.assert_close(ns["Standardize"](64)(x), fdsl.Standardize(64)(x), atol=1e-12, rtol=0)
    assert torch.equal(fdsl.Standardize(64)(x), machine_layer(64, decorr="bn")(x))


def toy_siamese_training(norm, steps=60):
    """A student's toy: an MLP on two noisy views of 32-d points, `norm` after it, the paper's loss.
    -> (the loss of two fixed views of all points before training, after it; the outputs of all points)"""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    data = torch.randn(512, 32, generator=g)
    v1, v2 = [data + 0.1 * torch.randn(data.shape, generator=g) for _ in range(2)]

    def held_out_loss():
        with torch.no_grad():
            return (norm(net(v1)) - norm(net(v2))).pow(2).sum(1).mean().item()
    before = held_out_loss()
    for _ in range(steps):
        x = data[torch.randint(0, 512, (64,), generator=g)]
        z1 = norm(net(x + 0.1 * torch.randn(x.shape, generator=g)))
        z2 = norm(net(x + 0.1 * torch.randn(x.shape, generator=g)))
        loss = (z1 - z2).pow(2).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(loss.item())
    with torch.no_grad():
        return before, held_out_loss(), norm(net(data))


def test_a_copied_layer_trains_a_toy_siamese_network():
    ns, _ = copied_layers()
    for make in (lambda: ns["GroupWhitening"](16, groups=4), lambda: ns["Standardize"](16),
                 lambda: machine_layer(16, groups=4, method="newton")):
        before, after, z = toy_siamese_training(make())
        assert after < 0.6 * before  # the views agree more: the layer passes gradients the network learns from
        assert z.std(0).mean().item() == pytest.approx(1.0, abs=0.01)  # no complete collapse: the layer forbids it
    _, _, z = toy_siamese_training(torch.nn.Identity())  # without a layer the same toy shrinks its output
    assert z.std(0).mean().item() < 0.2


# Several processes (gloo on the CPU): whitening over the global batch equals one process's
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORLD_CASES = [dict(groups=4, shuffle=True), dict(groups=1, shuffle=False), dict(groups=32, shuffle=False),
               dict(groups=4, shuffle=True, method="newton"), "bn"]


def world_case(case, global_batch=False):
    """The layer of a case, its input x: N x D and the target its output is multiplied with."""
    target = torch.randn(64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    layer = machine_layer(32, decorr="bn", global_batch=global_batch) if case == "bn" else \
        machine_layer(32, **case, global_batch=global_batch)
    return layer, correlated(64, 32, seed=1), target


def _whitening_worker(rank, world, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    # A file store has no server process: with tcp://, rank 0 hosts the store, and a rank that
    # exits first can leave the other waiting in destroy_process_group.
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    for i, case in enumerate(WORLD_CASES):  # one process group for every case
        layer, x, target = world_case(case, global_batch=True)
        torch.manual_seed(0)  # the same permutation on every process
        xs = x[rank::world].clone().requires_grad_()
        y = layer(xs)
        (y * target[rank::world]).sum().backward()
        torch.save({"y": y.detach(), "grad": xs.grad}, os.path.join(out_dir, f"case{i}-rank{rank}.pt"))
    layer = machine_layer(32, groups=2, shuffle=False, global_batch=True).eval()
    torch.save({"y": layer(correlated(64, 32)[rank::world])}, os.path.join(out_dir, f"eval-rank{rank}.pt"))
    dist.barrier()  # every result is on disk
    os._exit(0)  # without gloo's teardown, which can hang once the peer has gone


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
        torch.testing.assert_close(part["y"], y.detach()[rank::2], atol=1e-9, rtol=0)
        torch.testing.assert_close(part["grad"], xr.grad[rank::2], atol=1e-9, rtol=1e-9)  # summed in another order
    if layer.num_features // layer.groups < 32:  # each half on its own is whitened otherwise: they shared
        torch.manual_seed(0)
        assert (layer(x[0::2]) - y.detach()[0::2]).abs().max() > 1e-3


def test_in_eval_mode_each_process_whitens_its_own_batch(two_processes):
    for rank in range(2):
        alone = fdsl.GroupWhitening(32, groups=2, shuffle=False)(correlated(64, 32)[rank::2])
        torch.testing.assert_close(torch.load(two_processes / f"eval-rank{rank}.pt", weights_only=True)["y"], alone,
                                   atol=1e-12, rtol=0)


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------

def images(n=8, size=32, seed=0):
    return fdsl.make_synthetic(n, size, seed)[0]


def unnormalize(x):
    mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    return x * std + mean


def test_augment_shapes_and_ranges():
    x = images(16)
    out = fdsl.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    pixels = unnormalize(out)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    assert (pixels - x.float() / 255).abs().mean() > 0.05  # an augmented view, not the image
    views = fdsl.augment(torch.cat([x, x]), torch.Generator().manual_seed(0)).chunk(2)  # two views in one call
    assert (views[0] - views[1]).flatten(1).abs().amax(1).min() > 0.05


def test_every_image_gets_its_own_crop():
    x = images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one image
    out = fdsl.random_resized_crop_flip(x.float() / 255, generator=torch.Generator().manual_seed(0))
    flat = out.flatten(1)
    assert all((flat[i] - flat[j]).abs().max() > 0.05 for i in range(6) for j in range(i))


def test_augment_reproduces_with_a_seeded_generator():
    x = images(8)
    a = fdsl.augment(x, torch.Generator().manual_seed(3))
    b = fdsl.augment(x, torch.Generator().manual_seed(3))
    c = fdsl.augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 0.1


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_crop_of_the_whole_image_is_exact_and_flip_is_a_mirror(mode):
    x = images(16).float() / 255
    out = fdsl.random_resized_crop_flip(x, scale=(1.0, 1.0), ratio=(1.0, 1.0), mode=mode,
                                        generator=torch.Generator().manual_seed(0))
    same = (out - x).flatten(1).abs().amax(1) < 1e-5
    mirrored = (out - x.flip(-1)).flatten(1).abs().amax(1) < 1e-5
    assert (same | mirrored).all() and same.any() and mirrored.any()  # each image: itself, or its mirror
    crops = fdsl.random_resized_crop_flip(x, scale=(0.08, 1.0), mode=mode, generator=torch.Generator().manual_seed(0))
    assert crops.min() >= 0 and crops.max() <= 1  # bicubic overshoots; the probe's crop is clamped


def test_hue_shift_matches_torchvision_for_a_single_factor():
    x = images(4).float() / 255
    for shift in (0.0, 0.07, -0.1, 0.5):
        mine = fdsl.shift_hue(x, torch.full((4, 1, 1), shift))
        torch.testing.assert_close(mine, TF.adjust_hue(x, shift), atol=2e-5, rtol=0)
    shifts = [0.1, -0.2, 0.3, 0.0]  # each image its own shift
    mine = fdsl.shift_hue(x, torch.tensor(shifts).view(4, 1, 1))
    for i, s in enumerate(shifts):
        torch.testing.assert_close(mine[i], TF.adjust_hue(x[i], s), atol=2e-5, rtol=0)


def test_colour_jitter_off_is_identity_and_on_changes_colours(monkeypatch):
    # Every draw of augment replaced by one value: 0.9 turns jitter (p 0.8) and grayscale (p 0.2) off,
    # 0.75 turns jitter on with factors 1.2 and a hue shift of 0.05.
    x = images(8)
    real_rand = torch.rand

    def views(value):
        monkeypatch.setattr(torch, "rand", lambda *shape, generator=None, device=None: torch.full(shape, value))
        try:
            crop = fdsl.network_input(fdsl.random_resized_crop_flip(x.float() / 255))
            return fdsl.augment(x), crop
        finally:
            monkeypatch.setattr(torch, "rand", real_rand)
    off, crop = views(0.9)
    torch.testing.assert_close(off, crop, atol=1e-5, rtol=0)
    on, crop = views(0.75)
    assert ((unnormalize(on) - unnormalize(crop)).flatten(1).abs().amax(1) > 0.05).all()


@pytest.mark.parametrize("size,resized", [(32, 36), (64, 73)])  # int(size x 8/7): 73 for 64 (9/8 would give 72)
def test_eval_view_is_the_authors_resize_and_centre_crop(size, resized):
    import torchvision.transforms as T
    x = images(8, size=size)
    pil = T.Compose([T.Resize(resized, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)])
    ref = torch.stack([TF.pil_to_tensor(pil(Image.fromarray(im.permute(1, 2, 0).numpy()))) for im in x])
    ours = fdsl.eval_view(x)
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    assert (ours.int() - ref.int()).abs().max() <= 1  # PIL's rounding, at most one grey level
    assert (ours.int() - x.int()).abs().float().mean() > 5  # and it is not the raw image


# ---------------------------------------------------------------------------------------------
# Collapse metrics and k-NN
# ---------------------------------------------------------------------------------------------

def test_metrics_of_constant_features():
    m = fdsl.collapse_metrics(torch.ones(100, 16) * 3)
    assert m["std"] == 0 and m["std_l2"] == 0 and m["corr_strength"] == 0 and m["eff_rank"] == 0


def test_metrics_of_rank_one_features():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(500, 1, generator=g) * torch.randn(1, 32, generator=g) + 0.5
    m = fdsl.collapse_metrics(z)
    assert m["corr_strength"] > 0.999 and m["eff_rank"] < 1.01
    assert m["spectrum"][0] == 1.0 and max(m["spectrum"][1:]) < 1e-6


def test_metrics_of_isotropic_gaussian():
    d = 32
    z = torch.randn(20000, d, generator=torch.Generator().manual_seed(0))
    m = fdsl.collapse_metrics(z)
    assert abs(m["std_l2"] - 1 / math.sqrt(d)) < 0.02 / math.sqrt(d)
    assert abs(m["std"] - 1) < 0.02 and m["corr_strength"] < 0.02 and m["eff_rank"] > 0.98 * d
    assert len(m["spectrum"]) == d and m["spectrum"] == sorted(m["spectrum"], reverse=True)


def test_corr_and_eff_rank_are_blind_to_complete_collapse():
    # One point plus noise of std 0.01: std sees the collapse, corr and eff_rank score it as healthy noise.
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(4096, 512, generator=g)
    point = torch.randn(1, 512, generator=g) * 5
    collapsed, healthy = fdsl.collapse_metrics(point + 0.01 * noise), fdsl.collapse_metrics(noise)
    assert collapsed["std"] < 0.011 and healthy["std"] > 0.95
    assert collapsed["eff_rank"] > 0.9 * 512 and collapsed["corr_strength"] < 0.05
    assert collapsed["eff_rank"] == pytest.approx(healthy["eff_rank"], rel=1e-6)


def test_knn_is_perfect_on_separable_clusters_and_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 64, generator=g) * 5
    ytr, yte = torch.arange(2000) % 10, torch.arange(1000) % 10
    ftr = centres[ytr] + torch.randn(2000, 64, generator=g)
    fte = centres[yte] + torch.randn(1000, 64, generator=g)
    assert fdsl.knn_accuracy(ftr, ytr, fte, yte) == 100.0
    noise_tr, noise_te = torch.randn(5000, 64, generator=g), torch.randn(2000, 64, generator=g)
    acc = fdsl.knn_accuracy(noise_tr, torch.randint(0, 10, (5000,), generator=g), noise_te,
                            torch.randint(0, 10, (2000,), generator=g))
    assert 6.0 < acc < 14.0


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def test_synthetic_data_is_deterministic_and_class_balanced():
    x1, y1 = fdsl.make_synthetic(200, 32, seed=5)
    x2, y2 = fdsl.make_synthetic(200, 32, seed=5)
    x3, _ = fdsl.make_synthetic(200, 32, seed=6)
    assert x1.shape == (200, 3, 32, 32) and x1.dtype == torch.uint8
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)
    assert torch.bincount(y1).tolist() == [20] * 10
    means = torch.stack([x1[y1 == c].float().mean((0, 2, 3)) for c in range(10)])
    assert (means.amax(0) - means.amin(0)).max() < 40  # classes differ in shape and texture, not in colour


def test_balanced_subset():
    y = torch.arange(1000) % 10
    keep = fdsl.balanced_subset(y, 300, seed=0)
    assert torch.bincount(y[keep]).tolist() == [30] * 10 and len(set(keep.tolist())) == 300
    assert keep.tolist() == sorted(keep.tolist())  # in the data's order
    assert not torch.equal(fdsl.balanced_subset(y, 300, seed=1), keep)  # chosen at random, by seed
    keep = fdsl.balanced_subset(y, 25, seed=0)  # 25 over 10 classes: 3 or 2 each
    assert sorted(torch.bincount(y[keep], minlength=10).tolist()) == [2] * 5 + [3] * 5
    assert torch.equal(fdsl.balanced_subset(y, 0, seed=0), torch.arange(1000))  # 0: all


COLOURS = {"blue": (0, 0, 255), "green": (0, 255, 0), "red": (255, 0, 0)}


def write_image_folder(root, per_class=4, test_name="test"):
    for split in ("train", test_name):
        for name, rgb in COLOURS.items():
            os.makedirs(os.path.join(root, split, name))
            for i in range(per_class):
                size = (32, 32) if i % 2 == 0 else (48, 40)  # some need resizing
                Image.new("RGB", size, rgb).save(os.path.join(root, split, name, f"{i}.png"))


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_an_image_folder_loads_through_the_real_path(tmp_path, test_name):
    write_image_folder(tmp_path, test_name=test_name)
    cfg = fdsl.settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--batch-size", "4", "--no-progress",
                         "--device", "cpu", "--decorr", "none"])
    data = fdsl.load_data(cfg)
    assert data["classes"] == ["blue", "green", "red"]  # ImageFolder order: sorted
    assert data["train_x"].shape == (12, 3, 32, 32) and data["train_x"].dtype == torch.uint8
    assert data["bank"].shape == data["test"].shape == (12, 3, 32, 32)
    assert data["train_y"].tolist() == data["test_y"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert len(data["metric"]) == 12  # whole batches of 4
    for label, rgb in enumerate(COLOURS.values()):  # each class has its colour in the right channel
        mean = data["train_x"][data["train_y"] == label].float().mean((0, 2, 3))
        assert mean.tolist() == pytest.approx([float(c) for c in rgb], abs=1)


def test_a_folder_decodes_only_the_images_of_the_subsets(tmp_path, monkeypatch):
    write_image_folder(tmp_path, per_class=10)  # 30 training and 30 test images
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda path, *args: opened.append(path) or real_open(path, *args))
    cfg = fdsl.settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--batch-size", "4", "--decorr", "none",
                         "--train-subset", "6", "--test-subset", "9", "--device", "cpu", "--no-progress"])
    data = fdsl.load_data(cfg)
    assert len(opened) == 6 + 9 and len(set(opened)) == 15  # each image of the subsets once, no other
    assert data["train_y"].tolist() == [0, 0, 1, 1, 2, 2] and data["test_y"].tolist() == [0] * 3 + [1] * 3 + [2] * 3
    for label, rgb in enumerate(COLOURS.values()):  # each label still has its images
        mean = data["train_x"][data["train_y"] == label].float().mean((0, 2, 3))
        assert mean.tolist() == pytest.approx([float(c) for c in rgb], abs=1)


def test_a_damaged_image_is_named_in_one_line(tmp_path, capsys):
    write_image_folder(tmp_path)
    bad = tmp_path / "train" / "green" / "2.png"
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    assert_one_line_error(["--dataset", "folder", "--data-dir", str(tmp_path), "--arch", "small", "--no-progress",
                           "--out", str(tmp_path / "r")], capsys, str(bad), "cannot be read", "DIR/train/<class>/*")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("layout", ["missing", "empty", "no images"])
def test_an_empty_or_missing_image_folder_is_one_line(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "no images":
        for split in ("train", "test"):
            (root / split / "cat").mkdir(parents=True)
    assert_one_line_error(["--dataset", "folder", "--data-dir", str(root), "--arch", "small", "--no-progress",
                           "--out", str(tmp_path / "r")], capsys, f"--data-dir {root}", "DIR/train/<class>/*")


def test_cifar_offline_gives_one_clear_line(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.cifar as cifar

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    assert_one_line_error(["--dataset", "cifar10", "--arch", "small", "--data-dir", str(tmp_path / "data"),
                           "--out", str(tmp_path / "run")], capsys,
                          "cifar10 is not in", "could not be downloaded", "--dataset folder", "--dataset synthetic")


# ---------------------------------------------------------------------------------------------
# Runs end to end through main(): the run folder, the table, the paper's findings in miniature
# ---------------------------------------------------------------------------------------------

TINY = ["--dataset", "synthetic", "--arch", "small", "--image-size", "16", "--train-subset", "512",
        "--test-subset", "200", "--proj-dim", "64", "--proj-hidden", "128", "--groups", "4", "--batch-size", "32",
        "--lr", "0.1", "--warmup-epochs", "0", "--epochs", "3", "--eval-every", "0", "--linear-epochs", "1",
        "--no-progress"]
SHORT = TINY + ["--train-subset", "256", "--epochs", "1", "--linear-epochs", "0"]  # later flags win: 8 steps


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    """The three layers trained alike (3 epochs, 512 images): {decorr: (results, log, folder, printed)}."""
    root, runs = tmp_path_factory.mktemp("findings"), {}
    for decorr in ("none", "bn", "zca"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            results = fdsl.main(TINY + ["--decorr", decorr, "--out", str(root / decorr)])
        runs[decorr] = (results, read_log(root / decorr / "log.jsonl"), root / decorr, printed.getvalue())
    return runs


def copy_run(findings, decorr, tmp_path, finished=False):
    """A copy of a findings run to damage; unfinished (no results.json) unless asked."""
    run = tmp_path / f"copy-{decorr}"
    shutil.copytree(findings[decorr][2], run)
    if not finished:
        (run / "results.json").unlink()
    return run


def test_no_normalization_collapses_completely(findings):
    results, log, _, _ = findings["none"]
    start, end = log[0]["collapse"]["projector"], results["collapse"]["projector"]
    assert end["std"] < start["std"] / 5 and end["std_l2"] < start["std_l2"] / 2


def test_standardization_and_whitening_prevent_complete_collapse(findings):
    none = findings["none"][0]["collapse"]["projector"]["std"]
    for decorr in ("bn", "zca"):
        collapse = findings[decorr][0]["collapse"]
        assert collapse["normalized"]["std"] > 0.99  # the layer's output keeps unit scale by construction
        assert collapse["projector"]["std"] > 10 * none


def test_standardization_collapses_dimensions_and_whitening_does_not(findings):
    bn = findings["bn"][0]["collapse"]["projector"]
    zca = findings["zca"][0]["collapse"]["projector"]
    assert bn["corr_strength"] > 0.9 and bn["eff_rank"] < 4
    assert zca["corr_strength"] < bn["corr_strength"] - 0.3 and zca["eff_rank"] > 3 * bn["eff_rank"]


def test_the_linear_probe_runs_and_gives_a_percentage(findings):
    for decorr, (results, _, _, printed) in findings.items():
        acc = results["linear_acc"]
        assert 0 <= acc <= 100 and (acc * 2) == pytest.approx(round(acc * 2))  # k of 200 test images
        assert f"linear probe (1 epochs): {acc:.2f}%" in printed


def test_the_linear_probe_learns_what_the_features_hold(tmp_path):
    write_image_folder(tmp_path)  # three classes, one colour each
    cfg = fdsl.settings(["--dataset", "folder", "--data-dir", str(tmp_path), "--batch-size", "4",
                         "--linear-epochs", "2", "--no-progress", "--device", "cpu", "--decorr", "none"])
    data = fdsl.load_data(cfg)
    colour = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())  # each image's mean colour
    assert fdsl.linear_probe(colour, 3, data, cfg) == 100.0
    blind = torch.nn.Sequential(colour, torch.nn.Linear(3, 3))
    torch.nn.init.zeros_(blind[1].weight)  # features that hold nothing: one class for all, a third right
    assert fdsl.linear_probe(blind, 3, data, cfg) == pytest.approx(100 / 3, abs=1e-4)


def test_a_run_folder_holds_config_log_results_and_checkpoint(findings):
    results, log, run, _ = findings["zca"]
    assert sorted(os.listdir(run)) == ["checkpoint.pt", "config.json", "log.jsonl", "results.json"]
    assert [row["epoch"] for row in log] == [0, 1, 2, 3]
    assert [row["epoch"] for row in log if "knn_acc" in row] == [0, 3]  # --eval-every 0: first and last
    assert log[0]["loss"] is None and all(row["loss"] > 0 and row["images_per_s"] > 0 for row in log[1:])
    assert log[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to 0
    assert set(results["collapse"]) == {"backbone", "projector", "normalized"} and results["epochs"] == 3
    assert results["knn_acc"] == log[-1]["knn_acc"] and 0 <= results["knn_acc"] <= 100
    config = json.loads((run / "config.json").read_text())
    assert config["command"] == "python fdsl.py " + " ".join(TINY + ["--decorr", "zca", "--out", str(run)])
    assert config["decorr"] == "zca" and config["groups"] == 4 and config["step"] == results["step"] == "eager"
    digest = hashlib.sha256(open(FDSL, "rb").read()).hexdigest()[:16]
    for made in (results, config):  # what made the numbers: libraries, device, this file's version
        assert made["torch"] == torch.__version__ and made["torchvision"] == torchvision.__version__
        assert made["device_name"].endswith(f"{os.cpu_count()} CPUs") if os.path.isfile("/proc/cpuinfo") else \
            made["device_name"] == "cpu"
        assert re.fullmatch(rf"([0-9a-f]{{40}} )?sha256:{digest}", made["fdsl_version"])
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 3 and set(state) >= {"model", "optimizer", "scheduler", "scaler", "config"}


def test_the_table_has_a_header_and_a_row_per_epoch_with_std_corr_erank_and_knn(findings):
    # proj. std, corr, erank: the projector's output h; z erank: the layer's output, which the loss compares
    _, log, _, printed = findings["zca"]
    lines = printed.splitlines()
    header = [i for i, line in enumerate(lines) if line.split()[:2] == ["epoch", "loss"]]
    assert len(header) == 1
    assert re.fullmatch(r"\s*epoch\s+loss\s+lr\s+img/s\s+knn %\s+proj\. std\s+corr\s+erank\s+z erank\s+time",
                        lines[header[0]])
    assert lines[header[0] - 1].startswith("fdsl: synthetic (512 / 200 images), small, decorr=zca groups=4")
    widths = [5, 10, 9, 8, 6, 10, 5, 6, 7, 7]  # right-aligned under the header's names
    for line, row in zip(lines[header[0] + 1:header[0] + 5], log):
        cells, at = [], 0
        for w in widths:
            cells.append(line[at:at + w].strip())
            at += w + 1
        assert cells[0] == str(row["epoch"])
        if "knn_acc" in row:
            p, z = row["collapse"]["projector"], row["collapse"]["normalized"]
            assert cells[4:9] == [f"{row['knn_acc']:.2f}", f"{p['std']:.4g}", f"{p['corr_strength']:.2f}",
                                  f"{p['eff_rank']:.1f}", f"{z['eff_rank']:.1f}"]
        else:
            assert cells[4:9] == ["", "", "", "", ""]
        assert cells[1] == ("" if row["loss"] is None else f"{row['loss']:.4g}")
    assert f"k-NN {log[-1]['knn_acc']:.2f}% after 3 epochs" in printed


def ctrl_c_in_epoch(monkeypatch, epoch, after_steps=3):
    """Ctrl-C in the middle of an epoch: KeyboardInterrupt after `after_steps` of its steps (the epoch's
    progress bar, which the training loop walks, raises it)."""
    real = fdsl.progress

    def interrupted(items, what, cfg, total=None):
        bar = real(items, what, cfg, total)
        if what != f"epoch {epoch}/{cfg.epochs}":
            return bar

        class CtrlC:  # the bar, raising after some steps
            def __iter__(self):
                for i, item in enumerate(bar):
                    if i == after_steps:
                        raise KeyboardInterrupt
                    yield item

            def set_postfix(self, **kwargs):
                bar.set_postfix(**kwargs)
        return CtrlC()
    monkeypatch.setattr(fdsl, "progress", interrupted)


def without_timings(log):
    return [{k: v for k, v in row.items() if k not in ("time", "images_per_s")} for row in log]


def test_resume_after_ctrl_c_continues_exactly(findings, tmp_path, monkeypatch, capsys):
    straight, straight_log, straight_dir, _ = findings["zca"]
    run = tmp_path / "b"
    ctrl_c_in_epoch(monkeypatch, 2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        fdsl.main(TINY + ["--decorr", "zca", "--out", str(run)])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == f"fdsl: interrupted; go on: python fdsl.py --resume {run}"
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 1
    assert [row["epoch"] for row in read_log(run / "log.jsonl")] == [0, 1] and not (run / "results.json").exists()
    monkeypatch.undo()

    resumed = fdsl.main(["--resume", str(run), "--no-progress"])
    log = read_log(run / "log.jsonl")
    assert [row["epoch"] for row in log] == [0, 1, 2, 3]
    # every random stream is a function of (seed, epoch): the resumed run is the same run, to the bit
    assert without_timings(log) == without_timings(straight_log)
    assert resumed["knn_acc"] == straight["knn_acc"] and resumed["linear_acc"] == straight["linear_acc"]
    assert resumed["collapse"] == straight["collapse"]
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (straight_dir, run))
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["epoch"] == b["epoch"] == 3
    command = json.loads((run / "config.json").read_text())["command"]
    assert command == "python fdsl.py " + " ".join(TINY + ["--decorr", "zca", "--out", str(run)])  # what started it


def test_ctrl_c_in_the_first_epoch_resumes_with_every_epoch_logged_once(tmp_path, monkeypatch):
    run = tmp_path / "r"
    ctrl_c_in_epoch(monkeypatch, 1, after_steps=0)
    with pytest.raises(SystemExit) as e:
        fdsl.main(SHORT + ["--out", str(run)])
    assert e.value.code == 130 and torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == 0
    monkeypatch.undo()
    fdsl.main(["--resume", str(run)])
    assert [row["epoch"] for row in read_log(run / "log.jsonl")] == [0, 1]


def test_ctrl_c_before_anything_is_saved_says_so_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    def ctrl_c(*args):
        raise KeyboardInterrupt
    for where in ("load_data", "evaluate"):  # before the run folder, and in epoch 0's evaluation: config.json
        monkeypatch.setattr(fdsl, where, ctrl_c)
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            fdsl.main(SHORT + ["--out", str(tmp_path / "r")])
        assert e.value.code == 130 and capsys.readouterr().err.strip() == "fdsl: interrupted; nothing saved yet"
        assert not (tmp_path / "r").exists()  # nothing to delete by hand, nothing that --resume would refuse
        monkeypatch.undo()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file")
    monkeypatch.setattr(fdsl, "evaluate", ctrl_c)
    with pytest.raises(SystemExit):
        fdsl.main(SHORT + ["--out", str(tmp_path / "mine")])
    assert os.listdir(tmp_path / "mine") == ["notes.txt"]  # what the run wrote is gone, nothing else


def test_resuming_a_finished_run_says_so_in_one_line(findings, capsys):
    results, _, run, _ = findings["zca"]
    capsys.readouterr()
    assert fdsl.main(["--resume", str(run)]) == results
    out = capsys.readouterr().out.strip()
    assert out == f"fdsl: {run} is a finished run; start a new one to train longer"


def test_output_to_a_file_has_no_progress_bars_and_a_short_warm_up_says_so(tmp_path):
    # A log of a run is read later: no carriage returns from progress bars (on a terminal they are shown).
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        p = subprocess.run([sys.executable, FDSL, *SHORT, "--progress", "--warmup-epochs", "2", "--out",
                            str(tmp_path / "r")], stdout=stdout, stderr=stderr, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, err.read_text()
    printed = out.read_text() + err.read_text()
    assert "\r" not in printed and "epoch 1/1" not in printed  # no bar, not even its last state
    assert "note: the warm-up (2 epochs) is not shorter than the run" in printed
    assert re.search(r"^\s+1\s+[\d.]+", out.read_text(), re.M)  # the table's rows are there


def test_laptop_sets_the_laptop_recipe_and_flags_beside_it_win():
    laptop = fdsl.parse_settings(["--laptop"])
    assert laptop.laptop and all(getattr(laptop, k) == v for k, v in fdsl.LAPTOP.items())
    plain = fdsl.parse_settings([])
    assert any(getattr(plain, k) != v for k, v in fdsl.LAPTOP.items())  # they are not the paper's defaults
    for args in (["--laptop", "--epochs", "3", "--lr", "0.05"], ["--epochs", "3", "--laptop", "--lr", "0.05"]):
        cfg = fdsl.parse_settings(args)
        assert cfg.epochs == 3 and cfg.lr == 0.05 and cfg.arch == "small" and cfg.train_subset == 5000


def test_help_says_every_default_in_words(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as e:
        fdsl.parse_settings(["--help"])
    assert e.value.code == 0
    options, epilog = capsys.readouterr().out.split("options:")[1].split("\n\n")
    assert epilog.strip() == "Examples: the top of fdsl.py."
    entries = {}  # flag -> its help text, from argparse's layout: "  --flag ..." then deeper-indented lines
    for line in options.splitlines():
        if line.startswith("  -"):
            flag = line.split()[0].rstrip(",")
            entries[flag] = " ".join(line.split()[1:])
        elif line.strip():
            entries[flag] += " " + line.strip()
    assert set(entries) == {"-h"} | {f"--{k.replace('_', '-')}" for k in fdsl.RECIPE}
    for flag, text in entries.items():  # one default each, said in words: no "(default: )", no "True"
        if flag not in ("-h", "--resume"):  # --resume has none: without it a run starts anew
            assert re.search(r"\(default: [^)]+\)$", text) and text.count("(default:") == 1, text
            assert not re.search(r"default: (True|False)", text), text
    assert "default" not in entries["--resume"]
    assert entries["--shuffle"].endswith("(default: on)") and entries["--predictor"].endswith("(default: off)")
    assert entries["--lr"].endswith("(default: 0.02)") and entries["--groups"].endswith("(default: 16)")
    assert all(f"--{k.replace('_', '-')} {v}" in entries["--laptop"] for k, v in fdsl.LAPTOP.items())  # spelled out


# ---------------------------------------------------------------------------------------------
# Bad input: one line, exit 2; NaN: one line naming the last good checkpoint, exit 1
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,words", [
    (["--whiten", "newton"], "unrecognized arguments: --whiten newton (see --help)"),
    (["--decorr", "pca"], "invalid choice: 'pca'"),
    (["--groups", "5"], "--groups 5: a number that divides --proj-dim 512, or auto"),
    (["--groups", "two"], "--groups two: a number that divides"),
    (["--groups", "1", "--batch-size", "256"], "groups of 512 axes need a batch of more than 512 images, not 256"),
    (["--groups", "auto", "--batch-size", "48"], "--groups 22: a number that divides"),  # ceil(2 x 512 / 48)
    (["--batch-size", "1"], "--batch-size must be at least 2"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--eps", "-1"], "--eps must be at least 0"),
    (["--resume", "/nonexistent/run"], "--resume /nonexistent/run: no checkpoint.pt there"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 is not supported on cpu"),
    (["--image-size", "4"], "--image-size must be at least 8"),
    (["--dataset", "synthetic", "--image-size", "16", "--train-subset", "16"],
     "only 16 training images for a batch of 64"),
])
def test_bad_flags_exit_2_with_one_line(args, words, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(args + ["--arch", "small"] * ("--resume" not in args), capsys, "fdsl: error:", words)
    assert os.listdir(tmp_path) == []  # nothing written


def test_groups_auto_is_the_authors_rule():
    groups = lambda *a: fdsl.settings(["--groups", "auto", "--out", "x", *a]).groups
    assert groups() == 16 and groups("--batch-size", "512") == 2 and groups("--batch-size", "32") == 32
    assert groups("--batch-size", "128", "--proj-dim", "2") == 1  # ceil(2 x D / N): groups of about N / 2


def test_a_bad_flag_from_the_shell_has_no_traceback():
    p = subprocess.run([sys.executable, FDSL, "--groups", "3"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 2 and "Traceback" not in p.stderr and p.stdout == ""
    assert p.stderr.strip() == "fdsl: error: --groups 3: a number that divides --proj-dim 512, or auto"


def test_a_folder_that_holds_a_run_is_not_overwritten(findings, tmp_path, capsys):
    _, log, run, _ = findings["bn"]
    assert_one_line_error(TINY + ["--out", str(run)], capsys, f"{run} already holds a run", f"--resume {run}")
    assert read_log(run / "log.jsonl") == log
    for name in fdsl.RUN_FILES:  # any one of a run's files: a copy of a finished run has no checkpoint
        folder = tmp_path / name
        folder.mkdir()
        (folder / name).write_text("{}")
        err = assert_one_line_error(TINY + ["--out", str(folder)], capsys, f"{folder} already holds a run ({name})")
        assert ("--resume" in err) == (name == "checkpoint.pt")  # only a checkpoint can be gone on with
        assert os.listdir(folder) == [name] and (folder / name).read_text() == "{}"  # unchanged


def test_resume_takes_the_saved_settings_only(findings, capsys):
    run = findings["bn"][2]
    assert_one_line_error(["--resume", str(run), "--epochs", "5"], capsys, "--resume takes the run's saved settings",
                          "drop --epochs")


def test_resume_of_a_folder_without_a_checkpoint_or_with_a_damaged_config(findings, tmp_path, capsys):
    assert_one_line_error(["--resume", str(tmp_path)], capsys, f"--resume {tmp_path}: no checkpoint.pt there",
                          "not an fdsl run folder")
    (tmp_path / "config.json").write_text("{}")  # a run stopped before its first checkpoint (an older fdsl's)
    assert_one_line_error(["--resume", str(tmp_path)], capsys, "stopped before its first checkpoint",
                          "delete it and start anew")
    run = copy_run(findings, "bn", tmp_path)
    (run / "config.json").write_text('{"decorr": "bn", ')  # cut off mid-write
    assert_one_line_error(["--resume", str(run)], capsys, str(run / "config.json"), "cannot be read as JSON")


def test_a_damaged_checkpoint_is_one_line(findings, tmp_path, capsys):
    run = copy_run(findings, "bn", tmp_path)
    ckpt = run / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    assert_one_line_error(["--resume", str(run)], capsys, str(ckpt), "damaged, or not this network's")
    assert not (run / "results.json").exists()


class _Planted:
    """An object whose unpickling would create a file: what a malicious checkpoint carries."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_checkpoint_holding_code_is_refused_and_nothing_runs(findings, tmp_path, capsys):
    run = copy_run(findings, "bn", tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["epoch"], state["note"] = 1, _Planted(str(tmp_path / "pwned"))
    torch.save(state, run / "checkpoint.pt")
    before = (run / "log.jsonl").read_text()
    assert_one_line_error(["--resume", str(run)], capsys, str(run / "checkpoint.pt"), "could run code; refused")
    assert not (tmp_path / "pwned").exists() and (run / "log.jsonl").read_text() == before
    assert not (run / "results.json").exists()


def test_a_checkpoint_of_another_network_is_refused_in_one_line(findings, tmp_path, capsys):
    run = copy_run(findings, "zca", tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["proj_dim"] = 32  # the settings describe a network of another shape than the checkpoint's
    (run / "config.json").write_text(json.dumps(config))
    before = (run / "log.jsonl").read_text()
    assert_one_line_error(["--resume", str(run)], capsys, str(run / "checkpoint.pt"), "not this network's",
                          "RuntimeError")
    assert (run / "log.jsonl").read_text() == before and not (run / "results.json").exists()


def assert_run_stops(args, capsys, *words):
    """main(args) stops with exit 1 and one line naming the last good checkpoint, epoch 0's."""
    out = args[args.index("--out") + 1]
    err = assert_one_line_error(args, capsys, "fdsl: stopped:", *words, code=1)
    assert f"the last good checkpoint is {out}/checkpoint.pt" in err
    state = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert [row["epoch"] for row in read_log(os.path.join(out, "log.jsonl"))] == [0]  # no row for epoch 1
    assert not os.path.exists(os.path.join(out, "results.json"))


def test_a_nan_loss_stops_the_run(tmp_path, monkeypatch, capsys):
    real, calls = fdsl.siamese_loss, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 8 else loss  # the last of epoch 1's 8 steps
    monkeypatch.setattr(fdsl, "siamese_loss", poisoned)
    assert_run_stops(SHORT + ["--out", str(tmp_path / "r")], capsys, "the loss is nan at epoch 1, step 8")


def test_non_finite_weights_behind_a_finite_loss_stop_the_run(tmp_path, monkeypatch, capsys):
    real = fdsl.make_step

    def poisoned(cfg, parts, generator):
        step = real(cfg, parts, generator)
        calls = []

        def step_then_inf(x):
            loss = step(x)
            calls.append(1)
            if len(calls) == 8:  # after epoch 1's last step, whose loss was finite
                with torch.no_grad():
                    parts["model"].projector[0].weight[0, 0] = float("inf")
            return loss
        return step_then_inf
    monkeypatch.setattr(fdsl, "make_step", poisoned)
    assert_run_stops(SHORT + ["--out", str(tmp_path / "r")], capsys, "the weights after epoch 1 are not finite")


def test_non_finite_features_at_an_evaluation_stop_the_run(tmp_path, monkeypatch, capsys):
    real, calls = fdsl.encode, []

    def diverged(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out * float("nan") if len(calls) > 2 else out  # two calls per evaluation: from epoch 1's on
    monkeypatch.setattr(fdsl, "encode", diverged)
    assert_run_stops(SHORT + ["--out", str(tmp_path / "r")], capsys, "the backbone's features are not finite")


# ---------------------------------------------------------------------------------------------
# The GPU path, simulated on the CPU: the plan, the CUDA graph's self-check, no host reads
# ---------------------------------------------------------------------------------------------

def fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for name in ("benchmark", "allow_tf32"):  # start_machine turns them on: put back after the test
        monkeypatch.setattr(torch.backends.cudnn, name, getattr(torch.backends.cudnn, name))
    if not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):  # a CPU-only build's stand-in class
        monkeypatch.setattr(torch.cuda.CUDAGraph, "register_generator_state", lambda self, g: None, raising=False)


@pytest.mark.parametrize("capability,amp,step", [((6, 1), None, "graph"), ((7, 0), "float16", "eager"),
                                                 ((7, 5), "float16", "eager"), ((8, 0), "bfloat16", "graph"),
                                                 ((9, 0), "bfloat16", "graph")])
def test_the_plan_on_each_gpu_generation(monkeypatch, capsys, capability, amp, step):
    # V100 and T4 (7.x): fp16 with GradScaler, whose inf check is read on the host: eager. A100 and H100 (8.0, 9.0):
    # bf16 and the CUDA graph, whose whitening is Newton-Schulz (eigh waits for the host).
    fake_gpu(monkeypatch, capability)
    method = "newton" if step == "graph" else "eigh"
    for device in ("auto", "cuda"):
        cfg = fdsl.settings(["--device", device])
        fdsl.start_machine(cfg)
        assert (cfg.device, cfg.amp, cfg.step, cfg.whiten_method) == ("cuda:0", amp, step, method)
    cfg = fdsl.settings(["--no-graph"])
    assert (cfg.amp, cfg.step, cfg.whiten_method) == (amp, "eager", "eigh")
    for precision, forced, forced_step in (("fp32", None, "graph"), ("fp16", "float16", "eager"),
                                           ("bf16", "bfloat16", "graph")):
        cfg = fdsl.settings(["--precision", precision])
        assert (cfg.amp, cfg.step) == (forced, forced_step)
    assert capsys.readouterr().out == ""  # on a GPU nothing to say


def test_the_plan_on_a_cpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for args, amp in ((["--arch", "small"], None), (["--arch", "small", "--precision", "bf16"], "bfloat16")):
        cfg = fdsl.settings(args)
        fdsl.start_machine(cfg)
        assert (cfg.device, cfg.amp, cfg.step, cfg.whiten_method, cfg.world) == ("cpu", amp, "eager", "eigh", 1)
    assert capsys.readouterr().out == ""
    fdsl.start_machine(fdsl.settings([]))  # the paper's ResNet-18 on a CPU: one line pointing to --laptop
    out = capsys.readouterr().out.strip()
    assert "\n" not in out and out.startswith("note: no CUDA GPU") and "--laptop" in out
    with pytest.raises(SystemExit) as e:
        fdsl.settings(["--device", "cuda"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "fdsl: error: --device cuda: no such GPU is visible here"


GRAPH_ARGS = ["--dataset", "synthetic", "--arch", "small", "--image-size", "16", "--proj-dim", "64",
              "--proj-hidden", "128", "--groups", "4", "--batch-size", "32", "--warmup-epochs", "0", "--device", "cpu",
              "--out", "unused"]


def training(amp=None, method="newton", epochs=200):
    """The settings, the parts and step(x) as settings() plans them on a GPU: the graph's whitening, amp.
    -> (cfg, parts, step, generator)"""
    cfg = fdsl.settings(GRAPH_ARGS + ["--epochs", str(epochs)])
    cfg.amp, cfg.whiten_method = amp, method
    parts = fdsl.build_training(cfg, steps_per_epoch=4)
    generator = torch.Generator()
    return cfg, parts, fdsl.make_step(cfg, parts, generator), generator


def batches():
    return images(128, size=16, seed=3).split(32)


def train_steps(step, parts, generator):
    generator.manual_seed(5)
    torch.manual_seed(7)
    losses = []
    for x in batches():
        losses.append(step(x).item())
        parts["scheduler"].step()
    return losses


def one_step_taken(training):
    """A network that has taken a step: its optimizer holds momentum, as a resumed run's does. -> training"""
    _, parts, step, generator = training
    generator.manual_seed(1)
    step(batches()[-1])
    parts["scheduler"].step()
    assert parts["optimizer"].state  # momentum buffers
    return training


@pytest.fixture(scope="module")
def eager_training():
    _, parts, step, generator = one_step_taken(training())
    return train_steps(step, parts, generator), parts["model"].state_dict()


def fake_capture(replay_does):
    """capture's stand-in on a CPU: fn runs as the warm-up would; the "replay" runs the step eagerly (what a good
    graph does), does nothing, steps twice while reporting the first loss, or the capture fails."""
    def capture(fn, generator):
        out = fn()
        if replay_does == "raises":
            raise RuntimeError("operation not permitted when stream is capturing")

        def replay():
            if replay_does != "nothing":
                out.copy_(fn())
                if replay_does == "twice":
                    fn()
        return out, replay
    return capture


def faithful_capture(optimizer):
    """capture's stand-in that replays as a graph would: with the learning-rate tensors and the fused SGD that
    were in the optimizer when it recorded, whatever the optimizer holds now."""
    def capture(fn, generator):
        recorded = [dict(group) for group in optimizer.param_groups]
        out = fn()

        def replay():
            now = [dict(group) for group in optimizer.param_groups]
            for group, then in zip(optimizer.param_groups, recorded):
                group.update(lr=then["lr"], fused=then["fused"], foreach=then["foreach"])
            out.copy_(fn())
            for group, then in zip(optimizer.param_groups, now):
                group.update(lr=then["lr"], fused=then["fused"], foreach=then["foreach"])
        return out, replay
    return capture


def test_a_replay_learns_at_the_schedules_rate(monkeypatch):
    # One epoch of 4 steps: the cosine schedule goes from the peak to 0, so a replay that kept the rate it was
    # recorded (or checked) with would move the weights much further.
    eager = one_step_taken(training(epochs=1))
    losses = train_steps(eager[2], eager[1], eager[3])
    cfg, parts, step, generator = one_step_taken(training(epochs=1))
    monkeypatch.setattr(fdsl, "capture", faithful_capture(parts["optimizer"]))
    graphed = fdsl.graph_step(step, batches()[0], parts, generator, cfg)
    assert graphed is not step
    assert train_steps(graphed, parts, generator) == pytest.approx(losses, rel=1e-5)
    for name, value in parts["model"].state_dict().items():
        torch.testing.assert_close(value, eager[1]["model"].state_dict()[name], rtol=1e-4, atol=1e-6)


def test_a_good_replay_is_kept_and_trains_as_the_eager_step(eager_training, monkeypatch, capsys):
    eager, eager_state = eager_training
    monkeypatch.setattr(fdsl, "capture", fake_capture("the step"))
    cfg, parts, step, generator = one_step_taken(training())
    capsys.readouterr()
    cfg.step = "graph"  # as the settings plan it on a GPU
    graphed = fdsl.graph_step(step, batches()[0], parts, generator, cfg)
    assert graphed is not step and capsys.readouterr().out == "" and cfg.step == "graph"
    for group in parts["optimizer"].param_groups:  # the optimizer as it was: checkpoints see no graph
        assert isinstance(group["lr"], float) and group["fused"] is None and group["foreach"] is None
    assert train_steps(graphed, parts, generator) == eager  # the check left no trace, to the bit
    for name, value in parts["model"].state_dict().items():
        assert torch.equal(value, eager_state[name]), name


@pytest.mark.parametrize("replay_does", ["nothing", "twice", "raises"])
def test_a_bad_replay_is_refused_and_the_eager_step_trains_on(eager_training, monkeypatch, capsys, replay_does):
    eager, eager_state = eager_training
    monkeypatch.setattr(fdsl, "capture", fake_capture(replay_does))
    cfg, parts, step, generator = one_step_taken(training())
    capsys.readouterr()
    assert fdsl.graph_step(step, batches()[0], parts, generator, cfg) is step and cfg.step == "eager"
    note = capsys.readouterr().out.strip()
    assert "\n" not in note and note.startswith("note: the CUDA graph is not used (RuntimeError: ")
    assert note.endswith("; the eager step trains")
    if replay_does == "raises":
        assert "stream is capturing" in note
    else:
        assert "its replay differs from the eager step" in note and "update off by" in note
    assert isinstance(parts["optimizer"].param_groups[0]["lr"], float)
    assert train_steps(step, parts, generator) == eager  # from the restored state, to the bit
    for name, value in parts["model"].state_dict().items():
        assert torch.equal(value, eager_state[name]), name


def on_one_gpu(monkeypatch, step="graph"):
    """main() as on one CUDA GPU: the settings' plan of a step (and its whitening), capture faked (a good one)."""
    real = fdsl.settings

    def settings(argv):
        cfg = real(argv)
        cfg.step, cfg.whiten_method = step, "newton"
        return cfg
    monkeypatch.setattr(fdsl, "settings", settings)
    monkeypatch.setattr(fdsl, "capture", fake_capture("the step"))


def test_a_run_through_a_kept_graph_equals_the_eager_run(tmp_path, monkeypatch, capsys):
    runs = {}
    for step in ("eager", "graph"):
        on_one_gpu(monkeypatch, step)
        runs[step] = fdsl.main(SHORT + ["--out", str(tmp_path / step)])
        monkeypatch.undo()
    assert runs["graph"]["step"] == "graph" and "not used" not in capsys.readouterr().out
    logs = [without_timings(read_log(tmp_path / step / "log.jsonl")) for step in ("eager", "graph")]
    assert logs[1] == logs[0] and runs["graph"]["knn_acc"] == runs["eager"]["knn_acc"]
    state = torch.load(tmp_path / "graph" / "checkpoint.pt", weights_only=True)  # lr saved as a number
    assert all(isinstance(g["lr"], float) for g in state["optimizer"]["param_groups"])


def test_a_resumed_graph_run_equals_the_uninterrupted_one(tmp_path, monkeypatch):
    args = SHORT + ["--epochs", "2"]
    on_one_gpu(monkeypatch)
    fdsl.main(args + ["--out", str(tmp_path / "a")])
    ctrl_c_in_epoch(monkeypatch, 2)
    with pytest.raises(SystemExit):
        fdsl.main(args + ["--out", str(tmp_path / "b")])
    monkeypatch.undo()
    on_one_gpu(monkeypatch)
    assert fdsl.main(["--resume", str(tmp_path / "b")])["step"] == "graph"
    logs = [without_timings(read_log(tmp_path / run / "log.jsonl")) for run in ("a", "b")]
    assert [row["epoch"] for row in logs[1]] == [0, 1, 2] and logs[1] == logs[0]


class HostReads(TorchDispatchMode):
    """Reads of a tensor's value by the host (.item(), bool(), a Python branch on a tensor), each with the
    call stack that asked: on a GPU each makes the step wait, and a CUDA graph cannot hold one."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(traceback.extract_stack())
        return func(*args, **(kwargs or {}))

    def besides_the_cpus_nan_check(self):
        """The reads but those of the layer's NaN and overflow checks, made on the CPU only (on a GPU looking would
        wait): in GroupWhitening.forward on its input, in whitening_matrix on the covariance."""
        def cpu_check(stack):
            ours = [frame for frame in stack if frame.filename == FDSL]
            checks = {"forward": 'x.device.type == "cpu"', "whitening_matrix": 'cov.device.type == "cpu"'}
            return ours and checks.get(ours[-1].name, "?") in ours[-1].line
        return [stack for stack in self.reads if not cpu_check(stack)]


@pytest.mark.filterwarnings("ignore:Detected call of")  # a step fp16's scaler skips looks to torch like a missing one
def test_the_eager_step_never_reads_the_device_on_the_host_and_fp16_would():
    for amp, method in ((None, "newton"), ("bfloat16", "newton"), (None, "eigh"), ("bfloat16", "eigh")):
        _, parts, step, generator = training(amp, method)
        with HostReads() as host:
            for x in batches()[:2]:
                step(x)
        assert host.reads and host.besides_the_cpus_nan_check() == []  # the instrument sees reads; none else
    _, parts, step, generator = training("float16")
    assert parts["scaler"].is_enabled()
    with HostReads() as host:
        for x in batches()[:2]:
            step(x)
    scaler_reads = [s for s in host.besides_the_cpus_nan_check() if any("grad_scaler" in f.filename for f in s)]
    assert len(scaler_reads) >= 2  # GradScaler reads its inf flag on the host every step


# ---------------------------------------------------------------------------------------------
# torchrun: two CPU processes, one global batch
# ---------------------------------------------------------------------------------------------

def test_torchrun_two_processes_one_table_one_log_and_the_same_knn(tmp_path):
    out = tmp_path / "ddp"
    args = SHORT + ["--decorr", "zca", "--out", str(out)]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", FDSL, *args], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(re.findall(r"^\s*epoch\s+loss", p.stdout, re.M)) == 1  # one table: the other process stays quiet
    assert ", cpu x2, eager step ->" in p.stdout
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "log.jsonl", "results.json"]
    log = read_log(out / "log.jsonl")
    assert [row["epoch"] for row in log] == [0, 1]
    config, results = (json.loads((out / name).read_text()) for name in ("config.json", "results.json"))
    assert (config["device"], config["world"], results["step"]) == ("cpu", 2, "eager")
    assert results["knn_acc"] == log[-1]["knn_acc"]

    # One process, from the saved checkpoint, computes the same k-NN accuracy.
    cfg = fdsl.settings(SHORT + ["--decorr", "zca", "--out", str(tmp_path / "one")])
    net = fdsl.build_training(cfg, 1)["model"]
    net.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    data = fdsl.load_data(cfg)
    acc = fdsl.knn_accuracy(fdsl.encode(net.backbone, data["bank"], cfg), data["train_y"],
                            fdsl.encode(net.backbone, data["test"], cfg), data["test_y"])
    assert acc == results["knn_acc"]


# ---------------------------------------------------------------------------------------------
# tools/plot.py, on small fake run folders
# ---------------------------------------------------------------------------------------------

sys.path.insert(0, os.path.join(HERE, "tools"))
import plot  # noqa: E402

PLOT = os.path.join(HERE, "tools", "plot.py")


def plot_collapse(corr, points=None):
    metrics = {"std": 1.0, "std_l2": 0.1, "corr_strength": corr, "eff_rank": 3.0, "spectrum": [1.0, 0.5, 0.1, 0.0]}
    return {"backbone": dict(metrics), "projector": dict(metrics), "normalized": dict(metrics)}


def plot_log_row(epoch, knn, corr=0.5, projection=None):
    row = {"epoch": epoch, "loss": None if epoch == 0 else 1.0, "lr": 0.01, "images_per_s": 100.0, "time": epoch,
           "knn_acc": knn, "collapse": plot_collapse(corr)}
    if projection:
        row["projection"] = projection
    return json.dumps(row)


def plot_make_run(root, name, finished=True, log=None, projection=False, drop=(), **settings):
    """A run folder as the new fdsl.py writes it (settings: config.json's values to change; drop: keys it lacks)."""
    cfg = {"dataset": "synthetic", "arch": "small", "proj_hidden": 64, "linear_projector": False, "proj_dim": 8,
           "decorr": "bn", "groups": 16, "shuffle": True, "eps": 1e-8, "predictor": False, "stop_grad": False,
           "loss": "l2", "epochs": 2, "batch_size": 64, "lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3,
           "warmup_epochs": 5.0, "eval_every": 1, "linear_epochs": 1, "seed": 0, "data_dir": "./data",
           "image_size": 32, "train_subset": 1000, "test_subset": 500, "out": str(root / name), "device": "cpu",
           "precision": "auto",
           "amp": None, "step": "eager", "whiten_method": "eigh", "torch": "2.5", "device_name": "CPU",
           "fdsl_version": "0123456789abcdef sha256:0123456789abcdef", **settings}
    points = {"scale": 0.5, "points": [[i, -i] for i in range(-5, 5)], "labels": list(range(10))}
    if log is None:
        log = [plot_log_row(e, 20.0 + 10 * e + cfg["seed"], 0.5 - 0.1 * e, points if projection else None)
               for e in range(cfg["epochs"] + 1)]
    cfg = {key: value for key, value in cfg.items() if key not in drop}
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "log.jsonl").write_text("\n".join(log) + "\n")
    if finished:
        final = json.loads(log[-1])
        (folder / "results.json").write_text(json.dumps({"knn_acc": final["knn_acc"], "linear_acc": 30.0 + cfg["seed"],
                                                         "collapse": final["collapse"], "torch": "2.5"}))
    return str(folder)


def plot_entries_of(paths):
    return plot.group_settings([plot.read_run(path) for path in paths])


def test_seeds_of_one_setting_merged_and_nothing_else(tmp_path):
    old_style = {"drop": ("linear_projector", "amp", "step"), "whiten_method": None}  # an older fdsl's config
    paths = [plot_make_run(tmp_path, "bn-s0"), plot_make_run(tmp_path, "bn-s1", seed=1, device="cuda:0", graph=False),
             plot_make_run(tmp_path, "bn-old-s2", seed=2, **old_style), plot_make_run(tmp_path, "bn-lr", lr=0.1),
             plot_make_run(tmp_path, "zca-fixed", decorr="zca", shuffle=False), plot_make_run(tmp_path, "zca", decorr="zca"),
             plot_make_run(tmp_path, "none-batch128", decorr="none", batch_size=128),
             plot_make_run(tmp_path, "none", decorr="none")]
    entries = plot_entries_of(paths)
    assert [[run["name"] for run in entry["runs"]] for entry in entries] == [
        ["none"], ["none-batch128"], ["bn-s0", "bn-s1", "bn-old-s2"], ["bn-lr"], ["zca-fixed"], ["zca"]]
    assert [entry["title"] for entry in entries] == [
        "none (batch 64)", "none (batch 128)", "bn (lr 0.02)", "bn (lr 0.1)", "zca, 16 fixed groups",
        "zca, 16 shuffled groups"]
    table = plot.runs_table(entries)
    assert "| bn (lr 0.02) | bn-s0, bn-s1, bn-old-s2 (n=3) | 41.00 ± 1.00 | 31.00 ± 1.00 |" in table


def test_every_fdsl_flag_is_placed():
    """fdsl.py's RECIPE keys, read from its source (importing it would load torch: seconds)."""
    with open(FDSL) as f:
        tree = ast.parse(f.read())
    recipe = [node.value for node in tree.body if isinstance(node, ast.Assign) and
              any(getattr(target, "id", None) == "RECIPE" for target in node.targets)]
    assert len(recipe) == 1
    unplaced = {key.value for key in recipe[0].keys} - set(plot.SETTING_KEYS) - set(plot.NOT_SETTING)
    assert not unplaced, f"place {unplaced} in SETTING_KEYS or NOT_SETTING"


def test_log_keeps_last_row_of_an_epoch_and_ignores_a_half_written_line(tmp_path, capsys):
    log = [plot_log_row(0, 10.0), plot_log_row(1, 11.0), '{"epoch": 2, "kn', plot_log_row(2, 12.0), plot_log_row(2, 22.0),
           plot_log_row(3, 13.0), '{"epoch": 4, "loss": 0.5, "kn']
    path = plot_make_run(tmp_path, "resumed", finished=False, log=log, epochs=4)
    rows = plot.read_log(os.path.join(path, "log.jsonl"))
    assert [(row["epoch"], row["knn_acc"]) for row in rows] == [(0, 10.0), (1, 11.0), (2, 22.0), (3, 13.0)]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 3" in err[0]  # the damaged line in the middle; the last one: silently
    run = plot.read_run(path)
    assert run["knn"] == 13.0 and run["linear"] is None
    assert plot.epochs_cell([run]) == "3 of 4"


def test_spearman_with_ties():
    assert plot.ranks([10, 20, 20, 5]) == [1.0, 2.5, 2.5, 0.0]
    assert plot.spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(math.sqrt(0.9))
    assert plot.spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert math.isnan(plot.spearman([1, 1, 1], [1, 2, 3]))


def test_longer_training_at_one_batch_is_its_own_series(tmp_path):
    study = {"dataset": "folder", "data_dir": "/data/cifar10-jpeg", "train_subset": 10000, "decorr": "zca"}
    paths = [plot_make_run(tmp_path, f"sdbn-{b}", batch_size=b, epochs=12, log=[plot_log_row(0, 30.0), plot_log_row(12, 40.0)],
                      **study) for b in (64, 512)]
    paths.append(plot_make_run(tmp_path, "sdbn-512-96ep", finished=False, batch_size=512, epochs=96,
                          log=[plot_log_row(0, 30.0), plot_log_row(32, 45.0)], **study))
    series = plot.batch_series(plot_entries_of(paths))
    assert [(label, [e["runs"][0]["name"] for e in es]) for label, es, _, _ in series] == [
        ("Shuffled-DBN, 12 epochs", ["sdbn-64", "sdbn-512"]),
        ("Shuffled-DBN, 96 epochs (1824 steps, batch 64's 1872); at epoch 32 so far", ["sdbn-512-96ep"])]


def test_files_written_and_figure_2_only_for_2d_runs(tmp_path, capsys):
    flat = [plot_make_run(tmp_path / "a", "zca-2d", decorr="zca", groups=1, proj_dim=2, projection=True),
            plot_make_run(tmp_path / "a", "bn-batch128", batch_size=128)]
    out = str(tmp_path / "figs" / "fig.png")
    assert plot.main(flat + ["--out", out]) == out
    for suffix in (".png", ".md", "-2d.png", "-2d.gif", "-batch.png"):
        assert os.path.getsize(str(tmp_path / "figs" / "fig") + suffix) > 0
    assert "| zca, full ZCA | zca-2d |" in capsys.readouterr().out
    plain = [plot_make_run(tmp_path / "b", "bn-s0"), plot_make_run(tmp_path / "b", "bn-s1", seed=1)]
    assert plot.main(plain) == str(tmp_path / "b" / "comparison.png")  # beside the runs
    assert sorted(os.listdir(tmp_path / "b")) == ["bn-s0", "bn-s1", "comparison.md", "comparison.png"]


@pytest.mark.parametrize("case", ["missing", "not a run", "no evaluation", "bad flag"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    (tmp_path / "empty").mkdir()
    argv = {"missing": [str(tmp_path / "nowhere")], "not a run": [str(tmp_path / "empty")],
            "no evaluation": [plot_make_run(tmp_path, "fresh", finished=False, log=['{"epoch": 0, "loss": null}'])],
            "bad flag": [str(tmp_path), "--nope"]}[case]
    with pytest.raises(SystemExit) as e:
        plot.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("plot.py: error: ") and err.count("\n") == 1
    assert {"missing": "no such folder", "not a run": "no config.json", "no evaluation": "no evaluated epoch",
            "bad flag": "--nope"}[case] in err


def test_missing_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib: ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(SystemExit) as e:
        plot.main([plot_make_run(tmp_path, "bn")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install matplotlib" in err


def test_command_line_from_another_folder(tmp_path):
    plot_make_run(tmp_path, "bn")
    result = subprocess.run([sys.executable, PLOT, "bn", "--out", "figs/bn.png"], cwd=tmp_path, capture_output=True,
                            text=True)
    assert result.returncode == 0 and "| bn | bn | 40.00 | 30.00 |" in result.stdout
    assert sorted(os.listdir(tmp_path / "figs")) == ["bn.md", "bn.png"]
    result = subprocess.run([sys.executable, PLOT, "nowhere"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr == "plot.py: error: nowhere: no such folder\n"


# ---------------------------------------------------------------------------------------------
# README and the lab handout: every command of theirs starts as written (the data swapped for the
# synthetic set); bash itself expands their variables and loops, with python, pip and torchrun
# replaced by functions that record their words
# ---------------------------------------------------------------------------------------------

RECORD = r'''
record() { printf '%s\0' "$@" >> "$LOG"; printf '\n\0' >> "$LOG"; }
python() { record python "$@"; }
python3() { record python3 "$@"; }
pip() { record pip "$@"; }
torchrun() { record torchrun "$@"; }
'''


def documented_commands(path, tmp_path):
    """Every command of the bash blocks of a Markdown file, as bash expands it: [(words, its block)]."""
    blocks = re.findall(r"```bash\n(.*?)```", open(os.path.join(HERE, path)).read(), re.S)
    assert blocks, f"{path} has no bash blocks"
    commands = []
    shutil.copy(FDSL, tmp_path)  # README's copy-out command reads it
    for i, block in enumerate(blocks):
        log = tmp_path / f"block{i}.log"
        log.write_text("")
        p = subprocess.run(["bash", "-c", RECORD + block], cwd=tmp_path, env=dict(os.environ, LOG=str(log)),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, (path, block, p.stderr)
        words = []
        for word in log.read_text().split("\0"):
            if word == "\n":
                commands.append((words, block))
                words = []
            elif word:
                words.append(word)
    return commands


def synthetic(args):
    """fdsl.py's flags with the data swapped for the synthetic set."""
    kept, skip = [], False
    for a in args:
        if not skip and a not in ("--dataset", "--data-dir"):
            kept.append(a)
        skip = a in ("--dataset", "--data-dir")
    return kept + ["--dataset", "synthetic"]


@pytest.mark.parametrize("path", ["README.md", "docs/lab.md"])
def test_every_command_of_readme_and_the_handout_starts_as_written(path, tmp_path, monkeypatch):
    commands = documented_commands(path, tmp_path)
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, os.path.join(HERE, "tools"))
    import bench
    started = 0
    for words, block in commands:
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        if words[0] not in ("python", "python3", "torchrun") or not scripts or "-m" in words[:2]:
            continue  # pip, venv, pytest
        name, args = words[scripts[0]], words[scripts[0] + 1:]
        assert "--plot" not in args and "--benchmark" not in args, words
        if name == "fdsl.py":
            refused = any("# refused" in line for line in block.splitlines() if " ".join(args[-2:]) in line)
            if refused:  # the handout shows this refusal on purpose
                with pytest.raises(SystemExit):
                    fdsl.settings(synthetic(args))
            else:
                assert fdsl.settings(synthetic(args)).dataset == "synthetic", words
        elif name == "tools/plot.py":
            assert plot.parse_args(args).runs, words
        elif name == "tools/bench.py":
            assert bench.parse(synthetic(args))[1].dataset == "synthetic", words
        else:
            pytest.fail(f"{path}: a command of an unknown script: {' '.join(words)}")
        started += 1
    assert started >= 8, f"{path}: only {started} commands of fdsl.py and its tools"
    if path == "README.md":  # its shell command wrote the layers to whitening.py: they run there
        ns = {}
        exec(compile((tmp_path / "whitening.py").read_text(), "whitening.py", "exec"), ns)
        x = correlated(64, 32)
        assert torch.allclose(ns["GroupWhitening"](32, groups=2)(x).std(0), torch.ones(32, dtype=x.dtype), atol=0.02)


def test_the_handout_names_python_the_cpu_install_and_the_rate_per_256_images():
    lab = open(os.path.join(HERE, "docs", "lab.md")).read()
    assert "Python 3.10" in lab and "download.pytorch.org/whl/cpu" in lab and "per 256 images" in lab
    readme = open(os.path.join(HERE, "README.md")).read()
    assert "AMD EPYC" in readme  # the CPU the runs used
