"""
fdsl.py: "On Feature Decorrelation in Self-Supervised Learning" (Hua, Wang, Xue, Ren,
Wang, Zhao, ICCV 2021, arXiv 2105.00470), reproduced in one file.

    python fdsl.py --decorr zca                  # the paper's method (Shuffled-DBN), CIFAR-10, 200 epochs
    python fdsl.py --decorr bn                   # per-axis standardization: dimensional collapse
    python fdsl.py --decorr none                 # no normalization: complete collapse
    python fdsl.py --decorr zca --groups 1 --batch-size 1024    # full ZCA (DBN): a 512-axis group needs N > 512
    python fdsl.py --decorr zca --no-shuffle     # grouped DBN without shuffling
    python fdsl.py --dataset folder --data-dir ~/cifar10-jpeg       # train/ and test/ image folders
    python fdsl.py --dataset synthetic --arch small --epochs 2 --linear-epochs 0   # 1-minute CPU check
    torchrun --nproc_per_node=4 fdsl.py --decorr zca    # several GPUs, whitening over the global batch
    python fdsl.py --resume runs/cifar10-zca-20261124-101500     # continue an interrupted run
    python fdsl.py --benchmark                   # where the time of a training step goes
    python fdsl.py --plot runs/*                 # k-NN curves, effective rank, spectra -> plot.png

The story the file tells, section by section:
  1. Two augmented views of an image go through one network: encoder -> projector ->
     normalization layer -> (optional predictor), and the loss pulls the two outputs together.
  2. With no normalization the cheapest way to pull them together is to map every image to
     the same point: *complete collapse* (the per-axis std of the output falls to 0).
  3. Standardizing each axis over the batch (BN without affine) forbids that, but the axes can
     still all move together: the outputs become strongly correlated and live in a few
     directions, *dimensional collapse* (correlation strength near 1, effective rank near 1).
  4. Whitening the projector output over the batch (ZCA, in shuffled groups) makes the axes
     uncorrelated by construction, which removes the dimensional collapse and improves accuracy.
Sections 7-8 measure exactly these things while training: std, std of the l2-normalized
output, correlation strength, effective rank and eigenvalue spectrum, plus k-NN and linear
accuracy of the backbone.

Hardware and evidence. Developed and tested on a 2-core x86 CPU only: no GPU was available,
so no GPU speed or accuracy is claimed here yet. On that CPU (torch 2.14.1), real CIFAR-10
(JPEG copy), 5,000 training images, --arch small, 10 epochs, about 150 s per run, one run
each, k-NN / 5-epoch linear accuracy on 2,000 test images (the random network: 28.50% k-NN):
    --decorr none 23.50 / 18.40   bn 27.30 / 23.10   zca --no-shuffle 39.70 / 41.00   zca 43.50 / 42.45
Commands, collapse metrics and the eps study behind the default (a relative eps of 1e-5
collapsed both zca runs to 24%) are in README.md; the runs' files are in results/. The test
suite (79 tests, CPU) takes about 95 s, on torch 2.4.1 and 2.14.1 alike. The code runs on CUDA
(bf16 autocast, channels_last, the dataset resident on the GPU as uint8), Apple MPS or CPU,
and under torchrun (DDP).
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
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
# Every default is the authors' main CIFAR-10 recipe (ResNet-18, batch 64, 16 groups of 32,
# SGD lr 0.02 x batch/256, 200 epochs) unless its help says otherwise.
# =============================================================================================


class UsageError(Exception):
    """Bad input (a flag, a folder, a dataset). main() prints it on one line and exits 2."""


class ArgParser(argparse.ArgumentParser):
    # argparse prints the whole usage block before an error; one line is easier to read.
    def error(self, message):
        raise UsageError(f"{message} (see --help)")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    p = ArgParser(prog="fdsl.py", formatter_class=HelpFormatter,
                  description="Self-supervised learning with feature decorrelation "
                              "(Hua et al., ICCV 2021) on CIFAR-10/100 or an image folder.",
                  epilog="Examples are at the top of fdsl.py and in README.md.")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=["cifar10", "cifar100", "folder", "synthetic"],
                   help="cifar10/100 through torchvision; folder = DIR/train and DIR/test (or val) "
                        "with one sub-folder per class; synthetic = generated shapes, works offline")
    g.add_argument("--data-dir", default="./data", help="where CIFAR is (or is downloaded to), or the image folder")
    g.add_argument("--image-size", type=int, default=32, help="folder/synthetic images are made this size (pixels)")
    g.add_argument("--train-subset", type=int, default=0, help="train on N images, class-balanced (0 = all)")
    g.add_argument("--test-subset", type=int, default=0, help="evaluate on N test images, class-balanced (0 = all)")

    g = p.add_argument_group("model")
    g.add_argument("--arch", default="resnet18", choices=["resnet18", "small"],
                   help="resnet18 = CIFAR ResNet-18 (512-d); small = 4 conv layers (256-d), for CPU runs")
    g.add_argument("--proj-hidden", type=int, default=1024, help="projector hidden width")
    g.add_argument("--proj-dim", type=int, default=512, help="projector output width D")
    g.add_argument("--decorr", default="zca", choices=["none", "bn", "zca"],
                   help="normalization layer after the projector: none, per-axis standardization, ZCA whitening")
    g.add_argument("--groups", type=int, default=16, help="zca: whiten in G groups of D/G axes (1 = full ZCA)")
    g.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="zca: keep the groups fixed (grouped DBN) instead of reshuffling axes every call")
    g.add_argument("--eps", type=float, default=1e-8,
                   help="relative regularizer: eps x (mean variance of the group) is added to the covariance's "
                        "eigenvalues (bn: to each variance), so shrinking the output cannot lower the loss. "
                        "Keep it small: from 1e-5 up, the network learned to collapse below it (README)")
    g.add_argument("--whiten", default="eigh", choices=["eigh", "newton"],
                   help="how W = C^(-1/2) is computed: eigendecomposition (exact) or Newton-Schulz "
                        "iterations (matrix products only: no host synchronization)")
    g.add_argument("--whiten-dtype", default="float64", choices=["float32", "float64"],
                   help="precision of the covariance and its whitening matrix")
    g.add_argument("--predictor", action="store_true", help="add a predictor MLP D -> pred-hidden -> D")
    g.add_argument("--pred-hidden", type=int, default=256, help="predictor hidden width")
    g.add_argument("--stop-grad", action="store_true", help="no gradient through the target branch (SimSiam)")
    g.add_argument("--loss", default="l2", choices=["l2", "cosine"],
                   help="l2 = mean squared distance ||p - z||^2 (the paper); cosine = negative cosine (SimSiam)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, default=200)
    g.add_argument("--batch-size", type=int, default=64, help="global batch (split across GPUs under torchrun)")
    g.add_argument("--lr", type=float, default=0.02, help="learning rate per 256 images: lr = LR x batch/256")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=1e-3)
    g.add_argument("--warmup-epochs", type=float, default=5, help="linear warmup from 0, then cosine to 0, per step")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-every", type=int, default=5, help="k-NN and collapse metrics every N epochs (0 = start and end only)")
    g.add_argument("--knn-k", type=int, default=200)
    g.add_argument("--knn-t", type=float, default=0.1, help="k-NN temperature: neighbour weight exp(sim/t)")
    g.add_argument("--metric-samples", type=int, default=2048,
                   help="training images (fixed, not augmented) on which the projector-stage metrics are measured")
    g.add_argument("--raw-eval", action="store_true",
                   help="k-NN and linear-probe test on the raw images instead of the authors' "
                        "Resize(size x 9/8, bicubic) + CenterCrop(size), i.e. 36 -> 32 px for CIFAR")
    g.add_argument("--linear-epochs", type=int, default=100,
                   help="linear evaluation on the frozen backbone at the end (paper: 100; 0 = skip). "
                        "Each epoch cost about a quarter of a training epoch in CPU runs (README)")

    g = p.add_argument_group("run")
    g.add_argument("--out", default="", help="output folder (default runs/<dataset>-<decorr>-<time>)")
    g.add_argument("--resume", default="", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="autocast precision of the network (auto = bf16 on CUDA, else fp32); "
                        "the normalization layer and metrics always run in float32/64")
    g.add_argument("--no-sync-bn", dest="sync_bn", action="store_false",
                   help="under torchrun on CUDA, keep each GPU's BatchNorm statistics local")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--benchmark", action="store_true",
                   help="time the training step of this configuration and its parts, then exit (no data needed)")
    g.add_argument("--benchmark-steps", type=int, default=50, help="timed steps per part in --benchmark")
    g.add_argument("--plot", nargs="+", default=None, metavar="RUN_DIR",
                   help="draw k-NN curves, effective rank and eigenvalue spectra of finished or running "
                        "runs into one PNG (--out, default plot.png), then exit; needs matplotlib")
    return p


def check_config(cfg, world=1):
    """Everything that can be wrong with the flags, found before any work starts."""
    if cfg.batch_size < 2:
        raise UsageError(f"--batch-size {cfg.batch_size}: batch statistics need at least 2 images")
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} does not split over {world} processes")
    for name in ("epochs", "proj_dim", "proj_hidden", "pred_hidden", "image_size", "knn_k", "metric_samples",
                 "benchmark_steps"):
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
            # After centring, a batch of N spans at most N-1 directions: a group of N or more
            # axes has a singular covariance and its whitening divides by ~0.
            raise UsageError(f"group size {size} (= {cfg.proj_dim}/{cfg.groups}) must be smaller than the "
                             f"batch {cfg.batch_size}; use more --groups or a larger --batch-size")


# =============================================================================================
# 2. Setup: device, precision, processes
# One process per GPU under torchrun. Every helper below is a no-op in a single process.
# =============================================================================================


@dataclass
class Machine:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = plain float32
    rank: int = 0
    world: int = 1

    @property
    def main(self):
        return self.rank == 0


def setup_machine(cfg):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible")
    if want == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: Apple MPS is not available")
    device = torch.device(f"cuda:{local}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = True  # convolutions under --precision fp32
        # TF32 matmuls stay off: the only float32 matmuls are the whitening's (forward and
        # backward) and the metrics', which need full precision; the network's run in bf16.
        torch.backends.cuda.matmul.allow_tf32 = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    prec = cfg.precision
    if prec == "auto":
        prec = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if device.type == "cuda" else "fp32"
    if prec != "fp32" and device.type != "cuda":
        raise UsageError(f"--precision {prec} is only supported on CUDA here; use fp32")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[prec]
    return Machine(device, amp, rank, world)


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


def autocast(mach):
    if mach.amp_dtype is None:  # plain float32 (CPU, MPS, or --precision fp32)
        return contextlib.nullcontext()
    return torch.autocast(mach.device.type, dtype=mach.amp_dtype)


def full_precision(x):
    # Leaves any surrounding autocast: whitening and metrics must not run in bf16/fp16.
    return torch.autocast("cuda", enabled=False) if x.is_cuda else contextlib.nullcontext()


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


def mem_format(mach):
    # channels_last lets cuDNN use its fastest (NHWC tensor-core) convolution kernels
    return torch.channels_last if mach.device.type == "cuda" else torch.contiguous_format


# =============================================================================================
# 3. Data
# The whole dataset is one uint8 tensor (N x 3 x H x W) that moves to the device once; batches
# are slices of it, so no DataLoader or CPU worker sits in the training loop.
# =============================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the authors normalize CIFAR with ImageNet statistics
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_SIZES = (5000, 1000)  # train, test


@dataclass
class Data:
    train_x: torch.Tensor  # N x 3 x H x W uint8
    train_y: torch.Tensor  # N int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list


def load_cifar(name, root):
    """CIFAR-10/100 through torchvision: the local copy in `root`, else a download there."""
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


def _read_image(path, size):
    try:  # torchvision.io decodes JPEG/PNG about 4x faster than PIL
        img = torchvision.io.read_image(path, mode=torchvision.io.ImageReadMode.RGB)
    except (RuntimeError, AttributeError):  # a format it cannot decode (or a torchvision without it)
        from PIL import Image
        with Image.open(path) as im:
            img = TF.pil_to_tensor(im.convert("RGB"))
    if img.shape[-2:] != (size, size):
        img = TF.center_crop(TF.resize(img, size, antialias=True), [size, size])
    return img


def load_image_folder(root, size, progress=True):
    """DIR/train and DIR/test (or DIR/val), one sub-folder per class (torchvision's ImageFolder
    layout), decoded once into uint8 tensors of size x size (shorter side resized, centre crop)."""
    if not os.path.isdir(os.path.join(root, "train")):
        raise UsageError(f"no image folder at {os.path.join(root, 'train')} (--dataset folder expects "
                         f"DIR/train/<class>/* and DIR/test/<class>/*)")
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
            imgs = list(tqdm(pool.map(lambda p: _read_image(p, size), paths, chunksize=256), total=len(paths),
                             desc=f"decoding {split_dir}", disable=not progress, leave=False))
        out.append((torch.stack(imgs), torch.tensor(folder.targets, dtype=torch.long), folder.classes))
    (trx, try_, classes), (tex, tey, test_classes) = out
    if test_classes != classes:
        raise UsageError(f"{test_dir} has classes {test_classes[:5]}... but train has {classes[:5]}...")
    return Data(trx, try_, tex, tey, classes)


SHAPES = ("disk", "square", "triangle", "ring", "cross")


def make_synthetic(n, size=32, seed=0):
    """A labelled image set with real class structure, generated offline and deterministic per
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
    tri = torch.stack([u * math.cos(t) + v * math.sin(t) for t in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]).amax(0)
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
        x, y = make_synthetic(n_train + n_test, cfg.image_size, seed=1234)  # fixed: the data is not the seed's business
        data = Data(x[:n_train], y[:n_train], x[n_train:], y[n_train:],
                    [f"{SHAPES[c % 5]}-{'striped' if c >= 5 else 'plain'}" for c in range(10)])
    data.train_x, data.train_y = balanced_subset(data.train_x, data.train_y, cfg.train_subset, cfg.seed)
    data.test_x, data.test_y = balanced_subset(data.test_x, data.test_y, cfg.test_subset, cfg.seed + 1)
    return data


