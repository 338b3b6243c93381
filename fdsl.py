"""
fdsl.py: "On Feature Decorrelation in Self-Supervised Learning" (Hua, Wang, Xue, Ren, Wang, Zhao,
ICCV 2021, arXiv 2105.00470), reproduced in one file that reads from top to bottom.

    python fdsl.py --decorr zca             # the paper's recipe: CIFAR-10, ResNet-18, 200 epochs
    python fdsl.py --laptop --decorr none   # the laptop recipe: a small network, minutes on a CPU
    python fdsl.py --dataset synthetic --arch small --epochs 3 --linear-epochs 0   # offline
    python fdsl.py --dataset folder --data-dir DIR   # DIR/train/<class>/*, DIR/test/<class>/*
    python fdsl.py --resume runs/cifar10-zca-20261206-101500   # go on with an interrupted run
    torchrun --nproc_per_node=4 fdsl.py --decorr zca    # several GPUs share one global batch

Two augmented views of an image go through one network: backbone -> projector -> a normalization
layer -> an optional predictor; the loss pulls the two outputs together. The paper finds:
  1. With no normalization every image goes to one point: complete collapse.
  2. Standardizing each axis over the batch ("BN") forbids that, but the axes can move together:
     the output lives in a few directions, dimensional collapse.
  3. Whitening groups of axes (ZCA) makes each group's covariance the identity; groups drawn anew
     at every call decorrelate all axes over training (observed, not guaranteed): neither
     collapse, and better features.
  4. How correlated the features are, measured without labels, tells good features from bad.

THE METHOD (sections 1-5: the layers, the network, the loss, the augmentations, the collapse
metrics) needs torch alone; THE EXPERIMENT (6-11) runs it. The paper's names, and their flags:
    no normalization                                      --decorr none
    BN (standardizing each axis)                          --decorr bn
    ZCA, DBN (all D axes whitened at once)                --decorr zca --groups 1
    DBN in G fixed groups (their feature-dim. configs)    --decorr zca --groups G --no-shuffle
    Shuffled-DBN (the paper's method)                     --decorr zca (16 groups, new each call)
"""
import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import numbers
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm

# =================================================================================================
# THE METHOD. Sections 1 to 5 need nothing but torch: the experiment that runs them starts at 6.
# =================================================================================================
# ---- 1. The paper's layers: standardizing and whitening over the batch --------------------------
# --- copy from here: GroupWhitening and Standardize; they need numbers, torch, torch.nn as nn ---

class InverseSqrtEigh(torch.autograd.Function):
    """A^(-1/2) = U diag(l^-1/2) U^T of symmetric A = U diag(l) U^T: ... x S x S, each l clamped at
    floor. dL/dA = U (K o U^T sym(dL/dW) U) U^T, K_ij = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l),
    has no 1 / (l_i - l_j): repeated eigenvalues get a finite gradient, not autograd's NaN."""

    @staticmethod
    def forward(ctx, a, floor):
        # On the CPU for Apple's GPU, which has no eigh; rounding can put an l below the floor.
        evals, evecs = torch.linalg.eigh(a.cpu() if a.device.type == "mps" else a)
        s = evals.to(a.device).clamp_min(floor).sqrt()
        evecs = evecs.to(a.device)
        ctx.save_for_backward(evecs, s)
        return (evecs / s.unsqueeze(-2)) @ evecs.mT

    @staticmethod
    @torch.autograd.function.once_differentiable  # a second derivative raises an error
    def backward(ctx, grad):
        u, s = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        k = -1.0 / (si * sj * (si + sj))
        g = u.mT @ (0.5 * (grad + grad.mT)) @ u
        return u @ (k * g) @ u.mT, None

class GroupWhitening(nn.Module):
    """Shuffled group whitening over the batch, the paper's Shuffled-DBN (finding 3). x: N x D,
    one view -> N x D: the axes shuffled, then for each group of S = D / G axes
        xc = x - mean(x)                    centre every axis over the N samples (N x S)
        C  = xc^T xc / N                    the biased covariance (S x S); m = tr(C) / S
        C / m + e I = U diag(l) U^T         e = max(eps, S x the dtype's machine epsilon)
        W  = U diag(l^-1/2) U^T / sqrt(m)   ZCA: of all whitenings, the one that rotates least
        z  = xc W                           each group white over the batch, to within e / l
    and the shuffle undone; axes in different groups may stay correlated. groups=1: full ZCA (DBN);
    shuffle=False: fixed groups (gradcheck needs them, or a fixed seed). No running statistics."""

    def __init__(self, num_features, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64):
        super().__init__()
        whole = isinstance(groups, numbers.Integral) and not isinstance(groups, bool)
        if not whole or groups < 1 or num_features % groups:
            raise ValueError(f"groups: a whole number that divides {num_features}; got {groups!r}")
        if eps < 0 or dtype not in (torch.float32, torch.float64):  # eigh: no half precision
            raise ValueError(f"eps >= 0, dtype float32 or float64 (not half): {eps}, {dtype}")
        self.num_features = num_features
        self.groups = int(groups)
        self.shuffle = shuffle and 1 < groups < num_features  # else the order changes nothing
        self.eps = eps
        self.dtype = dtype
        self.last_perm = None  # the last call's permutation of the axes (None: not shuffled)

    def extra_repr(self):
        return (f"{self.num_features}, groups={self.groups}, shuffle={self.shuffle}, "
                f"eps={self.eps}, dtype={self.dtype}")

    def forward(self, x):
        if x.dim() != 2 or x.shape[1] != self.num_features or not x.dtype.is_floating_point:
            raise ValueError(f"expected floating-point features N x {self.num_features}, one view "
                             f"per call; got {x.dtype} {tuple(x.shape)}")
        n, size = len(x), self.num_features // self.groups
        if n < 2 or size >= n:  # N centred samples span N - 1 directions: C would be singular
            advice = "more groups or a larger batch" if n > 1 else "a larger batch"
            raise ValueError(f"groups of {size} axes need over {size} samples, got {n}: {advice}")
        if x.device.type == "cpu" and not torch.isfinite(x).all():  # (on a GPU looking waits)
            raise FloatingPointError("the whitening's input holds NaN or inf")

        with torch.autocast(x.device.type, enabled=False):  # in self.dtype, not autocast's
            # Shuffle the axes, then split them into groups: G x N x S.
            h = x.to(self.dtype)
            perm = torch.randperm(x.shape[1], device=x.device) if self.shuffle else None
            if perm is not None:
                h = h.index_select(1, perm)
            h = h.reshape(n, self.groups, size).transpose(0, 1)

            # Centre every axis, whiten every group, and put each axis back in its place.
            hc = h - h.sum(1, keepdim=True) / n
            z = hc @ self.whitening_matrix(hc.mT @ hc / n)
            z = z.transpose(0, 1).reshape(n, self.num_features)
            if perm is not None:
                z = z.index_select(1, perm.argsort())
        self.last_perm = perm
        return z.to(x.dtype)

    def whitening_matrix(self, cov):
        """W for covariances cov: G x S x S. e is relative to m: W(c^2 C) = W(C) / c, so shrinking
        cannot lower the loss; a direction of variance v comes out with std sqrt(v / (v + e m))."""
        if cov.device.type == "cpu" and not torch.isfinite(cov).all():  # from a finite input
            raise FloatingPointError(f"the covariance overflows {cov.dtype}: scale the input down")
        e = max(self.eps, cov.shape[-1] * torch.finfo(cov.dtype).eps)  # rounding moves l that much
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        constant = m == 0  # a group with no variance: W = I, and its zeros stay zeros
        m = torch.where(constant, torch.ones_like(m), m)
        a = torch.where(constant, eye, cov / m + e * eye)  # mean eigenvalue 1 + e: scale-free
        return self.inverse_sqrt(a, e) * m.rsqrt()

    def inverse_sqrt(self, a, floor):
        return InverseSqrtEigh.apply(a, floor)

class Standardize(GroupWhitening):
    """The paper's BN (finding 2): x: N x D -> (x - mean) / std per axis over the batch, biased std,
    no affine; groups of one axis, eps 0 (a constant axis gives 0). Unlike nn.BatchNorm1d: no eps
    (its 1e-5 lets a shrinking input shrink the output), and the batch's statistics in eval mode."""

    def __init__(self, num_features, dtype=torch.float64):
        super().__init__(num_features, num_features, False, 0.0, dtype)

# --- copy to here --------------------------------------------------------------------------------

