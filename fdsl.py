"""
fdsl.py: "On Feature Decorrelation in Self-Supervised Learning" (Hua, Wang, Xue, Ren, Wang,
Zhao, ICCV 2021, arXiv 2105.00470), reproduced in one file.

    python fdsl.py --decorr zca               # the paper's method (Shuffled-DBN): CIFAR-10, 200 epochs
    python fdsl.py --decorr bn                # per-axis standardization: dimensional collapse
    python fdsl.py --decorr none              # no normalization: complete collapse
    python fdsl.py --decorr zca --no-shuffle  # grouped DBN: fixed groups
    python fdsl.py --dataset folder --data-dir ~/cifar10-jpeg      # DIR/train and DIR/test image folders
    python fdsl.py --dataset synthetic --arch small --epochs 3 --linear-epochs 0   # 1-minute CPU check
    torchrun --nproc_per_node=4 fdsl.py --decorr zca    # several GPUs, whitening over the global batch
    python fdsl.py --resume runs/cifar10-zca-20261124-101500    # continue an interrupted run
    python fdsl.py --benchmark                # time the training step: eager, as a CUDA graph, bare model
    python fdsl.py --plot runs/*              # figure and Markdown table of several runs

The story the file tells:
  1. Two augmented views of an image go through one network: encoder -> projector ->
     normalization layer -> (optional predictor), and the loss pulls the two outputs together.
  2. With no normalization the cheapest way to do that is to map every image to one point:
     *complete collapse* (the per-axis std of the output falls to 0).
  3. Standardizing each axis over the batch (BN without affine) forbids that, but the axes can
     still all move together: the output lives in a few directions, *dimensional collapse*
     (correlation strength near 1, effective rank near 1).
  4. Whitening the projector output over the batch (ZCA, in shuffled groups) makes the axes
     uncorrelated by construction: no dimensional collapse, and better accuracy.

Layout. Part one is the method, in the paper's order, to read top to bottom: 1 settings,
2 data, 3 augmentations, 4 the paper's layer (GroupWhitening), 5 model, 6 loss, 7 collapse
metrics, 8 evaluation, 9 training, 10 main. Four appendices follow, each skippable:
A numerics of C^(-1/2), B several GPUs, C the fast path (the training step as one CUDA graph),
D tools (--benchmark, --plot). Comments that start with `##` teach the method; plain `#`
comments are notes for whoever maintains the code.

Evidence (README.md has the commands and tables; results/ has the runs' files):
  One NVIDIA H200, torch 2.11: the training step as one CUDA graph takes 7.3 ms at batch 64
  (the eager step 20.0 ms), 5.7 s of steps per CIFAR-10 epoch. ResNet-18, 10 epochs on
  CIFAR-10 (a JPEG copy), k-NN / 10-epoch linear accuracy (random network: 36.62% k-NN):
    --decorr none 28.93 / 23.98   bn 39.69 / 45.14   zca --no-shuffle 61.12 / 64.26   zca 65.17 / 67.56
  with the projector's std at 0.001 for none and its effective rank at 1.5 for bn.
  A 2-core CPU, torch 2.14.1, the small network, 5,000 images, 10 epochs (about 4 minutes a run):
    none 21.00 / 16.05   bn 26.90 / 24.10   zca --no-shuffle 39.70 / 40.15   zca 43.90 / 44.10
  The tests (CPU) take about 4 minutes on 2 cores, on torch 2.4.1 and 2.14.1 alike.
"""

import argparse
import contextlib
import json
import math
import os
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
from tqdm import tqdm

# =============================================================================================
# 1. Settings
## The defaults are the authors' main CIFAR-10 recipe: ResNet-18, batch 64, 16 groups of 32
## axes, SGD with lr 0.02 x batch/256, 200 epochs. README.md explains each flag at length.
# =============================================================================================


class UsageError(Exception):
    """Bad input (a flag, a folder, a file). main() prints it on one line and exits 2."""


class ArgParser(argparse.ArgumentParser):
    # argparse prints its whole usage block before an error; one line is easier to read.
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    # Adds "(default: X)" to a flag's help unless the help says the default in words, as it
    # must for on/off switches: "--no-shuffle (default: True)" reads as "shuffle is off".
    def _get_help_string(self, action):
        text = action.help or ""
        quiet = action.default is None or action.default == "" or isinstance(action.default, bool)
        if "default" in text or quiet or action.default is argparse.SUPPRESS:
            return text
        return text + " (default: %(default)s)"


def build_parser():
    p = ArgParser(prog="fdsl.py", formatter_class=HelpFormatter, epilog="Examples: the top of fdsl.py, README.md.",
                  description="Self-supervised learning with feature decorrelation (Hua et al., ICCV 2021).")
    arg = p.add_argument_group("data").add_argument
    arg("--dataset", default="cifar10", choices=["cifar10", "cifar100", "folder", "synthetic"],
        help="folder = DIR/train and DIR/test, a sub-folder per class; synthetic = generated, offline")
    arg("--data-dir", default="./data", help="where CIFAR is (or is downloaded to), or the image folder")
    arg("--image-size", type=int, default=32, help="folder and synthetic images are made this size (pixels)")
    arg("--train-subset", type=int, default=0, help="train on N class-balanced images (default: 0, all)")
    arg("--test-subset", type=int, default=0, help="evaluate on N class-balanced images (default: 0, all)")
    arg = p.add_argument_group("model").add_argument
    arg("--arch", default="resnet18", choices=["resnet18", "small"],
        help="resnet18 = CIFAR ResNet-18 (512-d); small = 4 conv layers (256-d), for CPUs")
    arg("--proj-hidden", type=int, default=1024, help="projector hidden width")
    arg("--proj-dim", type=int, default=512, help="projector output width D")
    arg("--decorr", default="zca", choices=["none", "bn", "zca"],
        help="layer after the projector: nothing, per-axis standardization, or ZCA whitening")
    arg("--groups", type=int, default=16, help="zca: whiten G groups of D/G axes (1 = full ZCA)")
    arg("--no-shuffle", dest="shuffle", action="store_false",
        help="zca: fixed groups (grouped DBN); default: axes reshuffled into new groups every step")
    arg("--eps", type=float, default=1e-8, help="whitening regularizer, relative to each group's mean variance")
    arg("--whiten", default="auto", choices=["auto", "eigh", "newton"],
        help="how W = C^(-1/2) is computed; default auto: newton in the CUDA-graph step, else eigh")
    arg("--whiten-dtype", default="float64", choices=["float32", "float64"], help="precision of C and W")
    arg("--predictor", action="store_true", help="add a predictor MLP D -> pred-hidden -> D (default: none)")
    arg("--pred-hidden", type=int, default=256, help="predictor hidden width")
    arg("--stop-grad", action="store_true", help="no gradient through the target view (default: through both)")
    arg("--loss", default="l2", choices=["l2", "cosine"], help="l2 = mean ||p - z||^2 (the paper); cosine: SimSiam's")
    arg = p.add_argument_group("optimization").add_argument
    arg("--epochs", type=int, default=200, help="training epochs")
    arg("--batch-size", type=int, default=64, help="global batch (split over the GPUs under torchrun)")
    arg("--lr", type=float, default=0.02, help="learning rate per 256 images: lr x batch/256 is used")
    arg("--momentum", type=float, default=0.9, help="SGD momentum")
    arg("--weight-decay", type=float, default=1e-3, help="SGD weight decay")
    arg("--warmup-epochs", type=float, default=5, help="linear warm-up from 0, then cosine to 0, per step")
    arg = p.add_argument_group("evaluation").add_argument
    arg("--eval-every", type=int, default=5, help="k-NN and collapse metrics every N epochs (0 = first and last)")
    arg("--knn-k", type=int, default=200, help="neighbours that vote in the k-NN monitor")
    arg("--knn-t", type=float, default=0.1, help="k-NN temperature: a neighbour's vote is exp(sim/t)")
    arg("--metric-samples", type=int, default=2048, help="fixed training images for the projector metrics")
    arg("--raw-eval", action="store_true",
        help="evaluate on the raw images; default: Resize(size x 9/8, bicubic) + CenterCrop, as the authors")
    arg("--linear-epochs", type=int, default=100, help="linear-probe epochs at the end (0 = no probe)")
    arg = p.add_argument_group("run").add_argument
    arg("--out", default="", help="output folder; default: runs/<dataset>-<decorr>-<date>-<time> "
                                  "(with --plot: the figure, default comparison.png beside the runs)")
    arg("--resume", default="", metavar="DIR", help="continue the run in DIR (default: start a new run)")
    arg("--seed", type=int, default=0, help="seed of every random stream")
    arg("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"], help="auto = CUDA, else MPS, else CPU")
    arg("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="auto: bf16 on CUDA, else fp32")
    arg("--no-graph", dest="graph", action="store_false",
        help="on CUDA, run each step eagerly; default: the whole step as one CUDA graph (one GPU)")
    arg("--no-sync-bn", dest="sync_bn", action="store_false",
        help="under torchrun, BatchNorm statistics per GPU; default: synchronized over GPUs")
    arg("--no-progress", dest="progress", action="store_false", help="no progress bars (default: shown)")
    arg("--benchmark", action="store_true", help="time the training step instead of training (default: off)")
    arg("--benchmark-steps", type=int, default=50, help="timed steps per row of --benchmark")
    arg("--plot", nargs="+", default=None, metavar="RUN_DIR",
        help="draw these runs and write their table, then exit (default: off; needs matplotlib)")
    return p


def check_config(cfg, world=1):
    """Everything that can be wrong with the flags, found before any work starts."""
    if cfg.batch_size < 2:
        raise UsageError(f"--batch-size {cfg.batch_size}: batch statistics need at least 2 images")
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    for name in ("epochs", "proj_dim", "proj_hidden", "pred_hidden", "image_size", "knn_k",
                 "metric_samples", "benchmark_steps"):
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("train_subset", "test_subset", "eval_every", "linear_epochs", "warmup_epochs"):
        if getattr(cfg, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must not be negative")
    if cfg.image_size < 8:
        raise UsageError("--image-size must be at least 8 pixels")
    if cfg.eps < 0:
        raise UsageError(f"--eps {cfg.eps} must not be negative")
    if cfg.decorr == "zca":
        if cfg.groups < 1 or cfg.proj_dim % cfg.groups:
            raise UsageError(f"--groups {cfg.groups} does not divide --proj-dim {cfg.proj_dim}")
        size = cfg.proj_dim // cfg.groups
        if size >= cfg.batch_size:
            ## After centring, N samples span at most N-1 directions: a group of N or more axes
            ## has a singular covariance, and whitening it would divide by ~0.
            raise UsageError(f"group size {size} (= {cfg.proj_dim}/{cfg.groups}) must be smaller than "
                             f"the batch {cfg.batch_size}; use more --groups or a larger --batch-size")


@dataclass
class Machine:
    """Where the run happens: device, autocast precision, and this process among several."""
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain float32
    rank: int = 0
    world: int = 1

    @property
    def main(self):  # process 0 prints, logs and saves
        return self.rank == 0

    @property
    def memory_format(self):  # channels_last lets cuDNN use its fastest convolutions
        return torch.channels_last if self.device.type == "cuda" else torch.contiguous_format

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # No weight-cast cache: a CUDA graph must not keep casts made at capture (Appendix C).
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=False)


def print0(machine, *args):
    """print() on process 0 only, between the progress bars."""
    if machine.main:
        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()  # a row per epoch should reach a log file when it happens


# =============================================================================================
# 2. Data
## The whole dataset is one uint8 tensor (N x 3 x H x W) that moves to the device once;
## batches are slices of it, so no DataLoader or CPU worker sits in the training loop.
# =============================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors normalize CIFAR with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_SIZES = (5000, 1000)  # train, test
SYNTHETIC_SEED = 1234  # the generated images are fixed: --seed changes the training, not the data


@dataclass
class Data:
    train_x: torch.Tensor  # N x 3 x H x W uint8
    train_y: torch.Tensor  # N int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list


def balanced_subset(x, y, n, seed):
    """n samples with (as nearly as possible) the same count per class, chosen at random."""
    if n <= 0 or n >= len(y):
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    yp = y[perm]
    by_class = torch.argsort(yp, stable=True)  # grouped by class, random order inside a class
    counts = torch.bincount(yp)
    rank = torch.empty_like(perm)
    rank[by_class] = torch.arange(len(y)) - (counts.cumsum(0) - counts)[yp[by_class]]
    # Deal the classes out round-robin: all first images, then all second images, ...
    keep = perm[torch.argsort(rank, stable=True)[:n]].sort().values
    return x[keep], y[keep]


def load_data(cfg):
    """The dataset named by the flags, on the CPU, as uint8 tensors (see Data)."""
    if cfg.dataset in ("cifar10", "cifar100"):
        data = load_cifar(cfg.dataset, cfg.data_dir)
    elif cfg.dataset == "folder":
        data = load_image_folder(cfg.data_dir, cfg.image_size, progress=cfg.progress)
    else:
        n_train, n_test = SYNTHETIC_SIZES
        x, y = make_synthetic(n_train + n_test, cfg.image_size, seed=SYNTHETIC_SEED)
        data = Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                    [f"{SHAPES[c % 5]}-{'striped' if c >= 5 else 'plain'}" for c in range(10)])
    data.train_x, data.train_y = balanced_subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed)
    data.test_x, data.test_y = balanced_subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1)
    return data