# =============================================================================================
# 4. Augmentations
# SimSiam's CIFAR recipe, each image with its own random parameters, as batched tensor ops on
# whatever device the batch is on: RandomResizedCrop(32, scale 0.2-1, ratio 3/4-4/3), flip 0.5,
# ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (ops in a random order per image, as torchvision),
# grayscale 0.2, then normalization.
# =============================================================================================


def to_float(x):
    return x.float().div_(255) if x.dtype == torch.uint8 else x.float()


_MEAN_STD = {}  # device -> (mean, std) as 3 x 1 x 1 tensors


def normalize(x):
    # torchvision's normalize builds its mean/std tensors from Python lists at every call, a
    # host-to-device copy per batch that a CUDA graph cannot hold: build them once per device.
    if x.device not in _MEAN_STD:
        _MEAN_STD[x.device] = tuple(torch.tensor(v, device=x.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    mean, std = _MEAN_STD[x.device]
    return (x - mean) / std


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
    one = lambda a: (1 + on * (2 * rand(n, 1, 1, 1) - 1) * a)  # factor in [1-a, 1+a], 1 when off
    fb, fc, fs = one(brightness), one(contrast), one(saturation)
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
    normalized. Call it twice on the same batch for the two views."""
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
# 5. Model: encoder -> projector -> normalization layer -> (predictor)
# The normalization layer is the paper's subject. Everything downstream (k-NN, linear) uses
# only the encoder's output.
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
        layers += [nn.Conv2d(c, width, 3, 1 if i == 0 else 2, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256


def projector_mlp(in_dim, hidden, out_dim):
    """Linear -> BN -> ReLU -> Linear (512 -> 1024 -> 512 in the paper). N x in_dim -> N x out_dim.
    No normalization at the end: that is the job of the layer that follows."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, out_dim))


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
    """A^(-1/2) for a batch of symmetric positive definite G x S x S matrices by the coupled
    Newton-Schulz iteration (Higham 2008, eq. 6.35), written with the residual R = (I - ZY) / 2:
        Y_0 = A / tr(A),  Z_0 = I,   Y <- Y + Y R,   Z <- Z + R Z     (Y -> A^(1/2), Z -> A^(-1/2))
    Only matrix products: no eigh, no .item(), no data-dependent branch, so it runs inside a
    CUDA graph, and autograd differentiates through the steps. Y and Z are kept symmetric,
    which halves the float32 rounding error. In float32 on CUDA it needs TF32 matmuls off
    (10-bit mantissas): setup_machine() turns them off for the whole run, backward included."""
    size = a.shape[-1]
    eye = torch.eye(size, dtype=a.dtype, device=a.device)
    trace = a.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]
    y, z = a / trace, eye.expand_as(a)
    for _ in range(steps):
        r = 0.5 * (eye - z @ y)
        yr, rz = y @ r, r @ z
        y, z = y + 0.5 * (yr + yr.mT), z + 0.5 * (rz + rz.mT)
    return z * trace.rsqrt()


def whitening_eps(eps, size, dtype):
    """The relative eps a group of `size` axes gets in `dtype`: at least size x machine epsilon."""
    return max(eps, size * torch.finfo(dtype).eps)


def whitening_matrix(cov, eps, method="eigh", steps=None):
    """W = (C / m + eps I)^(-1/2) / sqrt(m) for a batch of covariances C (G x S x S), where
    m = tr(C) / S is the group's mean variance (its mean eigenvalue).

    Why eps is relative: with C + eps I (an absolute eps), a network can lower the loss by
    shrinking the projector output, since the "whitened" output of a tiny input is just a
    small copy of it; a batch-512 GPU run did exactly that, then its eigh failed. Relative to
    m, W(c^2 C) = W(C) / c, so the whitened output of c x equals that of x for every c > 0.
    Why eps is small (1e-8): any eps damps a direction whose eigenvalue l is near eps x m to
    std sqrt(l / (l + eps m)) < 1, so a network can still lower the loss by collapsing its
    output below eps, and at 1e-5 it did within 2 epochs (README). eps bounds each group's
    condition number by S / eps, which keeps a rank-deficient group finite. A group whose
    axes are all exactly constant (C = 0) has nothing to whiten: W = I, its output is 0.

    eps cannot be smaller than the dtype resolves: rounding moves the eigenvalues of C / m
    (largest <= S) by about S x machine epsilon, so a smaller eps would not keep them positive
    (float32 Newton-Schulz turned NaN on rank-deficient groups). It is raised to that floor,
    whitening_eps: 3.8e-6 for 32 axes in float32, 7e-15 in float64.

    method: "eigh" (eigendecomposition, exact; the reference) or "newton" (Newton-Schulz,
    `steps` iterations, default newton_iterations(S, eps); capturable in a CUDA graph)."""
    size = cov.shape[-1]
    eps = whitening_eps(eps, size, cov.dtype)
    eye = torch.eye(size, dtype=cov.dtype, device=cov.device)
    m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]  # G x 1 x 1
    constant = m == 0
    m = torch.where(constant, torch.ones_like(m), m)
    a = torch.where(constant, eye, cov / m + eps * eye)  # mean eigenvalue 1 + eps, scale-free
    if method == "eigh":
        w = _InvSqrtEigh.apply(a, eps)
    else:
        w = inverse_sqrt_newton(a, newton_iterations(size, eps) if steps is None else steps)
    return w * m.rsqrt()