# ---- 2. The network: backbone -> projector -> normalization layer -> (predictor) ----------------
def make_backbone(arch):
    """The feature network, images N x 3 x H x W -> features N x F. resnet18: torchvision's
    ResNet-18 in its CIFAR form (F = 512); small: four conv-BN-ReLU blocks (F = 256), fdsl's own,
    for a CPU. -> (network, F)"""
    if arch == "small":
        layers = []
        for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2)):
            layers.append(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False))
            layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=True))
        return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256

    net = torchvision.models.resnet18()
    # CIFAR's images have 32 pixels: a 3x3 first convolution of stride 1 and no max-pool keep the
    # resolution. It is initialized as torchvision initializes the other convolutions.
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()  # the 512 features, not ImageNet's classes
    return net, 512

def mlp(in_dim, hidden, out_dim, linear=False):
    """Linear -> BatchNorm -> ReLU -> Linear: the projector (F -> hidden -> D) and the predictor
    (D -> 256 -> D). linear: without BatchNorm and ReLU, a linear bottleneck (Figure 2's)."""
    middle = [] if linear else [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(nn.Linear(in_dim, hidden), *middle, nn.Linear(hidden, out_dim))

class SiameseNet(nn.Module):
    """One network for both views: backbone -> projector -> norm (one of the paper's layers, or
    none) -> predictor (or none). forward(x1, x2), N x 3 x H x W each -> (p1, p2, z1, z2), N x D
    each: z the layer's output, p = predictor(z), or z itself without a predictor."""

    def __init__(self, backbone, feat_dim, projector, norm, predictor=None):
        super().__init__()
        self.backbone = backbone
        self.feat_dim = feat_dim
        self.projector = projector
        self.norm = norm
        self.predictor = predictor

    def project(self, x):  # the projector's output h, the layer's input: N x D
        return self.projector(self.backbone(x))

    def forward(self, x1, x2):
        # Each view in its own call, as the authors': BatchNorm and the layer see one view's
        # statistics at a time. The layer gets float32 under autocast too.
        z1 = self.norm(self.project(x1).float())
        z2 = self.norm(self.project(x2).float())
        if self.predictor is None:
            return z1, z2, z1, z2
        return self.predictor(z1), self.predictor(z2), z1, z2

# ---- 3. The loss ---------------------------------------------------------------------------------
def siamese_loss(p1, p2, z1, z2, kind="l2", stop_grad=False):
    """How far each view's prediction p is from the other view's output z, both ways, N x D each
    -> a scalar. l2, the paper's: the mean over the batch of ||p - z||^2; without a predictor
    ||z1 - z2||^2, 2D for two unrelated whitened outputs, less as the views agree. cosine:
    SimSiam's, minus the mean cosine similarity. stop_grad: SimSiam's, no gradient through z."""
    if stop_grad:
        z1 = z1.detach()
        z2 = z2.detach()

    def distance(p, z):
        if kind == "l2":
            return (p.float() - z.float()).pow(2).sum(1).mean()
        return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()

    return 0.5 * (distance(p1, z2) + distance(p2, z1))

# ---- 4. Augmentations: SimSiam's recipe, as the authors use it, each image its own draws --------
@functools.cache
def imagenet_stats(device):
    """ImageNet's per-channel mean and std, 3 x 1 x 1 each, as the authors standardize images;
    made once per device (a CUDA graph cannot copy from the host while it records)."""
    mean = torch.tensor((0.485, 0.456, 0.406), device=device).view(3, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225), device=device).view(3, 1, 1)
    return mean, std

def network_input(x):
    """Images N x 3 x H x W, uint8 or in [0, 1] -> the network's input: standardized per channel,
    in channels_last (the memory layout cuDNN's convolutions like best, and faster on a CPU too)."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    mean, std = imagenet_stats(x.device)
    return ((x.float() - mean) / std).contiguous(memory_format=torch.channels_last)

def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                             mode="bilinear"):
    """torchvision's RandomResizedCrop and a horizontal flip (p 0.5), each image its own draws:
    x: N x C x H x W in [0, 1] -> N x C x H x W. A box of area in scale x H x W and ratio of width
    to height in ratio (log-uniform): the first of 10 tries that fits, else the largest centred
    box. Crop, resize and flip are one grid_sample."""
    n, _, h, w = x.shape
    tries = 10

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)

    # Each image's box: the first try that fits, as torchvision.
    area = h * w * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n, tries)
    box_w = (area * log_ratio.exp()).sqrt().round()
    box_h = (area / log_ratio.exp()).sqrt().round()
    fits = (box_w > 0) & (box_w <= w) & (box_h > 0) & (box_h <= h)
    first = fits.int().argmax(1, keepdim=True)
    box_w = box_w.gather(1, first)[:, 0]
    box_h = box_h.gather(1, first)[:, 0]

    # No try fits: the largest centred box, its ratio clamped to the range.
    any_fits = fits.any(1)
    largest_w = w if w / h <= ratio[1] else round(h * ratio[1])
    largest_h = h if w / h >= ratio[0] else round(w / ratio[0])
    box_w = torch.where(any_fits, box_w, float(largest_w))
    box_h = torch.where(any_fits, box_h, float(largest_h))
    top = torch.where(any_fits, (rand(n) * (h - box_h + 1)).floor(), ((h - box_h) / 2).floor())
    left = torch.where(any_fits, (rand(n) * (w - box_w + 1)).floor(), ((w - box_w) / 2).floor())
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0)

    # The output's [-1, 1] (the outer pixel edges) mapped onto the box, mirrored if flipped.
    zero = torch.zeros_like(box_w)
    theta = torch.stack([box_w / w * flip, zero, (2 * left + box_w) / w - 1,
                         zero, box_h / h, (2 * top + box_h) / h - 1], 1)
    grid = F.affine_grid(theta.view(n, 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    if mode == "bicubic":  # bicubic overshoots [0, 1]
        out = out.clamp(0, 1)
    return out

def shift_hue(x, shift):
    """The hue of images x: N x 3 x H x W in [0, 1] turned by shift: N x 1 x 1 (a whole turn is
    1), each image by its own, as torchvision: to hue, saturation and value, and back."""
    r, g, b = x.unbind(1)
    v = x.amax(1)
    delta = v - x.amin(1)
    s = delta / v.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    rc = (v - r) / d
    gc = (v - g) / d
    bc = (v - b) / d
    hue = torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc)
    hue = torch.where(v == r, bc - gc, hue)
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    hue = (hue + shift) % 1.0

    # Back to RGB: the hue's sixth of the circle, i, says which of v, p, q, t each channel takes.
    i = (hue * 6.0).floor()
    f = hue * 6.0 - i
    i = i.long() % 6
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    red = torch.stack((v, q, p, p, t, v), 1)
    green = torch.stack((t, v, v, q, p, p), 1)
    blue = torch.stack((p, p, t, v, v, q), 1)
    table = torch.stack((red, green, blue), 1)  # N x 3 x 6 x H x W
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)

def augment(x, generator=None):
    """One random view of every image: uint8 x: N x 3 x H x W -> the network's input, N x 3 x H x W.
    RandomResizedCrop (scale 0.2-1) and a flip; ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, its
    four operations in a random order; grayscale with p 0.2; no blur at 32 px. torchvision's
    transforms draw once a call; here each image draws its own: augment(cat([x, x])) is 2 views."""
    n = len(x)

    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)

    x = random_resized_crop_flip(x.float() / 255, generator=generator)

    # Colour jitter for 80% of the images: factors in [0.6, 1.4] (1 when off), a hue shift of up
    # to a tenth of a turn, and each image's own order of the four operations.
    on = (rand(n) < 0.8).float().view(n, 1, 1, 1)
    brightness = 1 + on * (2 * rand(n, 1, 1, 1) - 1) * 0.4
    contrast = 1 + on * (2 * rand(n, 1, 1, 1) - 1) * 0.4
    saturation = 1 + on * (2 * rand(n, 1, 1, 1) - 1) * 0.4
    hue = on[:, 0] * (2 * rand(n, 1, 1) - 1) * 0.1
    order = torch.argsort(rand(n, 4), dim=1)
    for k in range(4):  # round k: each image applies its k-th operation, the identity the others
        turn = [(order[:, k] == op).view(n, 1, 1, 1) for op in range(4)]
        factor = torch.where(turn[0], brightness, 1.0)
        x = (x * factor).clamp(0, 1)
        factor = torch.where(turn[1], contrast, 1.0)
        mean_gray = TF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)
        x = (factor * x + (1 - factor) * mean_gray).clamp(0, 1)
        factor = torch.where(turn[2], saturation, 1.0)
        x = (factor * x + (1 - factor) * TF.rgb_to_grayscale(x)).clamp(0, 1)
        x = shift_hue(x, torch.where(turn[3][:, 0], hue, 0.0))

    # Grayscale for 20% of the images.
    gray = rand(n, 1, 1, 1) < 0.2
    x = torch.where(gray, TF.rgb_to_grayscale(x).expand_as(x), x)
    return network_input(x)

# ---- 5. Collapse metrics and the k-NN monitor ----------------------------------------------------
@contextlib.contextmanager
def one_thread():
    """torch's CPU work in one thread within: small matrix decompositions are faster so, and an
    eigenvalue's last digits depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

