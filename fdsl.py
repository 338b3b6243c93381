"""
fdsl.py: "On Feature Decorrelation in Self-Supervised Learning" (Hua, Wang, Xue, Ren, Wang,
Zhao, ICCV 2021, arXiv 2105.00470), reproduced in one file.

    python fdsl.py --decorr zca               # the paper's method (Shuffled-DBN): CIFAR-10, 200 epochs
    python fdsl.py --decorr bn                # per-axis standardization: dimensional collapse
    python fdsl.py --decorr none              # no normalization: complete collapse
    python fdsl.py --decorr zca --no-shuffle  # fixed groups, which can become copies of one another
    python fdsl.py --dataset folder --data-dir ~/cifar10-jpeg      # DIR/train and DIR/test image folders
    python fdsl.py --dataset synthetic --arch small --epochs 3 --linear-epochs 0   # 1-minute CPU check
    torchrun --nproc_per_node=4 fdsl.py --decorr zca    # several GPUs, whitening over the global batch
    python fdsl.py --resume runs/cifar10-zca-20261124-101500    # continue an interrupted run
    python fdsl.py --benchmark --out results/bench     # time the training step, keep the table
    python fdsl.py --plot runs/*              # figure and Markdown table of several runs

The story: two augmented views of an image go through one network (backbone -> projector ->
normalization layer -> optional predictor) and the loss pulls the outputs together. (1) With no
normalization the network maps every image to one point: complete collapse. (2) Standardizing
each axis (BN) forbids that, but the axes move together and the output lives in a few
directions: dimensional collapse. (3) Whitening groups of axes (ZCA) decorrelates the axes of
each group by construction, and reshuffling the groups decorrelates every pair over training: no
collapse of either kind, and better features. (4) How correlated the features are, measured
without labels, tells good representations from bad ones.

Part one is the method in the paper's order, sections 1 to 10. The appendices A to F are machinery,
skippable on a first reading (A, the numerics of C^(-1/2), goes with the layers when they are copied:
the lines between "# --- copy from here" and "# --- copy to here").
"""

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm import tqdm

if sys.version_info < (3, 10):  # `X | None` annotations, among others
    sys.exit(f"fdsl.py needs Python 3.10 or newer; this is Python {platform.python_version()}")

# =============================================================================================
# 1. The recipe
# The authors' main CIFAR-10 setting, from their released code and configs. Entries marked [fdsl]
# are this file's own (the authors' code has none, or another); [SimSiam] marks options the paper's
# framework does not have; [Figure 2] the authors' projector for their 2-d pictures. Each entry is a
# flag (--batch-size 512); where the data is and how to run (devices, run folders): Appendix D.
# =============================================================================================

RECIPE = {  # setting: (default, what it means)
    "dataset": ("cifar10", "cifar10 | cifar100 | folder (DIR/train, DIR/test) | synthetic ([fdsl] offline)"),
    "arch": ("resnet18", "resnet18: CIFAR ResNet-18 (F = 512 features); small: [fdsl] 4 convs (F = 256), for CPUs"),
    "proj_hidden": (1024, "projector hidden width: Linear(F, 1024) -> BN -> ReLU -> Linear(1024, D)"),
    "linear_projector": (False, "[Figure 2] a linear bottleneck: Linear(F, proj_hidden) -> Linear(proj_hidden, D)"),
    "proj_dim": (512, "projector output width D"),
    "decorr": ("zca", "the layer after the projector: none | bn (standardize each axis) | zca (whiten groups of axes)"),
    "groups": (16, "zca: whiten G groups of D/G axes (1: full ZCA); auto: the authors' ceil(2D / N), if it divides D"),
    "shuffle": (True, "zca: a new random grouping of the axes at every call (Shuffled-DBN); off: fixed groups"),
    "eps": (1e-8, "[fdsl] whitening regularizer, relative to each group's mean variance (the authors': none)"),
    "whiten": ("auto", "[fdsl] how W is computed: eigh | newton | auto (newton if a CUDA graph is planned)"),
    "whiten_dtype": ("float64", "[fdsl] the layer's statistics and W (float32 on Apple MPS; the authors: float32)"),
    "predictor": (False, "[SimSiam] a predictor MLP D -> pred_hidden -> D on the output"),
    "pred_hidden": (256, "[SimSiam] predictor hidden width"),
    "stop_grad": (False, "[SimSiam] no gradient through the target view"),
    "loss": ("l2", "l2: mean ||p - z||^2 of each view's p and the other's z (the paper: p = z); cosine: [SimSiam]"),
    "epochs": (200, "training epochs"),
    "batch_size": (64, "global batch (split over the GPUs under torchrun)"),
    "lr": (0.02, "learning rate per 256 images: lr x batch / 256 is used (0.005 at batch 64)"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (1e-3, "SGD weight decay on every parameter (the batch-size study: 2.5e-3)"),
    "warmup_epochs": (5.0, "linear warm-up from 0, then cosine to 0, per step"),
    "eval_every": (5, "the k-NN monitor, and the collapse metrics ([fdsl]), every N epochs (0: first and last only)"),
    "knn_k": (200, "neighbours that vote in the k-NN monitor"),
    "knn_t": (0.1, "k-NN temperature: a neighbour's vote is exp(similarity / t)"),
    "metric_samples": (2048, "[fdsl] fixed training images for the projector's and the layer's collapse metrics"),
    "raw_eval": (False, "evaluate on the raw images, not the authors' Resize(int(size x 8/7)) + CenterCrop"),
    "linear_epochs": (100, "linear-probe epochs at the end (0: no probe)"),
    "seed": (0, "seed of every random stream (the synthetic images are fixed)"),
}

# =============================================================================================
# 2. Data
# The images sit on the device as uint8 tensors, moved there once (training, evaluation views and
# metric images: images_on_device, Appendix B). A batch is a random gather from the training images:
# no DataLoader or CPU worker sits in the training loop.
# =============================================================================================


@dataclass
class Data:
    train_x: torch.Tensor  # N x 3 x H x W uint8
    train_y: torch.Tensor  # N int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list


def load_data(cfg):
    """CIFAR, an image folder or generated data (readers: Appendix E), class-balanced subsets if asked."""
    if cfg.dataset in ("cifar10", "cifar100"):
        data = load_cifar(cfg.dataset, cfg.data_dir)
    elif cfg.dataset == "folder":
        data = load_image_folder(cfg.data_dir, cfg.image_size, progress=cfg.progress)
    else:
        data = synthetic_data(cfg.image_size)
    data.train_x, data.train_y = balanced_subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed)
    data.test_x, data.test_y = balanced_subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1)
    return data


# =============================================================================================
# 3. Augmentations
# SimSiam's CIFAR recipe, drawn for every image on its own, on whatever device the batch is.
# The kernels that do it for a whole batch at once are in Appendix E.
# =============================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors standardize CIFAR with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)


def augment(x, generator=None):
    """One random view of every image: x: N x 3 x H x W, uint8 (0-255) or float (0-1) ->
    N x 3 x H x W float32, standardized. Every image draws its own parameters, so the two
    views of a batch x are the two halves of augment(torch.cat([x, x]))."""
    x = random_resized_crop_flip(to_float(x), scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5,
                                 generator=generator)
    x = color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, generator=generator)
    x = random_grayscale(x, p=0.2, generator=generator)
    return standardize_pixels(x)  # (x - ImageNet mean) / std, per channel


def eval_transform(x, chunk=4096):
    """The authors' evaluation view, made once: Resize(int(size x 8/7), bicubic, antialiased as PIL), then
    CenterCrop(size): 36 then 32 pixels for CIFAR, 73 for 64. x: N x 3 x H x H uint8 -> same."""
    size, big = x.shape[-1], int(x.shape[-1] * 8 / 7)
    bicubic = torchvision.transforms.InterpolationMode.BICUBIC
    crop = lambda t: TF.center_crop(TF.resize(t, [big, big], interpolation=bicubic, antialias=True), [size, size])
    return torch.cat([crop(t) for t in x.split(chunk)]) if len(x) else x


# =============================================================================================
# 4. The paper's layers: standardizing and whitening the projector output over the batch
# Standardizing each axis (BN) stops complete collapse but lets the axes stay correlated, so the
# output can collapse onto a few directions. Whitening makes the covariance of each group of axes
# the identity over the batch; reshuffling the groups at every call extends that to every pair of
# axes over training. Both copy out: this block and Appendix A's, under five imports (README).
# =============================================================================================

# --- copy from here: the paper's layers (Appendix A's block too) -----------------------------


class Standardize(nn.Module):
    """Per-axis standardization over the batch, no affine: the paper's "BN" (finding 2). x: N x D ->
    (x - mean) / std per axis with the batch's mean and biased std, in `dtype` outside autocast, as
    the authors' BatchNorm (eps 0, no affine) in training (a constant axis: 0 here, NaN there).
    Unlike nn.BatchNorm1d(affine=False): no eps (its 1e-5 lets a shrinking input shrink the output)
    and the batch's statistics in eval mode too (no running averages). global_batch: GroupWhitening's."""

    def __init__(self, num_features, dtype=torch.float64, global_batch=False):
        super().__init__()
        check_settings(dtype)
        self.num_features, self.dtype, self.global_batch = num_features, dtype, global_batch

    def extra_repr(self):
        return f"{self.num_features}, dtype={self.dtype}, global_batch={self.global_batch}"

    def forward(self, x):
        sync = self.global_batch and self.training
        check_features(x, self.num_features, sync)
        with outside_autocast(x):
            h = x.to(self.dtype)
            hc = h - batch_mean(h.sum(0), len(x), sync)
            var = batch_mean(hc.square().sum(0), len(x), sync)
            z = hc * torch.where(var > 0, var, torch.ones_like(var)).rsqrt()
        return z.to(x.dtype)