# =============================================================================================
# 3. Augmentations
## SimSiam's CIFAR recipe, each image with its own random parameters, as batched tensor ops on
## whatever device the batch is on: RandomResizedCrop(32, scale 0.2-1, ratio 3/4-4/3), flip
## 0.5, ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (the four ops in a random order per image,
## as torchvision), grayscale 0.2, then normalization.
# =============================================================================================


def to_float(x):
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


_MEAN_STD = {}  # device -> (mean, std) as 3 x 1 x 1 tensors


def normalize(x):
    # torchvision's normalize builds its mean/std tensors from Python lists at every call, a
    # host-to-device copy per batch that a CUDA graph cannot hold: build them once per device.
    if x.device not in _MEAN_STD:
        _MEAN_STD[x.device] = [torch.tensor(v, device=x.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD)]
    mean, std = _MEAN_STD[x.device]
    return (x - mean) / std


def network_input(x, machine):
    """Images as the network takes them: uint8 (or float in [0, 1]) N x 3 x H x W -> normalized
    float32 in the machine's memory format."""
    return normalize(to_float(x)).contiguous(memory_format=machine.memory_format)


def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5, generator=None, mode="bilinear"):
    """torchvision's RandomResizedCrop (same box sampling: 10 tries, then a centre crop) and a
    horizontal flip, for every image at once: each box becomes an affine map and one
    grid_sample resamples the whole batch. mode: "bilinear" (SSL training, as the authors) or
    "bicubic" (their linear-probe crop; clamped to [0, 1], as bicubic overshoots).
    x: N x C x H x W float in [0, 1] -> same shape."""
    n, _, h, w = x.shape
    dev, tries = x.device, 10
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n, tries)
    cw = (area * logr.exp()).sqrt().round()
    ch = (area / logr.exp()).sqrt().round()
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision
    cw, ch, any_ok = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], ok.any(1)
    # Fallback when no try fits: the largest centred box with the ratio clamped to its range.
    in_ratio = w / h
    fw = w if in_ratio <= ratio[1] else round(h * ratio[1])
    fh = h if in_ratio >= ratio[0] else round(w / ratio[0])
    cw = torch.where(any_ok, cw, torch.full_like(cw, fw))
    ch = torch.where(any_ok, ch, torch.full_like(ch, fh))
    top = torch.where(any_ok, (rand(n) * (h - ch + 1)).floor(), ((h - ch) / 2).floor())
    left = torch.where(any_ok, (rand(n) * (w - cw + 1)).floor(), ((w - cw) / 2).floor())
    flip = torch.where(rand(n) < flip_p, -1.0, 1.0)
    # Output pixel grid [-1, 1] -> crop box in the input's normalized coordinates
    # (align_corners=False: -1 and 1 are the outer edges of the border pixels).
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = cw / w * flip
    theta[:, 0, 2] = (2 * left + cw) / w - 1
    theta[:, 1, 1] = ch / h
    theta[:, 1, 2] = (2 * top + ch) / h - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out


def _rgb_to_hsv(x):
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-8)
    d = delta.clamp_min(1e-8)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return hue, s, maxc


def _hsv_to_rgb(h, s, v):
    i = (h * 6.0).floor()
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in
                         ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)  # N x 3 x 6 x H x W
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)


def color_jitter(x, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8, generator=None):
    """torchvision's ColorJitter applied with probability p, per image: its own factors and its
    own random order of the four operations. x: N x 3 x H x W float in [0, 1] -> same."""
    n, dev = x.shape[0], x.device
    rand = lambda *s: torch.rand(*s, generator=generator, device=dev)
    on = (rand(n) < p).float().view(n, 1, 1, 1)
    factor = lambda a: (1 + on * (2 * rand(n, 1, 1, 1) - 1) * a)  # in [1-a, 1+a], 1 when off
    fb, fc, fs = factor(brightness), factor(contrast), factor(saturation)
    fh = on[:, 0] * (2 * rand(n, 1, 1) - 1) * hue
    order = torch.argsort(rand(n, 4), dim=1)  # a random permutation of the 4 ops per image
    # Four rounds; in round k each image applies the op whose turn it is and the identity
    # (factor 1, shift 0) for the other three. Cheap elementwise work, no data-dependent branch.
    for k in range(4):
        turn = lambda op: (order[:, k] == op).view(n, 1, 1, 1)
        b = torch.where(turn(0), fb, 1.0)
        x = (x * b).clamp(0, 1)
        c = torch.where(turn(1), fc, 1.0)
        mean = TF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)
        x = (c * x + (1 - c) * mean).clamp(0, 1)
        s = torch.where(turn(2), fs, 1.0)
        x = (s * x + (1 - s) * TF.rgb_to_grayscale(x)).clamp(0, 1)
        hh, ss, vv = _rgb_to_hsv(x)
        x = _hsv_to_rgb((hh + torch.where(turn(3)[:, 0], fh, 0.0)) % 1.0, ss, vv)
    return x


def random_grayscale(x, p=0.2, generator=None):
    gray = (torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) < p)
    return torch.where(gray, TF.rgb_to_grayscale(x).expand_as(x), x)


def augment(x, generator=None):
    """One random view of every image in the batch (SimSiam's CIFAR recipe).
    x: N x 3 x H x W, uint8 (0-255) or float (0-1), on any device -> N x 3 x H x W float32,
    normalized. Every image gets its own draw, so the two views of a batch x are the two
    halves of augment(torch.cat([x, x]))."""
    x = random_resized_crop_flip(to_float(x), generator=generator)
    x = color_jitter(x, generator=generator)
    x = random_grayscale(x, generator=generator)
    return normalize(x)


def eval_transform(x, chunk=4096):
    """The authors' evaluation view: Resize(size x 9/8, bicubic) then CenterCrop(size), i.e.
    36 then 32 pixels for CIFAR, as their k-NN bank and queries and linear-probe test images
    get (torchvision's antialiased bicubic, which follows PIL's). Applied once to the fixed
    images, not per step. x: N x 3 x S x S uint8 -> N x 3 x S x S uint8."""
    size = x.shape[-1]
    big = round(size * 9 / 8)
    resize = lambda t: TF.resize(t, [big, big], interpolation=torchvision.transforms.InterpolationMode.BICUBIC,
                                 antialias=True)
    return torch.cat([TF.center_crop(resize(t), [size, size]) for t in x.split(chunk)]) if len(x) else x


# =============================================================================================
# 4. The paper's layer: whitening the projector output over the batch
## Standardizing each axis (BN) stops complete collapse but lets the axes stay correlated, so
## the output can collapse onto a few directions. Whitening makes the batch covariance the
## identity: no direction can be lost. This section is the paper's method; Appendix A computes
## C^(-1/2), Appendix B sums the statistics over GPUs. A copy for one GPU needs this section
## and Appendix A, with `sync = False` in GroupWhitening.forward.
# =============================================================================================


def batch_average(total, n, sync=False):
    """total / n, where `total` is a sum over this process's n samples. With sync (training
    under torchrun): the average over the global batch, sums and counts taken over all
    processes, differentiably (Appendix B). A one-GPU copy of the layer can keep `total / n`."""
    if not sync:
        return total / n
    count = torch.full((), n, dtype=total.dtype, device=total.device)
    return all_reduce_sum(total) / all_reduce_sum(count)


def whitening_matrix(cov, eps, method="eigh"):
    """W = (C / m + eps I)^(-1/2) / sqrt(m) for covariances C: ... x S x S, where m = tr(C) / S
    is the group's mean variance (its mean eigenvalue).
    ## Why eps is relative: with an absolute eps, (C + eps I)^(-1/2) of a tiny C is about
    ## eps^(-1/2) I, the "whitened" output of a tiny input is a small copy of it, and the
    ## network can lower the loss by shrinking its output. Relative to m, W(c^2 C) = W(C) / c,
    ## so the output of c x equals that of x for every c > 0.
    ## Why eps is small (1e-8): a direction with eigenvalue l near eps x m is damped to std
    ## sqrt(l / (l + eps m)) < 1, so a larger eps lets the network collapse below it (at
    ## 1e-5 it did, README). eps bounds each group's condition number by S / eps.
    A group whose axes are all exactly constant (C = 0) has nothing to whiten: W = I, its
    output is 0. method: "eigh" (exact) or "newton" (matrix products only), Appendix A."""
    size = cov.shape[-1]
    eps = whitening_eps(eps, size, cov.dtype)  # rounding cannot honour less: Appendix A
    eye = torch.eye(size, dtype=cov.dtype, device=cov.device)
    m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    constant = m == 0
    m = torch.where(constant, torch.ones_like(m), m)
    a = torch.where(constant, eye, cov / m + eps * eye)  # mean eigenvalue 1 + eps: scale-free
    return inverse_sqrt(a, eps, method) * m.rsqrt()