@torch.no_grad()
def collapse_metrics(feats):
    """How collapsed features f: N x D are, in float64, and which collapse each measure sees:
      std           mean over axes of the per-axis std. Near 0: complete collapse (finding 1).
      std_l2        the same for f / ||f||: about 1/sqrt(D) spread over the sphere, 0 pointing one
                    way. Sees both collapses of the outputs the loss compares.
      corr_strength mean |R_ij|, i != j, of the Pearson correlations (constant axes: uncorrelated).
                    1 on one direction: dimensional collapse (finding 2; 0.64 at rank 2, 0.42 at
                    rank 4, for D = 512).
      eff_rank      exp(entropy of q), q = singular values of the centred f / their sum (RankMe):
                    1 for rank-one features, D for isotropic ones.
      spectrum      the covariance's eigenvalues, descending, divided by the largest (D floats).
    corr and eff_rank are blind to complete collapse (a point plus noise of std 0.01 scores corr
    0.02 and eff_rank 494.7 of 512, as isotropic noise): read them beside std. -> a dict"""
    if feats.device.type == "mps":  # Apple's GPU has no float64
        feats = feats.cpu()
    f = feats.detach().double()
    n, d = f.shape
    std = f.std(0, correction=0)
    std_l2 = F.normalize(f, dim=1).std(0, correction=0)

    # Pearson correlations from the covariance.
    fc = f - f.mean(0)
    cov = fc.T @ fc / n
    sd = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(sd, sd)
    r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    off_diagonal = ~torch.eye(d, dtype=torch.bool, device=f.device)
    corr = r.abs()[off_diagonal].mean() if d > 1 else torch.zeros(())

    # The spectrum; the singular values of the centred features are sqrt(N x eigenvalue).
    with one_thread():
        evals = torch.linalg.eigvalsh(cov).flip(0).clamp_min(0)
    sv = (evals * n).sqrt()
    eff_rank = torch.zeros(())
    spectrum = torch.zeros(d)
    if sv.sum() > 0:
        q = sv / sv.sum()
        eff_rank = torch.exp(-(q * q.clamp_min(1e-300).log()).sum())
        spectrum = evals / evals[0]
    return {"std": std.mean().item(), "std_l2": std_l2.mean().item(),
            "corr_strength": corr.item(), "eff_rank": eff_rank.item(),
            "spectrum": [float(f"{v:.4g}") for v in spectrum.tolist()]}

@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, t=0.1):
    """Weighted k-NN (Wu et al. 2018), the authors' monitor: each test point's k most cosine-similar
    training points vote for their class with weight exp(similarity / t). train_feats: M x F with
    labels M, test_feats: N x F with labels N. -> accuracy in percent"""
    bank = F.normalize(train_feats.float(), dim=1)
    bank_labels = train_labels.to(bank.device)
    num_classes = int(max(bank_labels.max().item(), test_labels.max().item())) + 1
    k = min(k, len(bank))

    correct = 0
    for query, labels in zip(test_feats.split(1024), test_labels.split(1024)):
        query = F.normalize(query.float().to(bank.device), dim=1)
        sim, idx = (query @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(query), num_classes, device=bank.device)
        votes.scatter_add_(1, bank_labels[idx], (sim / t).exp())
        correct += (votes.argmax(1) == labels.to(bank.device)).sum().item()
    return 100.0 * correct / len(test_feats)

# =================================================================================================
# THE EXPERIMENT. Sections 6 to 11 run the method: the recipe, the data, the evaluation, the
# machine, training and its run folder, main.
# =================================================================================================

# ---- 6. The recipe and the command line ----------------------------------------------------------
# The authors' main CIFAR-10 setting, from their code and configs, a flag per entry. Not theirs:
# [fdsl] this file's choices, [SimSiam] beyond the paper's framework, [Figure 2] their 2-d pictures.
RECIPE = {  # setting: (default, what it means); a list: the default, then the other choices
    "dataset": (["cifar10", "cifar100", "folder", "synthetic"], "[fdsl] synthetic: offline"),
    "arch": (["resnet18", "small"], "CIFAR ResNet-18 (F = 512); [fdsl] small: 4 convs (F = 256)"),
    "proj_hidden": (1024, "projector: Linear(F, hidden) -> BN -> ReLU -> Linear(hidden, D)"),
    "linear_projector": (False, "[Figure 2] the projector without BN and ReLU: a bottleneck"),
    "proj_dim": (512, "projector output width D"),
    "decorr": (["zca", "none", "bn"], "the layer: bn standardizes each axis, zca whitens groups"),
    "groups": (16, "zca: G groups of D/G axes (1: full ZCA; auto: the authors' ceil(2D / batch))"),
    "shuffle": (True, "zca: new random groups at every call (Shuffled-DBN); off: fixed groups"),
    "eps": (1e-8, "[fdsl] the whitening's regularizer, relative to a group's mean variance"),
    "predictor": (False, "[SimSiam] a predictor MLP D -> 256 -> D after the layer"),
    "stop_grad": (False, "[SimSiam] no gradient through the other view's output"),
    "loss": (["l2", "cosine"], "l2: mean ||p - z||^2, the paper's; [SimSiam] cosine"),
    "epochs": (200, "training epochs"),
    "batch_size": (64, "global batch (split over the GPUs under torchrun)"),
    "lr": (0.02, "learning rate per 256 images: a step uses lr x batch / 256"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (1e-3, "SGD weight decay on every parameter (their batch study: 2.5e-3)"),
    "warmup_epochs": (5.0, "linear warm-up from 0, then cosine to 0, per step"),
    "eval_every": (5, "k-NN and the collapse metrics every N epochs (0: the first and last)"),
    "linear_epochs": (100, "linear-probe epochs at the end (0: no probe)"),
    "seed": (0, "seed of every random stream (the synthetic images are always the same)"),
    # [fdsl] where the data is, and how to run
    "data_dir": ("./data", "CIFAR's folder (downloaded if missing), or DIR/{train,test}/<class>/*"),
    "image_size": (32, "folder and synthetic images are made this size"),
    "train_subset": (0, "train on N class-balanced images (0: all)"),
    "test_subset": (0, "evaluate on N class-balanced images (0: all)"),
    "laptop": (False, "the laptop recipe, minutes on a CPU"),
    "out": ("", "run folder (default: runs/<dataset>-<decorr>-<date>-<time>)"),
    "resume": ("", "go on with the run in this folder, with its saved settings"),
    "device": (["auto", "cuda", "cpu", "mps"], "auto: CUDA if any, else the CPU; mps: unmeasured"),
    "precision": (["auto", "bf16", "fp16", "fp32"], "auto: bf16 from capability 8.0, fp16 on 7.x"),
    "graph": (True, "on one CUDA GPU, the step as a CUDA graph, checked against an eager step"),
    "progress": (True, "progress bars"),
}
# What a run folder holds; a folder with any of them is not written into.
RUN_FILES = ("config.json", "log.jsonl", "checkpoint.pt", "results.json")
# --laptop: the laptop recipe, under the command line's flags.
LAPTOP = {"arch": "small", "train_subset": 5000, "test_subset": 2000, "epochs": 10, "eval_every": 2,
          "lr": 0.1, "linear_epochs": 5}

def say(*lines, file=None):
    """Lines from process 0 (under torchrun every process runs this file), between the bars."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write("\n".join(lines), file=file)
        (file or sys.stdout).flush()  # a table row reaches a log file when it is made

def fail(message):
    """Bad input (a flag, a folder, a file): one line, exit code 2, no traceback."""
    say(f"fdsl: error: {message}", file=sys.stderr)
    raise SystemExit(2)

def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})")

def progress(items, what, cfg, total=None):
    """A progress bar over items on process 0, unless --no-progress or the output is a file or a
    pipe (whose reader would get a line per update); it leaves no line behind."""
    hidden = not cfg.progress or cfg.rank > 0 or not sys.stderr.isatty()
    return tqdm(items, desc=what, total=total, disable=hidden, leave=False)

def command_line():
    """argparse's parser: a flag for each entry of RECIPE, its meaning and default in --help."""
    parser = argparse.ArgumentParser(prog="fdsl.py", epilog="Examples: the top of fdsl.py.",
                                     allow_abbrev=False)
    parser.error = lambda message: fail(f"{message} (see --help)")  # not argparse's usage block

    for name, (default, text) in RECIPE.items():
        flag = "--" + name.replace("_", "-")
        if name == "laptop":
            text += ": " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in LAPTOP.items())
        if isinstance(default, bool):  # --shuffle and --no-shuffle
            shown = "on" if default else "off"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{text} (default: {shown})")
        elif isinstance(default, list):  # the first choice is the default
            parser.add_argument(flag, default=default[0], choices=default,
                                help=f"{text} (default: {default[0]})")
        else:  # --groups takes a number or auto; --out and --resume say no default
            kind = str if name == "groups" else type(default)
            shown = f" (default: {default})" if default != "" else ""
            parser.add_argument(flag, type=kind, default=default, help=text + shown)
    return parser