class GroupWhitening(nn.Module):
    """Shuffled group ZCA whitening over the batch (the paper's "Shuffled-DBN").

    Why: standardizing each axis (BN) stops complete collapse but lets the axes stay
    correlated, so the output collapses onto a few directions. Whitening makes the batch
    covariance the identity, so no direction can be lost. Per group of S = D/G axes:
        xc = x - mean_batch(x)                  (N x S)
        C  = xc^T xc / N                         (biased covariance), m = tr(C) / S
        W  = (C / m + eps I)^(-1/2) / sqrt(m)    (ZCA: the whitening closest to the input)
        y  = xc W
    eps is relative to the group's mean variance m, so y(c x) = y(x) for every scale c: the
    network cannot lower the loss by shrinking its output (see whitening_matrix). With eps = 0
    this is the authors' layer (but for the dtype's floor on eps: 7e-15 in float64).
    Small groups keep C well conditioned at small batches (rank(xc) <= N-1, so S must be < N);
    shuffling the D axes into new groups at every call (a fresh random permutation, undone
    after whitening) decorrelates every pair of axes over training, not only pairs in a group.
    groups=1 is full ZCA whitening (DBN); shuffle=False is grouped DBN; groups=D is per-axis
    standardization, y = xc / sqrt(var (1 + eps)), which is what `--decorr bn` uses.

    method="eigh" computes W by eigendecomposition (exact, the reference; its gradient is the
    closed form, finite for repeated eigenvalues); method="newton" by Newton-Schulz
    iterations (matrix products only, nothing that waits for the host, so a CUDA graph can
    hold it). Both compute the same W: in float64 they agree to 1e-8 or better (tests).

    Statistics always come from the batch (no running averages, as the authors' layer), in
    `dtype` outside autocast: cuSOLVER has no half-precision eigh, and the whitening of a
    badly conditioned group needs the precision. Under torch.distributed, in training mode,
    mean and covariance are summed over all processes (differentiably), so each GPU whitens
    with the global batch's statistics. The permutation comes from torch's global RNG on x's
    device, which the training loop seeds identically on every process.

    x: N x D -> N x D, same dtype. The last permutation is kept in `last_perm` for inspection.
    """

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
        n, d = x.shape
        if d != self.num_features:
            raise ValueError(f"expected {self.num_features} features, got {d}")
        if n < 2:
            raise ValueError("whitening needs a batch of at least 2")
        sync = self.training and distributed()
        s = d // self.groups
        dtype = torch.float32 if x.device.type == "mps" else self.dtype  # MPS has no float64
        h = x.to(dtype)
        perm = torch.randperm(d, device=x.device) if self.shuffle else None  # drawn on the device: no copy
        if perm is not None:
            h = h[:, perm]
        h = h.reshape(n, self.groups, s).transpose(0, 1)  # G x N x S
        count = all_reduce_sum(torch.full((), n, dtype=dtype, device=x.device)) if sync else n
        mean = all_reduce_sum(h.sum(1, keepdim=True)) / count
        hc = h - mean
        if s == 1:  # per-axis standardization: C is the 1x1 variance, W = 1/sqrt(var (1 + eps))
            var = all_reduce_sum((hc * hc).sum(1, keepdim=True)) / count
            y = hc * torch.where(var > 0, var * (1 + self.eps), torch.ones_like(var)).rsqrt()
        else:
            cov = all_reduce_sum(hc.transpose(1, 2) @ hc) / count  # G x S x S
            y = hc @ whitening_matrix(cov, self.eps, self.method)
        y = y.transpose(0, 1).reshape(n, d)
        if perm is not None:
            y = y[:, torch.argsort(perm)]  # every axis back to its own place
        self.last_perm = perm
        return y.to(x.dtype)