class GroupWhitening(nn.Module):
    """Shuffled group ZCA whitening over the batch, the paper's "Shuffled-DBN" (finding 3).
    x: N x D (one view) -> N x D: the axes shuffled, then for each group of S = D / G axes
        xc = x - mean(x)                    centre every axis over the N samples (N x S)
        C  = xc^T xc / N                    biased covariance (S x S); m = tr(C) / S
        C / m + e I = U diag(l) U^T         e = max(eps, S x machine epsilon of dtype)
        W  = U diag(l^-1/2) U^T / sqrt(m)   ZCA (the whitening that rotates least); l clamped at e (eigh)
        z  = xc W                           z's covariance over the batch: I, to within e / l
    and the shuffle undone. Each group is white; axes of different groups may stay correlated.
    The shuffle, a new permutation of the D axes at every call (each view of a step, each batch of an
    evaluation), puts every pair of axes in one group now and then: over training, every pair is
    decorrelated. N centred samples span N - 1 directions, so a group must be smaller than the
    batch (the layer refuses S >= N): groups keep C well conditioned at small batches.
    groups=1: full ZCA (the authors' "DBN"); shuffle=False: fixed groups. eps: relative to m
    (whitening_matrix says why); 0: the authors' layer, up to the floor e (7e-15 for S = 32, float64).
    The batch's statistics in train and eval mode (no running averages, as the authors'), in `dtype`
    (float32 or float64) outside autocast; z in x's dtype. method: eigh (a NaN in x: an error saying
    so) or newton (in float64 the same z to 1e-7; a NaN in x makes its group's outputs NaN, as looking
    would wait for the device: watch the loss, as fdsl's loop does). global_batch: in train mode, over
    every process's samples (torchrun). last_perm: the last permutation, None unshuffled."""

    def __init__(self, num_features, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64, method="eigh",
                 global_batch=False):
        super().__init__()
        check_settings(dtype, num_features, groups, eps, method)
        self.num_features, self.groups, self.eps, self.method, self.dtype = num_features, groups, eps, method, dtype
        self.shuffle = shuffle and 1 < groups < num_features  # one group, or groups of one: order is moot
        self.global_batch, self.last_perm = global_batch, None

    def extra_repr(self):
        return (f"{self.num_features}, groups={self.groups}, shuffle={self.shuffle}, eps={self.eps}, "
                f"dtype={self.dtype}, method={self.method!r}, global_batch={self.global_batch}")

    def forward(self, x):
        sync = self.global_batch and self.training
        check_features(x, self.num_features, sync, group_size=self.num_features // self.groups)
        n, d = x.shape
        with outside_autocast(x):
            h = x.to(self.dtype)
            perm = torch.randperm(d, device=x.device) if self.shuffle else None  # drawn on the device
            if perm is not None:
                h = h.index_select(1, perm)  # shuffle the axes
            h = h.reshape(n, self.groups, d // self.groups).transpose(0, 1)  # G x N x S
            hc = h - batch_mean(h.sum(1, keepdim=True), n, sync)  # centre every axis
            cov = batch_mean(hc.mT @ hc, n, sync)  # G x S x S
            z = (hc @ whitening_matrix(cov, self.eps, self.method)).transpose(0, 1).reshape(n, d)
            if perm is not None:
                z = z.index_select(1, perm.argsort())  # every axis back to its own place
        self.last_perm = perm
        return z.to(x.dtype)


def whitening_matrix(cov, eps, method="eigh"):
    """GroupWhitening's W (its formula) for covariances cov: ... x S x S.
    eps is relative: with an absolute eps, (C + eps I)^(-1/2) of a tiny C is about eps^(-1/2) I,
    the "whitened" output of a tiny input is a small copy of it, and the network lowers the loss
    by shrinking its output. Relative to m, W(c^2 C) = W(C) / c: the output of c x is that of x.
    eps is small (1e-8): a direction whose variance v (an eigenvalue of C) sinks to about eps x m
    comes out with std sqrt(v / (v + e m)) < 1, so a large eps lets the network collapse below
    it (at 1e-5 it did: docs/notes.md). The floor e: rounding moves the eigenvalues of C / m (at
    most S) by about S x machine epsilon, so no smaller eps can be honoured. A group's condition
    number is at most (S + e) / e. A group whose C is exactly 0 (constant axes): W = I, output 0."""
    group_size = cov.shape[-1]
    e = whitening_eps(eps, group_size, cov.dtype)
    eye = torch.eye(group_size, dtype=cov.dtype, device=cov.device)
    m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    constant = m == 0
    m = torch.where(constant, torch.ones_like(m), m)
    a = torch.where(constant, eye, cov / m + e * eye)  # mean eigenvalue 1 + e: scale-free
    return inverse_sqrt(a, e, method) * m.rsqrt()


# --- copy to here ----------------------------------------------------------------------------


# =============================================================================================
# 5. Model: backbone -> projector -> normalization layer -> (predictor)
# Everything downstream of training (k-NN, linear probe) uses only the backbone's output.
# =============================================================================================


def resnet18_cifar():
    """torchvision's ResNet-18 in its CIFAR form: 3x3 stride-1 first conv, no max-pool, the
    classifier removed. N x 3 x 32 x 32 -> N x 512."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32 px images: keep the resolution
    net.maxpool, net.fc = nn.Identity(), nn.Identity()
    return net, 512


def small_convnet():
    """Four conv-BN-ReLU layers and average pooling, for CPU runs and tests. N x 3 x H x W -> N x 256."""
    layers, c = [], 3
    for i, width in enumerate((32, 64, 128, 256)):
        layers += [nn.Conv2d(c, width, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256


def mlp(in_dim, hidden, out_dim, linear=False):
    """Linear -> BN -> ReLU -> Linear: the projector (F -> proj_hidden -> D, F = 512 for ResNet-18,
    256 for --arch small), the predictor (D -> pred_hidden -> D). linear: Linear -> Linear, the authors'
    bottleneck for their 2-d pictures (hidden 4): the output is then a linear map of the features."""
    middle = [] if linear else [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(nn.Linear(in_dim, hidden), *middle, nn.Linear(hidden, out_dim))


class SiameseNet(nn.Module):
    """One network shared by both views; the findings differ only in `norm`. forward(x1, x2), each
    view N x 3 x H x W -> (p1, p2, z1, z2), each N x D: z the normalized projector output (float32),
    p = predictor(z) (z itself without one). One call per view, as the authors: every BatchNorm and
    the paper's layer see one view at a time, with its own statistics and permutation."""

    def __init__(self, backbone, feat_dim, projector, norm, predictor=None):
        super().__init__()
        self.backbone, self.feat_dim, self.projector = backbone, feat_dim, projector
        self.norm, self.predictor = norm, predictor

    def project(self, x):
        """Projector output, before the normalization layer: N x 3 x H x W -> N x D."""
        return self.projector(self.backbone(x))

    def embed(self, x):
        """One view -> (p, z), each N x D."""
        z = self.norm(self.project(x).float())  # float32 under autocast too: the layer keeps its input's dtype
        return (z if self.predictor is None else self.predictor(z)), z

    def forward(self, x1, x2):
        (p1, z1), (p2, z2) = self.embed(x1), self.embed(x2)
        return p1, p2, z1, z2


def build_model(cfg, whiten="eigh", dtype=torch.float64, world=1):
    """The network cfg describes, with one of the paper's three layers after the projector. whiten:
    eigh or newton; dtype: the layer's; world: processes (more than 1: train-mode statistics over all)."""
    backbone, feat_dim = resnet18_cifar() if cfg.arch == "resnet18" else small_convnet()
    layers = {"none": lambda: nn.Identity(),  # finding 1: complete collapse
              "bn": lambda: Standardize(cfg.proj_dim, dtype, world > 1),  # finding 2: dimensional collapse
              "zca": lambda: GroupWhitening(cfg.proj_dim, cfg.groups, cfg.shuffle, cfg.eps, dtype, whiten,
                                            world > 1)}  # finding 3: neither
    norm, pred = layers[cfg.decorr](), mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim) if cfg.predictor else None
    projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.linear_projector)
    return SiameseNet(backbone, feat_dim, projector, norm, pred)


# =============================================================================================
# 6. Loss
# =============================================================================================


def siamese_loss(p1, p2, z1, z2, kind="l2", stop_grad=False):
    """Symmetric distance between each view's prediction p and the other view's output z.
    l2: mean over the batch of ||p - z||^2 (the paper's loss; with no predictor, mean
    ||z1 - z2||^2, of order D once whitened). cosine: minus the cosine similarity (SimSiam).
    stop_grad: the target z gets no gradient. p, z: N x D -> scalar."""
    z1, z2 = (z1.detach(), z2.detach()) if stop_grad else (z1, z2)

    def distance(p, z):
        p, z = p.float(), z.float()
        return (p - z).pow(2).sum(1).mean() if kind == "l2" else -F.cosine_similarity(p, z, dim=1).mean()

    return 0.5 * (distance(p1, z2) + distance(p2, z1))


# =============================================================================================
# 7. Collapse metrics
# =============================================================================================


@torch.no_grad()
def collapse_metrics(feats):
    """The measurements of collapse (findings 1 and 2), for features f: N x D, in float64.
      std           mean over axes of the per-axis std of f. Falls to 0 under complete collapse.
      std_l2        mean over axes of the std of f / ||f||. About 1/sqrt(D) when the outputs
                    spread over the sphere, 0 when they all point one way (SimSiam's measure).
      corr_strength mean |R_ij| over i != j of the Pearson correlation matrix R (axes with zero
                    variance count as uncorrelated). 1 for features on one direction (rank 2: 0.64,
                    rank 4: 0.42 at D = 512); blind to complete collapse (a point plus noise: 0.02).
      eff_rank      exp(entropy of q), q = singular values of the centred f / their sum
                    (Roy & Vetterli; RankMe). 1 for rank-1 features, D for isotropic ones.
      spectrum      covariance eigenvalues, descending, divided by the largest (D floats).
    -> a dict of Python floats (spectrum: a list of them)."""
    f = as_float64(feats.detach())  # Apple MPS has no float64: there on the CPU (Appendix B)
    (n, d), std = f.shape, f.std(0, correction=0)
    std_l2 = F.normalize(f, dim=1).std(0, correction=0)  # F.normalize: each row to unit length
    fc = f - f.mean(0)
    cov = fc.T @ fc / n
    sd = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(sd, sd)
    r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    off = ~torch.eye(d, dtype=torch.bool, device=f.device)
    corr = r.abs()[off].mean() if d > 1 else torch.zeros((), dtype=f.dtype)
    evals = small_eigh(cov, eigenvalues_only=True).flip(0).clamp_min(0)
    sv = (evals * n).sqrt()
    if sv.sum() > 0:
        q = sv / sv.sum()
        eff_rank, spectrum = torch.exp(-(q * q.clamp_min(1e-300).log()).sum()), evals / evals[0]
    else:
        eff_rank, spectrum = torch.zeros(()), torch.zeros(d)
    return {"std": std.mean().item(), "std_l2": std_l2.mean().item(), "corr_strength": corr.item(),
            "eff_rank": eff_rank.item(), "spectrum": [float(f"{v:.4g}") for v in spectrum.tolist()]}


@torch.no_grad()
def measure_collapse(net, metric_x, backbone_feats, batch_size, machine, n_total):
    """collapse_metrics at three stages, on two sets of images. -> {stage: metrics}.
      backbone    backbone_feats: the backbone's features of the test images' evaluation view, in
                  eval mode, as k-NN and the linear probe use them
      projector   the projector output h for metric_x (fixed training images, neither augmented nor
                  resized) in train mode, in batches of batch_size; normalized: the layer's z = norm(h)
    Train mode (on a copy: train_mode_outputs, Appendix B) is how the network computes what it trains
    on; in eval mode BatchNorm's running averages lag and can make a collapse look healthy."""
    h, z = train_mode_outputs(net, metric_x, batch_size, machine, n_total)
    return {"backbone": collapse_metrics(backbone_feats), "projector": collapse_metrics(h),
            "normalized": collapse_metrics(z)}


# =============================================================================================
# 8. Evaluation: k-NN monitor and linear probe, on the frozen backbone
# =============================================================================================


@torch.no_grad()
def encode(backbone, x, machine, chunk=1024):
    """Eval-mode backbone features of uint8 images x (no augmentation). -> N x F float32."""
    backbone.eval()  # the next epoch puts it back in train mode
    with machine.autocast():
        feats = [backbone(network_input(xb, machine)).float() for xb in x.split(chunk)]
    return torch.cat(feats) if feats else torch.zeros(0, 1, device=x.device)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, t=0.1, chunk=1024):
    """Weighted k-NN classification (Wu et al. 2018, the SSL monitor): features l2-normalized,
    each test point takes its k most cosine-similar training points, each votes for its class
    with weight exp(sim / t), the largest total wins. Whole test set, in chunks.
    train_feats: M x F, test_feats: N x F, labels int. -> percent."""
    bank = F.normalize(train_feats.float(), dim=1)
    bank_y = train_labels.to(bank.device)
    num_classes = int(max(bank_y.max().item(), test_labels.max().item())) + 1
    k, correct = min(k, len(bank)), 0
    for q, labels in zip(test_feats.split(chunk), test_labels.split(chunk)):
        sim, idx = (F.normalize(q.float().to(bank.device), dim=1) @ bank.T).topk(k, dim=1)
        scores = torch.zeros(len(q), num_classes, device=bank.device).scatter_add_(1, bank_y[idx], (sim / t).exp())
        correct += (scores.argmax(1) == labels.to(bank.device)).sum().item()
    return 100.0 * correct / len(test_feats)


def linear_accuracy(backbone, feat_dim, train_set, test_set, num_classes, epochs, machine, seed, progress=True):
    """Linear probe: Linear(F, classes) on the frozen eval-mode backbone, cross-entropy, SGD
    momentum 0.9, lr 30, no weight decay, batch 256, cosine over `epochs` (paper: 100), on crops
    RandomResizedCrop(scale 0.08-1, bicubic) + flip drawn anew each epoch. train_set, test_set:
    (this process's uint8 images, all labels), the test images in the evaluation view. -> percent."""
    gen = torch.Generator(device=machine.device).manual_seed(seed + PROBE_SEED_STRIDE * (machine.rank + 1))
    order_gen, clf = torch.Generator().manual_seed(seed), nn.Linear(feat_dim, num_classes).to(machine.device)
    opt = torch.optim.SGD(clf.parameters(), lr=30.0, momentum=0.9, weight_decay=0.0)
    n, labels = len(train_set[1]), train_set[1].to(machine.device)
    steps = max(1, math.ceil(n / 256)) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    backbone.eval()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not (progress and machine.is_main), leave=False):
        with torch.no_grad(), machine.autocast():
            feats = [backbone(network_input(random_resized_crop_flip(
                to_float(xb), scale=(0.08, 1.0), generator=gen, mode="bicubic"), machine)).float()
                for xb in train_set[0].split(1024)]
        feats = gather_shards(torch.cat(feats), n)
        check_finite("the backbone's features", [feats])  # once per epoch: a NaN is never scored
        for idx in torch.randperm(n, generator=order_gen).to(machine.device).split(256):
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = clf(gather_shards(encode(backbone, test_set[0], machine), len(test_set[1])))
    check_finite("the classifier's outputs", [logits])
    pred = logits.argmax(1)
    return 100.0 * (pred == test_set[1].to(machine.device)).float().mean().item()


def evaluate(net, run):
    """k-NN accuracy of the backbone and the collapse metrics of the current model; for an output
    of at most 3 axes also its points (the paper's Figure 2: Appendix F). -> the log row's entries."""
    cfg, machine, images = run.cfg, run.machine, run.images
    share_buffers(net)  # under torchrun: BatchNorm statistics as on process 0 (Appendix B)
    train_f = gather_shards(encode(net.backbone, images.bank, machine), len(run.data.train_y))
    test_f = gather_shards(encode(net.backbone, images.test, machine), len(run.data.test_y))
    check_finite("the backbone's features", [train_f, test_f])  # a diverged network is not scored
    acc = knn_accuracy(train_f, run.data.train_y, test_f, run.data.test_y, cfg.knn_k, cfg.knn_t)
    metrics = measure_collapse(net, images.metric, test_f, cfg.batch_size // machine.world, machine, images.n_metric)
    if isinstance(net.norm, GroupWhitening) and metrics["normalized"]["std"] < 0.9:
        # Whitened outputs fall below std 1 only along directions whose variance v (an eigenvalue
        # of C) is down near e x m: the network has found that eps lets it drop directions.
        print0(machine, f"warning: the whitened output is not white (std {metrics['normalized']['std']:.2f}, "
                        f"should be 1): eps is damping directions the network collapsed; {eps_advice(net.norm)}")
    row = {"knn_acc": acc, "collapse": metrics}
    if cfg.proj_dim <= 3:
        row["projection"] = projection_points(net, run)
    return row


# =============================================================================================
# 9. Training
# =============================================================================================


def lr_factor(i, total, warmup):
    """The schedule, as a multiple of the peak learning rate at step i: a linear warm-up from 0 over
    `warmup` steps, then cosine decay to 0 at `total` (a warm-up as long as the run never gets there)."""
    if i < warmup:
        return i / warmup
    return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))