def parse_settings(argv):
    """The command line's flags over the recipe (over the laptop recipe with --laptop); with
    --resume DIR, the settings saved in DIR, and beside it only how to run. -> cfg"""
    parser = command_line()
    if "--laptop" in argv:
        parser.set_defaults(**LAPTOP)
    cfg = parser.parse_args(argv)
    cfg.command = "python fdsl.py " + shlex.join(argv)  # kept in config.json
    if not cfg.resume:
        return cfg

    # --resume DIR: the settings saved in DIR.
    how = ("--resume", "--progress", "--no-progress", "--device", "--graph", "--no-graph")
    others = [arg for arg in argv if arg.startswith("--") and arg.split("=")[0] not in how]
    if others:
        fail(f"--resume takes the run's saved settings; drop {' '.join(others)}")
    if not os.path.isfile(os.path.join(cfg.resume, "checkpoint.pt")):
        started = os.path.isfile(os.path.join(cfg.resume, "config.json"))
        why = ("its run stopped before its first checkpoint (after epoch 0's evaluation): delete "
               "it and start anew") if started else "so it is not an fdsl run folder"
        fail(f"--resume {cfg.resume}: no checkpoint.pt there; {why}")
    config = read_json(os.path.join(cfg.resume, "config.json"))
    saved = vars(parser.parse_args([]))
    saved.update({name: value for name, value in config.items() if name in saved})
    saved.update(resume=cfg.resume, out=cfg.resume, progress=cfg.progress, device=cfg.device,
                 graph=cfg.graph, command=config.get("command", cfg.command))
    return argparse.Namespace(**saved)

def check_settings(cfg):
    """Whatever is wrong with the settings, found before any work: one line, exit code 2."""
    for name, least in (("epochs", 1), ("batch_size", 2), ("proj_dim", 1), ("proj_hidden", 1),
                        ("image_size", 8), ("eval_every", 0), ("linear_epochs", 0),
                        ("warmup_epochs", 0), ("eps", 0)):
        if getattr(cfg, name) < least:
            fail(f"--{name.replace('_', '-')} must be at least {least}")

    if cfg.batch_size % cfg.world:
        fail(f"--batch-size {cfg.batch_size} does not split evenly over {cfg.world} processes")
    whole = str(cfg.groups).isdigit() and int(cfg.groups) >= 1
    if not whole or (cfg.decorr == "zca" and cfg.proj_dim % int(cfg.groups)):
        fail(f"--groups {cfg.groups}: a number that divides --proj-dim {cfg.proj_dim}, or auto")
    size = cfg.proj_dim // int(cfg.groups)
    if cfg.decorr == "zca" and size >= cfg.batch_size:  # a singular covariance: GroupWhitening
        fail(f"--groups {cfg.groups}: groups of {size} axes need a batch of more than {size} "
             f"images, not {cfg.batch_size}; use more --groups or a larger --batch-size")

    visible = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not visible.get(cfg.device, True):
        fail(f"--device {cfg.device}: no such GPU is visible here")
    held = [name for name in RUN_FILES if cfg.out and os.path.exists(os.path.join(cfg.out, name))]
    if held and not cfg.resume:
        go_on = f", or go on with it: --resume {cfg.out}" if "checkpoint.pt" in held else ""
        fail(f"{cfg.out} already holds a run ({', '.join(held)}); pick another --out{go_on}")

def settings(argv):
    """The run's settings: the flags, checked, and all that is derived from them, set here once
    (later only a CUDA graph that fails its check turns cfg.step to "eager"). -> cfg"""
    cfg = parse_settings(argv)
    cfg.rank = int(os.environ.get("RANK", 0))  # torchrun starts a process per GPU
    cfg.world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.groups == "auto":  # the authors' rule: groups of about half the batch
        cfg.groups = math.ceil(2 * cfg.proj_dim / cfg.batch_size)
    check_settings(cfg)
    cfg.groups = int(cfg.groups)
    if not cfg.out:
        cfg.out = f"runs/{cfg.dataset}-{cfg.decorr}-{time.strftime('%Y%m%d-%H%M%S')}"

    # The device, and the precision the network runs in (autocast's dtype; None: float32).
    if cfg.device == "auto":  # Apple's GPU only when asked
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"
    if cfg.device == "cuda":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    precision = cfg.precision
    if cfg.device.startswith("cuda") and precision == "auto":
        capability = torch.cuda.get_device_capability(cfg.device)
        if capability >= (7, 0):  # bf16 from 8.0 (A100, H100); 7.x (V100, T4) has fp16 alone
            precision = "bf16" if capability >= (8, 0) else "fp16"
    if (cfg.device, precision) in (("cpu", "fp16"), ("mps", "fp16"), ("mps", "bf16")):
        fail(f"--precision {precision} is not supported on {cfg.device}: use fp32 (or bf16 on "
             f"a CPU)")
    cfg.amp = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    cfg.whiten_dtype = "float32" if cfg.device == "mps" else "float64"  # Apple's GPU: no float64

    # The step is one CUDA graph on one CUDA GPU, and its whitening Newton-Schulz: eigh waits for
    # the host, which a graph cannot, and so does fp16's loss scaler, which is why fp16 is eager.
    graphable = cfg.amp != "float16" and cfg.world == 1 and cfg.device.startswith("cuda")
    graphable = graphable and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    cfg.step = "graph" if cfg.graph and graphable else "eager"
    cfg.whiten_method = "newton" if cfg.step == "graph" else "eigh"
    return cfg

def autocast(cfg):
    """The network's precision, cfg.amp (None: float32), as a context; no cache of casts, which a
    CUDA graph would keep from its capture."""
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.split(":")[0], getattr(torch, cfg.amp), cache_enabled=False)

# ---- 7. Data: uint8 images on the device once; a batch is a gather there, no DataLoader ----------
def balanced_subset(labels, n, seed):
    """The indices of n samples with, as nearly as may be, as many of each class, chosen at random:
    each class's first sample in a random order, then each class's second, and so on (all the
    samples if n is 0 or not below their number)."""
    if n <= 0 or n >= len(labels):
        return torch.arange(len(labels))
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = labels[perm]
    by_class = torch.argsort(shuffled, stable=True)  # by class, in a random order within each
    counts = torch.bincount(shuffled)
    place = torch.empty_like(perm)  # each sample's place within its class
    place[by_class] = torch.arange(len(labels)) - (counts.cumsum(0) - counts)[shuffled[by_class]]
    return perm[torch.argsort(place, stable=True)[:n]].sort().values

def subset(cfg, split, labels):
    """The indices of a split's images that a run uses: --train-subset (drawn with --seed) or
    --test-subset (with --seed + 1) class-balanced ones, or all of them."""
    if split == "train":
        return balanced_subset(labels, cfg.train_subset, cfg.seed)
    return balanced_subset(labels, cfg.test_subset, cfg.seed + 1)