def normalization_layer(kind, dim, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64, method="eigh"):
    """The layer after the projector, by the paper's three cases:
    none -> identity (complete collapse); bn -> per-axis standardization over the batch, no
    affine (dimensional collapse); zca -> GroupWhitening (decorrelated, the paper's method)."""
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return GroupWhitening(dim, groups=dim, shuffle=False, eps=eps, dtype=dtype)
    return GroupWhitening(dim, groups=groups, shuffle=shuffle, eps=eps, dtype=dtype, method=method)


def predictor_mlp(dim, hidden):
    """Optional predictor (SimSiam / BYOL style): D -> hidden -> D with BN and ReLU."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


class SiameseNet(nn.Module):
    """One network applied to both views. Each view is a separate call of `branch`, so each gets
    its own batch statistics and its own shuffle, as in the authors' code.
    forward(x1, x2) with x: N x 3 x H x W -> (p1, p2, z1, z2), each N x D, where z is the
    normalized projector output and p = predictor(z) (p = z without a predictor)."""

    def __init__(self, encoder, feat_dim, projector, norm, predictor=None):
        super().__init__()
        self.encoder, self.feat_dim, self.projector, self.norm, self.predictor = encoder, feat_dim, projector, norm, predictor

    def stages(self, x):
        """backbone (N x 512), projector (before the normalization layer), normalized (after)."""
        h = self.encoder(x)
        y = self.projector(h)
        with full_precision(y):
            z = self.norm(y.float())
        return h, y, z

    def branch(self, x):
        z = self.stages(x)[2]
        return (self.predictor(z) if self.predictor is not None else z), z

    def forward(self, x1, x2):
        p1, z1 = self.branch(x1)
        p2, z2 = self.branch(x2)
        return p1, p2, z1, z2


def build_model(cfg):
    encoder, feat_dim = resnet18_cifar() if cfg.arch == "resnet18" else small_convnet()
    norm = normalization_layer(cfg.decorr, cfg.proj_dim, cfg.groups, cfg.shuffle, cfg.eps,
                               getattr(torch, cfg.whiten_dtype), cfg.whiten)
    pred = predictor_mlp(cfg.proj_dim, cfg.pred_hidden) if cfg.predictor else None
    return SiameseNet(encoder, feat_dim, projector_mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim), norm, pred)


# =============================================================================================
# 6. Loss
# =============================================================================================


def siamese_loss(p1, p2, z1, z2, kind="l2", stop_grad=False):
    """Symmetric distance between each view's prediction and the other view's output.
    l2: mean over the batch of ||p - z||^2 summed over axes (the paper's loss; with no predictor
    it is exactly mean ||z1 - z2||^2, of order D once the output is whitened). cosine: negative
    cosine similarity, in [-1, 1] (SimSiam). stop_grad: the target z gets no gradient.
    p, z: N x D -> scalar."""
    if stop_grad:
        z1, z2 = z1.detach(), z2.detach()

    def dist_(p, z):
        p, z = p.float(), z.float()
        if kind == "l2":
            return (p - z).pow(2).sum(1).mean()
        return -F.cosine_similarity(p, z, dim=1).mean()

    return 0.5 * (dist_(p1, z2) + dist_(p2, z1))


# =============================================================================================
# 7. Collapse metrics
# =============================================================================================


@torch.no_grad()
def collapse_metrics(z):
    """The paper's measurements of collapse, for features z: N x D (any dtype, computed in float64).
      std           mean over axes of the per-axis std of z. Falls to 0 under complete collapse.
      std_l2        mean over axes of the std of z / ||z||. About 1/sqrt(D) when the outputs
                    spread over the sphere, 0 when they all point one way (SimSiam's measure).
      corr_strength mean |R_ij| over i != j of the Pearson correlation matrix R (axes with zero
                    variance count as uncorrelated). Near 1 under dimensional collapse.
      eff_rank      exp(entropy of p), p = singular values of the centred z / their sum
                    (Roy & Vetterli; RankMe). 1 for rank-1 features, D for isotropic ones.
      spectrum      covariance eigenvalues, descending, divided by the largest (list of D floats).
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
def measure_collapse(net, metric_x, backbone_feats, batch, mach, n_total):
    """collapse_metrics at the three stages. backbone: the eval-mode features k-NN uses.
    projector / normalized: a fixed set of training images run in train mode, in chunks of the
    training batch, so every BatchNorm and the whitening use batch statistics exactly as they
    do in training (in eval mode BN's running statistics can hide a collapse)."""
    outs = []
    with train_mode_frozen_buffers(net), autocast(mach):
        for x in metric_x.split(batch):  # full batches: metric set is a multiple of the batch
            _, y, z = net.stages(normalize(to_float(x)).contiguous(memory_format=mem_format(mach)))
            outs.append(torch.cat([y.float(), z.float()], 1))
    yz = gather_shards(torch.cat(outs), n_total)
    d = yz.shape[1] // 2
    return {"backbone": collapse_metrics(backbone_feats), "projector": collapse_metrics(yz[:, :d]),
            "normalized": collapse_metrics(yz[:, d:])}


# =============================================================================================
# 8. Evaluation: k-NN monitor and linear probe, on the frozen backbone
# =============================================================================================


@torch.no_grad()
def encode(encoder, x, mach, batch=1024):
    """Eval-mode backbone features of uint8 images x (no augmentation). -> N x 512 float32."""
    was = encoder.training
    encoder.eval()
    feats = []
    with autocast(mach):
        for xb in x.split(batch):
            feats.append(encoder(normalize(to_float(xb)).contiguous(memory_format=mem_format(mach))).float())
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


def linear_accuracy(encoder, feat_dim, tr, te, num_classes, epochs, mach, seed, progress=True):
    """Linear probe: a Linear(512, classes) on the frozen eval-mode backbone, cross-entropy,
    SGD momentum 0.9, lr 30, no weight decay, batch 256, cosine over `epochs` (paper: 100);
    training images get RandomResizedCrop(scale 0.08-1, bicubic) + flip, as the authors; test
    images come already in the evaluation view (eval_transform, unless --raw-eval).
    tr, te: (uint8 images of this process's shard, labels of the whole split). -> percent.
    The augmented features of each epoch are gathered from all processes, so every process
    trains the same classifier on the same data, exactly as one process would."""
    gen = torch.Generator(device=mach.device).manual_seed(seed + 7919 * (mach.rank + 1))
    order_gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(feat_dim, num_classes).to(mach.device)
    opt = torch.optim.SGD(clf.parameters(), lr=30.0, momentum=0.9, weight_decay=0.0)
    n = len(tr[1])
    steps = max(1, math.ceil(n / 256)) * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    encoder.eval()
    for _ in tqdm(range(epochs), desc="linear probe", disable=not (progress and mach.main), leave=False):
        feats = []
        with torch.no_grad(), autocast(mach):
            for xb in tr[0].split(1024):
                xb = normalize(random_resized_crop_flip(to_float(xb), scale=(0.08, 1.0), generator=gen, mode="bicubic"))
                feats.append(encoder(xb.contiguous(memory_format=mem_format(mach))).float())
        feats = gather_shards(torch.cat(feats), n)
        labels = tr[1].to(mach.device)
        for idx in torch.randperm(n, generator=order_gen).to(mach.device).split(256):
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    test_feats = gather_shards(encode(encoder, te[0], mach), len(te[1]))
    with torch.no_grad():
        pred = clf(test_feats).argmax(1)
    return 100.0 * (pred == te[1].to(mach.device)).float().mean().item()


# =============================================================================================
# 9. Training
# =============================================================================================


def lr_at(step, total, warmup, peak):
    """Linear warmup from 0 over `warmup` steps, then cosine decay to 0 at `total` (per step)."""
    if step < warmup:
        return peak * step / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def epoch_seed(cfg, epoch, rank=0, stream=0):
    # Every random stream is re-seeded from (seed, epoch) at the start of each epoch, so a run
    # resumed from a checkpoint draws exactly the numbers the uninterrupted run would have.
    return (cfg.seed * 1_000_003 + epoch) * 1009 + stream * 101 + rank


class Diverged(Exception):
    pass


def train_step(model, opt, sched, scaler, x, aug_gen, cfg, mach):
    """One SGD step on a uint8 batch x: two augmented views, the Siamese loss, backward, update.
    Returns the loss as a device tensor (reading it would wait for the GPU)."""
    v1 = augment(x, aug_gen).contiguous(memory_format=mem_format(mach))
    v2 = augment(x, aug_gen).contiguous(memory_format=mem_format(mach))
    with autocast(mach):
        loss = siamese_loss(*model(v1, v2), kind=cfg.loss, stop_grad=cfg.stop_grad)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    sched.step()
    return loss.detach()


def train_one_epoch(model, opt, sched, scaler, train_x, cfg, mach, epoch):
    """One pass over this process's shard: two augmented views per image, the Siamese loss,
    one SGD step per batch. -> (mean loss, images/s, seconds)."""
    local_batch = cfg.batch_size // mach.world
    steps = len(train_x) // local_batch  # drop_last, as the authors
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(epoch_seed(cfg, epoch, mach.rank, 1)))
    order = order.to(mach.device)
    aug_gen = torch.Generator(device=mach.device).manual_seed(epoch_seed(cfg, epoch, mach.rank, 2))
    torch.manual_seed(epoch_seed(cfg, epoch))  # shuffles of GroupWhitening: identical on every process
    model.train()
    loss_sum = torch.zeros((), device=mach.device)
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", disable=not (cfg.progress and mach.main),
               leave=False, dynamic_ncols=True)
    sync_time()
    t0 = time.perf_counter()
    for step in bar:
        x = train_x[order[step * local_batch:(step + 1) * local_batch]]
        try:
            loss_sum += train_step(model, opt, sched, scaler, x, aug_gen, cfg, mach)
        except torch.linalg.LinAlgError:  # NaN/inf features reach the whitening before the loss check
            raise Diverged(f"the whitening's eigendecomposition failed at epoch {epoch}, step {step + 1} "
                           f"(non-finite or degenerate features)") from None
        if step % 25 == 24 or step == steps - 1:  # .item() waits for the GPU: only now and then
            mean = loss_sum.item() / (step + 1)
            if not math.isfinite(mean):
                raise Diverged(f"loss is {mean} at epoch {epoch}, step {step + 1}")
            bar.set_postfix(loss=f"{mean:.4g}", lr=f"{opt.param_groups[0]['lr']:.4g}",
                            img_s=f"{(step + 1) * cfg.batch_size / (time.perf_counter() - t0):.0f}")
    sync_time()
    seconds = time.perf_counter() - t0
    return loss_sum.item() / max(1, steps), steps * cfg.batch_size / max(seconds, 1e-9), seconds