@dataclass
class Trainer:
    """Everything an SGD step touches."""
    cfg: argparse.Namespace
    machine: "Machine"
    net: SiameseNet
    model: nn.Module  # net, or its DistributedDataParallel wrapper under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # active only under fp16 autocast (--precision fp16, or auto on a 7.x GPU)
    aug_gen: torch.Generator  # the augmentations' random stream, on the device
    step_kind: str = "eager"  # "graph" once cuda_graph has captured train_step (Appendix C)
    graph_holds: list = None  # the addresses of what the graph updates (Appendix C)


def build_trainer(cfg, machine, steps_per_epoch, whiten):
    """Model (whitening by `whiten`: eigh or newton), SGD (lr x batch/256, warm-up then cosine,
    per step), the loss scaler and the augmentation stream."""
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, whiten, machine.whitening_dtype(cfg.whiten_dtype), machine.world)
    net, model = wrap_for_processes(net.to(machine.device, memory_format=machine.memory_format), cfg, machine)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    total, warm = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warm))
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.amp_dtype == torch.float16)
    return Trainer(cfg, machine, net, model, opt, sched, scaler, torch.Generator(device=machine.device))


def train_step(tr, x):
    """One SGD step on a uint8 batch x (N x 3 x H x W): two augmented views, the network applied to
    each in its own call (SiameseNet.forward), the Siamese loss, backward, update. -> the loss, a
    device tensor (reading it waits for the GPU). Eagerly, eigh (its error check) and fp16's loss
    scaler (its inf check) wait for the device; the CUDA-graph step (bf16 or fp32, newton) does not."""
    # One augmentation call on the batch twice over: every image draws its own crop, flip and
    # colours, so the halves are two independent views, for half the kernels of two calls.
    x1, x2 = augment(torch.cat([x, x]), tr.aug_gen).contiguous(memory_format=tr.machine.memory_format).chunk(2)
    with tr.machine.autocast():
        loss = siamese_loss(*tr.model(x1, x2), kind=tr.cfg.loss, stop_grad=tr.cfg.stop_grad)
    tr.opt.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    return loss.detach()


def train_one_epoch(tr, step, train_x, epoch):
    """One pass over this process's images in a new random order: step(batch), then the schedule,
    per batch. -> (mean loss, images per second)."""
    cfg, machine = tr.cfg, tr.machine
    batch_size = cfg.batch_size // machine.world
    steps = len(train_x) // batch_size  # drop_last, as the authors
    order = reseed_epoch(tr, epoch, len(train_x))  # every random stream from (seed, epoch): --resume is exact
    tr.model.train()
    loss_sum = torch.zeros((), device=machine.device)
    bar, t0 = progress_bar(range(steps), f"epoch {epoch}/{cfg.epochs}", cfg, machine), synced_clock()
    for i in bar:
        try:
            loss_sum += step(train_x[order[i * batch_size:(i + 1) * batch_size]])
        except (torch.linalg.LinAlgError, FloatingPointError):  # NaN/inf features reach eigh before the loss check
            raise Diverged(f"the whitening's eigendecomposition failed at epoch {epoch}, step {i + 1}") from None
        tr.sched.step()
        if i % 25 == 24 or i == steps - 1:  # .item() waits for the GPU: only now and then
            mean = loss_sum.item() / (i + 1)
            if not math.isfinite(mean):
                raise Diverged(f"loss is {mean} at epoch {epoch}, step {i + 1}")
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{current_lr(tr.opt):.4g}",
                            img_s=f"{(i + 1) * cfg.batch_size / (time.perf_counter() - t0):.0f}")
    check_finite(f"the weights after epoch {epoch}", [*tr.net.parameters(), *tr.net.buffers()])
    return loss_sum.item() / max(1, steps), steps * cfg.batch_size / max(synced_clock() - t0, 1e-9)


def train(run, step):
    """The loop: evaluate the random network (epoch 0), then per epoch train, evaluate when due,
    log and checkpoint (an interruption loses one epoch at most). -> the last evaluation (or None)."""
    cfg, tr, final = run.cfg, run.tr, None
    if not run.cfg.resume:  # a new run
        log_epoch(run, {"epoch": 0, "loss": None, "lr": None, "images_per_s": None, **evaluate(tr.net, run)})
        save_checkpoint(run, 0)
    for epoch in range(run.start + 1, cfg.epochs + 1):
        try:
            loss, images_per_s = train_one_epoch(tr, step, run.images.train, epoch)
            row = {"epoch": epoch, "loss": loss, "lr": current_lr(tr.opt), "images_per_s": images_per_s}
            if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
                row.update(final := evaluate(tr.net, run))
        except Diverged as e:  # NaN or inf in the loss, the weights or what an evaluation reads
            raise Diverged(f"{e}; the last good checkpoint is {run.path('checkpoint.pt')} "
                           f"(epoch {epoch - 1}). Try a lower --lr") from None
        log_epoch(run, row)
        save_checkpoint(run, epoch)
    return final


# =============================================================================================
# 10. Main: recipe -> machine -> data -> model -> train -> linear probe
# =============================================================================================


def main(argv=None):
    """Command line entry point. -> a run's results (OUT/results.json), or what --plot, --benchmark made."""
    with command_line(argv) as cfg:  # the recipe with the flags applied; errors as one line (Appendix D)
        if cfg.plot:
            return plot_runs(cfg.plot, cfg.out)  # a figure and a table of runs, finished or not (Appendix F)
        machine = setup_machine(cfg)  # device, precision, processes (Appendix B)
        if cfg.benchmark:
            return benchmark(cfg, machine)  # time the training step instead of training (Appendix F)
        if cfg.resume and os.path.isfile(os.path.join(cfg.out, "results.json")):
            return finished_run(cfg, machine)  # a finished run cannot be extended (Appendix D)
        data = load_data(cfg)
        images = images_on_device(data, cfg, machine)  # this process's share, on its device (Appendix B)
        step_kind = choose_step(cfg, machine)  # "graph" or "eager", and why (Appendix C)
        tr = build_trainer(cfg, machine, len(images.train) // (cfg.batch_size // machine.world),
                           whitening_method(cfg, step_kind))  # --whiten auto: newton if a graph is planned
        run = open_run(cfg, machine, data, images, tr)  # run folder; --resume: the checkpoint (Appendix D)
        # The step: train_step, or train_step recorded once as a CUDA graph and replayed (the same step
        # but for the whitening's method, newton for eigh: in float64 the same output to about 1e-7; it
        # must match an eager step before training, else the eager step trains: Appendix C).
        step = cuda_graph(train_step, tr, images.train) if step_kind == "graph" else lambda x: train_step(tr, x)
        log_start(run)  # config.json, the run's description, the table's header (Appendix D)
        return finish_run(run, train(run, step))  # linear probe and results.json (Appendix D)


# =============================================================================================
# Appendix A. Numerics of C^(-1/2), and sums over processes     (skippable: the method is above)
# Two ways to the same W with finite gradients: eigh (exact, the reference) and Newton-Schulz (matrix
# products only: a CUDA graph holds it); the batch mean over processes (differentiable); leaving autocast.
# =============================================================================================

# --- copy from here: what the layers need besides section 4 ----------------------------------


def whitening_eps(eps, group_size, dtype):
    """eps, raised to group_size x machine epsilon, as rounding moves C / m's eigenvalues (3.8e-6: 32, float32)."""
    return max(eps, group_size * torch.finfo(dtype).eps)


def inverse_sqrt(a, floor, method="eigh"):
    """A^(-1/2) of symmetric matrices a: ... x S x S whose eigenvalues are at least `floor`, exactly."""
    if method == "newton":
        return inverse_sqrt_newton(a, newton_scales(a.shape[-1], floor, a.dtype))
    try:
        return _InvSqrtEigh.apply(a, floor)
    except torch.linalg.LinAlgError:  # looked into only after a failure: a check first would wait every call
        if torch.isfinite(a).all():
            raise
        raise FloatingPointError("the whitening's input holds NaN or inf, so its covariance has no "
                                 "eigendecomposition: find where it comes from (a diverged network: a lower "
                                 "learning rate; or the data)") from None


def small_eigh(a, eigenvalues_only=False):
    """eigh / eigvalsh, single-threaded on the CPU: on matrices this small, threads cost more than they save."""
    fn, threads = torch.linalg.eigvalsh if eigenvalues_only else torch.linalg.eigh, torch.get_num_threads()
    if a.device.type == "mps":  # no eigensolver on Apple GPUs: solve on the CPU (differentiably)
        out = small_eigh(a.cpu(), eigenvalues_only)
        return out.to(a.device) if eigenvalues_only else tuple(t.to(a.device) for t in out)
    if a.device.type != "cpu" or threads == 1:  # the GPU's eager step calls this every step: nothing to set
        return fn(a)
    try:
        torch.set_num_threads(1)
        return fn(a)
    finally:
        torch.set_num_threads(threads)


class _InvSqrtEigh(torch.autograd.Function):
    # A^(-1/2) = U diag(l^-1/2) U^T by eigendecomposition, with the gradient in closed form
    # instead of autograd through eigh (Daleckii-Krein):
    #     dL/dA = U (K o U^T sym(dL/dW) U) U^T,   K_ij = (l_i^-1/2 - l_j^-1/2) / (l_i - l_j)
    #                                                 = -1 / (s_i s_j (s_i + s_j)),  s = sqrt(l).
    # The second form has no 1/(l_i - l_j): repeated eigenvalues (duplicated axes, rank-deficient
    # groups) give a finite gradient, where autograd through eigh gives inf/NaN.
    @staticmethod
    def forward(ctx, a, floor):
        evals, evecs = small_eigh(a)
        s = evals.clamp_min(floor).sqrt()  # exactly, every eigenvalue is >= floor: undo the rounding
        ctx.save_for_backward(evecs, s)
        return (evecs / s.unsqueeze(-2)) @ evecs.mT

    @staticmethod
    def backward(ctx, grad):
        u, s = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        k, g = -1.0 / (si * sj * (si + sj)), u.mT @ (0.5 * (grad + grad.mT)) @ u
        return u @ (k * g) @ u.mT, None


def newton_scales(group_size, eps, dtype):
    """Scaled Newton-Schulz (Chen and Chow, 2014): with x^2 an eigenvalue of ZY, a step scaled by a maps x
    to h(a x), h(t) = (3t - t^3) / 2; x starts in [b, 1], b^2 = eps / (S (1 + eps)), and a = sqrt(3 / (1 +
    b + b^2)) gives h(a b) = h(a), the best a cubic can do. 16 steps for 32 axes at 1e-8 in float64."""
    lo, scales = math.sqrt(eps / (group_size * (1 + eps))), []
    while 1 - lo > torch.finfo(dtype).eps:
        a = math.sqrt(3 / (1 + lo + lo * lo))
        scales.append(a)
        lo = a * lo * (3 - (a * lo) ** 2) / 2
    return scales


def inverse_sqrt_newton(a, scales):
    """A^(-1/2) of symmetric positive definite ... x S x S matrices by coupled Newton-Schulz (Higham 2008,
    eq. 6.35), scaled by c, with R = (I - c^2 ZY) / 2 (Y, Z kept symmetric: half the float32 rounding):
        Y_0 = A / tr(A),  Z_0 = I,   Y <- c (Y + Y R),   Z <- c (Z + R Z)   (Z -> (A / tr A)^(-1/2))"""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y, z = a / trace, eye.expand_as(a)
    for c in scales:
        r = 0.5 * (eye - (c * c) * (z @ y))
        yr, rz = y @ r, r @ z
        y, z = c * (y + 0.5 * (yr + yr.mT)), c * (z + 0.5 * (rz + rz.mT))
    return z * trace.rsqrt()