class GroupWhitening(nn.Module):
    """Shuffled group ZCA whitening over the batch (the paper's "Shuffled-DBN"). Per group of
    S = D/G axes:
        xc = x - mean_batch(x)                  (N x S)
        C  = xc^T xc / N                         (biased covariance), m = tr(C) / S
        W  = (C / m + eps I)^(-1/2) / sqrt(m)    (ZCA: the whitening closest to the input)
        y  = xc W
    ## Small groups keep C well conditioned at small batches (rank(xc) <= N-1, so S < N);
    ## shuffling the axes into new groups at every call (a fresh random permutation, undone
    ## after whitening) decorrelates every pair of axes over training, not only pairs in a group.
    groups=1 is full ZCA whitening (DBN); shuffle=False is grouped DBN; groups=D is per-axis
    standardization, y = xc / sqrt(var (1 + eps)), which `--decorr bn` uses. With eps = 0 this
    is the authors' layer. Statistics always come from the batch (no running averages, as
    theirs), in `dtype` and outside autocast: the whitening of a badly conditioned group needs
    the precision. Under torchrun they are the global batch's (Appendix B).

    x: N x D, or V x N x D for V views at once (each view its own statistics and its own
    permutation: the same as V calls) -> same shape and dtype. The last permutation drawn
    (D, or V x D) is kept in `last_perm`. The permutations come from torch's global RNG."""

    def __init__(self, num_features, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64, method="eigh"):
        super().__init__()
        if groups < 1 or num_features % groups:
            raise ValueError(f"groups={groups} must divide num_features={num_features}")
        if method not in ("eigh", "newton"):
            raise ValueError(f"method must be 'eigh' or 'newton', not {method!r}")
        if eps < 0:
            raise ValueError("eps must be >= 0")
        self.num_features, self.groups, self.eps, self.dtype, self.method = num_features, groups, eps, dtype, method
        self.shuffle = shuffle and 1 < groups < num_features  # one group, or groups of one: order is moot
        self.last_perm = None

    def extra_repr(self):
        return (f"{self.num_features}, groups={self.groups}, shuffle={self.shuffle}, eps={self.eps}, "
                f"dtype={self.dtype}, method={self.method}")

    def forward(self, x):
        *_, n, d = x.shape
        if d != self.num_features or x.dim() not in (2, 3):
            raise ValueError(f"expected (V x) N x {self.num_features} features, got {tuple(x.shape)}")
        if n < 2:
            raise ValueError("whitening needs a batch of at least 2")
        dtype = torch.float32 if x.device.type == "mps" else self.dtype  # MPS has no float64
        h = x.to(dtype).reshape(-1, n, d)  # V x N x D
        v, g, s = h.shape[0], self.groups, d // self.groups
        perm = None
        if self.shuffle:  # one permutation per view, drawn on the device (no host copy)
            perm = torch.stack([torch.randperm(d, device=x.device) for _ in range(v)])
            h = h.gather(2, perm[:, None, :].expand(v, n, d))
        h = h.reshape(v, n, g, s).transpose(1, 2)  # V x G x N x S
        sync = self.training and distributed()
        hc = h - batch_average(h.sum(2, keepdim=True), n, sync)
        if s == 1:  # per-axis standardization: C is the 1x1 variance, W = 1/sqrt(var (1 + eps))
            var = batch_average((hc * hc).sum(2, keepdim=True), n, sync)
            y = hc * torch.where(var > 0, var * (1 + self.eps), torch.ones_like(var)).rsqrt()
        else:
            cov = batch_average(hc.transpose(2, 3) @ hc, n, sync)  # V x G x S x S
            y = hc @ whitening_matrix(cov, self.eps, self.method)
        y = y.transpose(1, 2).reshape(v, n, d)
        if perm is not None:  # every axis back to its own place
            y = torch.empty_like(y).scatter_(2, perm[:, None, :].expand(v, n, d), y)
        self.last_perm = None if perm is None else perm[0] if x.dim() == 2 else perm
        return y.reshape(x.shape).to(x.dtype)


def normalization_layer(kind, dim, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64, method="eigh"):
    """The layer after the projector, by the paper's three cases:
    none -> identity (complete collapse); bn -> per-axis standardization over the batch, no
    affine (dimensional collapse); zca -> GroupWhitening (decorrelated, the paper's method)."""
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return GroupWhitening(dim, groups=dim, shuffle=False, eps=eps, dtype=dtype)
    return GroupWhitening(dim, groups=groups, shuffle=shuffle, eps=eps, dtype=dtype, method=method)


# =============================================================================================
# 5. Model: encoder -> projector -> normalization layer -> (predictor)
## Everything downstream of training (k-NN, linear probe) uses only the encoder's output.
# =============================================================================================


def resnet18_cifar():
    """torchvision's ResNet-18 in its CIFAR form: 3x3 stride-1 first conv, no max-pool, the
    classifier removed. N x 3 x 32 x 32 -> N x 512."""
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32 px images: keep the resolution
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


def small_convnet():
    """Four conv-BN-ReLU layers and average pooling, for CPU runs and tests. N x 3 x H x W -> N x 256."""
    layers, c = [], 3
    for i, width in enumerate((32, 64, 128, 256)):
        layers += [nn.Conv2d(c, width, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(width),
                   nn.ReLU(inplace=True)]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256


def mlp(in_dim, hidden, out_dim):
    """Linear -> BN -> ReLU -> Linear: the projector (512 -> 1024 -> 512 in the paper) and the
    optional predictor (D -> 256 -> D). N x in_dim -> N x out_dim. No normalization at the
    end: after the projector, that is the job of the paper's layer."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


def full_precision(x):
    # Leaves any surrounding autocast: whitening and metrics must not run in bf16/fp16.
    return torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext()


class SiameseNet(nn.Module):
    """One network applied to both views.
    ## Each view goes through the encoder and projector in its own call, so each gets its own
    ## BatchNorm statistics, as in the authors' code; the normalization layer then takes both
    ## views in one call, each with its own statistics and shuffle (the same as two calls).
    forward(x1, x2), x: N x 3 x H x W -> (p1, p2, z1, z2), each N x D: z is the normalized
    projector output, p = predictor(z) (p = z without a predictor)."""

    def __init__(self, encoder, feat_dim, projector, norm, predictor=None):
        super().__init__()
        self.encoder, self.feat_dim, self.projector = encoder, feat_dim, projector
        self.norm, self.predictor = norm, predictor

    def project(self, x):
        """Projector output before the normalization layer: N x 3 x H x W -> N x D."""
        return self.projector(self.encoder(x))

    def normalize(self, y):
        """The paper's layer, in float32/64 outside autocast: (V x) N x D -> same, float32."""
        with full_precision(y):
            return self.norm(y.float())

    def forward(self, x1, x2):
        z1, z2 = self.normalize(torch.stack([self.project(x1), self.project(x2)]))
        if self.predictor is None:
            return z1, z2, z1, z2
        return self.predictor(z1), self.predictor(z2), z1, z2


def build_model(cfg, whiten_method="eigh"):
    encoder, feat_dim = resnet18_cifar() if cfg.arch == "resnet18" else small_convnet()
    norm = normalization_layer(cfg.decorr, cfg.proj_dim, cfg.groups, cfg.shuffle, cfg.eps,
                               getattr(torch, cfg.whiten_dtype), whiten_method)
    pred = mlp(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim) if cfg.predictor else None
    return SiameseNet(encoder, feat_dim, mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim), norm, pred)


# =============================================================================================
# 6. Loss
# =============================================================================================


def siamese_loss(p1, p2, z1, z2, kind="l2", stop_grad=False):
    """Symmetric distance between each view's prediction and the other view's output.
    l2: mean over the batch of ||p - z||^2 summed over axes (the paper's loss; with no
    predictor it is exactly mean ||z1 - z2||^2, of order D once the output is whitened).
    cosine: negative cosine similarity, in [-1, 1] (SimSiam). stop_grad: the target z gets no
    gradient. p, z: N x D -> scalar."""
    if stop_grad:
        z1, z2 = z1.detach(), z2.detach()

    def distance(p, z):
        p, z = p.float(), z.float()
        if kind == "l2":
            return (p - z).pow(2).sum(1).mean()
        return -F.cosine_similarity(p, z, dim=1).mean()

    return 0.5 * (distance(p1, z2) + distance(p2, z1))


# =============================================================================================
# 7. Collapse metrics
# =============================================================================================


@torch.no_grad()
def collapse_metrics(z):
    """The paper's measurements of collapse, for features z: N x D (computed in float64).
      std           mean over axes of the per-axis std of z. Falls to 0 under complete collapse.
      std_l2        mean over axes of the std of z / ||z||. About 1/sqrt(D) when the outputs
                    spread over the sphere, 0 when they all point one way (SimSiam's measure).
      corr_strength mean |R_ij| over i != j of the Pearson correlation matrix R (axes with zero
                    variance count as uncorrelated). Near 1 under dimensional collapse.
      eff_rank      exp(entropy of p), p = singular values of the centred z / their sum
                    (Roy & Vetterli; RankMe). 1 for rank-1 features, D for isotropic ones.
      spectrum      covariance eigenvalues, descending, divided by the largest (D floats).
    Returns a dict of Python floats."""
    z = z.detach()
    z = (z.cpu() if z.device.type == "mps" else z).double()  # MPS has no float64
    n, d = z.shape
    std = z.std(0, correction=0)
    std_l2 = F.normalize(z, dim=1).std(0, correction=0)
    zc = z - z.mean(0)
    cov = zc.T @ zc / n
    sd = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(sd, sd)
    r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    off = ~torch.eye(d, dtype=torch.bool, device=z.device)
    corr = r.abs()[off].mean() if d > 1 else torch.zeros((), dtype=z.dtype)
    evals = small_eigh(cov, eigenvalues_only=True).flip(0).clamp_min(0)
    sv = (evals * n).sqrt()
    if sv.sum() > 0:
        p = sv / sv.sum()
        eff_rank = torch.exp(-(p * p.clamp_min(1e-300).log()).sum())
        spectrum = evals / evals[0]
    else:
        eff_rank, spectrum = torch.zeros(()), torch.zeros(d)
    return {"std": std.mean().item(), "std_l2": std_l2.mean().item(), "corr_strength": corr.item(),
            "eff_rank": eff_rank.item(), "spectrum": [float(f"{v:.4g}") for v in spectrum.tolist()]}


@contextlib.contextmanager
def train_mode_frozen_buffers(model):
    """Runs a module in train mode (batch statistics, as in training) and puts every buffer
    (BatchNorm running statistics) back afterwards: measuring must not change the model."""
    saved, was_training = {k: v.clone() for k, v in model.named_buffers()}, model.training
    model.train()
    try:
        yield
    finally:
        with torch.no_grad():
            for k, v in model.named_buffers():
                v.copy_(saved[k])
        model.train(was_training)


@torch.no_grad()
def measure_collapse(net, metric_x, backbone_feats, batch, machine, n_total):
    """collapse_metrics at three stages. backbone: the eval-mode features k-NN uses.
    projector (before the paper's layer) and normalized (after it): fixed training images in
    train mode, in chunks of the training batch.
    ## Train mode, because that is how the network computes the outputs it trains on: in eval
    ## mode BatchNorm's running averages lag behind and can make a collapsing output look healthy."""
    outs = []
    with train_mode_frozen_buffers(net), machine.autocast():
        for x in metric_x.split(batch):  # full batches: the metric set is a multiple of the batch
            y = net.project(network_input(x, machine))
            outs.append(torch.cat([y.float(), net.normalize(y)], 1))
    yz = gather_shards(torch.cat(outs), n_total)  # all processes' images (Appendix B)
    d = yz.shape[1] // 2
    return {"backbone": collapse_metrics(backbone_feats), "projector": collapse_metrics(yz[:, :d]),
            "normalized": collapse_metrics(yz[:, d:])}