def sync_time():
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def evaluate(net, data, local, cfg, mach):
    """k-NN accuracy and collapse metrics of the current model (every process takes part)."""
    if distributed():  # BN running statistics as on process 0, whose checkpoint is the model
        for b in net.buffers():
            dist.broadcast(b, 0)
    train_f = gather_shards(encode(net.encoder, local["bank_x"], mach), len(data.train_y))
    test_f = gather_shards(encode(net.encoder, local["test_x"], mach), len(data.test_y))
    acc = knn_accuracy(train_f, data.train_y, test_f, data.test_y, cfg.knn_k, cfg.knn_t)
    metrics = measure_collapse(net, local["metric_x"], test_f, cfg.batch_size // mach.world, mach,
                               local["metric_n"])
    if cfg.decorr == "zca" and metrics["normalized"]["std"] < 0.9:
        # A whitened axis has std sqrt(l / (l + eps m)) < 1 only where the group's eigenvalue l
        # is down at eps x its mean: the network has found that eps lets it drop directions.
        say(mach, f"warning: the whitened output is not white (per-axis std {metrics['normalized']['std']:.2f}, "
                  f"should be 1): eps is damping directions the network collapsed; try a smaller --eps")
    return acc, metrics


# =============================================================================================
# 10. Benchmark: where the time of a training step goes (--benchmark)
# =============================================================================================