def check_settings(dtype, num_features=1, groups=1, eps=0.0, method="eigh"):
    """Refuses the layers' settings that cannot work."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype={dtype}: the layer's statistics and W need float32 or float64 (torch's "
                         f"eigendecomposition has no half-precision kernels); half-precision inputs are fine")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"groups must be an int, not {groups!r}" + "; 'auto' is fdsl's command-line rule, "
                        "groups = ceil(2 D / N) for a batch of N: math.ceil(2 * num_features / N)" * (groups == "auto"))
    if groups < 1 or num_features % groups:
        raise ValueError(f"groups={groups} must divide num_features={num_features}")
    if method not in ("eigh", "newton") or eps < 0:
        raise ValueError(f"method must be 'eigh' or 'newton' (not {method!r}) and eps >= 0 (not {eps})")


def check_features(x, num_features, global_batch, group_size=1):
    """Refuses what the layers cannot normalize: N samples (over every process with global_batch) span
    N - 1 directions, so a group of S axes needs N > S samples, or its covariance is singular."""
    if x.dim() != 2 or x.shape[1] != num_features:
        raise ValueError(f"expected N x {num_features} features (one view per call), got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected floating-point features, got {x.dtype}: the output keeps the input's dtype, "
                        f"so integers would be truncated; pass x.float()")
    samples = len(x) * (world_size() if global_batch else 1)
    if samples < 2:
        raise ValueError(f"a batch of {samples}: the layer normalizes with the batch's statistics (in eval mode "
                         f"too), which need at least 2 samples; call it on a batch")
    if group_size >= samples:
        raise ValueError(f"groups of {group_size} axes need more than {group_size} samples, got {samples}: N "
                         f"samples span N - 1 directions, so the covariance would be singular; use more groups "
                         f"(of fewer than {samples} axes) or a larger batch")


def world_size():
    """How many processes share the batch (torchrun); 1 without torch.distributed."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _AllReduceSum(torch.autograd.Function):
    # y = sum_r x_r on every process. Each process's loss depends on y, so the gradient of the
    # total loss with respect to x_r is the sum over processes of dL_r/dy: all-reduce it too.
    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(t):
    """Sum of t over all processes, differentiable (torch.distributed.nn's is deprecated)."""
    return _AllReduceSum.apply(t) if world_size() > 1 else t


def batch_mean(total, n, global_batch=False):
    """total / n, for `total` a sum over this process's n samples; global_batch: the mean over
    every process's samples (each holding n), their sum all-reduced differentiably."""
    return all_reduce_sum(total) / (n * world_size()) if global_batch else total / n


def outside_autocast(x):
    """Leaves a surrounding autocast for the block it guards (fdsl autocasts on CPU and CUDA only)."""
    on = x.device.type in ("cpu", "cuda")
    return torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext()


# --- copy to here ----------------------------------------------------------------------------


# =============================================================================================
# Appendix B. Devices and several GPUs                    (skippable: one process needs none of it)
# Where a run happens (CUDA, MPS or CPU; bf16, fp16 or fp32); under torchrun, the shards and their gathering.
# =============================================================================================


@dataclass
class Machine:
    """Where the run happens: device, autocast precision, and this process among several."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None: plain float32
    rank: int = 0
    world: int = 1

    is_main = property(lambda self: self.rank == 0)  # process 0 prints, logs and saves
    # channels_last: cuDNN's fastest convolutions, and 1.2x on a CPU (docs/notes.md); MPS: unmeasured, not used
    memory_format = property(lambda self: torch.contiguous_format if self.device.type == "mps" else torch.channels_last)

    def whitening_dtype(self, name):  # --whiten-dtype, but float32 on Apple MPS: it has no float64
        return torch.float32 if self.device.type == "mps" else getattr(torch, name)

    def autocast(self):  # no weight-cast cache: a CUDA graph must not keep casts made at capture (Appendix C)
        on, device = self.amp_dtype is not None, self.device.type
        return torch.autocast(device, self.amp_dtype, cache_enabled=False) if on else contextlib.nullcontext()


def process_ranks():
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without it."""
    env = os.environ.get
    return int(env("RANK", "0")), int(env("WORLD_SIZE", "1")), int(env("LOCAL_RANK", "0"))


def setup_machine(cfg):
    """The device (CUDA, else MPS, else CPU), the autocast precision, and the processes."""
    have = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    want = next(d for d in have if have[d]) if cfg.device == "auto" else cfg.device
    if not have[want]:
        raise UsageError(f"--device {want}: " + ("no CUDA GPU is visible" if want == "cuda" else "no Apple MPS here"))
    rank, world, local = process_ranks()
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True  # convolutions under --precision fp32; TF32 matmuls stay off:
        torch.backends.cuda.matmul.allow_tf32 = False  # the float32 ones are the whitening's and the metrics'
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prec = autocast_precision(device) if cfg.precision == "auto" else cfg.precision
    if (device.type, prec) in (("cpu", "fp16"), ("mps", "fp16"), ("mps", "bf16")):
        raise UsageError(f"--precision {prec} is not supported on {device.type} here; use "
                         f"{'fp32 or bf16' if device.type == 'cpu' else 'fp32'}")
    return Machine(device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[prec], rank, world)


def autocast_precision(device):
    """--precision auto: bf16 from compute capability 8.0 (A100, H100, RTX 30/40), loss-scaled fp16 on 7.x (V100,
    T4, RTX 20: fp16 tensor cores, no bf16 though is_bf16_supported() says True), else fp32 (CPU, MPS too)."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
    return "bf16" if capability >= (8, 0) else "fp16" if capability >= (7, 0) else "fp32"


def as_float64(z):
    """z in float64, on the CPU where the device has none (Apple MPS)."""
    return (z.cpu() if z.device.type == "mps" else z).double()


def eps_advice(layer):
    """A smaller --eps, unless eps is at its floor for the layer's dtype (float32: 3.8e-6 for groups of 32)."""
    at_floor = layer.eps <= whitening_eps(0.0, layer.num_features // layer.groups, layer.dtype)
    return "try a smaller --eps" if not at_floor else "eps is at float64's floor" if layer.dtype == torch.float64 \
        else "eps is at float32's floor: use --whiten-dtype float64 (Apple MPS has none)"


def print0(machine, *args):
    if machine.is_main:  # process 0 speaks for all, between the progress bars
        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()  # a row per epoch should reach a log file when it happens


def progress_bar(iterable, desc, cfg, machine):
    return tqdm(iterable, desc=desc, disable=not (cfg.progress and machine.is_main), leave=False, dynamic_ncols=True)


def synced_clock():
    """time.perf_counter() once the GPU has finished the work queued so far (for timings)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    elif torch.backends.mps.is_available():
        torch.mps.synchronize()
    return time.perf_counter()


def network_input(x, machine):
    """uint8 (or [0, 1] float) images -> standardized float32 in the machine's memory format."""
    return standardize_pixels(to_float(x)).contiguous(memory_format=machine.memory_format)


@torch.no_grad()
def train_mode_outputs(net, x, batch_size, machine, n_total):
    """Projector output h and z = norm(h) of uint8 images x as in training: train mode, training batches,
    on a copy (the running averages must not move). -> (h, z), n_total x D, every process's images."""
    probe = copy.deepcopy(net).train()
    with machine.autocast():
        hs = [probe.project(network_input(xb, machine)).float() for xb in x.split(batch_size)]
    check_finite("the projector's outputs", hs)  # a diverged network must stop here, not fail in eigh
    zs = [probe.norm(h) for h in hs]
    return gather_shards(torch.cat(hs), n_total), gather_shards(torch.cat(zs), n_total)


@dataclass
class DeviceImages:
    """This process's images on its device, uint8 (under torchrun: every world-th image)."""
    train_all: torch.Tensor  # all of this process's training images (linear-probe crops)
    train: torch.Tensor  # the same, cut to equal shards (SSL steps: every process takes as many)
    bank: torch.Tensor  # the evaluation view of the training images (the k-NN bank)
    test: torch.Tensor  # the evaluation view of the test images
    metric: torch.Tensor  # fixed training images for the projector metrics
    n_metric: int  # their number over all processes


def images_on_device(data, cfg, machine):
    """This process's shard of the images, moved to its device once (see DeviceImages)."""
    r, w = machine.rank, machine.world
    n_metric = min(cfg.metric_samples, len(data.train_y)) // cfg.batch_size * cfg.batch_size or cfg.batch_size
    metric_idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.seed))[:n_metric]
    view, train_all = (lambda x: x) if cfg.raw_eval else eval_transform, data.train_x[r::w].to(machine.device)
    return DeviceImages(train_all=train_all, train=train_all[: len(data.train_y) // w],
                        bank=train_all if cfg.raw_eval else view(data.train_x[r::w]).to(machine.device),
                        test=view(data.test_x[r::w]).to(machine.device),
                        metric=data.train_x[metric_idx][r::w].to(machine.device), n_metric=n_metric)


def gather_shards(t, n_total):
    """Inverse of `x[rank::world]`: every process gets every process's rows, in their order."""
    if world_size() == 1:
        return t
    world, padded = dist.get_world_size(), t.new_zeros(-(-n_total // dist.get_world_size()), *t.shape[1:])
    padded[: len(t)] = t  # every shard as long as the longest
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = t.new_empty(n_total, *t.shape[1:])
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n_total, world))]
    return out


def shared_value(value):
    """Process 0's value on every process (the run folder's name, say)."""
    box = [value]
    if world_size() > 1:
        dist.broadcast_object_list(box, 0)
    return box[0]


def share_buffers(net):
    """Every process takes process 0's BatchNorm statistics (the checkpoint's) before an evaluation."""
    if world_size() > 1:
        for b in net.buffers():
            dist.broadcast(b, 0)


def wrap_for_processes(net, cfg, machine):
    """(net, model): under torchrun SyncBatchNorm on CUDA (unless --no-sync-bn) and the DDP wrapper."""
    if world_size() == 1:
        return net, net
    if cfg.sync_bn and machine.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif cfg.sync_bn:
        print0(machine, "note: SyncBatchNorm needs CUDA: each process's BatchNorm uses its own slice")
    return net, nn.parallel.DistributedDataParallel(net, device_ids=[machine.device.index] if
                                                    machine.device.type == "cuda" else None)


# =============================================================================================
# Appendix C. The fast path: the training step as one CUDA graph      (skippable: section 9, replayed)
# A GPU step is hundreds of small kernels launched from Python; a CUDA graph replays them with one launch,
# if the step never waits for the host, reuses its tensors and draws only from generators the graph knows.
# Before training, the replay proves itself against the eager step, or the eager step trains.
# =============================================================================================

WARMUP_STEPS = 3  # eager steps before capture: cuDNN picks its kernels, SGD creates its state
# A replay must give the eager step's loss and update to 1%: bf16 keeps 8 significant bits (a rounding
# is up to 2^-9 = 0.2%), and the two run the same kernels, differing only where an accumulation order
# does (a few roundings); a replay that skips or misapplies the update is off by about 100%.
SELF_CHECK_RTOL = 0.01


def choose_step(cfg, machine):
    """"graph" on one CUDA GPU in bf16 or fp32; "eager" on a CPU or Apple MPS, with --no-graph, and (with
    a line why) in fp16, under torchrun, with --whiten eigh for zca, or on a torch that cannot replay the
    generator."""
    if machine.device.type != "cuda" or not cfg.graph:
        return "eager"
    why = next((why for no, why in [
        (machine.amp_dtype == torch.float16, "fp16 trains with torch's loss scaler (torch.amp.GradScaler), which "
                                             "checks for inf on the host every step: eager step, no CUDA graph"),
        (machine.world > 1, "under torchrun each step runs eagerly (the CUDA graph is built for one GPU)"),
        (cfg.decorr == "zca" and cfg.whiten == "eigh", "--whiten eigh waits for the host, which a CUDA graph "
                                                       "cannot hold: eager step"),
        (not graphs_replay_generators(), f"torch {torch.__version__} cannot replay the augmentation's generator "
                                         f"in a graph: eager step")] if no), None)
    if why:
        print0(machine, f"note: {why}")
    return "eager" if why else "graph"


def whitening_method(cfg, step_kind):
    """--whiten auto: newton for the CUDA-graph step (eigh waits for the host; kept if capture fails), else eigh."""
    return cfg.whiten if cfg.whiten != "auto" else "newton" if step_kind == "graph" else "eigh"


def graphs_replay_generators():
    version = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])
    return hasattr(torch.cuda.CUDAGraph, "register_generator_state") or version >= (2, 14)