# =============================================================================================
# 8. Evaluation: k-NN monitor and linear probe, on the frozen backbone
# =============================================================================================


@torch.no_grad()
def encode(encoder, x, machine, batch=1024):
    """Eval-mode backbone features of uint8 images x (no augmentation). -> N x F float32."""
    was = encoder.training
    encoder.eval()
    with machine.autocast():
        feats = [encoder(network_input(xb, machine)).float() for xb in x.split(batch)]
    encoder.train(was)
    return torch.cat(feats) if feats else torch.zeros(0, 1, device=x.device)


@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, t=0.1, chunk=1024):
    """Weighted k-NN classification (Wu et al. 2018, the SSL monitor): features are
    l2-normalized, each test point takes its k most cosine-similar training points, each votes
    for its class with weight exp(sim / t), and the class with the largest total wins.
    train_feats: M x F, test_feats: N x F, labels int. Whole test set, in chunks. -> percent."""
    bank = F.normalize(train_feats.float(), dim=1)
    bank_y = train_labels.to(bank.device)
    classes = int(max(bank_y.max().item(), test_labels.max().item())) + 1
    k = min(k, len(bank))
    correct = 0
    for q, y in zip(test_feats.split(chunk), test_labels.split(chunk)):
        sim, idx = (F.normalize(q.float().to(bank.device), dim=1) @ bank.T).topk(k, dim=1)
        scores = torch.zeros(len(q), classes, device=bank.device).scatter_add_(1, bank_y[idx], (sim / t).exp())
        correct += (scores.argmax(1) == y.to(bank.device)).sum().item()
    return 100.0 * correct / len(test_feats)


PROBE_SEED_STRIDE = 7919  # a prime: each process's probe crops get a stream of their own


def linear_accuracy(encoder, feat_dim, train, test, num_classes, epochs, machine, seed, progress=True):
    """Linear probe: a Linear(F, classes) on the frozen eval-mode backbone, cross-entropy, SGD
    momentum 0.9, lr 30, no weight decay, batch 256, cosine over `epochs` (paper: 100);
    training images get RandomResizedCrop(scale 0.08-1, bicubic) + flip, as the authors; test
    images come already in the evaluation view (eval_transform, unless --raw-eval).
    train, test: (uint8 images of this process's shard, labels of the whole split). -> percent.
    Each epoch's features are gathered from all processes (Appendix B), so every process
    trains the same classifier on the same data, exactly as one process would."""
    gen = torch.Generator(device=machine.device).manual_seed(seed + PROBE_SEED_STRIDE * (machine.rank + 1))
    order_gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(feat_dim, num_classes).to(machine.device)
    opt = torch.optim.SGD(clf.parameters(), lr=30.0, momentum=0.9, weight_decay=0.0)
    n = len(train[1])
    steps = max(1, math.ceil(n / 256)) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    labels = train[1].to(machine.device)
    encoder.eval()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not (progress and machine.main), leave=False):
        with torch.no_grad(), machine.autocast():
            feats = [encoder(network_input(random_resized_crop_flip(
                to_float(xb), scale=(0.08, 1.0), generator=gen, mode="bicubic"), machine)).float()
                for xb in train[0].split(1024)]
        feats = gather_shards(torch.cat(feats), n)
        for idx in torch.randperm(n, generator=order_gen).to(machine.device).split(256):
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    test_feats = gather_shards(encode(encoder, test[0], machine), len(test[1]))
    with torch.no_grad():
        pred = clf(test_feats).argmax(1)
    return 100.0 * (pred == test[1].to(machine.device)).float().mean().item()


@dataclass
class DeviceImages:
    """This process's images on its device, uint8 (under torchrun each process holds every
    world-th image, Appendix B)."""
    train_all: torch.Tensor  # all of this process's training images (linear-probe crops)
    train: torch.Tensor  # the same, cut to equal shards (SSL steps: every process takes as many)
    bank: torch.Tensor  # the evaluation view of the training images (the k-NN bank)
    test: torch.Tensor  # the evaluation view of the test images
    metric: torch.Tensor  # fixed training images for the projector metrics
    n_metric: int  # their number over all processes


def evaluate(net, data, images, cfg, machine):
    """k-NN accuracy and collapse metrics of the current model. -> (percent, metrics)."""
    share_buffers(net)  # under torchrun: BatchNorm statistics as on process 0 (Appendix B)
    train_f = gather_shards(encode(net.encoder, images.bank, machine), len(data.train_y))
    test_f = gather_shards(encode(net.encoder, images.test, machine), len(data.test_y))
    acc = knn_accuracy(train_f, data.train_y, test_f, data.test_y, cfg.knn_k, cfg.knn_t)
    metrics = measure_collapse(net, images.metric, test_f, cfg.batch_size // machine.world, machine,
                               images.n_metric)
    if cfg.decorr == "zca" and metrics["normalized"]["std"] < 0.9:
        ## A whitened axis has std sqrt(l / (l + eps m)) < 1 only where the group's eigenvalue
        ## l is down at eps x its mean: the network has found that eps lets it drop directions.
        print0(machine, f"warning: the whitened output is not white (per-axis std "
                        f"{metrics['normalized']['std']:.2f}, should be 1): eps is damping directions "
                        f"the network collapsed; try a smaller --eps")
    return acc, metrics


# =============================================================================================
# 9. Training
# =============================================================================================


def lr_at(step, total, warmup, peak):
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# Random streams. Each is re-seeded from (seed, epoch, stream, rank) at the start of every
# epoch, so a run resumed from a checkpoint draws exactly what the uninterrupted run would.
# The mixing constants are primes larger than what they separate (ranks < 101, streams < 10,
# epochs < 1,000,003), so two different tuples never share a seed.
SHUFFLE_STREAM, ORDER_STREAM, AUGMENT_STREAM = 0, 1, 2


def epoch_seed(cfg, epoch, rank=0, stream=0):
    return (cfg.seed * 1_000_003 + epoch) * 1009 + stream * 101 + rank


class Diverged(Exception):
    """The loss became NaN or inf: main() stops with exit code 1 and names the last checkpoint."""


@dataclass
class Trainer:
    """Everything one SGD step touches. `step(x) -> loss` runs one step on a uint8 batch: the
    eager train_step below, or its CUDA-graph replay (Appendix C)."""
    cfg: argparse.Namespace
    machine: Machine
    net: SiameseNet
    model: nn.Module  # net, or its DistributedDataParallel wrapper under torchrun
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # only active under --precision fp16
    aug_gen: torch.Generator  # the augmentations' random stream, on the device
    step_kind: str = "eager"  # or "graph"
    step: object = None


def build_trainer(cfg, machine, steps_per_epoch, step_kind="eager"):
    """Model, SGD (lr x batch/256, warm-up then cosine, per step) and the augmentation stream."""
    whiten = cfg.whiten if cfg.whiten != "auto" else "newton" if step_kind == "graph" else "eigh"
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, whiten).to(machine.device, memory_format=machine.memory_format)
    net, model = wrap_for_processes(net, cfg, machine)  # DDP and SyncBatchNorm (Appendix B)
    peak_lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total, warm = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warm, 1.0))
    scaler = torch.amp.GradScaler(machine.device.type, enabled=machine.amp_dtype == torch.float16)
    tr = Trainer(cfg, machine, net, model, opt, sched, scaler, torch.Generator(device=machine.device), step_kind)
    tr.step = lambda x: train_step(tr, x)
    return tr


def sgd_step(tr, x):
    """Two augmented views of the uint8 batch x (N x 3 x H x W), the Siamese loss, backward and
    the SGD update. -> the loss, a device tensor (reading it would wait for the GPU).
    Nothing in it waits for the host, so a CUDA graph can hold it whole (Appendix C)."""
    ## Both views in one call: every image draws its own crop, flip and colours anyway, and
    ## one call on 2N images launches half the kernels of two calls on N.
    v1, v2 = augment(torch.cat([x, x]), tr.aug_gen).contiguous(memory_format=tr.machine.memory_format).chunk(2)
    with tr.machine.autocast():
        loss = siamese_loss(*tr.model(v1, v2), kind=tr.cfg.loss, stop_grad=tr.cfg.stop_grad)
    tr.opt.zero_grad(set_to_none=True)
    tr.scaler.scale(loss).backward()
    tr.scaler.step(tr.opt)
    tr.scaler.update()
    return loss.detach()


def train_step(tr, x):
    """One training step: sgd_step, then the learning-rate schedule. -> loss (device tensor)."""
    loss = sgd_step(tr, x)
    tr.sched.step()
    return loss


def current_lr(opt):
    return float(opt.param_groups[0]["lr"])  # a float, or a 0-dim tensor in the graph step


def train_one_epoch(tr, train_x, epoch):
    """One pass over this process's images, one tr.step per batch. -> (mean loss, images/s)."""
    cfg, machine = tr.cfg, tr.machine
    batch = cfg.batch_size // machine.world
    steps = len(train_x) // batch  # drop_last, as the authors
    seed = lambda stream, rank=machine.rank: epoch_seed(cfg, epoch, rank, stream)
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed(ORDER_STREAM)))
    order = order.to(machine.device)
    tr.aug_gen.manual_seed(seed(AUGMENT_STREAM))
    torch.manual_seed(seed(SHUFFLE_STREAM, rank=0))  # the whitening's shuffles: the same on every process
    tr.model.train()
    loss_sum = torch.zeros((), device=machine.device)
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and machine.main),
               leave=False, dynamic_ncols=True)
    sync_device()
    t0 = time.perf_counter()
    for i in bar:
        try:
            loss_sum += tr.step(train_x[order[i * batch:(i + 1) * batch]])
        except torch.linalg.LinAlgError:  # NaN/inf features reach eigh before the loss check
            raise Diverged(f"the whitening's eigendecomposition failed at epoch {epoch}, step {i + 1} "
                           f"(non-finite or degenerate features)") from None
        if i % 25 == 24 or i == steps - 1:  # .item() waits for the GPU: only now and then
            mean = loss_sum.item() / (i + 1)
            if not math.isfinite(mean):
                raise Diverged(f"loss is {mean} at epoch {epoch}, step {i + 1}")
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{current_lr(tr.opt):.4g}",
                            img_s=f"{(i + 1) * cfg.batch_size / (time.perf_counter() - t0):.0f}")
    sync_device()
    seconds = time.perf_counter() - t0
    return loss_sum.item() / max(1, steps), steps * cfg.batch_size / max(seconds, 1e-9)