def seconds_per_call(fn, mach, calls, warmup=3):
    """Mean seconds per call of fn after `warmup` untimed calls. On CUDA the work is
    asynchronous, so the timed calls are bracketed by events on the GPU's own clock."""
    for _ in range(warmup):
        fn()
    if mach.device.type == "cuda":
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
    if mach.device.type == "mps":
        torch.mps.synchronize()
    return (time.perf_counter() - t0) / calls


def benchmark(cfg, mach):
    """Times the full training step of this configuration (augmentation, both views, the
    normalization layer, loss, backward, SGD) against the bare encoder+projector forward and
    backward on the same two views with the same precision, and each part on its own, on random
    images (their content does not change the speed). Also the cost of a k-NN evaluation of
    50,000 + 10,000 images, from the measured eval-forward speed and a timed k-NN search.
    Prints a table; returns {part: seconds} and the throughputs."""
    b, calls = cfg.batch_size, cfg.benchmark_steps
    dev = mach.device
    x = torch.randint(0, 256, (b, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    torch.manual_seed(cfg.seed)
    net = build_model(cfg).to(dev, memory_format=mem_format(mach))
    opt = torch.optim.SGD(net.parameters(), lr=1e-5, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = torch.amp.GradScaler(dev.type, enabled=mach.amp_dtype == torch.float16)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    views = [augment(x, gen).contiguous(memory_format=mem_format(mach)) for _ in range(2)]
    proj_out = [torch.randn(b, cfg.proj_dim, device=dev, requires_grad=True) for _ in range(2)]
    eval_x = torch.randint(0, 256, (1024, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=dev)
    bank, queries = torch.randn(50000, net.feat_dim, device=dev), torch.randn(10000, net.feat_dim, device=dev)
    bank_y, query_y = torch.randint(0, 10, (50000,), device=dev), torch.randint(0, 10, (10000,), device=dev)

    def bare():
        net.zero_grad(set_to_none=True)
        with autocast(mach):
            loss = sum(net.projector(net.encoder(v)).float().square().mean() for v in views)
        loss.backward()

    def normalization():
        with full_precision(proj_out[0]):
            sum(net.norm(y).square().mean() for y in proj_out).backward()

    net.train()
    t = {"full training step": seconds_per_call(lambda: train_step(net, opt, sched, scaler, x, gen, cfg, mach), mach, calls),
         "bare encoder+projector": seconds_per_call(bare, mach, calls),
         "augmentation (2 views)": seconds_per_call(lambda: [augment(x, gen) for _ in range(2)], mach, calls),
         "normalization layer (2 views)": seconds_per_call(normalization, mach, calls),
         "optimizer step": seconds_per_call(opt.step, mach, calls),  # gradients left by bare()
         "eval forward (1024 images)": seconds_per_call(lambda: encode(net.encoder, eval_x, mach), mach, max(1, calls // 10), 1),
         "k-NN search (10k x 50k)": seconds_per_call(lambda: knn_accuracy(bank, bank_y, queries, query_y), mach, 1, 1)}
    knn_pass = 60000 / 1024 * t["eval forward (1024 images)"] + t["k-NN search (10k x 50k)"]
    ratio = t["bare encoder+projector"] / t["full training step"]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type
    prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[mach.amp_dtype]
    norm = cfg.decorr + (f" ({cfg.groups} groups, {'shuffled' if cfg.shuffle else 'fixed'}, {cfg.whiten}, "
                         f"{cfg.whiten_dtype})" if cfg.decorr == "zca" else "")
    say(mach, f"benchmark: {cfg.arch}, batch {b}, {cfg.image_size} px, decorr {norm}, {prec}, {name}, "
              f"torch {torch.__version__}; mean of {calls} steps after 3 warm-up steps")
    for part in list(t)[:5]:
        say(mach, f"  {part:<32} {t[part] * 1e3:9.2f} ms {b / t[part]:10.0f} img/s")
    parts = sum(t[p] for p in list(t)[1:5])
    say(mach, f"  {'sum of the four parts':<32} {parts * 1e3:9.2f} ms   (the rest: loss, predictor, launch gaps)")
    say(mach, f"  full step throughput = {ratio:.0%} of the bare model's")
    say(mach, f"  k-NN evaluation of 50,000 + 10,000 images: {knn_pass:.2f} s "
              f"(eval forward {1024 / t['eval forward (1024 images)']:.0f} img/s, search {t['k-NN search (10k x 50k)']:.2f} s)")
    epoch = 50000 // b * t["full training step"]
    say(mach, f"  a 50,000-image epoch at this speed: {epoch:.1f} s of training steps")
    return {"seconds": t, "images_per_s": b / t["full training step"],
            "bare_images_per_s": b / t["bare encoder+projector"], "step_vs_bare": ratio, "knn_pass_s": knn_pass}


# =============================================================================================
# 11. Plots (--plot): k-NN curves, effective rank and eigenvalue spectra of finished runs
# =============================================================================================


def plot_runs(run_dirs, path):
    """Draws, from each run's log.jsonl (and results.json when the run finished), one colour
    per run: k-NN accuracy over training; the effective rank of the projector output (solid)
    and of the backbone (dashed) over training; their final covariance eigenvalue spectra,
    normalized by the largest, on a log scale. Writes a PNG to `path` and returns it.
    matplotlib is the one optional dependency, used only here."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no window
        import matplotlib.pyplot as plt
    except ImportError:
        raise UsageError("--plot needs matplotlib, which nothing else in fdsl uses: pip install matplotlib") from None
    runs = []
    for d in run_dirs:
        rows = [r for r in read_log(os.path.join(d, "log.jsonl")) if "knn_acc" in r]
        if not rows:
            raise UsageError(f"--plot {d}: no evaluated epochs in {os.path.join(d, 'log.jsonl')}")
        res_path = os.path.join(d, "results.json")
        final = rows[-1]["collapse"]
        if os.path.exists(res_path):
            with open(res_path) as f:
                final = json.load(f)["collapse"]
        runs.append((os.path.basename(os.path.normpath(d)), rows, final))
    fig, (ax_knn, ax_rank, ax_spec) = plt.subplots(1, 3, figsize=(16, 4.5))
    for i, (name, rows, final) in enumerate(runs):
        epochs = [r["epoch"] for r in rows]
        ax_knn.plot(epochs, [r["knn_acc"] for r in rows], "o-", ms=3, color=f"C{i}", label=name)
        for stage, style in (("projector", "-"), ("backbone", "--")):
            ax_rank.plot(epochs, [r["collapse"][stage]["eff_rank"] for r in rows], style, color=f"C{i}")
            spectrum = [v for v in final[stage]["spectrum"] if v > 0]  # log scale: zeros have no place
            ax_spec.semilogy(range(1, len(spectrum) + 1), spectrum, style, color=f"C{i}")
    ax_knn.set(title="k-NN accuracy (backbone)", xlabel="epoch", ylabel="%")
    ax_rank.set(title="effective rank: projector (solid), backbone (dashed)", xlabel="epoch")
    ax_spec.set(title="final eigenvalue spectrum / largest", xlabel="index", ylim=(1e-8, 2))
    ax_knn.legend(fontsize=8)
    for ax in (ax_knn, ax_rank, ax_spec):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"fdsl: plot of {len(runs)} run(s) written to {path}")
    return path


# =============================================================================================
# 12. Main: settings -> data -> model -> (resume) -> train, evaluate, checkpoint -> results
# =============================================================================================


def say(mach, *args):
    if mach.main:
        tqdm.write(" ".join(str(a) for a in args))
        sys.stdout.flush()  # one row per epoch should reach a log file when it happens


def save_atomic(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def read_log(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def resolve_config(argv):
    parser = build_parser()
    cfg = parser.parse_args(argv)
    if not cfg.resume:
        return cfg, False
    others = [a for a in argv if a.startswith("--") and a.split("=")[0] not in ("--resume", "--no-progress", "--device")]
    if others:
        raise UsageError(f"--resume takes the run's saved settings; drop {' '.join(others)}")
    ckpt = os.path.join(cfg.resume, "checkpoint.pt")
    if not os.path.isfile(ckpt):
        raise UsageError(f"--resume {cfg.resume}: no checkpoint.pt there")
    resumed = parser.parse_args([])  # defaults first: a run saved before a flag existed still loads
    with open(os.path.join(cfg.resume, "config.json")) as f:
        vars(resumed).update(json.load(f))
    vars(resumed).update(resume=cfg.resume, out=cfg.resume, progress=cfg.progress, device=cfg.device)
    return resumed, True


HEADER = f"{'epoch':>5} {'loss':>10} {'lr':>9} {'img/s':>8} {'knn %':>6} | {'projector: std':>14} {'corr':>5} {'erank':>6} | {'time':>7}"


def run(cfg, resuming):
    check_config(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    if cfg.benchmark and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--benchmark times one process; run it without torchrun")
    if cfg.plot:
        return plot_runs(cfg.plot, cfg.out or "plot.png")
    mach = setup_machine(cfg)
    if cfg.benchmark:
        return benchmark(cfg, mach)
    if mach.device.type == "cpu":
        say(mach, "note: running on the CPU: fine for --arch small and subsets, very slow for a full run")
    # Output folder: chosen by process 0, shared with the others.
    out = [cfg.out or os.path.join("runs", f"{cfg.dataset}-{cfg.decorr}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if distributed():
        dist.broadcast_object_list(out, 0)
    cfg.out = out[0]
    ckpt_path, log_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "log.jsonl")
    if not resuming and os.path.exists(ckpt_path):
        raise UsageError(f"{cfg.out} already holds a run; continue it with --resume {cfg.out} or pick another --out")

    data = load_data(cfg)
    if len(data.train_y) < cfg.batch_size:
        raise UsageError(f"only {len(data.train_y)} training images for a batch of {cfg.batch_size}")
    r, w = mach.rank, mach.world
    # Each process keeps its shard (every world-th image: class-balanced even when sorted) on
    # its device. Labels are tiny and stay whole on every process.
    n_metric = min(cfg.metric_samples, len(data.train_y)) // cfg.batch_size * cfg.batch_size or cfg.batch_size
    metric_idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(cfg.seed))[:n_metric]
    # train_all: training images as they are (SSL steps, linear-probe crops); bank_x, test_x:
    # the evaluation view of the training and test images (k-NN, linear-probe test).
    train, test = data.train_x[r::w], data.test_x[r::w]
    local = {"train_all": train.to(mach.device), "metric_x": data.train_x[metric_idx][r::w].to(mach.device),
             "metric_n": n_metric, "test_x": (test if cfg.raw_eval else eval_transform(test)).to(mach.device)}
    local["bank_x"] = local["train_all"] if cfg.raw_eval else eval_transform(train).to(mach.device)
    local["train_x"] = local["train_all"][: len(data.train_y) // w]  # equal shards: every process takes the same steps

    torch.manual_seed(cfg.seed)
    net = build_model(cfg).to(mach.device, memory_format=mem_format(mach))
    model = net
    if distributed():
        if cfg.sync_bn and mach.device.type == "cuda":
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        elif cfg.sync_bn:
            say(mach, "note: SyncBatchNorm needs CUDA; on CPU each process's BatchNorm uses its own slice "
                      "(the normalization layer after the projector is still synchronized)")
        model = nn.parallel.DistributedDataParallel(net, device_ids=[mach.device.index] if mach.device.type == "cuda" else None)
    peak_lr = cfg.lr * cfg.batch_size / 256
    opt = torch.optim.SGD(net.parameters(), lr=peak_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(local["train_x"]) // (cfg.batch_size // w)
    total, warm = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, total, warm, 1.0))
    scaler = torch.amp.GradScaler(mach.device.type, enabled=mach.amp_dtype == torch.float16)

    start, elapsed = 0, 0.0
    if resuming:
        state = torch.load(ckpt_path, map_location=mach.device, weights_only=False)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start, elapsed = state["epoch"], state["elapsed"]
        if mach.main:  # rows written after the checkpoint are redone: drop them
            rows = [row for row in read_log(log_path) if row["epoch"] <= start]
            with open(log_path, "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
        say(mach, f"resuming {cfg.out} after epoch {start}")
    elif mach.main:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(vars(cfg), f, indent=2)
        open(log_path, "w").close()  # a run that died before its first checkpoint left rows here
    say(mach, f"fdsl: {cfg.dataset} ({len(data.train_y)} train / {len(data.test_y)} test), {cfg.arch}, "
              f"decorr={cfg.decorr}" + (f" groups={cfg.groups} shuffle={cfg.shuffle}" if cfg.decorr == "zca" else "")
              + f", batch {cfg.batch_size}, lr {peak_lr:.4g}, {cfg.epochs} epochs on {mach.device}"
              + (f" x{w} processes" if w > 1 else "") + f" -> {cfg.out}")
    say(mach, HEADER)

    def checkpoint(epoch):
        if mach.main:
            save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                         "scaler": scaler.state_dict(), "epoch": epoch, "elapsed": elapsed, "config": vars(cfg)},
                        ckpt_path)

    def log(row):
        if mach.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            p = row.get("collapse", {}).get("projector")
            knn = f"{row['knn_acc']:6.2f}" if "knn_acc" in row else " " * 6
            proj = f"{p['std']:14.4g} {p['corr_strength']:5.2f} {p['eff_rank']:6.1f}" if p else " " * 27
            loss = f"{row['loss']:10.4g}" if row.get("loss") is not None else " " * 10
            lr = f"{row['lr']:9.3g}" if row.get("lr") is not None else " " * 9
            ips = f"{row['images_per_s']:8.0f}" if row.get("images_per_s") else " " * 8
            say(mach, f"{row['epoch']:5d} {loss} {lr} {ips} {knn} | {proj} | {row['time']:7.1f}")

    t_run = time.perf_counter() - elapsed
    if not resuming:  # epoch 0: the random network, the baseline every curve starts from
        acc, metrics = evaluate(net, data, local, cfg, mach)
        elapsed = time.perf_counter() - t_run
        log({"epoch": 0, "loss": None, "lr": None, "images_per_s": None, "time": elapsed, "knn_acc": acc, "collapse": metrics})
        checkpoint(0)
    acc = metrics = None
    for epoch in range(start + 1, cfg.epochs + 1):
        try:
            loss, ips, _ = train_one_epoch(model, opt, sched, scaler, local["train_x"], cfg, mach, epoch)
        except Diverged as e:
            raise Diverged(f"{e}; the last good checkpoint is {ckpt_path} (epoch {epoch - 1}). "
                           f"Try a lower --lr") from None
        row = {"epoch": epoch, "loss": loss, "lr": opt.param_groups[0]["lr"], "images_per_s": ips}
        if epoch == cfg.epochs or (cfg.eval_every and epoch % cfg.eval_every == 0):
            acc, metrics = evaluate(net, data, local, cfg, mach)
            row.update(knn_acc=acc, collapse=metrics)
        elapsed = time.perf_counter() - t_run
        row["time"] = elapsed
        log(row)
        checkpoint(epoch)

    if acc is None:  # resumed a finished run: measure the final state again
        acc, metrics = evaluate(net, data, local, cfg, mach)
    rows = read_log(log_path) if mach.main else []  # the log spans every session of a resumed run
    speeds = [r["images_per_s"] for r in rows if r.get("images_per_s")]
    results = {"knn_acc": acc, "collapse": metrics, "epochs": cfg.epochs,
               "images_per_s": sum(speeds) / len(speeds) if speeds else None,
               "knn_curve": [[r["epoch"], r["knn_acc"]] for r in rows if "knn_acc" in r]}
    if cfg.linear_epochs > 0:
        t0 = time.perf_counter()
        results["linear_acc"] = linear_accuracy(
            net.encoder, net.feat_dim, (local["train_all"], data.train_y), (local["test_x"], data.test_y),
            len(data.classes), cfg.linear_epochs, mach, cfg.seed, cfg.progress)
        results["linear_time_s"] = time.perf_counter() - t0
        say(mach, f"linear probe ({cfg.linear_epochs} epochs): {results['linear_acc']:.2f}%")
    results["time_s"] = time.perf_counter() - t_run
    results["device"] = str(mach.device) + (f" x{w}" if w > 1 else "")
    if mach.main:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        say(mach, f"k-NN {acc:.2f}% after {cfg.epochs} epochs, {results['time_s']:.0f} s; results in {cfg.out}/results.json")
    return results


def main(argv=None):
    """Command line entry point. Returns the results dict (also written to OUT/results.json):
    knn_acc (percent), linear_acc (when run), collapse (final metrics by stage), images_per_s,
    epochs, knn_curve, time_s; with --benchmark, the timings instead. Bad input: one line on
    stderr, exit code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet = int(os.environ.get("RANK", "0")) != 0
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
            print("\nfdsl: interrupted; " + (f"finished epochs are saved; continue with: fdsl.py --resume {out}"
                                             if saved else "no epoch was finished, nothing to resume"), file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