def cuda_graph(step_fn, tr, train_x, capture=True):
    """step_fn(tr, x) recorded once as a CUDA graph. -> step(x): copies the uint8 batch x into the input
    buffer and replays augmentation, forward, loss, backward and SGD; the warm-up is undone, and the replay
    has matched an eager step (graph_self_check). A failed capture or check: one line why, then step_fn
    eagerly from the same state. capture=False: all but the capture and the check (the CPU tests)."""
    device, restore, batch = tr.machine.device, snapshot(tr), train_x[: tr.cfg.batch_size // tr.machine.world]
    static_x = torch.zeros_like(batch)
    for g in tr.opt.param_groups:  # SGD as a graph holds it: the lr a 0-dim device tensor LambdaLR fills in place,
        g["lr"], g["fused"], g["foreach"] = torch.tensor(float(g["lr"]), device=device), True, False  # fused kernel
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            warm_up(lambda: step_fn(tr, static_x), device)
            static_loss, replay = capture_graph(lambda: step_fn(tr, static_x), [tr.aug_gen]) if capture else [None] * 2
            restore()
            if replay is not None:
                static_x.copy_(batch)
                graph_self_check(tr, lambda: step_fn(tr, static_x), lambda: (replay(), static_loss)[1], restore)
    except Exception as e:
        restore()
        eager_optimizer(tr.opt.param_groups)
        reason = (str(e).strip().splitlines() or [""])[0][:200]
        print0(tr.machine, f"note: the CUDA graph is not used ({type(e).__name__}: {reason}); "
                           f"continuing with the eager step")
        return lambda x: step_fn(tr, x)
    tr.step_kind, tr.graph_holds = "graph" if capture else "eager", graph_inputs(tr)

    def step(x):
        if x.shape != static_x.shape:  # copy_ would broadcast a smaller batch silently
            raise ValueError(f"the CUDA graph was recorded for batches of {tuple(static_x.shape)}, "
                             f"not {tuple(x.shape)}")
        static_x.copy_(x)
        if replay is None:
            return step_fn(tr, static_x)
        replay()
        return static_loss.clone()  # the next replay overwrites static_loss
    return step


def graph_self_check(tr, eager, replay, restore, rtol=SELF_CHECK_RTOL):
    """The captured step proves itself: from one state, with one batch and the same random streams, one eager
    step and one replay (each -> the loss) must give the same loss and parameter update to rtol (at the peak
    lr: the warm-up's first is 0). Else RuntimeError, why. The state is restored after each, so the run is
    the same whether the check passes or not; it costs one extra step."""
    params, lrs = list(tr.net.parameters()), [g["lr"] for g in tr.opt.param_groups]
    start, lr_now, outcome = [p.detach().clone() for p in params], [lr.clone() for lr in lrs], []
    for fn in (eager, replay):
        for lr, peak in zip(lrs, tr.sched.base_lrs):
            lr.fill_(peak)
        torch.manual_seed(0)  # the whitening's shuffles
        tr.aug_gen.manual_seed(0)
        loss = float(fn())
        outcome.append((loss, torch.cat([(p.detach() - s).flatten() for p, s in zip(params, start)])))
        restore()
    for lr, value in zip(lrs, lr_now):
        lr.copy_(value)
    (loss_e, update_e), (loss_g, update_g) = outcome
    off = ((update_g - update_e).norm() / update_e.norm()).item()
    if not abs(loss_g - loss_e) <= rtol * abs(loss_e) or not off <= rtol:
        raise RuntimeError(f"its replay differs from the eager step (loss {loss_g:.6g} against {loss_e:.6g}, "
                           f"parameter update off by {off:.1%}; {rtol:.0%} allowed)")


def warm_up(fn, device, steps=WARMUP_STEPS):
    """Eager calls of fn before its capture, on a side stream as CUDA graphs require."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    if side:
        side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # a no-op for None (the CPU tests)
        for _ in range(steps):
            fn()
    if side:
        torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(fn, generators=()):
    """fn() recorded as a CUDA graph. -> (fn's output, replay). 2.14 deprecates register_generator_state."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators if hasattr(graph, "register_generator_state") else ():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


def snapshot(tr):
    """Copies of what a step changes. -> restore(): the copies back into the same tensors (a graph holds
    their addresses), a momentum buffer made since zeroed (SGD's next step then is a first step)."""
    held = [(t, t.detach().clone()) for t in (*tr.net.parameters(), *tr.net.buffers())]
    held += [(s["momentum_buffer"], s["momentum_buffer"].clone()) for s in tr.opt.state.values()
             if torch.is_tensor(s.get("momentum_buffer"))]

    @torch.no_grad()
    def restore():
        for s in tr.opt.state.values():
            if torch.is_tensor(s.get("momentum_buffer")):
                s["momentum_buffer"].zero_()
        for t, value in held:
            t.copy_(value)
    return restore


def eager_optimizer(param_groups):
    """SGD as the eager step has it (a float lr, the default kernel): checkpoints resume with either step."""
    for g in param_groups:
        g["lr"], g["fused"], g["foreach"] = float(g["lr"]), None, None


def graph_inputs(tr):
    """Addresses of every tensor the graph reads or updates in place."""
    momentum = [s["momentum_buffer"] for s in tr.opt.state.values() if torch.is_tensor(s.get("momentum_buffer"))]
    lrs = [g["lr"] for g in tr.opt.param_groups if torch.is_tensor(g["lr"])]
    return [t.data_ptr() for t in (*tr.net.parameters(), *tr.net.buffers(), *momentum, *lrs)]


def step_record(tr):
    """Which step and whitening ran: written to config.json and results.json."""
    norm = tr.net.norm
    return {"train_step": tr.step_kind, "whiten_method": norm.method if isinstance(norm, GroupWhitening) else None}


# =============================================================================================
# Appendix D. Settings and run files          (skippable: how a run is configured, saved, resumed)
# The flags; the run folder (config.json, log.jsonl, checkpoint.pt, results.json); --resume; errors.
# =============================================================================================


class UsageError(Exception):
    """Bad input (a flag, a folder, a file): one line on stderr, exit code 2."""


class Diverged(Exception):
    """The loss or the weights became NaN or inf: exit code 1, naming the last checkpoint."""


class ArgParser(argparse.ArgumentParser):
    # argparse prints its whole usage block before an error; one line is easier to read.
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


CHOICES = {"dataset": ["cifar10", "cifar100", "folder", "synthetic"], "arch": ["resnet18", "small"],
           "decorr": ["none", "bn", "zca"], "whiten": ["auto", "eigh", "newton"],
           "whiten_dtype": ["float32", "float64"], "loss": ["l2", "cosine"]}
FLAG_GROUPS = {"dataset": "data", "arch": "model", "epochs": "optimization", "eval_every": "evaluation",
               "seed": "run"}  # the first setting of each --help group


def build_parser():
    p = ArgParser(prog="fdsl.py", epilog="Examples: the top of fdsl.py, README.md.",
                  description="Self-supervised learning with feature decorrelation (Hua et al., ICCV 2021).")
    groups, title = {}, None
    for name, (default, text) in RECIPE.items():  # every setting of the recipe is a flag; each help
        # says its default in words: "--no-shuffle (default: True)" would read as "shuffle is off"
        title = FLAG_GROUPS.get(name, title)
        if title not in groups:
            groups[title] = p.add_argument_group(title)
        flag = "--" + name.replace("_", "-")
        if default is True:
            groups[title].add_argument("--no-" + flag[2:], dest=name, action="store_false",
                                       help=f"{text} (default: on; this flag turns it off)")
        elif default is False:
            groups[title].add_argument(flag, action="store_true", help=f"{text} (default: off)")
        else:
            groups[title].add_argument(flag, type=group_count if name == "groups" else type(default),
                                       default=default, choices=CHOICES.get(name), help=f"{text} (default: {default})")
    add_other_flags(groups["data"].add_argument, groups["run"].add_argument)
    return p


def group_count(text):
    """--groups: a number, or "auto" (check_config resolves it)."""
    return text if text == "auto" else int(text)


def add_other_flags(data, arg):
    """The flags beside the recipe: where the data is, and how to run."""
    data("--data-dir", default="./data", help="where CIFAR is (or is downloaded to), or the image folder "
                                               "(default: ./data)")
    data("--image-size", type=int, default=32, help="folder and synthetic images are made this size (default: 32)")
    data("--train-subset", type=int, default=0, help="train on N class-balanced images (default: 0, all)")
    data("--test-subset", type=int, default=0, help="evaluate on N class-balanced images (default: 0, all)")
    arg("--out", default="", help="output folder; default: runs/<dataset>-<decorr>-<date>-<time> (--plot: the figure, "
                                  "default comparison.png beside the runs; --benchmark: its table, default: not kept)")
    arg("--resume", default="", metavar="DIR", help="continue the run in DIR (default: start a new run)")
    arg("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="default auto: CUDA, MPS, or CPU")
    arg("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
        help="autocast precision; default auto: bf16 on GPUs of compute capability 8.0 and later, fp16 "
             "(loss-scaled, the eager step) on 7.x, fp32 below 7.0 and on a CPU or MPS")
    arg("--no-graph", dest="graph", action="store_false",
        help="on CUDA, run each step eagerly; default: the whole step as one CUDA graph (one GPU)")
    arg("--no-sync-bn", dest="sync_bn", action="store_false",
        help="under torchrun, BatchNorm statistics per GPU; default: synchronized over GPUs")
    arg("--no-progress", dest="progress", action="store_false", help="no progress bars (default: shown)")
    arg("--benchmark", action="store_true", help="time the training step instead of training (default: off)")
    arg("--benchmark-steps", type=int, default=50, help="timed steps per row of --benchmark (default: 50)")
    arg("--plot", nargs="+", default=None, metavar="RUN_DIR",
        help="draw these runs and write their table, then exit (default: off; needs matplotlib)")


def check_config(cfg, world=1):
    """What can be wrong with the flags, found before any work starts; resolves --groups auto."""
    if cfg.batch_size < 2 or cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size}: batch statistics need at least 2 images, split "
                         f"evenly over the {world} process(es)")
    if cfg.benchmark and world > 1:
        raise UsageError("--benchmark times one process; run it without torchrun")
    for name, least in {**dict.fromkeys(("epochs", "proj_dim", "proj_hidden", "pred_hidden", "knn_k", "metric_samples",
                                         "benchmark_steps"), 1), "image_size": 8, **dict.fromkeys((
            "train_subset", "test_subset", "eval_every", "linear_epochs", "warmup_epochs", "eps"), 0)}.items():
        if getattr(cfg, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must {f'be at least {least}' if least else 'be 0 or more'}")
    how = f"--groups {cfg.groups}"
    if cfg.groups == "auto":  # the authors' rule: groups of about half the batch
        cfg.groups = math.ceil(2 * cfg.proj_dim / cfg.batch_size)
        how = f"--groups auto (ceil(2 x {cfg.proj_dim} / {cfg.batch_size}) = {cfg.groups})"
    if cfg.decorr == "zca":
        if cfg.groups < 1 or cfg.proj_dim % cfg.groups:
            raise UsageError(f"{how} does not divide --proj-dim {cfg.proj_dim}")
        size = cfg.proj_dim // cfg.groups
        if size >= cfg.batch_size:  # a singular covariance (check_features says why)
            raise UsageError(f"{how}: group size {size} (= {cfg.proj_dim}/{cfg.groups}) must be smaller than "
                             f"the batch {cfg.batch_size}; use more --groups or a larger --batch-size")


def resolve_config(argv):
    """The flags over the recipe; with --resume DIR, the run's saved settings instead."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    cfg.command = "python fdsl.py " + shlex.join(argv)  # kept in config.json: the command that ran
    if cfg.resume:
        keeps = ("--resume", "--no-progress", "--device", "--no-graph")  # how to run, not what
        others = [a for a in argv if a.startswith("--") and a.split("=")[0] not in keeps]
        if others:
            raise UsageError(f"--resume takes the run's saved settings; drop {' '.join(others)}")
        for name in ("checkpoint.pt", "config.json"):
            if not os.path.isfile(os.path.join(cfg.resume, name)):
                raise UsageError(f"--resume {cfg.resume}: no {name} there, so it is not an fdsl run folder")
        # defaults first: a run saved before a flag existed still loads
        saved, config = parser.parse_args([]), read_json(os.path.join(cfg.resume, "config.json"))
        vars(saved).update({k: v for k, v in config.items() if k in vars(saved)})
        vars(saved).update(resume=cfg.resume, out=cfg.resume, progress=cfg.progress, device=cfg.device,
                           graph=cfg.graph, command=config.get("command", cfg.command))
        cfg = saved
    check_config(cfg, process_ranks()[1])
    return cfg


@contextlib.contextmanager
def command_line(argv=None):
    """Yields the settings; bad input: one line, exit 2; divergence: exit 1; Ctrl-C: exit 130, how to resume."""
    argv = list(sys.argv[1:] if argv is None else argv)
    say, cfg = (lambda text: print(text, file=sys.stderr)) if process_ranks()[0] == 0 else (lambda text: None), None
    try:
        cfg = resolve_config(argv)
        yield cfg
    except UsageError as e:
        say(f"fdsl: error: {e}")
        raise SystemExit(2) from None
    except Diverged as e:
        say(f"fdsl: stopped: {e}")
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        out = getattr(cfg, "out", "")
        say("\nfdsl: interrupted; " + (f"finished epochs are saved; continue with: python fdsl.py --resume {out}"
                                       if out and os.path.exists(os.path.join(out, "checkpoint.pt")) else
                                       "no epoch was finished, nothing to resume"))
        raise SystemExit(130) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class Run:
    """A training run: its settings, machine, data, trainer and folder."""
    cfg: argparse.Namespace
    machine: Machine
    data: Data
    images: DeviceImages
    tr: Trainer
    start: int = 0  # the last finished epoch (0: only the random network evaluated)
    elapsed: float = 0.0  # seconds of this run so far, time before a --resume included
    t0: float = 0.0

    def path(self, name):
        return os.path.join(self.cfg.out, name)


def open_run(cfg, machine, data, images, tr):
    """The run folder (never over another run), notes on the settings, --resume's checkpoint loaded."""
    cfg.out = shared_value(cfg.out or f"runs/{cfg.dataset}-{cfg.decorr}-{time.strftime('%Y%m%d-%H%M%S')}")
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        raise UsageError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")
    if len(data.train_y) < cfg.batch_size:
        raise UsageError(f"only {len(data.train_y)} training images for a batch of {cfg.batch_size}")
    for note in settings_notes(cfg, machine, tr):
        print0(machine, f"note: {note}")
    run = Run(cfg, machine, data, images, tr)
    if cfg.resume:
        state = load_checkpoint(run.path("checkpoint.pt"), machine.device)
        try:
            for part, obj in (("model", tr.net), ("optimizer", tr.opt), ("scheduler", tr.sched), ("scaler", tr.scaler)):
                obj.load_state_dict(state[part])
        except (RuntimeError, ValueError, KeyError) as e:  # another network: another version of fdsl.py made it
            raise UsageError(f"{run.path('checkpoint.pt')} does not fit this network ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:120]})") from None
        run.start, run.elapsed = state["epoch"], state["elapsed"]
    return run


def settings_notes(cfg, machine, tr):
    """One line for each setting that makes a run's numbers easy to misread."""
    device = machine.device
    if device.type == "cpu":
        yield ("running on the CPU: fine for --arch small and subsets, very slow for a full run"
               + ("" if machine.amp_dtype else "; --precision bf16 is faster where the CPU has bf16 units (README)"))
    if device.type == "cuda" and machine.amp_dtype == torch.bfloat16 and \
            torch.cuda.get_device_capability(device) < (8, 0):
        yield "this GPU has no bf16 units (compute capability below 8.0): bf16 is emulated and slow; try fp16"
    if cfg.warmup_epochs >= cfg.epochs:
        yield (f"the {cfg.warmup_epochs:g}-epoch warm-up is not shorter than the {cfg.epochs}-epoch run: the "
               f"learning rate never reaches its peak (--warmup-epochs sets it)")
    if isinstance(tr.net.norm, GroupWhitening) and tr.net.norm.dtype == torch.float32:
        yield ("the whitening runs in float32" + " (Apple MPS has no float64)" * (device.type == "mps") + ": its "
               "eps is at least S x 1.2e-7 (3.8e-6 for groups of 32), near where eps damps directions, and "
               "Newton-Schulz leaks up to 6e-3 into null directions (docs/notes.md); watch for 'not white'")


def log_start(run):
    """config.json, the log cut back to the checkpoint's epoch on --resume, the table's header; the clock."""
    cfg, machine = run.cfg, run.machine
    if machine.is_main:
        rows = [row for row in read_log(run.path("log.jsonl")) if row["epoch"] <= run.start] if cfg.resume else []
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(run.path("log.jsonl"), "".join(json.dumps(row, separators=(",", ":")) + "\n" for row in rows))
        write_atomic(run.path("config.json"), json.dumps({**vars(cfg), **step_record(run.tr),
                                                          **provenance(machine)}, indent=2))
    if cfg.resume:
        print0(machine, f"resuming {cfg.out} after epoch {run.start}")
    norm = f"decorr={cfg.decorr}" + (f" groups={cfg.groups} shuffle={cfg.shuffle}" if cfg.decorr == "zca" else "")
    print0(machine, f"fdsl: {cfg.dataset} ({len(run.data.train_y)} train / {len(run.data.test_y)} test), "
                    f"{cfg.arch}, {norm}, batch {cfg.batch_size}, lr {cfg.lr * cfg.batch_size / 256:.4g}, "
                    f"{cfg.epochs} epochs on {machine.device}" + f" x{machine.world} processes" * (machine.world > 1)
                    + f", {run.tr.step_kind} step -> {cfg.out}")
    print0(machine, HEADER)
    run.t0 = time.perf_counter() - run.elapsed


HEADER = (f"{'epoch':>5} {'loss':>10} {'lr':>9} {'img/s':>8} {'knn %':>6} | "
          f"{'projector: std':>14} {'corr':>5} {'erank':>6} | {'time':>7}")


def log_epoch(run, row):
    """Appends a row to log.jsonl and prints it as a line of the table."""
    run.elapsed = row["time"] = time.perf_counter() - run.t0
    if not run.machine.is_main:
        return
    with open(run.path("log.jsonl"), "a") as f:
        f.write(json.dumps(row, separators=(",", ":")) + "\n")  # compact: a 2-d run logs its points
    p = row.get("collapse", {}).get("projector")
    cell = lambda key, fmt, width: format(row[key], fmt) if row.get(key) is not None else " " * width
    proj = f"{p['std']:14.4g} {p['corr_strength']:5.2f} {p['eff_rank']:6.1f}" if p else " " * 27
    print0(run.machine, f"{row['epoch']:5d} {cell('loss', '10.4g', 10)} {cell('lr', '9.3g', 9)} "
                        f"{cell('images_per_s', '8.0f', 8)} {cell('knn_acc', '6.2f', 6)} | {proj} | {row['time']:7.1f}")


def current_lr(opt):
    return float(opt.param_groups[0]["lr"])  # a float, or a 0-dim tensor in the graph step


# Random streams, re-seeded from (seed, epoch, stream, rank) every epoch: a resumed run draws what the uninterrupted
# one would. Distinct while stream x 101 + rank < 1009 (ranks < 101, streams < 9) and epochs < 1,000,003.
SHUFFLE_STREAM, ORDER_STREAM, AUGMENT_STREAM = 0, 1, 2
PROBE_SEED_STRIDE = 7919  # a prime: each process's linear-probe crops get a stream of their own


def reseed_epoch(tr, epoch, n):
    """Re-seeds the epoch's random streams. -> the order of the n training images, on the device."""
    seed = lambda stream, rank=tr.machine.rank: (tr.cfg.seed * 1_000_003 + epoch) * 1009 + stream * 101 + rank
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed(ORDER_STREAM))).to(tr.machine.device)
    tr.aug_gen.manual_seed(seed(AUGMENT_STREAM))
    torch.manual_seed(seed(SHUFFLE_STREAM, rank=0))  # the whitening's shuffles: the same on every process
    return order