def sync_device():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def train(run):
    """The training loop: evaluate the random network, then per epoch train, evaluate when
    due, log, checkpoint. Every epoch is saved, so an interrupted run loses at most one.
    -> (k-NN accuracy, collapse metrics) of the last evaluation, None if no epoch was left."""
    cfg, tr = run.cfg, run.tr
    final = None
    run.t0 = time.perf_counter() - run.elapsed
    if not run.resumed:  # epoch 0: the random network, the baseline every curve starts from
        acc, metrics = evaluate(tr.net, run.data, run.images, cfg, run.machine)
        log_epoch(run, {"epoch": 0, "loss": None, "lr": None, "images_per_s": None,
                        "knn_acc": acc, "collapse": metrics})
        save_checkpoint(run, 0)
    for epoch in range(run.start + 1, cfg.epochs + 1):
        check_graph_inputs(tr)  # Appendix C: nothing the graph holds was replaced
        try:
            loss, ips = train_one_epoch(tr, run.images.train, epoch)
        except Diverged as e:
            raise Diverged(f"{e}; the last good checkpoint is {run.path('checkpoint.pt')} "
                           f"(epoch {epoch - 1}). Try a lower --lr") from None
        row = {"epoch": epoch, "loss": loss, "lr": current_lr(tr.opt), "images_per_s": ips}
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            final = evaluate(tr.net, run.data, run.images, cfg, run.machine)
            row.update(knn_acc=final[0], collapse=final[1])
        log_epoch(run, row)
        save_checkpoint(run, epoch)
    return final


# =============================================================================================
# 10. Main: settings -> machine -> data -> trainer (-> resume) -> train -> linear probe
# =============================================================================================


@dataclass
class Run:
    """A training run: its settings, machine, data, trainer and folder."""
    cfg: argparse.Namespace
    machine: Machine
    data: Data
    images: DeviceImages
    tr: Trainer
    resumed: bool = False
    start: int = 0  # the last finished epoch (0: only the random network evaluated)
    elapsed: float = 0.0  # seconds of this run so far, time before a --resume included
    t0: float = 0.0

    def path(self, name):
        return os.path.join(self.cfg.out, name)