def load_image_folder(cfg):
    """DIR/train and DIR/test (or val), a folder per class: the images of the subsets, decoded
    once into uint8 tensors N x 3 x size x size (a damaged one stops the load, named) and their
    labels. -> a dict as load_data's"""
    root = cfg.data_dir
    size = cfg.image_size
    def read(path):
        try:
            image = TF.pil_to_tensor(Image.open(path).convert("RGB"))
            return TF.center_crop(TF.resize(image, size), [size, size])
        except Exception as e:  # a damaged file fails in many ways (OSError, SyntaxError, ...)
            why = f"{type(e).__name__}: {str(e).strip()[:100]}"
            raise OSError(f"{path} cannot be read ({why})") from None

    data = {}
    test = "test" if os.path.isdir(os.path.join(root, "test")) else "val"
    for split, name in (("train", "train"), ("test", test)):
        try:  # no such folder, no class folders, no images in them, or a damaged image
            folder = torchvision.datasets.ImageFolder(os.path.join(root, name))
            labels = torch.tensor(folder.targets)
            keep = subset(cfg, split, labels)  # only these images are decoded
            paths = [folder.samples[i][0] for i in keep.tolist()]
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                decoded = pool.map(read, paths, chunksize=256)
                images = list(progress(decoded, f"decoding {name}", cfg, total=len(paths)))
        except OSError as e:
            fail(f"--dataset folder --data-dir {root}: {e} (DIR/train/<class>/*, "
                 f"DIR/test/<class>/*, all readable)")
        data[f"{split}_x"] = torch.stack(images)
        data[f"{split}_y"] = labels[keep]
    data["classes"] = folder.classes
    return data