def check_finite(what, tensors):
    """Diverged if a tensor holds a NaN or inf (one host read): nothing non-finite is saved, scored or solved."""
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise Diverged(f"{what} are not finite")


def save_checkpoint(run, epoch):
    """model, optimizer, schedule, loss scaler, epoch and settings, after every epoch."""
    if run.tr.graph_holds not in (None, graph_inputs(run.tr)):  # replaced after capture: cut off from the graph
        raise RuntimeError("a tensor the CUDA graph updates was replaced after capture; load every state first")
    if run.machine.is_main:
        tr, opt_state = run.tr, run.tr.opt.state_dict()
        eager_optimizer(opt_state["param_groups"])
        state = {"model": tr.net.state_dict(), "optimizer": opt_state, "scheduler": tr.sched.state_dict(),
                 "scaler": tr.scaler.state_dict(), "epoch": epoch, "elapsed": run.elapsed, "config": vars(run.cfg)}
        torch.save(state, run.path("checkpoint.pt.tmp"))
        os.replace(run.path("checkpoint.pt.tmp"), run.path("checkpoint.pt"))  # a crash mid-write keeps the last


def load_checkpoint(path, device):
    """A checkpoint read as data (weights_only: tensors, numbers, strings, lists, dicts): it cannot run code."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects, RuntimeError/EOFError if damaged
        refused = "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError"
        raise UsageError(f"{path}: " + ("it holds objects other than tensors and numbers, which could run code; "
                                        "refused" if refused else f"damaged, or no checkpoint ({type(e).__name__})"))
    keys = set(state) if isinstance(state, dict) else set()
    if missing := {"model", "optimizer", "scheduler", "scaler", "epoch", "elapsed"} - keys:
        raise UsageError(f"{path}: not an fdsl checkpoint (no {', '.join(sorted(missing))})")
    return state


def finish_run(run, final):
    """Linear probe and results.json; final None (resumed after the last epoch): evaluate again."""
    cfg, tr, machine = run.cfg, run.tr, run.machine
    final = final or evaluate(tr.net, run)
    acc, metrics = final["knn_acc"], final["collapse"]
    rows = read_log(run.path("log.jsonl")) if machine.is_main else []  # the whole run, resumed parts included
    speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")] or [None]
    results = {"knn_acc": acc, "collapse": metrics, "epochs": cfg.epochs,
               "images_per_s": speeds[0] and sum(speeds) / len(speeds),
               "knn_curve": [[r["epoch"], r["knn_acc"]] for r in rows if "knn_acc" in r], **step_record(tr)}
    if cfg.linear_epochs > 0:
        t0 = time.perf_counter()
        try:
            results["linear_acc"] = linear_accuracy(
                tr.net.backbone, tr.net.feat_dim, (run.images.train_all, run.data.train_y), (run.images.test,
                run.data.test_y), len(run.data.classes), cfg.linear_epochs, machine, cfg.seed, cfg.progress)
        except Diverged as e:
            raise Diverged(f"{e} in the linear probe; the trained network is {run.path('checkpoint.pt')}") from None
        results["linear_time_s"] = time.perf_counter() - t0
        print0(machine, f"linear probe ({cfg.linear_epochs} epochs): {results['linear_acc']:.2f}%")
    results.update(time_s=time.perf_counter() - run.t0, device=str(machine.device) + f" x{machine.world}" *
                   (machine.world > 1), **provenance(machine))
    if machine.is_main:
        write_atomic(run.path("results.json"), json.dumps(results, indent=2))
        print0(machine, f"k-NN {acc:.2f}% after {cfg.epochs} epochs, {results['time_s']:.0f} s; "
                        f"results in {run.path('results.json')}")
    return results


def finished_run(cfg, machine):
    results = read_json(os.path.join(cfg.out, "results.json"))
    print0(machine, f"fdsl: {cfg.out} is a finished run ({cfg.epochs} epochs, k-NN {results.get('knn_acc', 0):.2f}%), "
                    f"which cannot be extended: start a new one with more --epochs")
    return results


def provenance(machine):
    """What made a run's numbers: the library versions, the device by name, fdsl.py's version."""
    device, name = machine.device, platform.processor() or platform.machine()
    if device.type == "cpu" and os.path.isfile("/proc/cpuinfo"):  # Linux names the CPU model
        name = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "Apple MPS" if device.type == "mps" \
        else f"{name}, {os.cpu_count()} CPUs"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device_name": name, "fdsl_version": code_version()}


def code_version(short=False):
    """fdsl.py's git commit (+modified and its sha256 if changed), outside a checkout its sha256."""
    path = os.path.abspath(__file__)
    with open(path, "rb") as f:
        digest = "sha256:" + hashlib.sha256(f.read()).hexdigest()[:16]
    try:
        commit, changed = (subprocess.run(["git", "-C", os.path.dirname(path), *a], capture_output=True, text=True,
                                          timeout=10) for a in (("rev-parse", "HEAD"), ("status", "--porcelain", path)))
    except (OSError, subprocess.SubprocessError):
        return digest
    if commit.returncode or changed.returncode:
        return digest
    modified = bool(changed.stdout.strip())
    return commit.stdout.strip()[:12 if short else 40] + ("+modified" if short else f"+modified {digest}") * modified


def read_log(path):
    """A log.jsonl's rows, a half-written last line left out (a damaged one before it is an error)."""
    lines = [line for line in open(path).read().splitlines() if line.strip()] if os.path.exists(path) else []
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UsageError(f"{path}, line {i + 1}: not a JSON row") from None
    return rows


def read_json(path):
    try:
        return json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous file intact


# =============================================================================================
# Appendix E. Data readers and augmentation kernels      (skippable: sections 2 and 3 use them)
# Image folders, generated data, subsets; torchvision's augmentations per image for a batch on the device.
# =============================================================================================

def load_cifar(name, root):
    """CIFAR-10/100: the copy in `root`, else a download there."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        sets = [cls(root, train=t, download=True) for t in (True, False)]  # downloads only what is missing
    except (OSError, RuntimeError) as e:
        raise UsageError(f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: {e}); "
                         f"use --dataset folder --data-dir DIR (train/, test/) or --dataset synthetic") from None
    xs = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]
    ys = [torch.tensor(s.targets, dtype=torch.long) for s in sets]
    return Data(xs[0], ys[0], xs[1], ys[1], list(sets[0].classes))


def balanced_subset(x, y, n, seed):
    """n samples with (as nearly as possible) the same count per class, chosen at random."""
    if n <= 0 or n >= len(y):
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    yp, by_class = y[perm], torch.argsort(y[perm], stable=True)  # by class, random order inside a class
    counts, rank = torch.bincount(yp), torch.empty_like(perm)
    rank[by_class] = torch.arange(len(y)) - (counts.cumsum(0) - counts)[yp[by_class]]
    # Deal the classes out round-robin: all first images, then all second images, ...
    keep = perm[torch.argsort(rank, stable=True)[:n]].sort().values
    return x[keep], y[keep]


def load_image_folder(root, size, progress=True):
    """DIR/train and DIR/test (or DIR/val), a sub-folder per class, decoded once to uint8. -> Data."""
    test = next((d for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(os.path.join(root, "train")) or test is None:
        raise UsageError(f"no image folder at {root} (--dataset folder expects DIR/train/<class>/*, DIR/test/...)")
    (train_x, train_y, classes), (test_x, test_y, test_classes) = (
        decode_split(os.path.join(root, split), size, progress) for split in ("train", test))
    if test_classes != classes:
        raise UsageError(f"{root}/{test} has classes {test_classes[:5]}... but train has {classes[:5]}...")
    return Data(train_x, train_y, test_x, test_y, classes)


def decode_split(split_dir, size, progress):
    """A split's images, labels, classes; an unreadable file stops the load (fewer images: other numbers)."""
    try:
        folder = torchvision.datasets.ImageFolder(split_dir)
    except OSError as e:
        raise UsageError(f"{split_dir}: {e}") from None
    paths = [p for p, _ in folder.samples]
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        decoded = list(tqdm(pool.map(lambda p: read_image(p, size), paths, chunksize=256), total=len(paths),
                            desc=f"decoding {split_dir}", disable=not progress, leave=False))
    if bad := [d for d in decoded if isinstance(d, str)]:
        raise UsageError(f"{len(bad)} of {len(paths)} images cannot be read: {bad[0]}"
                         f"{f' and {len(bad) - 1} more' * (len(bad) > 1)}; remove or replace them")
    return torch.stack(decoded), torch.tensor(folder.targets, dtype=torch.long), folder.classes