def images_on_device(data, cfg, machine):
    """This process's shard of the images, moved to its device once (see DeviceImages)."""
    r, w = machine.rank, machine.world
    n_metric = min(cfg.metric_samples, len(data.train_y)) // cfg.batch_size * cfg.batch_size or cfg.batch_size
    metric_idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.seed))[:n_metric]
    view = (lambda x: x) if cfg.raw_eval else eval_transform
    train_all = data.train_x[r::w].to(machine.device)
    return DeviceImages(train_all=train_all, train=train_all[: len(data.train_y) // w],
                        bank=train_all if cfg.raw_eval else view(data.train_x[r::w]).to(machine.device),
                        test=view(data.test_x[r::w]).to(machine.device),
                        metric=data.train_x[metric_idx][r::w].to(machine.device), n_metric=n_metric)


def start_run(cfg, machine, resuming):
    """Run folder, data, trainer; with --resume, the checkpoint's state; then the step."""
    if machine.device.type == "cpu":
        print0(machine, "note: running on the CPU: fine for --arch small and subsets, very slow for a full run")
    name = f"{cfg.dataset}-{cfg.decorr}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.out = shared_value(cfg.out or os.path.join("runs", name))  # process 0's choice (Appendix B)
    if not resuming and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        raise UsageError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")
    data = load_data(cfg)
    if len(data.train_y) < cfg.batch_size:
        raise UsageError(f"only {len(data.train_y)} training images for a batch of {cfg.batch_size}")
    images = images_on_device(data, cfg, machine)
    kind, why = choose_step(cfg, machine)  # Appendix C
    if why:
        print0(machine, f"note: {why}")
    newton = cfg.whiten == "newton" or (cfg.whiten == "auto" and kind == "graph")
    if cfg.decorr == "zca" and newton and cfg.whiten_dtype == "float32":
        print0(machine, "note: float32 Newton-Schulz leaks about 2e-3 of the output of a rank-deficient group "
                        "into its null directions (README); the default float64 does not")
    batch = cfg.batch_size // machine.world
    tr = build_trainer(cfg, machine, len(images.train) // batch, kind)
    run = Run(cfg, machine, data, images, tr, resumed=resuming)
    if resuming:
        state = load_checkpoint(run.path("checkpoint.pt"), machine.device)
        for part, obj in (("model", tr.net), ("optimizer", tr.opt), ("scheduler", tr.sched), ("scaler", tr.scaler)):
            obj.load_state_dict(state[part])
        run.start, run.elapsed = state["epoch"], state["elapsed"]
    make_step(tr, (batch, *images.train.shape[1:]))  # after the loads: a graph keeps its tensors
    if machine.main:
        rows = [row for row in read_log(run.path("log.jsonl")) if row["epoch"] <= run.start] if resuming else []
        os.makedirs(cfg.out, exist_ok=True)
        write_atomic(run.path("log.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))  # drop redone rows
        write_atomic(run.path("config.json"), json.dumps({**vars(cfg), **step_record(tr)}, indent=2))
    return run


def describe(run):
    cfg, m = run.cfg, run.machine
    norm = f"decorr={cfg.decorr}" + (f" groups={cfg.groups} shuffle={cfg.shuffle}" if cfg.decorr == "zca" else "")
    return (f"fdsl: {cfg.dataset} ({len(run.data.train_y)} train / {len(run.data.test_y)} test), {cfg.arch}, "
            f"{norm}, batch {cfg.batch_size}, lr {cfg.lr * cfg.batch_size / 256:.4g}, {cfg.epochs} epochs on "
            f"{m.device}" + (f" x{m.world} processes" if m.world > 1 else "") + f", {run.tr.step_kind} step"
            + f" -> {cfg.out}")


HEADER = (f"{'epoch':>5} {'loss':>10} {'lr':>9} {'img/s':>8} {'knn %':>6} | "
          f"{'projector: std':>14} {'corr':>5} {'erank':>6} | {'time':>7}")


def log_epoch(run, row):
    """Appends a row to log.jsonl and prints it as a line of the table."""
    run.elapsed = row["time"] = time.perf_counter() - run.t0
    if not run.machine.main:
        return
    with open(run.path("log.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    p = row.get("collapse", {}).get("projector")
    cell = lambda key, fmt, width: format(row[key], fmt) if row.get(key) is not None else " " * width
    proj = f"{p['std']:14.4g} {p['corr_strength']:5.2f} {p['eff_rank']:6.1f}" if p else " " * 27
    print0(run.machine, f"{row['epoch']:5d} {cell('loss', '10.4g', 10)} {cell('lr', '9.3g', 9)} "
                        f"{cell('images_per_s', '8.0f', 8)} {cell('knn_acc', '6.2f', 6)} | {proj} | {row['time']:7.1f}")


def save_checkpoint(run, epoch):
    """model, optimizer, schedule, loss scaler, epoch and settings, after every epoch."""
    if run.machine.main:
        tr = run.tr
        state = {"model": tr.net.state_dict(), "optimizer": portable(tr.opt.state_dict()),
                 "scheduler": tr.sched.state_dict(), "scaler": tr.scaler.state_dict(), "epoch": epoch,
                 "elapsed": run.elapsed, "config": vars(run.cfg)}
        tmp = run.path("checkpoint.pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, run.path("checkpoint.pt"))  # a crash mid-write keeps the previous one


def finish_run(run, final):
    """Linear probe and results.json. final: train()'s last evaluation, or None (a run resumed
    after its last epoch, interrupted in the probe), which measures the final state again."""
    cfg, tr, machine = run.cfg, run.tr, run.machine
    acc, metrics = final or evaluate(tr.net, run.data, run.images, cfg, machine)
    rows = read_log(run.path("log.jsonl")) if machine.main else []  # the whole run, resumed parts included
    speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    results = {"knn_acc": acc, "collapse": metrics, "epochs": cfg.epochs,
               "images_per_s": sum(speeds) / len(speeds) if speeds else None,
               "knn_curve": [[r["epoch"], r["knn_acc"]] for r in rows if "knn_acc" in r], **step_record(tr)}
    if cfg.linear_epochs > 0:
        t0 = time.perf_counter()
        results["linear_acc"] = linear_accuracy(
            tr.net.encoder, tr.net.feat_dim, (run.images.train_all, run.data.train_y),
            (run.images.test, run.data.test_y), len(run.data.classes), cfg.linear_epochs, machine, cfg.seed,
            cfg.progress)
        results["linear_time_s"] = time.perf_counter() - t0
        print0(machine, f"linear probe ({cfg.linear_epochs} epochs): {results['linear_acc']:.2f}%")
    results["time_s"] = time.perf_counter() - run.t0
    results["device"] = str(machine.device) + (f" x{machine.world}" if machine.world > 1 else "")
    if machine.main:
        write_atomic(run.path("results.json"), json.dumps(results, indent=2))
        print0(machine, f"k-NN {acc:.2f}% after {cfg.epochs} epochs, {results['time_s']:.0f} s; "
                        f"results in {run.path('results.json')}")
    return results


def run(cfg, resuming):
    check_config(cfg, process_ranks()[1])
    if cfg.plot:
        return plot_runs(cfg.plot, cfg.out)
    if cfg.benchmark and process_ranks()[1] > 1:
        raise UsageError("--benchmark times one process; run it without torchrun")
    machine = setup_machine(cfg)
    if cfg.benchmark:
        return benchmark(cfg, machine)
    if resuming and os.path.isfile(os.path.join(cfg.out, "results.json")):
        results = read_json(os.path.join(cfg.out, "results.json"))
        print0(machine, f"fdsl: {cfg.out} is a finished run ({cfg.epochs} epochs, k-NN "
                        f"{results.get('knn_acc', 0):.2f}%); a finished run cannot be extended: "
                        f"start a new one with more --epochs")
        return results
    r = start_run(cfg, machine, resuming)
    if resuming:
        print0(machine, f"resuming {cfg.out} after epoch {r.start}")
    print0(machine, describe(r))
    print0(machine, HEADER)
    return finish_run(r, train(r))


def main(argv=None):
    """Command line entry point. Returns the results dict (also written to OUT/results.json):
    knn_acc (percent), linear_acc (when run), collapse (final metrics by stage), images_per_s,
    epochs, knn_curve, time_s, train_step, whiten; with --benchmark, the timings instead.
    Bad input: one line on stderr, exit code 2. A diverged run: exit 1. Ctrl-C: exit 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = process_ranks()[0] != 0
    cfg = None
    try:
        cfg, resuming = resolve_config(argv)
        return run(cfg, resuming)
    except UsageError as e:
        if not quiet:
            print(f"fdsl: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except Diverged as e:
        if not quiet:
            print(f"fdsl: stopped: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        if not quiet:
            out = getattr(cfg, "out", "")
            saved = out and os.path.exists(os.path.join(out, "checkpoint.pt"))
            print("\nfdsl: interrupted; " + (f"finished epochs are saved; continue with: python fdsl.py --resume {out}"
                                             if saved else "no epoch was finished, nothing to resume"), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        end_processes()


# =============================================================================================
# Appendix A. Numerics of C^(-1/2)                          (skippable: the method is above)
# How the whitening matrix is computed, accurately and with finite gradients. Two methods
# give the same W: eigh (exact; the reference) and Newton-Schulz (matrix products only, so a
# CUDA graph can hold it). In float64 they agree to 1e-8 or better (tests).
# =============================================================================================


def whitening_eps(eps, size, dtype):
    """The relative eps a group of `size` axes gets in `dtype`: at least size x machine epsilon.
    Rounding moves the eigenvalues of C / m (the largest is at most S) by about that much, so a
    smaller eps would not keep them positive (float32 Newton-Schulz turned NaN on
    rank-deficient groups): 3.8e-6 for 32 axes in float32, 7e-15 in float64."""
    return max(eps, size * torch.finfo(dtype).eps)


def inverse_sqrt(a, floor, method="eigh"):
    """A^(-1/2) for symmetric positive definite matrices a: ... x S x S whose eigenvalues are
    at least `floor` in exact arithmetic (whitening_matrix guarantees it)."""
    if method == "eigh":
        return _InvSqrtEigh.apply(a, floor)
    return inverse_sqrt_newton(a, newton_iterations(a.shape[-1], floor))


def small_eigh(a, eigenvalues_only=False):
    """torch.linalg.eigh / eigvalsh for the small symmetric matrices of this file (32x32 groups,
    a 512x512 covariance). On the CPU it runs single-threaded: MKL's threaded eigensolver on such
    sizes was measured 25 to 500 times slower than one thread on a 2-core machine."""
    fn = torch.linalg.eigvalsh if eigenvalues_only else torch.linalg.eigh
    if a.device.type == "mps":  # no eigensolver on Apple GPUs: solve on the CPU (differentiably)
        out = small_eigh(a.cpu(), eigenvalues_only)
        return out.to(a.device) if eigenvalues_only else tuple(t.to(a.device) for t in out)
    if a.device.type != "cpu" or torch.get_num_threads() == 1:
        return fn(a)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn(a)
    finally:
        torch.set_num_threads(threads)


class _InvSqrtEigh(torch.autograd.Function):
    # A^(-1/2) by eigendecomposition, with the gradient in closed form instead of autograd
    # through eigh. For A = U diag(l) U^T and W = U diag(l^-1/2) U^T (Daleckii-Krein):
    #     dL/dA = U (K o U^T sym(dL/dW) U) U^T,   K_ij = (l_i^-1/2 - l_j^-1/2) / (l_i - l_j)
    #                                                 = -1 / (s_i s_j (s_i + s_j)),  s = sqrt(l).
    # The second form has no 1/(l_i - l_j): repeated eigenvalues (duplicated axes, rank-deficient
    # groups) give a finite gradient, where autograd through eigh's eigenvectors gives inf/NaN.
    @staticmethod
    def forward(ctx, a, floor):
        evals, evecs = small_eigh(a)
        # In exact arithmetic every eigenvalue is >= floor (= eps); rounding can push the
        # smallest below it, or below 0 in float32. Clamping undoes only that rounding.
        s = evals.clamp_min(floor).sqrt()
        ctx.save_for_backward(evecs, s)
        return (evecs / s.unsqueeze(-2)) @ evecs.mT

    @staticmethod
    def backward(ctx, grad):
        u, s = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        k = -1.0 / (si * sj * (si + sj))
        g = u.mT @ (0.5 * (grad + grad.mT)) @ u
        return u @ (k * g) @ u.mT, None


def newton_iterations(size, eps, tol=1e-15):
    """How many coupled Newton-Schulz steps reach A^(-1/2) for every matrix the layer can meet.
    The iteration acts on each eigenvalue of A / tr(A) alone: with p = y*z, p <- p (3 - p)^2 / 4,
    and the relative error of z is (1 - p) / 2. After the relative eps, tr(A) = size (1 + eps)
    and every eigenvalue is >= eps, so p starts at >= eps / (size (1 + eps)): run the scalar
    recurrence from there until 1 - p < tol. A count fixed by (size, eps), never by the data
    (32 for 32 axes at eps 1e-8, 35 for 256)."""
    p, steps = eps / (size * (1 + eps)), 0
    while 1 - p > tol:
        p, steps = p * (3 - p) ** 2 / 4, steps + 1
    return steps


def inverse_sqrt_newton(a, steps):
    """A^(-1/2) for a batch of symmetric positive definite ... x S x S matrices by the coupled
    Newton-Schulz iteration (Higham 2008, eq. 6.35), written with the residual R = (I - ZY) / 2:
        Y_0 = A / tr(A),  Z_0 = I,   Y <- Y + Y R,   Z <- Z + R Z     (Y -> A^(1/2), Z -> A^(-1/2))
    Only matrix products: no eigh, no .item(), no data-dependent branch, so it runs inside a
    CUDA graph, and autograd differentiates through the steps. Y and Z are kept symmetric,
    which halves the float32 rounding error. In float32 on CUDA it needs TF32 matmuls off
    (10-bit mantissas): setup_machine() turns them off for the whole run, backward included.
    In float32 it leaks about 2e-3 (relative) of output into the null directions of an exactly
    rank-deficient group, where eigh leaks 3e-4: the iteration's rounding floor at a fixed
    point with eps^(-1/2)-sized entries (README). float64, the default, has no such leak."""
    size = a.shape[-1]
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y, z = a / trace, eye.expand_as(a)
    for _ in range(steps):
        r = 0.5 * (eye - z @ y)
        yr, rz = y @ r, r @ z
        y, z = y + 0.5 * (yr + yr.mT), z + 0.5 * (rz + rz.mT)
    return z * trace.rsqrt()


# =============================================================================================
# Appendix B. Several GPUs                                  (skippable: one process needs none)
# One process per GPU under torchrun. Each holds every world-th image; the whitening sums its
# statistics over all processes (the global batch), the evaluations gather features from all.
# Every function here is a no-op, or returns its input, in a single process.
# =============================================================================================


def process_ranks():
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) without it."""
    env = os.environ.get
    return int(env("RANK", "0")), int(env("WORLD_SIZE", "1")), int(env("LOCAL_RANK", "0"))


def setup_machine(cfg):
    """The device (CUDA, else MPS, else CPU), the autocast precision, and the processes."""
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    if want == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple MPS is not available")
    rank, world, local = process_ranks()
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True  # convolutions under --precision fp32
        # TF32 matmuls stay off: the only float32 matmuls are the whitening's (forward and
        # backward) and the metrics', which need full precision; the network's run in bf16.
        torch.backends.cuda.matmul.allow_tf32 = False
    init_processes(device, world)
    prec = cfg.precision
    if prec == "auto":
        prec = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if prec != "fp32" and device.type != "cuda":
        raise UsageError(f"--precision {prec} is only supported on CUDA here; use fp32")
    return Machine(device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[prec], rank, world)


def init_processes(device, world):
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def end_processes():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def distributed():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
    """Sum of t over all processes, differentiable, so a statistic of the global batch gets the
    same gradient as on one GPU. (torch.distributed.nn's version is deprecated since 2.x.)"""
    return _AllReduceSum.apply(t) if distributed() else t


def gather_shards(t, n_total):
    """Inverse of `x[rank::world]`: every process gets the rows of all processes, in the
    original order. Used for features, so k-NN and linear evaluation see the whole set."""
    if not distributed():
        return t
    world = dist.get_world_size()
    size = -(-n_total // world)
    padded = torch.zeros(size, *t.shape[1:], dtype=t.dtype, device=t.device)
    padded[: len(t)] = t
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    out = torch.empty(n_total, *t.shape[1:], dtype=t.dtype, device=t.device)
    for r, part in enumerate(parts):
        out[r::world] = part[: len(range(r, n_total, world))]
    return out


def shared_value(value):
    """Process 0's value on every process (the run folder's name, say)."""
    if not distributed():
        return value
    box = [value]
    dist.broadcast_object_list(box, 0)
    return box[0]


def share_buffers(net):
    """Every process takes process 0's buffers (BatchNorm running statistics), whose checkpoint
    is the model, before an evaluation."""
    if distributed():
        for b in net.buffers():
            dist.broadcast(b, 0)


def wrap_for_processes(net, cfg, machine):
    """(net, model): under torchrun, SyncBatchNorm on CUDA (unless --no-sync-bn) and the
    DistributedDataParallel wrapper that averages gradients; (net, net) in one process."""
    if not distributed():
        return net, net
    if cfg.sync_bn and machine.device.type == "cuda":
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    elif cfg.sync_bn:
        print0(machine, "note: SyncBatchNorm needs CUDA; on CPU each process's BatchNorm uses its own "
                        "slice (the normalization layer after the projector is still synchronized)")
    ids = [machine.device.index] if machine.device.type == "cuda" else None
    return net, nn.parallel.DistributedDataParallel(net, device_ids=ids)


# =============================================================================================
# Appendix C. The fast path: the training step as one CUDA graph      (skippable: same step)
# Eagerly, a step on a GPU is hundreds of small kernels, each launched from Python: on one
# H200 the default step took 32.5 ms, of which the GPU was busy about 4 ms. A CUDA graph
# records the whole step once and replays it with one launch. What that asks of the step,
# and how sgd_step meets it: nothing waits for the host (Newton-Schulz, not eigh; no .item());
# the same tensors every time (the batch is copied into a fixed buffer; parameters, buffers,
# momentum and the learning rate change in place, never get replaced); random numbers only
# from generators the graph knows (re-seeded per epoch, a replay draws the same numbers as
# eager code would, so --resume stays exact).
# =============================================================================================

WARMUP_STEPS = 3  # eager steps before capture: cuDNN picks its kernels, SGD creates its state


def choose_step(cfg, machine):
    """("graph" or "eager", None or a one-line reason why the graph is not used)."""
    if machine.device.type != "cuda" or not cfg.graph:
        return "eager", None
    if machine.world > 1:
        why = "under torchrun each step runs eagerly (the CUDA graph is built for one GPU)"
    elif machine.amp_dtype == torch.float16:
        why = "--precision fp16 needs a loss scaler that reads the GPU every step: eager step"
    elif cfg.decorr == "zca" and cfg.whiten == "eigh":
        why = "--whiten eigh waits for the host, which a CUDA graph cannot hold: eager step"
    elif not (hasattr(torch.cuda.CUDAGraph, "register_generator_state") or torch_version() >= (2, 14)):
        why = f"torch {torch.__version__} cannot replay the augmentation's generator in a graph: eager step"
    else:
        return "graph", None
    return "eager", why


def torch_version():
    return tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2])


def make_step(tr, batch_shape):
    """Sets tr.step: the graph replay where tr.step_kind is "graph", else the eager train_step.
    If the capture fails, one line says why and the eager step goes on from the same state."""
    if tr.step_kind == "graph":
        try:
            tr.step = graphed_step(tr, batch_shape)
            return
        except Exception as e:
            tr.step_kind = "eager"
            if tr.cfg.whiten == "auto" and isinstance(tr.net.norm, GroupWhitening):
                tr.net.norm.method = "eigh"  # the same W, and eagerly the faster way
            reason = (str(e).strip().splitlines() or [""])[0][:160]
            print0(tr.machine, f"note: the CUDA graph could not be captured ({type(e).__name__}: {reason}); "
                               f"continuing with the eager step")
    tr.step = lambda x: train_step(tr, x)


def graphed_step(tr, batch_shape, capture=True):
    """train_step as one CUDA graph, with its contract: step(x) -> loss for a uint8 batch x.
    step copies x into the graph's input buffer, replays augmentation, forward, loss, backward
    and SGD, then steps the schedule outside the graph (it fills the learning-rate tensor in
    place). The warm-up steps are undone: training goes on from exactly the state it had.
    capture=False does all of this but calls sgd_step eagerly, which the CPU tests check."""
    device = tr.machine.device
    static_x = torch.zeros(batch_shape, dtype=torch.uint8, device=device)
    saved = save_state(tr)
    graph_optimizer(tr.opt, device)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            warm_up(lambda: sgd_step(tr, static_x), device)
        static_loss, replay = capture_graph(lambda: sgd_step(tr, static_x), [tr.aug_gen]) if capture else (None, None)
    except BaseException:
        restore_state(tr, saved)
        eager_optimizer(tr.opt)
        raise
    restore_state(tr, saved)

    def step(x):
        static_x.copy_(x)
        if replay is None:
            loss = sgd_step(tr, static_x)
        else:
            replay()
            loss = static_loss
        tr.sched.step()
        return loss.clone()  # the next replay overwrites static_loss

    step.holds = graph_inputs(tr)
    return step


def warm_up(fn, device, steps=WARMUP_STEPS):
    """Eager calls of fn before its capture, on a side stream as CUDA graphs require."""
    if device.type != "cuda":
        for _ in range(steps):
            fn()
        return
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(steps):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)


def capture_graph(fn, generators=()):
    """Records fn() once as a CUDA graph. -> (fn's output, replay function). A generator other
    than the default must be registered with the graph on torch 2.11; newer torch registers it
    by itself and deprecates the call (a no-op there), hence the silenced warning."""
    graph = torch.cuda.CUDAGraph()
    for gen in generators:
        if hasattr(graph, "register_generator_state"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph.register_generator_state(gen)
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay


def save_state(tr):
    """Copies of what a step changes: parameters, buffers (BatchNorm statistics), momentum."""
    tensors = [(t, t.detach().clone()) for t in (*tr.net.parameters(), *tr.net.buffers())]
    momentum = {p: s["momentum_buffer"].clone() for p, s in tr.opt.state.items()
                if torch.is_tensor(s.get("momentum_buffer"))}
    return tensors, momentum


def restore_state(tr, saved):
    """Puts the copies back into the same tensors (a graph holds their addresses). A momentum
    buffer made by the warm-up is zeroed: SGD's next step then sets it to the gradient, as it
    does on a first step."""
    tensors, momentum = saved
    with torch.no_grad():
        for t, copy in tensors:
            t.copy_(copy)
        for p, s in tr.opt.state.items():
            if torch.is_tensor(s.get("momentum_buffer")):
                s["momentum_buffer"].copy_(momentum[p]) if p in momentum else s["momentum_buffer"].zero_()


def graph_optimizer(opt, device):
    """SGD as a graph can hold it: the learning rate a 0-dim tensor on the device (LambdaLR
    fills it in place between replays) and, on CUDA, the fused kernel (foreach SGD breaks
    the capture)."""
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), device=device)
        if device.type == "cuda":
            g["fused"], g["foreach"] = True, False


def eager_optimizer(opt):
    for g in opt.param_groups:
        g["lr"], g["fused"], g["foreach"] = float(g["lr"]), None, None


def portable(opt_state):
    """An optimizer state dict as the eager step has it (a float learning rate, the default
    kernel), so a checkpoint of either step resumes with either, on any device."""
    for g in opt_state["param_groups"]:
        g["lr"], g["fused"], g["foreach"] = float(g["lr"]), None, None
    return opt_state


def graph_inputs(tr):
    """Addresses of every tensor the graph reads or updates in place."""
    momentum = [s["momentum_buffer"] for s in tr.opt.state.values() if torch.is_tensor(s.get("momentum_buffer"))]
    lrs = [g["lr"] for g in tr.opt.param_groups if torch.is_tensor(g["lr"])]
    return [t.data_ptr() for t in (*tr.net.parameters(), *tr.net.buffers(), *momentum, *lrs)]


def check_graph_inputs(tr):
    # A parameter, buffer or optimizer tensor replaced after capture (a load_state_dict of the
    # optimizer, say) is silently cut off from the graph: training would go on without it.
    held = getattr(tr.step, "holds", None)
    if held is not None and held != graph_inputs(tr):
        raise RuntimeError("a tensor the CUDA graph updates was replaced after capture; "
                           "load every state before make_step()")


def step_record(tr):
    """Which step and whitening ran: written to config.json and results.json."""
    norm = tr.net.norm
    whitens = isinstance(norm, GroupWhitening) and norm.groups < norm.num_features
    return {"train_step": tr.step_kind, "whiten_method": norm.method if whitens else None}


# =============================================================================================
# Appendix D. Tools: --benchmark, --plot, run files          (skippable: not part of training)
# =============================================================================================


def load_cifar(name, root):
    """CIFAR-10/100 through torchvision: the copy in `root`, else a download there."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        try:
            sets = [cls(root, train=t, download=False) for t in (True, False)]
        except RuntimeError:  # not there yet: fetch it
            sets = [cls(root, train=t, download=True) for t in (True, False)]
    except (OSError, RuntimeError) as e:
        raise UsageError(
            f"{name} is not in {root} and could not be downloaded ({type(e).__name__}: {e}). "
            f"Place the torchvision {name} files in --data-dir, or use --dataset folder --data-dir DIR "
            f"with train/ and test/ image folders, or try --dataset synthetic") from None
    xs = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]
    ys = [torch.tensor(s.targets, dtype=torch.long) for s in sets]
    return Data(xs[0], ys[0], xs[1], ys[1], list(sets[0].classes))


def read_image(path, size):
    """One image file -> 3 x size x size uint8 (shorter side resized, then centre crop)."""
    try:  # torchvision.io decodes JPEG/PNG about 4x faster than PIL
        img = torchvision.io.read_image(path, mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, AttributeError):  # a format it cannot decode (or a torchvision without it)
        from PIL import Image
        with Image.open(path) as im:
            img = TF.pil_to_tensor(im.convert("RGB"))
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return img


def _read_or_report(path, size):
    try:
        return read_image(path, size), None
    except Exception as e:  # a damaged file fails in many ways (OSError, SyntaxError, ...): name it
        return None, f"{path} ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else '?'})"


def load_image_folder(root, size, progress=True):
    """DIR/train and DIR/test (or DIR/val), one sub-folder per class (torchvision's ImageFolder
    layout), decoded once into uint8 tensors. A file that cannot be decoded stops the load with
    its path: silently training on fewer images would make the numbers incomparable."""
    if not os.path.isdir(os.path.join(root, "train")):
        raise UsageError(f"no image folder at {os.path.join(root, 'train')} (--dataset folder "
                         f"expects DIR/train/<class>/* and DIR/test/<class>/*)")
    test_dir = next((os.path.join(root, d) for d in ("test", "val") if os.path.isdir(os.path.join(root, d))), None)
    if test_dir is None:
        raise UsageError(f"no {os.path.join(root, 'test')} or {os.path.join(root, 'val')} folder for evaluation")
    out = []
    for split_dir in (os.path.join(root, "train"), test_dir):
        try:
            folder = torchvision.datasets.ImageFolder(split_dir)
        except (FileNotFoundError, OSError) as e:
            raise UsageError(f"{split_dir}: {e}") from None
        paths = [p for p, _ in folder.samples]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            decoded = list(tqdm(pool.map(lambda p: _read_or_report(p, size), paths, chunksize=256),
                                total=len(paths), desc=f"decoding {split_dir}", disable=not progress, leave=False))
        bad = [err for _, err in decoded if err]
        if bad:
            more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
            raise UsageError(f"{len(bad)} of {len(paths)} images cannot be read: {bad[0]}{more}; "
                             f"remove or replace them")
        imgs = torch.stack([img for img, _ in decoded])
        out.append((imgs, torch.tensor(folder.targets, dtype=torch.long), folder.classes))
    (trx, try_, classes), (tex, tey, test_classes) = out
    if test_classes != classes:
        raise UsageError(f"{test_dir} has classes {test_classes[:5]}... but train has {classes[:5]}...")
    return Data(trx, try_, tex, tey, classes)


SHAPES = ("disk", "square", "triangle", "ring", "cross")


def make_synthetic(n, size=32, seed=0):
    """A labelled image set with real class structure, generated offline, deterministic per
    seed. Class = shape (disk, square, triangle, ring, cross) x texture (plain, striped), 10
    classes; colour, position, size, rotation, stripe frequency and noise vary per image, so
    that only shape and texture carry the label (colour jitter cannot give it away).
    Returns (images N x 3 x size x size uint8, labels N)."""
    g = torch.Generator().manual_seed(seed)
    U = lambda *shape, lo=0.0, hi=1.0: lo + (hi - lo) * torch.rand(*shape, generator=g)
    y = torch.arange(n) % 10
    y = y[torch.randperm(n, generator=g)]
    shape, striped = y % 5, y // 5
    lin = (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(lin, lin, indexing="ij")
    cx, cy, s = U(n, 1, 1, lo=-0.3, hi=0.3), U(n, 1, 1, lo=-0.3, hi=0.3), U(n, 1, 1, lo=0.4, hi=0.65)
    a = U(n, 1, 1, hi=2 * math.pi)
    u = ((xx - cx) * a.cos() + (yy - cy) * a.sin()) / s  # rotated coordinates, unit = shape size
    v = (-(xx - cx) * a.sin() + (yy - cy) * a.cos()) / s
    r = (u * u + v * v).sqrt()
    corners = (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
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


RESUME_KEEPS = ("--resume", "--no-progress", "--device", "--no-graph")  # how to run, not what


def resolve_config(argv):
    """The flags; with --resume DIR, the run's saved settings instead."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if not cfg.resume:
        return cfg, False
    others = [a for a in argv if a.startswith("--") and a.split("=")[0] not in RESUME_KEEPS]
    if others:
        raise UsageError(f"--resume takes the run's saved settings; drop {' '.join(others)}")
    for name in ("checkpoint.pt", "config.json"):
        if not os.path.isfile(os.path.join(cfg.resume, name)):
            raise UsageError(f"--resume {cfg.resume}: no {name} there, so it is not an fdsl run folder")
    resumed = parser.parse_args([])  # defaults first: a run saved before a flag existed still loads
    vars(resumed).update(read_json(os.path.join(cfg.resume, "config.json")))
    vars(resumed).update(resume=cfg.resume, out=cfg.resume, progress=cfg.progress, device=cfg.device,
                         graph=cfg.graph)
    return resumed, True


def load_checkpoint(path, device):
    """A checkpoint read as data: torch.load(weights_only=True) accepts tensors, numbers,
    strings, lists and dicts only, so a checkpoint someone shared cannot run code here."""
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for objects, RuntimeError/EOFError if damaged
        refused = "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError"
        why = ("it holds objects other than tensors and numbers, which could run code; refused"
               if refused else f"damaged or not a checkpoint ({type(e).__name__})")
        raise UsageError(f"{path}: {why}") from None
    keys = set(state) if isinstance(state, dict) else set()
    missing = {"model", "optimizer", "scheduler", "scaler", "epoch", "elapsed"} - keys
    if missing:
        raise UsageError(f"{path}: not an fdsl checkpoint (no {', '.join(sorted(missing))})")
    return state


def seconds_per_call(fn, machine, calls, warmup=3):
    """Mean seconds per call of fn after `warmup` untimed calls. On CUDA the work is
    asynchronous, so the timed calls are bracketed by events on the GPU's own clock."""
    for _ in range(warmup):
        fn()
    if machine.device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1000 / calls
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    if machine.device.type == "mps":
        torch.mps.synchronize()
    return (time.perf_counter() - t0) / calls


def bare_model(tr, x):
    """Encoder and projector forward and backward on two views, nothing else: the floor a
    training step is compared with."""
    views = augment(torch.cat([x, x]), tr.aug_gen).contiguous(memory_format=tr.machine.memory_format).chunk(2)

    def bare():
        tr.net.zero_grad(set_to_none=True)
        with tr.machine.autocast():
            loss = sum(tr.net.project(v).float().square().mean() for v in views)
        loss.backward()
    return bare


def benchmark(cfg, machine):
    """Times, on random images (their content does not change the speed): the full training
    step, eager and as a CUDA graph; the bare encoder+projector, eager and graphed (the
    floor); the eager parts; the seconds from the start to the first graphed step (model,
    warm-up, capture); a 50,000-image epoch; a k-NN pass over 50,000 + 10,000 images.
    Prints a table; returns the figures."""
    t_start, b, dev, calls = time.perf_counter(), cfg.batch_size, machine.device, cfg.benchmark_steps
    time_it = lambda fn, n=calls: seconds_per_call(fn, machine, n)
    images = lambda n: torch.randint(0, 256, (n, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    x, t, first_step, tg = images(b), {}, None, None
    if choose_step(cfg, machine)[0] == "graph":
        tg = build_trainer(cfg, machine, 50000 // b, "graph")
        make_step(tg, x.shape)
        tg.step(x)
        sync_device()
        first_step = time.perf_counter() - t_start
        if tg.step_kind == "graph":
            t["graphed full step"] = time_it(lambda: tg.step(x))
            bare = bare_model(tg, x)
            warm_up(bare, dev)
            t["graphed bare encoder+projector"] = time_it(capture_graph(bare)[1])
    te = build_trainer(cfg, machine, 50000 // b, "eager")
    make_step(te, x.shape)
    t["eager full step"] = time_it(lambda: te.step(x))
    t["eager bare encoder+projector"] = time_it(bare_model(te, x))
    y = torch.randn(2, b, cfg.proj_dim, device=dev, requires_grad=True)
    t["augmentation (2 views, one call)"] = time_it(lambda: augment(torch.cat([x, x]), te.aug_gen))
    t["normalization layer (2 views, one call)"] = time_it(lambda: te.net.normalize(y).square().mean().backward())
    t["optimizer step"] = time_it(te.opt.step)  # gradients left by the bare model
    eval_x = images(1024)
    t["eval forward (1024 images)"] = time_it(lambda: encode(te.net.encoder, eval_x, machine), max(1, calls // 10))
    bank, labels = torch.randn(60000, te.net.feat_dim, device=dev), torch.randint(0, 10, (60000,), device=dev)
    search = lambda: knn_accuracy(bank[:50000], labels[:50000], bank[50000:], labels[50000:])
    t["k-NN search (10k x 50k)"] = seconds_per_call(search, machine, 1, 1)
    return report_benchmark(cfg, machine, t, first_step, te, tg)


def report_benchmark(cfg, machine, t, first_step, te, tg):
    b, ms = cfg.batch_size, lambda s: f"{s * 1e3:9.2f} ms"
    best = t.get("graphed full step", t["eager full step"])
    knn_pass = 60000 / 1024 * t["eval forward (1024 images)"] + t["k-NN search (10k x 50k)"]
    name = torch.cuda.get_device_name(machine.device) if machine.device.type == "cuda" else machine.device.type
    prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[machine.amp_dtype]
    norm = cfg.decorr + (f" ({cfg.groups} groups, {'shuffled' if cfg.shuffle else 'fixed'}, {cfg.whiten_dtype})"
                         if cfg.decorr == "zca" else "")
    out = [f"benchmark: {cfg.arch}, batch {b}, {cfg.image_size} px, decorr {norm}, {prec}, {name}, "
           f"torch {torch.__version__}; mean of {cfg.benchmark_steps} steps after 3 warm-up steps"]
    missing = "   needs CUDA" if machine.device.type != "cuda" else "   not run (see the note above)"
    for kind, tr in (("eager", te), ("graphed", tg)):
        whiten = step_record(tr)["whiten_method"] if tr else None
        for row in (f"{kind} full step", f"{kind} bare encoder+projector"):
            label = row + (f" ({whiten})" if whiten and "full" in row else "")
            out.append(f"  {label:<48}" + (f"{ms(t[row])} {b / t[row]:10.0f} img/s" if row in t else missing))
    ratios = {k: t[f"{k} full step"] / t[f"{k} bare encoder+projector"] for k in ("eager", "graphed")
              if f"{k} full step" in t}
    out.append(f"  {'full step / bare model':<48}" + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    for row in ("augmentation (2 views, one call)", "normalization layer (2 views, one call)", "optimizer step"):
        out.append(f"  {'eager ' + row:<48}{ms(t[row])}")
    if first_step is not None:
        out.append(f"  start to the first graphed step: {first_step:.1f} s (model, warm-up steps, capture)")
    out.append(f"  a 50,000-image epoch at the {'graphed' if 'graphed full step' in t else 'eager'} step: "
               f"{50000 // b * best:.1f} s of training steps")
    out.append(f"  k-NN evaluation of 50,000 + 10,000 images: {knn_pass:.2f} s (eval forward "
               f"{1024 / t['eval forward (1024 images)']:.0f} img/s, search {t['k-NN search (10k x 50k)']:.2f} s)")
    print0(machine, "\n".join(out))
    return {"seconds": t, "images_per_s": b / best, "step_vs_bare": ratios, "first_step_s": first_step,
            "epoch_s": 50000 // b * best, "knn_pass_s": knn_pass, **step_record(tg or te)}


PAPER_ORDER = {"none": 0, "bn": 1, "zca": 2}  # the order of the paper's findings


def run_label(cfg):
    if cfg.get("decorr") != "zca":
        return cfg.get("decorr", "?")
    groups = cfg.get("groups", 16)
    if groups == 1:
        return "zca, full (DBN)"
    return f"zca, {groups} {'shuffled' if cfg.get('shuffle', True) else 'fixed'} groups"


def read_run(d):
    """A run folder's settings, evaluated log rows and results (if it finished)."""
    if not os.path.isdir(d):
        raise UsageError(f"--plot {d}: no such folder")
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise UsageError(f"--plot {d}: not a run folder (no config.json)")
    cfg = read_json(os.path.join(d, "config.json"))
    rows = [r for r in read_log(os.path.join(d, "log.jsonl")) if "knn_acc" in r]
    if not rows:
        raise UsageError(f"--plot {d}: no evaluated epoch yet in {os.path.join(d, 'log.jsonl')}")
    res = os.path.join(d, "results.json")
    results = read_json(res) if os.path.isfile(res) else {}
    final = results.get("collapse") or rows[-1]["collapse"]
    return {"name": os.path.basename(os.path.normpath(d)), "cfg": cfg, "rows": rows, "results": results,
            "final": final, "label": run_label(cfg)}


def plot_runs(run_dirs, out=""):
    """One figure of several runs, in the paper's order (none, bn, zca fixed, zca shuffled):
    k-NN accuracy over training; effective rank of the projector output (solid) and of the
    backbone (dashed); their final covariance spectra. Writes it as a PNG (default
    comparison.png beside the runs) and the runs' final numbers as a Markdown table beside it
    (same name, .md). matplotlib is the one optional dependency, used only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        raise UsageError("--plot needs matplotlib, which nothing else in fdsl uses: pip install matplotlib") from None
    runs = sorted((read_run(d) for d in run_dirs), key=lambda r: (
        PAPER_ORDER.get(r["cfg"].get("decorr"), 3), r["cfg"].get("groups", 16) > 1 and r["cfg"].get("shuffle", True)))
    labels = [r["label"] for r in runs]
    for r in runs:
        if labels.count(r["label"]) > 1:
            r["label"] += f" ({r['name']})"
    beside = os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in run_dirs])
    out = out or os.path.join(beside, "comparison.png")
    fig, (ax_knn, ax_rank, ax_spec) = plt.subplots(1, 3, figsize=(16, 5))
    for i, r in enumerate(runs):
        epochs = [row["epoch"] for row in r["rows"]]
        ax_knn.plot(epochs, [row["knn_acc"] for row in r["rows"]], "o-", ms=3, color=f"C{i}", label=r["label"])
        for stage, style in (("projector", "-"), ("backbone", "--")):
            ax_rank.plot(epochs, [row["collapse"][stage]["eff_rank"] for row in r["rows"]], style, color=f"C{i}")
            spectrum = [v for v in r["final"][stage]["spectrum"] if v > 0]  # log scale: zeros have no place
            ax_spec.semilogy(range(1, len(spectrum) + 1), spectrum, style, color=f"C{i}")
    ax_knn.set(title="k-NN accuracy of the backbone", xlabel="epoch", ylabel="k-NN accuracy (%)")
    ax_rank.set(title="effective rank", xlabel="epoch", ylabel="effective rank")
    ax_spec.set(title="final covariance spectrum", xlabel="eigenvalue index (largest first)",
                ylabel="eigenvalue / largest", ylim=(1e-8, 2))
    stages = [Line2D([], [], color="0.3", ls=ls, label=name) for ls, name in (("-", "projector output"),
                                                                              ("--", "backbone"))]
    for ax in (ax_rank, ax_spec):
        ax.legend(handles=stages, fontsize=8)
    for ax in (ax_knn, ax_rank, ax_spec):
        ax.grid(alpha=0.3)
    fig.legend(*ax_knn.get_legend_handles_labels(), loc="lower center", ncol=min(len(runs), 5), fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    table = runs_table(runs)
    write_atomic(os.path.splitext(out)[0] + ".md", table)
    print(table + f"\nfdsl: figure of {len(runs)} run(s) in {out}, table in {os.path.splitext(out)[0]}.md")
    return out


def runs_table(runs):
    """The runs' final numbers as a Markdown table, one row per run."""
    lines = ["| run | decorr | groups | k-NN % | linear % | projector eff. rank | epochs | batch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        cfg, res, last = r["cfg"], r["results"], r["rows"][-1]
        groups = "" if cfg.get("decorr") != "zca" else "1 (full)" if cfg.get("groups") == 1 else \
            f"{cfg.get('groups')} {'shuffled' if cfg.get('shuffle', True) else 'fixed'}"
        knn = res.get("knn_acc", last["knn_acc"])
        linear = f"{res['linear_acc']:.2f}" if "linear_acc" in res else ""
        epochs = f"{cfg.get('epochs')}" if res else f"{last['epoch']} of {cfg.get('epochs')}"
        lines.append(f"| {r['name']} | {cfg.get('decorr')} | {groups} | {knn:.2f} | {linear} | "
                     f"{r['final']['projector']['eff_rank']:.1f} | {epochs} | {cfg.get('batch_size')} |")
    return "\n".join(lines) + "\n"


def read_log(path):
    """The rows of a log.jsonl. A half-written last line (the run is writing it, or died while
    it did) is left out; a damaged line before it is an error."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
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
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})") from None


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # a crash mid-write leaves the previous file intact


if __name__ == "__main__":
    main()