def make_synthetic(n, size=32, seed=0):
    """Offline images N x 3 x size x size (uint8) of 10 classes: a disk, square, triangle, ring or
    cross, plain or striped, each image its own place, size, angle and colours. -> (x, labels)"""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=g)

    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    grid = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")

    # Each image's shape: coordinates u, v around its centre, turned, in units of its size.
    cx = uniform(n, 1, 1, low=-0.3, high=0.3)
    cy = uniform(n, 1, 1, low=-0.3, high=0.3)
    s = uniform(n, 1, 1, low=0.4, high=0.65)
    a = uniform(n, 1, 1, high=2 * math.pi)
    u = ((xx - cx) * a.cos() + (yy - cy) * a.sin()) / s
    v = (-(xx - cx) * a.sin() + (yy - cy) * a.cos()) / s
    r = (u * u + v * v).sqrt()
    corners = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
    triangle = torch.stack([u * math.cos(t) + v * math.sin(t) for t in corners]).amax(0)
    cross = ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1))
    masks = torch.stack([r < 1, torch.maximum(u.abs(), v.abs()) < 0.8, triangle < 0.5,
                         (r > 0.55) & (r < 1), cross], 1)
    mask = masks[torch.arange(n), y % 5].float().unsqueeze(1)  # N x 1 x H x W

    # Stripes for the classes 5 to 9. Lightness varies widely and the tint little: what survives
    # colour jitter is shape and texture, not a tint.
    frequency = uniform(n, 1, 1, low=2.5, high=4.0)
    stripes = torch.sin(frequency * math.pi * u + uniform(n, 1, 1, high=6.3)) > 0
    striped = (y // 5).view(n, 1, 1, 1).bool()
    texture = torch.where(striped, 0.35 + 0.65 * stripes.float().unsqueeze(1), torch.ones(1))
    background = uniform(n, 1, 1, 1, high=0.45) + uniform(n, 3, 1, 1, low=-0.08, high=0.08)
    foreground = uniform(n, 1, 1, 1, low=0.55, high=1.0) + uniform(n, 3, 1, 1, low=-0.08, high=0.08)
    noise = 0.04 * torch.randn(n, 3, size, size, generator=g)
    image = background + (foreground * texture - background) * mask + noise
    return (image.clamp(0, 1) * 255).round().to(torch.uint8), y

def eval_view(x):
    """The authors' evaluation view of uint8 images x: N x 3 x H x W: Resize(int(size x 8/7),
    bicubic), then CenterCrop(size), 36 then 32 px for CIFAR; 4,096 images at a time."""
    size = x.shape[-1]
    bicubic = torchvision.transforms.InterpolationMode.BICUBIC
    parts = []
    for part in x.split(4096):
        part = TF.resize(part, [int(size * 8 / 7)] * 2, interpolation=bicubic)
        parts.append(TF.center_crop(part, [size, size]))
    return torch.cat(parts)

def load_data(cfg):
    """A run's images, uint8 N x 3 x H x W, moved to the device once: train_x (labels train_y),
    bank and test (the evaluation view of the training and the test images, for k-NN; labels
    train_y, test_y) and metric (2,048 fixed training images, in whole batches, for the collapse
    metrics); the subsets if asked. -> a dict"""
    if cfg.dataset in ("cifar10", "cifar100"):
        kind = {"cifar10": torchvision.datasets.CIFAR10, "cifar100": torchvision.datasets.CIFAR100}
        try:
            sets = [kind[cfg.dataset](cfg.data_dir, train=is_train, download=True)
                    for is_train in (True, False)]
        except (OSError, RuntimeError) as e:
            fail(f"{cfg.dataset} is not in {cfg.data_dir} and could not be downloaded "
                 f"({type(e).__name__}: {e}); use --dataset folder --data-dir DIR or "
                 f"--dataset synthetic")
        x = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]
        data = {"train_x": x[0], "train_y": torch.tensor(sets[0].targets), "test_x": x[1],
                "test_y": torch.tensor(sets[1].targets), "classes": sets[0].classes}
    elif cfg.dataset == "folder":
        data = load_image_folder(cfg)  # the subsets' images alone
    else:  # 5,000 + 1,000 images, always the same: --seed changes the training, not the data
        x, y = make_synthetic(6000, cfg.image_size, seed=1234)
        shapes = ("disk", "square", "triangle", "ring", "cross")
        classes = [f"{shape}-{texture}" for texture in ("plain", "striped") for shape in shapes]
        data = {"train_x": x[:5000], "train_y": y[:5000], "test_x": x[5000:], "test_y": y[5000:],
                "classes": classes}

    if cfg.dataset != "folder":
        for split in ("train", "test"):
            keep = subset(cfg, split, data[f"{split}_y"])
            data[f"{split}_x"] = data[f"{split}_x"][keep]
            data[f"{split}_y"] = data[f"{split}_y"][keep]
    train_x = data["train_x"]
    train_y = data["train_y"]
    if len(train_y) < cfg.batch_size:
        fail(f"only {len(train_y)} training images for a batch of {cfg.batch_size}")
    n = max(min(2048, len(train_y)) // cfg.batch_size * cfg.batch_size, cfg.batch_size)
    metric = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return {"train_x": train_x.to(cfg.device), "train_y": train_y, "test_y": data["test_y"],
            "classes": data["classes"], "bank": eval_view(train_x).to(cfg.device),
            "test": eval_view(data["test_x"]).to(cfg.device),
            "metric": train_x[metric].to(cfg.device)}

# ---- 8. Evaluation: the k-NN monitor, collapse at three stages, the linear probe -----------------
def check_finite(what, tensors):
    """One read from the device, so that nothing that is not finite is saved or scored."""
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise FloatingPointError(f"{what} are not finite")

@torch.no_grad()
def encode(backbone, x, cfg):
    """The eval-mode backbone's features of uint8 images x: N x 3 x H x W -> N x F float32."""
    backbone.eval()  # the next epoch puts it back in train mode
    parts = progress(x.split(1024), f"features of {len(x)} images", cfg)
    with autocast(cfg):
        return torch.cat([backbone(network_input(part)).float() for part in parts])

@torch.no_grad()
def train_mode_outputs(net, x, cfg):
    """The projector's output h and the layer's z, N x D each, for uint8 images x, as training
    computes them: in train mode and training batches, on a copy of the network (eval mode's
    running averages lag, and can make a collapse look healthy). -> (h, z)"""
    probe = copy.deepcopy(net).train()
    parts = progress(x.split(cfg.batch_size), f"outputs of {len(x)} images", cfg)
    with autocast(cfg):
        hs = [probe.project(network_input(part)).float() for part in parts]
    check_finite("the projector's outputs", hs)  # a diverged network stops here, not in the layer
    return torch.cat(hs), torch.cat([probe.norm(h) for h in hs])

def projection_points(net, data, cfg):
    """Figure 2's points: the layer's outputs for 1,024 test images (drawn once with --seed, whole
    batches), in whole units of a scale so that a log of 50 epochs stays small. -> a dict"""
    n = min(1024, len(data["test_y"])) // cfg.batch_size * cfg.batch_size
    shown = torch.randperm(len(data["test_y"]), generator=torch.Generator().manual_seed(cfg.seed))
    shown = shown[:n]
    _, z = train_mode_outputs(net, data["test"][shown.to(data["test"].device)], cfg)
    scale = float(f"{z.abs().max().item() / 999:.4g}")  # 3 digits a coordinate
    if scale == 0:
        scale = 1.0
    points = (z / scale).round().int().tolist()
    return {"scale": scale, "points": points, "labels": data["test_y"][shown].tolist()}

def evaluate(net, data, cfg):
    """k-NN accuracy, and the collapse metrics at three stages: the backbone's features (of the
    test images, as k-NN sees them), the projector's output h and the layer's output z (of the
    fixed training images); for an output of at most 3 axes, Figure 2's points. -> a log row"""
    bank_feats = encode(net.backbone, data["bank"], cfg)
    test_feats = encode(net.backbone, data["test"], cfg)
    check_finite("the backbone's features", [bank_feats, test_feats])
    h, z = train_mode_outputs(net, data["metric"], cfg)
    collapse = {"backbone": collapse_metrics(test_feats), "projector": collapse_metrics(h),
                "normalized": collapse_metrics(z)}

    # A whitened output has std 1 on every axis; less means eps is damping directions that the
    # network has collapsed (whitening_matrix says why; --eps 1e-5 let a network do so).
    white_std = collapse["normalized"]["std"]
    if cfg.decorr == "zca" and white_std < 0.9:
        say(f"warning: the whitened output is not white (std {white_std:.2f}, should be 1): eps "
            f"is damping directions the network collapsed; try a smaller --eps")

    accuracy = knn_accuracy(bank_feats, data["train_y"], test_feats, data["test_y"])
    row = {"knn_acc": accuracy, "collapse": collapse}
    if cfg.proj_dim <= 3 and min(1024, len(data["test_y"])) >= cfg.batch_size:
        row["projection"] = projection_points(net, data, cfg)
    return row

@torch.no_grad()
def crop_features(backbone, x, generator, cfg):
    """The backbone's features of a new crop of every uint8 image x, as the linear probe trains
    on them: RandomResizedCrop(scale 0.08-1, bicubic) and a flip. -> N x F"""
    feats = []
    with autocast(cfg):
        for part in progress(x.split(1024), f"crops of {len(x)} images", cfg):
            crops = random_resized_crop_flip(part.float() / 255, scale=(0.08, 1.0),
                                             generator=generator, mode="bicubic")
            feats.append(backbone(network_input(crops)).float())
    return torch.cat(feats)

def linear_probe(backbone, feat_dim, data, cfg):
    """The authors' linear evaluation: Linear(F, classes) on the frozen eval-mode backbone, SGD
    with momentum 0.9, lr 30, batch 256, cosine to 0, on new crops of the training images every
    epoch; tested on the evaluation view. -> accuracy in percent"""
    device = data["train_x"].device
    n = len(data["train_y"])
    crops = torch.Generator(device=device).manual_seed(cfg.seed + 7919)
    order = torch.Generator().manual_seed(cfg.seed)
    classifier = nn.Linear(feat_dim, len(data["classes"])).to(device)
    labels = data["train_y"].to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=30.0, momentum=0.9)
    steps = math.ceil(n / 256) * cfg.linear_epochs
    cosine = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))

    backbone.eval()
    for _ in progress(range(cfg.linear_epochs), "linear probe", cfg):
        feats = crop_features(backbone, data["train_x"], crops, cfg)
        check_finite("the backbone's features", [feats])  # once an epoch: a NaN is never scored
        for batch in torch.randperm(n, generator=order).to(device).split(256):
            loss = F.cross_entropy(classifier(feats[batch]), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            cosine.step()

    with torch.no_grad():
        logits = classifier(encode(backbone, data["test"], cfg))
    check_finite("the classifier's outputs", [logits])
    return 100.0 * (logits.argmax(1) == data["test_y"].to(device)).float().mean().item()

# ---- 9. The machine: GPUs, several processes, and the training step as one CUDA graph ------------
def start_machine(cfg):
    """The machine as the settings say: this process's GPU, cuDNN's autotuner and TF32
    convolutions, torchrun's process group; a note where the machine does not suit the recipe."""
    if cfg.device.startswith("cuda"):
        torch.cuda.set_device(cfg.device)
        torch.backends.cudnn.benchmark = True  # the fastest convolutions for these shapes
        torch.backends.cudnn.allow_tf32 = True  # TF32 convolutions; matrix products stay float32
    if cfg.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")

    if cfg.device == "cpu" and cfg.arch == "resnet18":
        say("note: no CUDA GPU: the paper's recipe (ResNet-18, 200 epochs) takes days on a CPU; "
            "--laptop runs the laptop recipe (small network, 5,000 / 2,000 images, 10 epochs: "
            "minutes)")
    if cfg.device == "mps":
        say("note: fdsl is unmeasured on Apple's GPU, where the layer runs in float32: eps is at "
            "least 3.8e-6 for groups of 32, near the 1e-5 that let a network collapse; watch for "
            "'not white'")

class AllGather(torch.autograd.Function):
    """The global batch from every process's share x: N x D, process r holding its images r, r +
    world, ... -> (world x N) x D. The gradient of x: its rows of the gradient, summed over all."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts, 1).flatten(0, 1)  # back in the global batch's order

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[dist.get_rank()::dist.get_world_size()]

def inverse_sqrt_newton(a, floor):
    """A^(-1/2) of symmetric S x S matrices a with eigenvalues in [floor, S + floor], by matrix
    products alone, which a CUDA graph can hold: scaled coupled Newton-Schulz (Higham 2008, eq.
    6.35). Y = A / tr A, Z = I; R = (I - c^2 ZY) / 2, Y <- c (Y + YR), Z <- c (Z + RZ) until Z is
    (A / tr A)^(-1/2). A step maps a root x of ZY's eigenvalues to h(c x), h(t) = (3t - t^3) / 2;
    c = sqrt(3 / (1 + b + b^2)) for the lowest root b makes h(c b) = h(c) (Chen and Chow 2014).
    The scalings depend on S, floor and the dtype, never on the data."""
    low = math.sqrt(floor / (a.shape[-1] * (1 + floor)))
    scales = []
    while 1 - low > torch.finfo(a.dtype).eps:
        c = math.sqrt(3 / (1 + low + low * low))
        scales.append(c)
        low = c * low * (3 - (c * low) ** 2) / 2

    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)
    y = a / trace[..., None, None]
    z = eye.expand_as(a)
    for c in scales:
        r = 0.5 * (eye - (c * c) * (z @ y))
        yr, rz = y @ r, r @ z
        y = c * (y + 0.5 * (yr + yr.mT))  # kept symmetric: less rounding
        z = c * (z + 0.5 * (rz + rz.mT))
    return z * trace.rsqrt()[..., None, None]

class MachineWhitening(GroupWhitening):
    """The layer of the settings as this machine runs it: Standardize's (bn: groups of one axis,
    no shuffle, eps 0) or GroupWhitening's (zca). In a CUDA graph, W by Newton-Schulz (eigh waits
    for the host); under torchrun, in train mode, over the global batch, every process's samples;
    on a CPU, eigh in one thread."""

    def __init__(self, cfg):
        dtype = getattr(torch, cfg.whiten_dtype)
        if cfg.decorr == "bn":
            super().__init__(cfg.proj_dim, cfg.proj_dim, False, 0.0, dtype)
        else:
            super().__init__(cfg.proj_dim, cfg.groups, cfg.shuffle, cfg.eps, dtype)
        self.method = cfg.whiten_method
        self.global_batch = cfg.world > 1

    def extra_repr(self):
        return f"{super().extra_repr()}, method={self.method!r}, global_batch={self.global_batch}"

    def forward(self, x):
        if not (self.global_batch and self.training and dist.is_initialized()):
            return super().forward(x)
        z = super().forward(AllGather.apply(x))  # every process whitens the global batch
        return z[dist.get_rank()::dist.get_world_size()]

    def inverse_sqrt(self, a, floor):
        if self.method == "newton":
            return inverse_sqrt_newton(a, floor)
        if a.device.type == "cuda":
            return super().inverse_sqrt(a, floor)
        with one_thread():
            return super().inverse_sqrt(a, floor)

def capture(fn, generator):
    """fn() recorded as a CUDA graph, after 3 warm-up calls on a side stream. -> (its output, a
    function that replays the graph)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if torch.__version__ < (2, 14):  # later versions register a generator used in a capture
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay

def record(step, static_x, optimizer, generator):
    """step(static_x) as a CUDA graph. SGD is recorded in its fused kernel with the learning rate
    as a device tensor, which each replay fills from the schedule's value; the optimizer is left
    as it was. -> replayed(x): x copied in, the graph replayed, the loss"""
    groups = optimizer.param_groups
    lrs = [group["lr"] for group in groups]
    lr_tensors = [torch.tensor(lr, device=static_x.device) for lr in lrs]
    for group, lr in zip(groups, lr_tensors):
        group.update(lr=lr, fused=True, foreach=False)
    try:
        loss, replay = capture(lambda: step(static_x), generator)
    finally:
        for group, lr in zip(groups, lrs):
            group.update(lr=lr, fused=None, foreach=None)

    def replayed(x):
        static_x.copy_(x)
        for group, lr in zip(groups, lr_tensors):
            lr.fill_(group["lr"])
        replay()
        return loss.clone()  # the next replay overwrites loss

    return replayed

def restore(net, optimizer, saved, lrs):
    """The saved state, copied into the same tensors (a graph holds their addresses), and lrs."""
    net.load_state_dict(saved["weights"])
    for p, state in optimizer.state.items():
        state["momentum_buffer"].zero_().add_(saved["momenta"].get(p, 0))
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr

def graph_step(step, batch, parts, generator, cfg):
    """step recorded once as a CUDA graph and replayed for every batch, once a replay matches an
    eager step: from one state, batch and random streams, at the peak learning rate, both must
    change the loss and the weights alike to 1% (bf16 rounds to 0.2%; a replay that skips or
    repeats the update is off by 100%). If not, one line says why, cfg.step turns "eager" and step
    trains. Either way the state is put back. -> a step"""
    net = parts["model"]
    optimizer = parts["optimizer"]
    lrs = [group["lr"] for group in optimizer.param_groups]
    momenta = {p: state["momentum_buffer"].clone() for p, state in optimizer.state.items()}
    saved = {"weights": copy.deepcopy(net.state_dict()), "momenta": momenta}
    static_x = batch.clone()  # the graph's input

    def update(one_step):  # (loss, change of the weights) of one step from the saved state
        restore(net, optimizer, saved, [group["initial_lr"] for group in optimizer.param_groups])
        torch.manual_seed(0)  # the whitening's shuffles
        generator.manual_seed(0)  # the augmentations
        loss = float(one_step())
        weights = net.named_parameters()
        return loss, torch.cat([(p.detach() - saved["weights"][k]).flatten() for k, p in weights])

    try:
        with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []):
            replayed = record(step, static_x, optimizer, generator)
            loss_eager, change_eager = update(lambda: step(static_x))
            loss_graph, change_graph = update(lambda: replayed(static_x))
        off = ((change_graph - change_eager).norm() / change_eager.norm()).item()
        if not abs(loss_graph - loss_eager) <= 0.01 * abs(loss_eager) or not off <= 0.01:
            raise RuntimeError(f"its replay differs from the eager step: loss {loss_graph:.6g} "
                               f"against {loss_eager:.6g}, update off by {off:.1%}")
    except Exception as e:
        restore(net, optimizer, saved, lrs)
        say(f"note: the CUDA graph is not used ({type(e).__name__}: {str(e).strip()[:200]}); "
            f"the eager step trains")
        cfg.step = "eager"
        return step
    restore(net, optimizer, saved, lrs)
    return replayed

# ---- 10. Training, and the run folder: config.json, log.jsonl, checkpoint.pt, results.json -------
def build_training(cfg, steps_per_epoch):
    """The network of the settings and what trains it, the parts that a checkpoint holds:
    {"model": backbone -> projector -> the layer of --decorr -> predictor, "optimizer": SGD at
    lr x batch / 256, "scheduler": warm-up, then cosine to 0, "scaler": fp16's loss scaler}"""
    torch.manual_seed(cfg.seed)
    backbone, feat_dim = make_backbone(cfg.arch)
    norm = nn.Identity() if cfg.decorr == "none" else MachineWhitening(cfg)
    predictor = mlp(cfg.proj_dim, 256, cfg.proj_dim) if cfg.predictor else None  # drawn first
    projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.linear_projector)
    net = SiameseNet(backbone, feat_dim, projector, norm, predictor)
    net = net.to(cfg.device, memory_format=torch.channels_last)
    if cfg.world > 1 and cfg.device.startswith("cuda"):  # BatchNorm over every GPU's images
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)

    optimizer = torch.optim.SGD(net.parameters(), lr=cfg.lr * cfg.batch_size / 256,
                                momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total = cfg.epochs * steps_per_epoch
    warmup = round(cfg.warmup_epochs * steps_per_epoch)

    def lr_factor(step):  # the learning rate after a step, as a multiple of the peak
        if step < warmup:
            return step / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=cfg.amp == "float16")
    return {"model": net, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}

def make_step(cfg, parts, generator):
    """The training step, step(x) on this process's share of a batch, uint8 x: N x 3 x H x W:
    two augmented views, the network on each, the loss, backward and SGD. It returns the loss on
    the device: reading it would make the host wait for the GPU. -> step"""
    model = parts["model"]
    if cfg.world > 1:  # gradients averaged over the processes
        model = nn.parallel.DistributedDataParallel(model)

    def step(x):
        views = augment(torch.cat([x, x]), generator)  # each image draws its own: two views
        x1, x2 = views.chunk(2)
        with autocast(cfg):
            p1, p2, z1, z2 = model(x1, x2)
            loss = siamese_loss(p1, p2, z1, z2, cfg.loss, cfg.stop_grad)
        parts["optimizer"].zero_grad(set_to_none=True)
        parts["scaler"].scale(loss).backward()
        parts["scaler"].step(parts["optimizer"])
        parts["scaler"].update()
        return loss.detach()

    return step

def seed_epoch(cfg, epoch, generator, n):
    """Every random stream of an epoch seeded from (seed, epoch), so that a resumed run draws what
    an uninterrupted one would. -> the epoch's order of the n training images (the same on every
    process, as the whitening's shuffles are; each process augments with a stream of its own)"""
    def seed(stream, rank=0):
        return (cfg.seed * 1_000_003 + epoch) * 1009 + stream * 101 + rank

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed(1)))
    generator.manual_seed(seed(2, cfg.rank))
    torch.manual_seed(seed(0))
    return order

def mean_loss(loss_sum, steps, epoch):
    """The mean loss of an epoch's first steps, read from the device; not finite: the run stops."""
    mean = loss_sum.item() / steps
    if not math.isfinite(mean):
        raise FloatingPointError(f"the loss is {mean} at epoch {epoch}, step {steps} (read every "
                                 f"25 steps: it may have turned earlier)")
    return mean

def provenance(cfg):
    """What made a run's numbers: the versions, the device by name, and fdsl.py's git commit (in a
    checkout) and sha256 (the file that ran may differ from its commit)."""
    commit = ""
    if shutil.which("git"):
        git = ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"]
        commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    with open(__file__, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]

    name = cfg.device
    if cfg.device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    elif cfg.device == "cpu" and os.path.isfile("/proc/cpuinfo"):  # Linux names the CPU
        with open("/proc/cpuinfo") as f:
            models = [line.split(":")[1].strip() for line in f if line.startswith("model name")]
        name = f"{models[0] if models else 'CPU'}, {os.cpu_count()} CPUs"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device_name": name,
            "fdsl_version": f"{commit} sha256:{digest}".strip()}

# The printed table: a column per number, its width and format. proj. std, corr and erank are the
# projector's output h, before the layer; z erank the layer's output, which the loss compares.
COLUMNS = [("epoch", 5, "d"), ("loss", 10, ".4g"), ("lr", 9, ".3g"), ("img/s", 8, ".0f"),
           ("knn %", 6, ".2f"), ("proj. std", 10, ".4g"), ("corr", 5, ".2f"), ("erank", 6, ".1f"),
           ("z erank", 7, ".1f"), ("time", 7, ".1f")]