def read_image(path, size):
    """An image file -> 3 x size x size uint8 (resized, centre-cropped), or a line naming it and why not."""
    try:
        img = TF.pil_to_tensor(Image.open(path).convert("RGB"))
    except Exception as e:  # a damaged file fails in many ways (OSError, SyntaxError, ...)
        return f"{path} ({type(e).__name__}: {(str(e).strip().splitlines() or ['?'])[0]})"
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return img


def synthetic_data(size, n_train=5000, n_test=1000):
    """make_synthetic's images, always the same (--seed changes the training, not the data). -> Data."""
    x, y = make_synthetic(n_train + n_test, size, seed=1234)
    names = [f"{shape}-{texture}" for texture in ("plain", "striped") for shape in ("disk", "square", "triangle",
                                                                                    "ring", "cross")]
    return Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:], names)


def make_synthetic(n, size=32, seed=0):
    """Labelled images generated offline: class = shape (5) x texture (plain, striped); colour, position,
    size, rotation, stripes and noise vary per image. -> (N x 3 x size x size uint8, labels N)."""
    g = torch.Generator().manual_seed(seed)
    U = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    shape, striped, lin = y % 5, y // 5, (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy, s, a = U(n, 1, 1, lo=-0.3, hi=0.3), U(n, 1, 1, lo=-0.3, hi=0.3), U(n, 1, 1, lo=0.4, hi=0.65), \
        U(n, 1, 1, hi=2 * math.pi)
    u = ((xx - cx) * a.cos() + (yy - cy) * a.sin()) / s  # rotated coordinates, unit = shape size
    v = (-(xx - cx) * a.sin() + (yy - cy) * a.cos()) / s
    r, corners = (u * u + v * v).sqrt(), (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
    tri = torch.stack([u * math.cos(t) + v * math.sin(t) for t in corners]).amax(0)
    masks = torch.stack([r < 1, torch.maximum(u.abs(), v.abs()) < 0.8, tri < 0.5, (r > 0.55) & (r < 1),
                         ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1))], 1)
    mask = masks[torch.arange(n), shape].float().unsqueeze(1)  # N x 1 x H x W
    stripes = (torch.sin(U(n, 1, 1, lo=2.5, hi=4.0) * math.pi * u + U(n, 1, 1, hi=6.3)) > 0).float().unsqueeze(1)
    texture = torch.where(striped.view(n, 1, 1, 1).bool(), 0.35 + 0.65 * stripes, torch.ones(1))
    # Lightness varies widely but the tint only a little: what survives the colour jitter of
    # two views must then be shape and texture, not a per-image colour (a shortcut to nowhere).
    tint = lambda: U(n, 3, 1, 1, lo=-0.08, hi=0.08)
    bg, fg = U(n, 1, 1, 1, hi=0.45) + tint(), U(n, 1, 1, 1, lo=0.55, hi=1.0) + tint()
    img = bg + (fg * texture - bg) * mask + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y


def to_float(x):
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


def standardize_pixels(x):
    """(x - ImageNet mean) / ImageNet std per channel, for x in [0, 1]: N x 3 x H x W."""
    mean, std = pixel_statistics(x.device)
    return (x - mean) / std


@functools.cache
def pixel_statistics(device):
    # torchvision's normalize builds its mean/std tensors from Python lists at every call, a
    # host-to-device copy per batch that a CUDA graph cannot hold: build them once per device.
    return [torch.tensor(v, device=device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]


def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, generator=None, mode="bilinear"):
    """torchvision's RandomResizedCrop (10 tries, then a centre crop) and a flip, per image, one grid_sample.
    mode: "bilinear" (SSL, as the authors) or "bicubic" (their probe; clamped). N x C x H x W in [0, 1]."""
    (n, _, h, w), tries = x.shape, 10
    rand = lambda *s: torch.rand(*s, generator=generator, device=x.device)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n, tries)
    cw, ch = (area * logr.exp()).sqrt().round(), (area / logr.exp()).sqrt().round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision
    cw, ch, any_ok = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(1)
    # Fallback when no try fits: the largest centred box with the ratio clamped to its range.
    fw, fh = w if w / h <= ratio[1] else round(h * ratio[1]), h if w / h >= ratio[0] else round(w / ratio[0])
    cw, ch = torch.where(any_ok, cw, float(fw)), torch.where(any_ok, ch, float(fh))
    top = torch.where(any_ok, (rand(n) * (h - ch + 1)).floor(), ((h - ch) / 2).floor())
    left = torch.where(any_ok, (rand(n) * (w - cw + 1)).floor(), ((w - cw) / 2).floor())
    flip = torch.where(rand(n) < flip_p, -1.0, 1.0)
    zero = torch.zeros_like(cw)  # the output grid [-1, 1] to the crop box (-1, 1: the border pixels' outer edges)
    theta = torch.stack([cw / w * flip, zero, (2 * left + cw) / w - 1, zero, ch / h, (2 * top + ch) / h - 1], 1)
    out = F.grid_sample(x, F.affine_grid(theta.view(n, 2, 3), list(x.shape), align_corners=False), mode=mode,
                        padding_mode="border", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out


def _rgb_to_hsv(x):
    (r, g, b), maxc = x.unbind(1), x.amax(1)
    delta = maxc - x.amin(1)
    s, d = delta / maxc.clamp_min(1e-8), delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return hue, s, maxc


def _hsv_to_rgb(h, s, v):
    i = (h * 6.0).floor()
    f, i = h * 6.0 - i, i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)  # N x 3 x 6 x H x W
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, generator=None):
    """torchvision's ColorJitter with probability p, each image its own factors and order. N x 3 x H x W."""
    n, dev = x.shape[0], x.device
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
    on = (rand(n) < p).float().view(n, 1, 1, 1)
    factor = lambda a: (1 + on * (2 * rand(n, 1, 1, 1) - 1) * a)  # in [1-a, 1+a], 1 when off
    fb, fc, fs, fh = factor(brightness), factor(contrast), factor(saturation), on[:, 0] * (2 * rand(n, 1, 1) - 1) * hue
    order = torch.argsort(rand(n, 4), dim=1)  # a random permutation of the 4 ops per image
    # Four rounds; in round k each image applies the op whose turn it is and the identity
    # (factor 1, shift 0) for the other three. Cheap elementwise work, no data-dependent branch.
    for k in range(4):
        turn = lambda op: (order[:, k] == op).view(n, 1, 1, 1)
        x = (x * torch.where(turn(0), fb, 1.0)).clamp(0, 1)
        c, s = torch.where(turn(1), fc, 1.0), torch.where(turn(2), fs, 1.0)
        x = (c * x + (1 - c) * TF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)
        x = (s * x + (1 - s) * TF.rgb_to_grayscale(x)).clamp(0, 1)
        hh, ss, vv = _rgb_to_hsv(x)
        x = _hsv_to_rgb((hh + torch.where(turn(3)[:, 0], fh, 0.0)) % 1.0, ss, vv)
    return x


def random_grayscale(x, p=0.2, generator=None):
    gray = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) < p
    return torch.where(gray, TF.rgb_to_grayscale(x).expand_as(x), x)


# =============================================================================================
# Appendix F. Tools: --benchmark and --plot                    (skippable: not part of training)
# =============================================================================================


def benchmark(cfg, machine):
    """Times the eager and graphed training step on random images (content does not change speed). -> figures"""
    b, dev, t, tg = cfg.batch_size, machine.device, {}, None

    def time_it(fn):  # mean seconds per call after WARMUP_STEPS untimed ones, the device waited for
        for _ in range(WARMUP_STEPS):
            fn()
        t0 = synced_clock()
        for _ in range(cfg.benchmark_steps):
            fn()
        return (synced_clock() - t0) / cfg.benchmark_steps
    x = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    if choose_step(cfg, machine) == "graph":
        tg = build_trainer(cfg, machine, 50000 // b, whitening_method(cfg, "graph"))
        step = cuda_graph(train_step, tg, x)
        if tg.step_kind == "graph":
            t["graphed full step"] = time_it(lambda: (step(x), tg.sched.step()))
    te = build_trainer(cfg, machine, 50000 // b, whitening_method(cfg, "eager"))
    t["eager full step"] = time_it(lambda: (train_step(te, x), te.sched.step()))
    fastest, ms = "graphed" if "graphed full step" in t else "eager", lambda s: f"{s * 1e3:9.2f} ms"
    best, shuffle = t[f"{fastest} full step"], "shuffled" if cfg.shuffle else "fixed"
    norm = cfg.decorr + f" ({cfg.groups} groups, {shuffle}, {cfg.whiten_dtype})" * (cfg.decorr == "zca")
    out = [f"benchmark: {cfg.arch}, batch {b}, {cfg.image_size} px, decorr {norm}, "
           f"{ {None: 'fp32', torch.bfloat16: 'bf16', torch.float16: 'fp16'}[machine.amp_dtype]}, "
           f"{str(machine.memory_format).split('.')[-1]}, {provenance(machine)['device_name']}, torch "
           f"{torch.__version__}, fdsl {code_version(short=True)}; mean of {cfg.benchmark_steps} calls after "
           f"{WARMUP_STEPS} untimed ones"]
    for kind, tr in (("eager", te), ("graphed", tg)):
        row, whiten = f"{kind} full step", step_record(tr)["whiten_method"] if tr else None
        out.append(f"  {row + f' ({whiten})' * bool(whiten):<48}" + (f"{ms(t[row])} {b / t[row]:10.0f} img/s" if
                   row in t else "   needs CUDA" if dev.type != "cuda" else "   not run"))
    out.append(f"  a 50,000-image epoch at the {fastest} step: {50000 // b * best:.1f} s of training steps")
    figures = {"seconds": t, "images_per_s": b / best, "epoch_s": 50000 // b * best,
               **step_record(tg or te), "settings": vars(cfg), **provenance(machine)}
    print0(machine, "\n".join(out))
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(os.path.join(cfg.out, "benchmark.md"), f"`{cfg.command}`\n\n```\n" + "\n".join(out) + "\n```\n")
        write_atomic(os.path.join(cfg.out, "benchmark.json"), json.dumps(figures, indent=2))
    return figures


def projection_points(net, run, most=1024):
    """Figure 2's points: the layer's output for 1,024 fixed random test images (every class), measured as the
    projector metrics are (train_mode_outputs), in whole units of scale (3 digits). -> {"scale", "points", "labels"}"""
    cfg, w = run.cfg, run.machine.world
    n = min(most, len(run.data.test_y)) // cfg.batch_size * cfg.batch_size
    if n == 0:
        return {"points": [], "labels": []}
    mine = torch.randperm(len(run.data.test_y) // w, generator=torch.Generator().manual_seed(cfg.seed))[: n // w]
    _, z = train_mode_outputs(net, run.images.test[mine.to(run.images.test.device)], cfg.batch_size // w,
                              run.machine, n)
    shown = mine.repeat_interleave(w) * w + torch.arange(n) % w  # process r's k-th image, as gather_shards orders
    scale = float(f"{z.abs().max().item() / 999:.4g}") or 1.0
    return {"scale": scale, "points": (z / scale).round().int().tolist(), "labels": run.data.test_y[shown].tolist()}


def read_run(d):
    """A run folder: settings, evaluated rows, results, final metrics, label, setting (RECIPE's flags but --seed)."""
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise UsageError(f"--plot {d}: " + ("not a run folder (no config.json)" if os.path.isdir(d) else
                                            "no such folder"))
    cfg = read_json(os.path.join(d, "config.json"))
    rows = [r for r in read_log(os.path.join(d, "log.jsonl")) if "knn_acc" in r]
    if not rows:
        raise UsageError(f"--plot {d}: no evaluated epoch yet in {os.path.join(d, 'log.jsonl')}")
    results = read_json(os.path.join(d, "results.json")) if os.path.isfile(os.path.join(d, "results.json")) else {}
    groups, shuffled = cfg.get("groups", 16), cfg["decorr"] == "zca" and cfg.get("shuffle", True)
    label = cfg["decorr"] + ("" if cfg["decorr"] != "zca" else ", full ZCA" if groups == 1 else
                             f", {groups} {'shuffled' if shuffled else 'fixed'} groups")
    return {"name": os.path.basename(os.path.normpath(d)), "cfg": cfg, "rows": rows, "results": results,
            "final": results.get("collapse") or rows[-1]["collapse"], "shuffled": shuffled, "label": label,
            "setting": tuple(cfg.get(k, v[0]) for k, v in RECIPE.items() if k != "seed") +
                       tuple(cfg.get(k) for k in ("train_subset", "test_subset", "image_size", "precision"))}


def plot_runs(run_dirs, out=""):
    """The runs in the paper's order, the runs of a setting (differing only in --seed) merged: a figure
    (default comparison.png beside the runs), a Markdown table (.md) and for 2-d outputs the paper's
    Figure 2 (-2d.png). matplotlib is the one optional dependency, used only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which nothing else in fdsl uses: pip install matplotlib") from None
    runs, settings = [read_run(d) for d in run_dirs], {}
    for r in runs:
        settings.setdefault(r["setting"], []).append(r)
    order = {"none": 0, "bn": 1, "zca": 2}  # the order of the paper's findings
    entries = sorted(settings.values(), key=lambda e: (order.get(e[0]["cfg"]["decorr"], 3), e[0]["shuffled"],
                                                       e[0]["cfg"]["batch_size"]))
    labels = [e[0]["label"] for e in entries]
    for e in entries:  # a setting's title: its label, a run's name if two settings share it, its seeds
        e[0]["title"] = (e[0]["label"] + f" ({e[0]['name']})" * (labels.count(e[0]["label"]) > 1) +
                         f" ({len(e)} seeds)" * (len(e) > 1))
    out = out or os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in run_dirs]),
                              "comparison.png")
    flat = [r for r in runs if any(row.get("projection", {}).get("points") for row in r["rows"])]
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    draw_runs(plt, entries).savefig(out, dpi=110)
    write_atomic(stem + ".md", table := runs_table(entries))
    if flat:
        draw_projections(plt, flat, stem + "-2d.gif").savefig(stem + "-2d.png", dpi=110)
    if batches := len({e[0]["cfg"]["batch_size"] for e in entries}) > 1:
        draw_batch_sizes(plt, entries).savefig(stem + "-batch.png", dpi=110)
    print(table + f"\nfdsl: figure of {len(runs)} run(s) in {out}, table in {stem}.md" +
          f", the 2-d projection spaces of {len(flat)} in {stem}-2d.png and, in motion, {stem}-2d.gif" * bool(flat) +
          f", accuracy against the batch size in {stem}-batch.png" * batches)
    return out


def seed_stats(entry, value):
    """(epochs every run of a setting evaluated, and the mean, min and max of value(row) there)."""
    by_epoch = [{row["epoch"]: row for row in r["rows"]} for r in entry]
    epochs = sorted(set.intersection(*(set(b) for b in by_epoch)))
    v = torch.tensor([[value(b[e]) for e in epochs] for b in by_epoch], dtype=torch.float64)
    return epochs, v.mean(0), v.amin(0), v.amax(0)


def metric_points(runs):
    """(backbone correlation strength, k-NN accuracy) at every evaluation of the runs, each network once:
    runs that agree in `same` evaluated the same random network at epoch 0 (it depends on nothing else)."""
    same, points = ("seed", "arch", "dataset", "train_subset", "test_subset", "image_size", "raw_eval", "knn_k",
                    "knn_t", "precision"), {}
    for r in runs:
        for row in r["rows"]:
            key = ("epoch 0", *(r["cfg"].get(k) for k in same)) if row["epoch"] == 0 else (r["name"], row["epoch"])
            points.setdefault(key, (row["collapse"]["backbone"]["corr_strength"], row["knn_acc"]))
    return list(points.values())


def draw_runs(plt, entries):
    """Per setting over epochs (seeds: their mean, a band from min to max): k-NN accuracy, the projector's
    std (complete collapse: 0) and correlation strength (dimensional collapse: 1), effective rank; the
    final spectra; correlation as an unsupervised metric (against k-NN, every evaluation). -> the figure."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    (ax_knn, ax_std, ax_corr), (ax_rank, ax_spec, ax_metric) = axes
    at = lambda where, key: lambda row: row["collapse"][where][key]
    curves = ((ax_knn, lambda row: row["knn_acc"], "o-"), (ax_std, at("projector", "std"), "-"),
              (ax_corr, at("projector", "corr_strength"), "-"), (ax_corr, at("backbone", "corr_strength"), "--"),
              (ax_rank, at("projector", "eff_rank"), "-"), (ax_rank, at("backbone", "eff_rank"), "--"))
    for i, entry in enumerate(entries):
        for ax, value, style in curves:
            epochs, mean, lo, hi = seed_stats(entry, value)
            ax.plot(epochs, mean, style, ms=3, color=f"C{i}", label=entry[0]["title"])
            if len(entry) > 1:
                ax.fill_between(epochs, lo, hi, color=f"C{i}", alpha=0.2, lw=0)
        for where, style in (("projector", "-"), ("backbone", "--")):
            spectrum = torch.tensor([r["final"][where]["spectrum"] for r in entry]).mean(0)
            ax_spec.semilogy(torch.arange(1, len(spectrum) + 1)[spectrum > 0], spectrum[spectrum > 0], style,
                             color=f"C{i}")  # log scale: zeros have no place
        ax_metric.scatter(*zip(*metric_points(entry)), s=14, color=f"C{i}")
    for ax, title, ylabel in ((ax_knn, "k-NN accuracy of the backbone", "k-NN accuracy (%)"),
                              (ax_std, "projector output: std (0 = complete collapse)", "mean per-axis std"),
                              (ax_corr, "correlation strength (1 = dimensional collapse)", "mean |corr|"),
                              (ax_rank, "effective rank", "effective rank")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax_std.set_yscale("log")
    ax_spec.set(title="final covariance spectrum", xlabel="eigenvalue index (largest first)",
                ylabel="eigenvalue / largest", ylim=(1e-8, 2))
    rho = spearman(*zip(*metric_points([r for e in entries for r in e])))
    ax_metric.set(title=f"correlation as an unsupervised metric (Spearman {rho:+.2f})", ylabel="k-NN accuracy (%)",
                  xlabel="backbone correlation strength (no labels), every evaluation")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (ax_corr, ax_rank, ax_spec):
        ax.legend(handles=[plt.Line2D([], [], color="0.3", ls="-", label="projector"),
                           plt.Line2D([], [], color="0.3", ls="--", label="backbone")], fontsize=8)
    fig.legend(*ax_knn.get_legend_handles_labels(), loc="lower center", ncol=min(len(entries), 4), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    return fig


def draw_batch_sizes(plt, entries):
    """A batch-size study: each layer's final k-NN and linear accuracy against the batch, mean ± std over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines, sizes = {}, sorted({e[0]["cfg"]["batch_size"] for e in entries})
    for e in sorted(entries, key=lambda e: e[0]["cfg"]["batch_size"]):
        lines.setdefault(e[0]["cfg"]["decorr"] + ", shuffled groups" * e[0]["shuffled"], []).append(e)
    for ax, name, key in ((axes[0], "k-NN", "knn_acc"), (axes[1], "linear", "linear_acc")):
        for i, (label, es) in enumerate(lines.items()):
            v = [torch.tensor([r["results"].get(key, r["rows"][-1].get(key, math.nan)) for r in e]) for e in es]
            ax.errorbar([e[0]["cfg"]["batch_size"] for e in es], [a.mean() for a in v], [a.std() if len(a) > 1 else 0
                        for a in v], fmt="o-", capsize=3, color=f"C{i}", label=label)
        ax.set(title=f"{name} accuracy against the batch size (mean ± std)", xlabel="batch size", ylabel="%")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=9)
    fig.tight_layout()
    return fig


def draw_projections(plt, runs, gif=None):
    """The paper's Figure 2: a row per 2-d run (3-d: two axes), points coloured by class, at up to 4 evaluations;
    every panel on the same axes, so a collapsed output is drawn as the point it is. gif: also this file, the
    runs side by side, a frame per evaluation on the same axes (Pillow, which torchvision brings). -> the figure."""
    rows = [[row for row in r["rows"] if row.get("projection", {}).get("points")] for r in runs]
    points_of = lambda row: torch.tensor(row["projection"]["points"]) * row["projection"].get("scale", 1)
    every = torch.cat([points_of(row)[:, :2] for rs in rows for row in rs])
    lim = 1.1 * every.abs().flatten().quantile(0.995).item()  # the rarest outliers may leave the frame

    def draw(ax, row, title):
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), aspect="equal", xticks=[], yticks=[])
        pts, labels = points_of(row), row["projection"]["labels"]
        ax.scatter(pts[:, 0], pts[:, 1], c=labels, cmap="tab10", vmin=-0.5, vmax=9.5, s=2, rasterized=True)
        ax.set_title(title, fontsize=10)
    if gif:
        from matplotlib.animation import FuncAnimation, PillowWriter
        fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.9), squeeze=False)

        def frame(epoch):  # each run at its latest evaluation up to this epoch
            for ax, r, rs in zip(axes[0], runs, rows):
                ax.clear()
                draw(ax, ([row for row in rs if row["epoch"] <= epoch] or rs)[-1], r["label"])
            fig.suptitle(f"epoch {epoch}", fontsize=11)
        frames = sorted({row["epoch"] for rs in rows for row in rs})
        FuncAnimation(fig, frame, frames=frames).save(gif, PillowWriter(fps=4), dpi=72)
        plt.close(fig)
    picks = [[rs[round(i * (len(rs) - 1) / 3)] for i in range(4)] if len(rs) > 4 else rs for rs in rows]
    width = max(map(len, picks))
    fig, axes = plt.subplots(len(runs), width, figsize=(2.8 * width, 2.8 * len(runs)), squeeze=False)
    for ax_row, r, rs in zip(axes, runs, picks):
        for j, ax in enumerate(ax_row):
            draw(ax, rs[j], f"epoch {rs[j]['epoch']}") if j < len(rs) else ax.set_axis_off()
        ax_row[0].set_ylabel(r["label"], fontsize=11)
    fig.suptitle("2-d projection spaces (colours: classes), every panel on the same axes", fontsize=11)
    fig.tight_layout()
    return fig


def spearman(x, y):
    """Spearman's rank correlation: the Pearson correlation of the ranks (ties: their mean rank)."""
    def ranks(v):
        _, inverse, counts = torch.tensor(v, dtype=torch.float64).unique(return_inverse=True, return_counts=True)
        return (counts.cumsum(0) - counts + (counts - 1) / 2)[inverse]  # 0-based, ties averaged
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx @ ry / (rx.norm() * ry.norm())).item()


def runs_table(entries):
    """The final numbers as a Markdown table, a row per setting (seeds: mean ± standard deviation, n), with
    what made them; then how well backbone correlation (no labels) ranks the accuracies (Spearman)."""
    lines = ["| setting | runs | k-NN % | linear % | projector std | projector corr | projector eff. rank | "
             "backbone corr | epochs | batch | made with |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    spread = lambda v, fmt: f"{v[0]:{fmt}}" if len(v) == 1 else \
        f"{sum(v) / len(v):{fmt}} ± {torch.tensor(v, dtype=torch.float64).std():{fmt}}"
    for e in entries:
        cfg, res, last = e[0]["cfg"], e[0]["results"], e[0]["rows"][-1]
        stat = lambda value, fmt=".2f": spread([value(r) for r in e], fmt)
        final = lambda where, key, fmt: stat(lambda r: r["final"][where][key], fmt)
        linear = stat(lambda r: r["results"]["linear_acc"]) if all("linear_acc" in r["results"] for r in e) else ""
        epochs = f"{cfg.get('epochs')}" if res else f"{last['epoch']} of {cfg.get('epochs')}"
        made = f"{res['device_name']}, torch {res['torch']}, fdsl {res['fdsl_version'][:12]}" if "torch" in res else ""
        lines.append(f"| {e[0]['label']} | {', '.join(r['name'] for r in e)}{f' (n={len(e)})' * (len(e) > 1)} | "
                     f"{stat(lambda r: r['results'].get('knn_acc', r['rows'][-1]['knn_acc']))} | {linear} | "
                     f"{final('projector', 'std', '.3g')} | {final('projector', 'corr_strength', '.2f')} | "
                     f"{final('projector', 'eff_rank', '.1f')} | {final('backbone', 'corr_strength', '.2f')} | "
                     f"{epochs} | {cfg.get('batch_size')} | {made} |")
    runs, points = [r for e in entries for r in e], metric_points([r for e in entries for r in e])
    lines.append(f"\nSpearman's rank correlation of the backbone's correlation strength with k-NN accuracy over "
                 f"every evaluation of every run, each network once ({len(points)} points): "
                 f"{spearman(*zip(*points)):+.2f}.")
    final = lambda acc: spearman([r["final"]["backbone"]["corr_strength"] for r in runs], [acc(r) for r in runs])
    lines.append(f"Over the runs' final correlation ({len(runs)} runs): with final k-NN accuracy "
                 f"{final(lambda r: r['rows'][-1]['knn_acc']):+.2f}" + (f", with linear accuracy "
                 f"{final(lambda r: r['results']['linear_acc']):+.2f}" if all("linear_acc" in r["results"]
                                                                              for r in runs) else "") + ".")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