def begin_run(cfg, data):
    """The run's first line and the table's header; config.json."""
    if cfg.warmup_epochs >= cfg.epochs:
        say(f"note: the warm-up ({cfg.warmup_epochs:g} epochs) is not shorter than the run: the "
            f"learning rate stays below --lr, so the run shows collapse, not what training learns")

    layer = f"decorr={cfg.decorr}"
    if cfg.decorr == "zca":
        layer += f" groups={cfg.groups} shuffle={cfg.shuffle}"
    say(f"fdsl: {cfg.dataset} ({len(data['train_y'])} / {len(data['test_y'])} images), "
        f"{cfg.arch}, {layer}, batch {cfg.batch_size}, lr {cfg.lr * cfg.batch_size / 256:.4g} "
        f"(--lr {cfg.lr:g} per 256 images), {cfg.epochs} epochs, {cfg.device} x{cfg.world}, "
        f"{cfg.step} step -> {cfg.out}", " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
    if cfg.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({**vars(cfg), **provenance(cfg)}, f, indent=2)

def log_epoch(cfg, row):
    """An epoch's row, appended to log.jsonl (compact: a 2-d run logs its points) and printed."""
    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")
    projector = row.get("collapse", {}).get("projector", {})
    layer = row.get("collapse", {}).get("normalized", {})
    values = [row["epoch"], row["loss"], row["lr"], row["images_per_s"], row.get("knn_acc"),
              projector.get("std"), projector.get("corr_strength"), projector.get("eff_rank"),
              layer.get("eff_rank"), row["time"]]
    cells = [" " * width if value is None else format(value, f"{width}{spec}")
             for value, (_, width, spec) in zip(values, COLUMNS)]
    say(" ".join(cells))

def save_checkpoint(cfg, parts, epoch, elapsed):
    """All it takes to go on after this epoch, whole or not at all: written to a temporary file,
    then renamed over the last checkpoint."""
    path = os.path.join(cfg.out, "checkpoint.pt")
    state = {name: part.state_dict() for name, part in parts.items()}
    torch.save({**state, "epoch": epoch, "elapsed": elapsed, "config": vars(cfg)}, path + ".tmp")
    os.replace(path + ".tmp", path)

def load_checkpoint(cfg, parts):
    """--resume: the checkpoint's state put into the parts, read as data (a file that holds code
    is refused). -> where training starts: {"epoch": the first epoch to run, "elapsed": seconds}"""
    if not cfg.resume:
        return {"epoch": 0, "elapsed": 0.0}

    path = os.path.join(cfg.out, "checkpoint.pt")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, part in parts.items():
            part.load_state_dict(state[name])
    except Exception as e:  # objects: UnpicklingError; another network: RuntimeError, KeyError
        if "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError":
            fail(f"{path}: it holds objects that could run code; refused")
        first_line = str(e).strip().split("\n")[0][:120]
        fail(f"{path}: damaged, or not this network's ({type(e).__name__}: {first_line})")
    return {"epoch": state["epoch"] + 1, "elapsed": state["elapsed"]}

def train(cfg, data, parts, step, generator, start):
    """The run, epoch by epoch: train on every image once (epoch 0 only measures the random
    network), evaluate when due, log a row and save the checkpoint, so that an interruption loses
    an epoch at most. -> (the last evaluation, None if no epoch was left; seconds in all)"""
    net = parts["model"]
    train_x = data["train_x"]
    steps = len(train_x) // cfg.batch_size  # the last partial batch is dropped
    clock = time.perf_counter() - start["elapsed"]
    final = None
    begin_run(cfg, data)
    for epoch in range(start["epoch"], cfg.epochs + 1):
        row = {"epoch": epoch, "loss": None, "lr": None, "images_per_s": None}

        # Train: every image once, in batches; process r takes the r-th share of each batch.
        if epoch > 0:
            order = seed_epoch(cfg, epoch, generator, len(train_x)).to(train_x.device)
            net.train()
            loss_sum = torch.zeros((), device=train_x.device)
            t0 = time.perf_counter()
            bar = progress(range(steps), f"epoch {epoch}/{cfg.epochs}", cfg)
            for i in bar:
                batch = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                loss_sum += step(train_x[batch[cfg.rank::cfg.world]])
                parts["scheduler"].step()
                if i % 25 == 24 or i == steps - 1:  # reading the loss waits for the GPU
                    bar.set_postfix(loss=f"{mean_loss(loss_sum, i + 1, epoch):.4g}")
            check_finite(f"the weights after epoch {epoch}", [*net.parameters(), *net.buffers()])
            row["loss"] = loss_sum.item() / steps
            row["lr"] = float(parts["optimizer"].param_groups[0]["lr"])
            row["images_per_s"] = steps * cfg.batch_size / (time.perf_counter() - t0)

        # Evaluate: the first and the last epoch, and every --eval-every.
        if epoch in (0, cfg.epochs) or (cfg.eval_every and epoch % cfg.eval_every == 0):
            final = evaluate(net, data, cfg)
            row.update(final)
        row["time"] = time.perf_counter() - clock

        # Log and checkpoint: process 0 writes the run folder.
        if cfg.rank == 0:
            log_epoch(cfg, row)
            save_checkpoint(cfg, parts, epoch, row["time"])
    return final, time.perf_counter() - clock

# ---- 11. Main: settings -> machine -> data -> training -> linear probe -> results.json -----------
def finish(cfg, data, net, final, seconds):
    """The run's end: its last evaluation (now, if it resumed after its last epoch), the linear
    probe, results.json and a closing line. -> the results"""
    t0 = time.perf_counter()
    results = {**(final or evaluate(net, data, cfg)), "epochs": cfg.epochs}
    if cfg.linear_epochs > 0:
        results["linear_acc"] = linear_probe(net.backbone, net.feat_dim, data, cfg)
        say(f"linear probe ({cfg.linear_epochs} epochs): {results['linear_acc']:.2f}%")

    results["time_s"] = seconds + time.perf_counter() - t0
    results["step"] = cfg.step
    results["device"] = f"{cfg.device} x{cfg.world}"
    results.update(provenance(cfg))
    if cfg.rank == 0:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
    say(f"k-NN {results['knn_acc']:.2f}% after {cfg.epochs} epochs; results in "
        f"{cfg.out}/results.json")
    return results

def remove_unsaved(cfg):
    """A run stopped before its first checkpoint leaves nothing behind: the files it wrote go, and
    its folder if that leaves it empty (a run starts only in a folder without such files)."""
    if cfg.rank > 0 or cfg.resume or os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        return
    for name in RUN_FILES:
        if os.path.exists(os.path.join(cfg.out, name)):
            os.remove(os.path.join(cfg.out, name))
    if os.path.isdir(cfg.out) and not os.listdir(cfg.out):
        os.rmdir(cfg.out)

def main(argv=None):
    """A run from the command line. Bad input: one line, exit 2; a run that diverges: one line
    naming the last good checkpoint, exit 1; Ctrl-C: how to go on, exit 130. -> the results"""
    cfg = settings(sys.argv[1:] if argv is None else argv)
    checkpoint = os.path.join(cfg.out, "checkpoint.pt")
    try:
        start_machine(cfg)
        if cfg.resume and os.path.isfile(os.path.join(cfg.out, "results.json")):
            say(f"fdsl: {cfg.out} is a finished run; start a new one to train longer")
            return read_json(os.path.join(cfg.out, "results.json"))
        data = load_data(cfg)
        parts = build_training(cfg, len(data["train_x"]) // cfg.batch_size)
        generator = torch.Generator(device=cfg.device)  # the augmentations' random stream
        step = make_step(cfg, parts, generator)
        start = load_checkpoint(cfg, parts)
        if cfg.step == "graph":
            step = graph_step(step, data["train_x"][:cfg.batch_size], parts, generator, cfg)
        final, seconds = train(cfg, data, parts, step, generator, start)
        return finish(cfg, data, parts["model"], final, seconds)

    except (FloatingPointError, torch.linalg.LinAlgError) as e:  # NaN or inf: loss, weights, ...
        last = "nothing saved"
        if os.path.exists(checkpoint):
            last = f"the last good checkpoint is {checkpoint}"
        remove_unsaved(cfg)
        say(f"fdsl: stopped: {e}; {last}; try a lower --lr", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        how = "nothing saved yet"
        if os.path.exists(checkpoint):
            how = f"go on: python fdsl.py --resume {cfg.out}"
        remove_unsaved(cfg)
        say(f"\nfdsl: interrupted; {how}", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
