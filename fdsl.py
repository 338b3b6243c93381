"""
fdsl.py: "On Feature Decorrelation in Self-Supervised Learning" (Hua, Wang, Xue, Ren, Wang, Zhao,
ICCV 2021, arXiv 2105.00470), reproduced in one file that reads from top to bottom.

    python fdsl.py --decorr zca            # the paper's method and recipe: CIFAR-10, ResNet-18, 200 epochs (a GPU)
    python fdsl.py --laptop --decorr none  # the laptop recipe (small network, 5,000 images, 10 epochs): a CPU
    python fdsl.py --dataset synthetic --arch small --epochs 3 --linear-epochs 0   # offline, generated images
    python fdsl.py --dataset folder --data-dir DIR    # DIR/train/<class>/*, DIR/test/<class>/* instead of CIFAR-10
    python fdsl.py --resume runs/cifar10-zca-20261206-101500    # continue an interrupted run
    torchrun --nproc_per_node=4 fdsl.py --decorr zca          # several GPUs share one global batch
    python tools/plot.py runs/*            # figures and a table of runs (tools/bench.py times the step)

Two augmented views of an image go through one network (backbone -> projector -> normalization layer ->
optional predictor); the loss pulls the two outputs together. The paper's findings:
  1. With no normalization the network maps every image to one point: complete collapse.
  2. Standardizing each axis over the batch ("BN") forbids that, but the axes can move together: the
     output lives in a few directions, dimensional collapse.
  3. Whitening groups of axes (ZCA) makes each group's covariance the identity; groups drawn anew at every
     call decorrelate all axes over training (observed, not guaranteed): no collapse, better features.
  4. How correlated the features are, measured without labels, tells good representations from bad.

The paper's names, and the flags that give each:
    no normalization                                      --decorr none
    BN (standardizing each axis)                          --decorr bn
    ZCA, DBN (whitening all D axes at once)               --decorr zca --groups 1
    DBN in G fixed groups (their feature-dim. configs)    --decorr zca --groups G --no-shuffle
    Shuffled-DBN (the paper's method)                     --decorr zca  (16 groups of 32 axes, new at every call)
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
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

# ---- 1. The recipe ---------------------------------------------------------------------------
# The authors' main CIFAR-10 setting, from their code and configs, one flag each (batch_size: --batch-size).
# Not theirs: [fdsl] this file's choice, [SimSiam] beyond the paper's framework, [Figure 2] their 2-d pictures.
LAPTOP = {"arch": "small", "train_subset": 5000, "test_subset": 2000, "epochs": 10, "eval_every": 2, "lr": 0.1,
          "linear_epochs": 5}  # --laptop: the laptop recipe, whose defaults these are
RECIPE = {  # setting: (default, what it means); a list: the default, then the other choices
    "dataset": (["cifar10", "cifar100", "folder", "synthetic"], "folder: --data-dir; [fdsl] synthetic: offline"),
    "arch": (["resnet18", "small"], "CIFAR ResNet-18 (F = 512 features); [fdsl] small: 4 convs (F = 256)"),
    "proj_hidden": (1024, "projector: Linear(F, proj_hidden) -> BN -> ReLU -> Linear(proj_hidden, D)"),
    "linear_projector": (False, "[Figure 2] the projector without BN and ReLU: a linear bottleneck"),
    "proj_dim": (512, "projector output width D"),
    "decorr": (["zca", "none", "bn"], "the layer after the projector: bn standardizes each axis, zca whitens groups"),
    "groups": (16, "zca: G groups of D/G axes (1: full ZCA); auto: the authors' rule ceil(2D / batch)"),
    "shuffle": (True, "zca: new random groups of axes at every call (Shuffled-DBN); off: fixed groups"),
    "eps": (1e-8, "[fdsl] whitening regularizer, relative to each group's mean variance (the authors': none)"),
    "predictor": (False, "[SimSiam] a predictor MLP D -> 256 -> D after the layer"),
    "stop_grad": (False, "[SimSiam] no gradient through the other view's output"),
    "loss": (["l2", "cosine"], "l2: mean ||p - z||^2, the paper's (p = z without a predictor); [SimSiam] cosine"),
    "epochs": (200, "training epochs"),
    "batch_size": (64, "global batch (split over the GPUs under torchrun)"),
    "lr": (0.02, "learning rate per 256 images: the step uses lr x batch / 256 (0.005 at batch 64)"),
    "momentum": (0.9, "SGD momentum"),
    "weight_decay": (1e-3, "SGD weight decay on every parameter (their batch-size study: 2.5e-3)"),
    "warmup_epochs": (5.0, "linear warm-up from 0, then cosine to 0, per step"),
    "eval_every": (5, "k-NN accuracy (k 200, t 0.1) and the collapse metrics every N epochs (0: first and last)"),
    "linear_epochs": (100, "linear-probe epochs at the end (0: no probe)"),
    "seed": (0, "seed of every random stream (the synthetic images are always the same)"),
    # [fdsl] where the data is, and how to run
    "data_dir": ("./data", "CIFAR's folder (downloaded there if missing), or the image folder"),
    "image_size": (32, "folder and synthetic images are made this size"),
    "train_subset": (0, "train on N class-balanced images (0: all)"),
    "test_subset": (0, "evaluate on N class-balanced images (0: all)"),
    "laptop": (False, "the laptop recipe, minutes on a CPU: " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                         for k, v in LAPTOP.items())),
    "out": ("", "run folder (default: runs/<dataset>-<decorr>-<date>-<time>)"),
    "resume": ("", "continue the run in this folder, with its saved settings"),
    "device": (["auto", "cuda", "cpu", "mps"], "auto: CUDA if any, else the CPU; mps: Apple's GPU, unmeasured"),
    "precision": (["auto", "bf16", "fp16", "fp32"], "auto: bf16 from compute capability 8.0, fp16 on 7.x, else fp32"),
    "graph": (True, "on one CUDA GPU the step is one CUDA graph, checked against an eager step first"),
    "progress": (True, "progress bars"),
}

def say(*lines, file=None):  # on process 0 only (under torchrun every process runs this), between progress bars
    if os.environ.get("RANK", "0") == "0":
        tqdm.write("\n".join(lines), file=file)
        (file or sys.stdout).flush()  # a row per epoch reaches a log file when it happens

def fail(message):  # bad input (a flag, a folder, a file): one line, exit code 2, no traceback
    say(f"fdsl: error: {message}", file=sys.stderr)
    raise SystemExit(2)

def read_json(path):  # or one line saying why it cannot be read
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        fail(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})")

def parse_settings(argv):
    """cfg: the recipe under the command line's flags (--laptop: under the laptop recipe); --resume: as saved."""
    parser = argparse.ArgumentParser(prog="fdsl.py", epilog="Examples: the top of fdsl.py.", allow_abbrev=False)
    parser.error = lambda message: fail(f"{message} (see --help)")  # not argparse's whole usage block
    for name, (default, text) in RECIPE.items():
        flag, choices = "--" + name.replace("_", "-"), default if isinstance(default, list) else None
        if isinstance(default, bool):  # --shuffle / --no-shuffle
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{text} (default: {'on' if default else 'off'})")
        else:  # --groups: a number, or auto
            default = choices[0] if choices else default
            parser.add_argument(flag, type=str if name == "groups" else type(default), default=default,
                                choices=choices, help=f"{text} (default: {default})" if default != "" else text)
    if "--laptop" in argv:
        parser.set_defaults(**LAPTOP)
    cfg = parser.parse_args(argv)
    cfg.command = "python fdsl.py " + shlex.join(argv)  # kept in config.json
    if cfg.resume:
        how = ("--resume", "--progress", "--no-progress", "--device", "--graph", "--no-graph")  # how, not what
        others = [a for a in argv if a.startswith("--") and a.split("=")[0] not in how]
        if others or not os.path.isfile(os.path.join(cfg.resume, "checkpoint.pt")):
            fail(f"--resume takes the run's saved settings; drop {' '.join(others)}" if others else
                 f"--resume {cfg.resume}: no checkpoint.pt there, so it is not an fdsl run folder")
        saved, config = vars(parser.parse_args([])), read_json(os.path.join(cfg.resume, "config.json"))
        saved.update({k: v for k, v in config.items() if k in saved})  # a run saved before a flag existed loads
        saved.update(resume=cfg.resume, out=cfg.resume, progress=cfg.progress, device=cfg.device, graph=cfg.graph)
        cfg = argparse.Namespace(**saved, command=config.get("command", cfg.command))
    return cfg

def check_settings(cfg):
    """What is wrong with the settings, found before any work; resolves --groups auto and the folder. -> cfg"""
    for name, least in (("epochs", 1), ("batch_size", 2), ("proj_dim", 1), ("proj_hidden", 1), ("image_size", 8),
                        ("eval_every", 0), ("linear_epochs", 0), ("warmup_epochs", 0), ("eps", 0)):
        if getattr(cfg, name) < least:
            fail(f"--{name.replace('_', '-')} must be at least {least}")
    if cfg.batch_size % int(os.environ.get("WORLD_SIZE", 1)):
        fail(f"--batch-size {cfg.batch_size} does not split evenly over {os.environ['WORLD_SIZE']} processes")
    if cfg.groups == "auto":  # the authors' rule: groups of about half the batch
        cfg.groups = math.ceil(2 * cfg.proj_dim / cfg.batch_size)
    if not str(cfg.groups).isdigit() or int(cfg.groups) < 1 or (cfg.decorr == "zca" and cfg.proj_dim % int(cfg.groups)):
        fail(f"--groups {cfg.groups}: a number that divides --proj-dim {cfg.proj_dim}, or auto")
    cfg.groups, size = int(cfg.groups), cfg.proj_dim // int(cfg.groups)
    if cfg.decorr == "zca" and size >= cfg.batch_size:  # a singular covariance (GroupWhitening.forward says why)
        fail(f"--groups {cfg.groups}: groups of {size} axes need a batch of more than {size} images, not "
             f"{cfg.batch_size}; use more --groups or a larger --batch-size")
    cfg.out = cfg.out or f"runs/{cfg.dataset}-{cfg.decorr}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "checkpoint.pt")):
        fail(f"{cfg.out} already holds a run; continue it with --resume {cfg.out}, or pick another --out")
    return cfg

# ---- 2. Data: uint8 images on the device, once; a batch is a gather there, no DataLoader -------------
def load_image_folder(root, size, progress=True):
    """DIR/train, DIR/test (or val), a folder per class, decoded once; a damaged image stops the load, named."""
    def read(path):  # -> 3 x size x size uint8
        try:
            return TF.center_crop(TF.resize(TF.pil_to_tensor(Image.open(path).convert("RGB")), size), [size, size])
        except Exception as e:  # a damaged file fails in many ways (OSError, SyntaxError, ...)
            raise OSError(f"{path} cannot be read ({type(e).__name__}: {str(e).strip()[:100]})") from None
    data = {}
    for split, name in (("train", "train"), ("test", "test" if os.path.isdir(f"{root}/test") else "val")):
        try:  # no such folder, no class folders, no images in them, or a damaged image
            folder = torchvision.datasets.ImageFolder(os.path.join(root, name))
            with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
                images = list(tqdm(pool.map(read, [path for path, _ in folder.samples], chunksize=256),
                                   total=len(folder), desc=f"decoding {name}", disable=not progress, leave=False))
        except OSError as e:
            fail(f"--dataset folder --data-dir {root}: {e} (DIR/train/<class>/*, DIR/test/<class>/*, all readable)")
        data[split + "_x"], data[split + "_y"] = torch.stack(images), torch.tensor(folder.targets, dtype=torch.long)
    return {**data, "classes": folder.classes}

def make_synthetic(n, size=32, seed=0):
    """Offline images N x 3 x size x size (uint8) of 10 classes, shape x texture, varied per image; labels N."""
    g = torch.Generator().manual_seed(seed)
    def uniform(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    shape, striped, grid = y % 5, y // 5, (torch.arange(size) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")
    cx, cy = uniform(n, 1, 1, lo=-0.3, hi=0.3), uniform(n, 1, 1, lo=-0.3, hi=0.3)
    s, a = uniform(n, 1, 1, lo=0.4, hi=0.65), uniform(n, 1, 1, hi=2 * math.pi)
    u = ((xx - cx) * a.cos() + (yy - cy) * a.sin()) / s  # rotated coordinates, unit = the shape's size
    v = (-(xx - cx) * a.sin() + (yy - cy) * a.cos()) / s
    r, corners = (u * u + v * v).sqrt(), (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)
    triangle = torch.stack([u * math.cos(t) + v * math.sin(t) for t in corners]).amax(0)
    masks = torch.stack([r < 1, torch.maximum(u.abs(), v.abs()) < 0.8, triangle < 0.5, (r > 0.55) & (r < 1),
                         ((u.abs() < 0.3) & (v.abs() < 1)) | ((v.abs() < 0.3) & (u.abs() < 1))], 1)
    mask = masks[torch.arange(n), shape].float().unsqueeze(1)  # N x 1 x H x W
    stripes = torch.sin(uniform(n, 1, 1, lo=2.5, hi=4.0) * math.pi * u + uniform(n, 1, 1, hi=6.3)) > 0
    texture = torch.where(striped.view(n, 1, 1, 1).bool(), 0.35 + 0.65 * stripes.float().unsqueeze(1), torch.ones(1))
    # lightness varies widely, the tint little: what survives colour jitter is shape and texture, not a tint
    background = uniform(n, 1, 1, 1, hi=0.45) + uniform(n, 3, 1, 1, lo=-0.08, hi=0.08)
    foreground = uniform(n, 1, 1, 1, lo=0.55, hi=1.0) + uniform(n, 3, 1, 1, lo=-0.08, hi=0.08)
    img = background + (foreground * texture - background) * mask + 0.04 * torch.randn(n, 3, size, size, generator=g)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8), y

def balanced_subset(x, y, n, seed):
    """n samples with (as nearly as possible) the same count per class, chosen at random."""
    if n <= 0 or n >= len(y):
        return x, y
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    yp, by_class = y[perm], torch.argsort(y[perm], stable=True)  # by class, random order inside a class
    counts, rank = torch.bincount(yp), torch.empty_like(perm)
    rank[by_class] = torch.arange(len(y)) - (counts.cumsum(0) - counts)[yp[by_class]]
    keep = perm[torch.argsort(rank, stable=True)[:n]].sort().values  # each class's 1st image, then 2nd, ...
    return x[keep], y[keep]

def eval_view(x):
    """The authors' evaluation view, Resize(int(size x 8/7), bicubic) + CenterCrop(size): 36, then 32 px."""
    size, bicubic = x.shape[-1], torchvision.transforms.InterpolationMode.BICUBIC
    return torch.cat([TF.center_crop(TF.resize(part, [int(size * 8 / 7)] * 2, interpolation=bicubic), [size, size])
                      for part in x.split(4096)])

def load_data(cfg):
    """The dataset, uint8 on the device: train_x, the evaluation view of the training (bank) and test images, and
    2,048 fixed training images (metric) on which the projector's collapse is measured; subsets if asked."""
    if cfg.dataset in ("cifar10", "cifar100"):
        kind = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            sets = [kind(cfg.data_dir, train=is_train, download=True) for is_train in (True, False)]
        except (OSError, RuntimeError) as e:
            fail(f"{cfg.dataset} is not in {cfg.data_dir} and could not be downloaded ({type(e).__name__}: {e}); "
                 f"use --dataset folder --data-dir DIR, or --dataset synthetic")
        x = [torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous() for s in sets]
        data = {"train_x": x[0], "train_y": torch.tensor(sets[0].targets), "test_x": x[1],
                "test_y": torch.tensor(sets[1].targets), "classes": sets[0].classes}
    elif cfg.dataset == "folder":
        data = load_image_folder(cfg.data_dir, cfg.image_size, cfg.progress and cfg.rank == 0)
    else:  # 5,000 + 1,000 images, always the same: --seed changes the training, not the data
        x, y = make_synthetic(6000, cfg.image_size, seed=1234)
        classes = [f"{s}-{t}" for t in ("plain", "striped") for s in ("disk", "square", "triangle", "ring", "cross")]
        data = {"train_x": x[:5000], "train_y": y[:5000], "test_x": x[5000:], "test_y": y[5000:], "classes": classes}
    train_x, train_y = balanced_subset(data["train_x"], data["train_y"], cfg.train_subset, cfg.seed)
    test_x, test_y = balanced_subset(data["test_x"], data["test_y"], cfg.test_subset, cfg.seed + 1)
    if len(train_y) < cfg.batch_size:
        fail(f"only {len(train_y)} training images for a batch of {cfg.batch_size}")
    n = max(min(2048, len(train_y)) // cfg.batch_size * cfg.batch_size, cfg.batch_size)  # whole batches
    metric = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(cfg.seed))[:n]
    return {"train_x": train_x.to(cfg.device), "train_y": train_y, "test_y": test_y, "classes": data["classes"],
            "bank": eval_view(train_x).to(cfg.device), "test": eval_view(test_x).to(cfg.device),
            "metric": train_x[metric].to(cfg.device)}

# ---- 3. Augmentations: SimSiam's recipe, as the authors, each image its own draws, a batch at once -------
# (torchvision's transforms draw one set of parameters per call: here is their arithmetic, per image)
PIXEL_STATS = {}  # device -> ImageNet's mean and std, made once: a host copy per call would stall a CUDA graph

def network_input(x):
    """Images, uint8 or in [0, 1], standardized as the authors do, in channels_last (cuDNN's layout; 1.2x on CPU)."""
    x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
    if x.device not in PIXEL_STATS:
        PIXEL_STATS[x.device] = [torch.tensor(v, device=x.device).view(3, 1, 1)
                                 for v in ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    return ((x - PIXEL_STATS[x.device][0]) / PIXEL_STATS[x.device][1]).contiguous(memory_format=torch.channels_last)

def random_resized_crop_flip(x, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3), generator=None, mode="bilinear"):
    """torchvision's RandomResizedCrop and a flip (p 0.5) per image, one grid_sample; x: N x C x H x W in [0, 1]."""
    (n, _, h, w), tries = x.shape, 10
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * rand(n, tries))
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * rand(n, tries)
    cw, ch = (area * log_r.exp()).sqrt().round(), (area / log_r.exp()).sqrt().round()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.int().argmax(1, keepdim=True)  # the first try that fits, as torchvision
    cw, ch, any_fits = cw.gather(1, first)[:, 0], ch.gather(1, first)[:, 0], fits.any(1)
    fw = w if w / h <= ratio[1] else round(h * ratio[1])  # no try fits: the largest centred box,
    fh = h if w / h >= ratio[0] else round(w / ratio[0])  # its ratio clamped to the range
    cw, ch = torch.where(any_fits, cw, float(fw)), torch.where(any_fits, ch, float(fh))
    top = torch.where(any_fits, (rand(n) * (h - ch + 1)).floor(), ((h - ch) / 2).floor())
    left = torch.where(any_fits, (rand(n) * (w - cw + 1)).floor(), ((w - cw) / 2).floor())
    flip, zero = torch.where(rand(n) < 0.5, -1.0, 1.0), torch.zeros_like(cw)
    # the output's [-1, 1] (outer pixel edges) mapped onto the crop box
    theta = torch.stack([cw / w * flip, zero, (2 * left + cw) / w - 1, zero, ch / h, (2 * top + ch) / h - 1], 1)
    grid = F.affine_grid(theta.view(n, 2, 3), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.clamp(0, 1) if mode == "bicubic" else out

def shift_hue(x, shift):
    """Hue of x: N x 3 x H x W in [0, 1] shifted by shift: N x 1 x 1 (a turn is 1), with torchvision's HSV."""
    (r, g, b), v = x.unbind(1), x.amax(1)
    delta = v - x.amin(1)
    s, d = delta / v.clamp_min(1e-8), delta.clamp_min(1e-8)
    rc, gc, bc = (v - r) / d, (v - g) / d, (v - b) / d
    hue = torch.where(v == r, bc - gc, torch.where(v == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = (torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue)) + shift) % 1.0
    i = (h * 6.0).floor()
    f, i = h * 6.0 - i, i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    table = torch.stack([torch.stack(c, 1) for c in ((v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q))], 1)
    return table.gather(2, i[:, None, None].expand(-1, 3, 1, -1, -1)).squeeze(2)  # from N x 3 x 6 x H x W

def augment(x, generator=None):
    """One random view of every image: uint8 x: N x 3 x H x W -> the network's input, N x 3 x H x W.
    RandomResizedCrop(scale 0.2-1) + flip; ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8, the four in a random
    order; grayscale with p 0.2; no blur at 32 px. Each image draws its own: augment(cat([x, x])) is 2 views."""
    def rand(*shape):
        return torch.rand(*shape, generator=generator, device=x.device)
    x, n = random_resized_crop_flip(x.float() / 255, generator=generator), len(x)
    on = (rand(n) < 0.8).float().view(n, 1, 1, 1)
    fb, fc, fs = [1 + on * (2 * rand(n, 1, 1, 1) - 1) * 0.4 for _ in range(3)]  # in [0.6, 1.4]; 1 when off
    fh, order = on[:, 0] * (2 * rand(n, 1, 1) - 1) * 0.1, torch.argsort(rand(n, 4), dim=1)
    for k in range(4):  # in round k each image applies its k-th operation, the identity for the others
        turn = [(order[:, k] == op).view(n, 1, 1, 1) for op in range(4)]
        x = (x * torch.where(turn[0], fb, 1.0)).clamp(0, 1)  # brightness
        c, sat = torch.where(turn[1], fc, 1.0), torch.where(turn[2], fs, 1.0)
        x = (c * x + (1 - c) * TF.rgb_to_grayscale(x).mean((1, 2, 3), keepdim=True)).clamp(0, 1)  # contrast
        x = (sat * x + (1 - sat) * TF.rgb_to_grayscale(x)).clamp(0, 1)  # saturation
        x = shift_hue(x, torch.where(turn[3][:, 0], fh, 0.0))
    gray = rand(n, 1, 1, 1) < 0.2
    return network_input(torch.where(gray, TF.rgb_to_grayscale(x).expand_as(x), x))

# ---- 4. The paper's layers, standardizing and whitening over the batch ---------------------------
# The block copies out as it is, under four imports: math, torch, torch.distributed as dist, torch.nn as nn.
# --- copy from here: the paper's two layers and everything they need -------------------------

def small_eigh(a, eigenvalues_only=False):
    """eigh of small matrices, in one CPU thread (more cost more than they save), also for Apple's GPU (none)."""
    fn, threads = torch.linalg.eigvalsh if eigenvalues_only else torch.linalg.eigh, torch.get_num_threads()
    if a.device.type not in ("cpu", "mps"):
        return fn(a)
    try:
        torch.set_num_threads(1)
        out = fn(a.cpu())
    finally:
        torch.set_num_threads(threads)
    return out.to(a.device) if eigenvalues_only else tuple(t.to(a.device) for t in out)

class InverseSqrtEigh(torch.autograd.Function):
    """A^(-1/2) = U diag(l^-1/2) U^T, l clamped at floor; dL/dA = U (K o U^T sym(dL/dW) U) U^T in closed form,
    K_ij = (l_i^-1/2 - l_j^-1/2) / (l_i - l_j) = -1 / (s_i s_j (s_i + s_j)), s = sqrt(l): no 1 / (l_i - l_j),
    so repeated eigenvalues (duplicated axes) give a finite gradient, where autograd through eigh gives NaN."""
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

def inverse_sqrt_newton(a, floor):
    """A^(-1/2) of symmetric S x S matrices a (eigenvalues in [floor, S + floor]) by matrix products, which a CUDA
    graph holds: scaled coupled Newton-Schulz (Higham 2008, eq. 6.35), Y = A / tr A, Z = I, R = (I - c^2 ZY) / 2,
    Y <- c (Y + YR), Z <- c (Z + RZ) -> (A / tr A)^(-1/2). A root x of ZY's eigenvalue goes to h(c x), h(t) =
    (3t - t^3) / 2; c = sqrt(3 / (1 + b + b^2)) for the lowest, b, makes h(c b) = h(c) (Chen and Chow 2014)."""
    lo, scales = math.sqrt(floor / (a.shape[-1] * (1 + floor))), []
    while 1 - lo > torch.finfo(a.dtype).eps:
        scales.append(math.sqrt(3 / (1 + lo + lo * lo)))
        lo = scales[-1] * lo * (3 - (scales[-1] * lo) ** 2) / 2
    eye, trace = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device), a.diagonal(dim1=-2, dim2=-1).sum(-1)
    y, z = a / trace[..., None, None], eye.expand_as(a)
    for c in scales:
        r = 0.5 * (eye - (c * c) * (z @ y))
        yr, rz = y @ r, r @ z
        y, z = c * (y + 0.5 * (yr + yr.mT)), c * (z + 0.5 * (rz + rz.mT))  # kept symmetric: less rounding
    return z * trace.rsqrt()[..., None, None]

def whitening_matrix(cov, eps, method="eigh"):
    """GroupWhitening's W for covariances cov: ... x S x S. eps is relative to the mean variance m: with an
    absolute eps a tiny input would come out a small copy of itself, and the network could lower the loss by
    shrinking; relative, W(c^2 C) = W(C) / c. A direction of variance v comes out with std sqrt(v / (v + e m)),
    so a large eps lets the network drop directions (at 1e-5 one did). e is at least S machine epsilons, as
    rounding moves C / m's eigenvalues that much (32 axes: 7e-15 in float64, 3.8e-6 in float32). NaN or inf:
    an error in words on the CPU; on a GPU looking would wait: eigh raises, Newton-Schulz passes NaN on."""
    size = cov.shape[-1]
    if cov.device.type == "cpu" and not torch.isfinite(cov).all():
        raise FloatingPointError("the whitening's input holds NaN or inf: find where it comes from (a diverged "
                                 "network: a lower learning rate; or the data)")
    e, eye = max(eps, size * torch.finfo(cov.dtype).eps), torch.eye(size, dtype=cov.dtype, device=cov.device)
    m = cov.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
    constant = m == 0
    m = torch.where(constant, torch.ones_like(m), m)
    a = torch.where(constant, eye, cov / m + e * eye)  # mean eigenvalue 1 + e: scale-free
    w = inverse_sqrt_newton(a, e) if method == "newton" else InverseSqrtEigh.apply(a, e)
    return w * m.rsqrt()

class AllReduceSum(torch.autograd.Function):
    """x summed over all processes; its gradient is every process's gradient, summed the same way."""
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

def batch_mean(total, n, global_batch=False):  # total: a sum over n samples; global_batch: over all processes'
    if global_batch and dist.is_initialized():
        return AllReduceSum.apply(total) / (n * dist.get_world_size())
    return total / n

class GroupWhitening(nn.Module):
    """Shuffled group ZCA whitening over the batch, the paper's "Shuffled-DBN" (finding 3).
    x: N x D (one view) -> N x D: the axes shuffled, then for each group of S = D / G axes
        xc = x - mean(x)                    centre every axis over the N samples (N x S)
        C  = xc^T xc / N                    biased covariance (S x S); m = tr(C) / S
        C / m + e I = U diag(l) U^T         e = max(eps, S x machine epsilon of dtype)
        W  = U diag(l^-1/2) U^T / sqrt(m)   ZCA: of all whitenings, the one that rotates least
        z  = xc W                           z's covariance over the batch: I, to within e / l
    and the shuffle undone. Each group comes out white; axes of different groups may stay correlated.
    shuffle: new groups at every call (each view, each evaluation batch): two axes share a group now and then
    (1 call in 16 for 16 groups). groups=1: full ZCA, the authors' "DBN"; shuffle=False: fixed groups. A group
    must be smaller than the batch; eps is relative (whitening_matrix); method: eigh, or newton for the CUDA
    graph; no running statistics, as the authors'. global_batch: over all processes' samples in train mode."""
    def __init__(self, num_features, groups=16, shuffle=True, eps=1e-8, dtype=torch.float64, method="eigh",
                 global_batch=False):
        super().__init__()
        if not (isinstance(groups, int) and groups > 0 and num_features % groups == 0 and eps >= 0 and method in
                ("eigh", "newton") and dtype in (torch.float32, torch.float64)):  # eigh has no half precision
            raise ValueError(f"needs groups that divide num_features={num_features} (fdsl's --groups auto is "
                             f"math.ceil(2 * num_features / batch)), eps >= 0, method eigh or newton, dtype float32 "
                             f"or float64 (half-precision inputs are fine); got {groups!r}, {eps}, {method!r}, {dtype}")
        self.num_features, self.groups, self.eps, self.method, self.dtype = num_features, groups, eps, method, dtype
        self.shuffle = shuffle and 1 < groups < num_features  # one group, or groups of one axis: order is moot
        self.global_batch, self.last_perm = global_batch, None
    def extra_repr(self):
        return (f"{self.num_features}, groups={self.groups}, shuffle={self.shuffle}, eps={self.eps}, "
                f"dtype={self.dtype}, method={self.method!r}, global_batch={self.global_batch}")
    def forward(self, x):
        sync, size = self.global_batch and self.training, self.num_features // self.groups
        if x.dim() != 2 or x.shape[1] != self.num_features or not x.dtype.is_floating_point:
            raise ValueError(f"expected floating-point features, N x {self.num_features} (one view per call), got "
                             f"{x.dtype} {tuple(x.shape)}: integers would be truncated, the output keeps their dtype")
        (n, d), samples = x.shape, len(x) * (dist.get_world_size() if sync and dist.is_initialized() else 1)
        if size >= samples or samples < 2:  # N centred samples span N - 1 directions
            raise ValueError(f"groups of {size} axes need a batch of more than {max(size, 1)} samples, got "
                             f"{samples} (the batch's statistics, in eval mode too): more groups, a larger batch")
        with torch.autocast(x.device.type, enabled=False):  # the statistics in dtype, not autocast's
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

class Standardize(GroupWhitening):
    """The paper's "BN" (finding 2): x: N x D -> (x - mean) / std per axis over the batch, biased std, no affine:
    whitening in groups of one axis, eps 0 (a constant axis gives 0). As the authors' BatchNorm in training;
    unlike nn.BatchNorm1d, no eps (its 1e-5 lets a shrinking input shrink the output), batch statistics in eval."""
    def __init__(self, num_features, dtype=torch.float64, method="eigh", global_batch=False):
        super().__init__(num_features, num_features, False, 0.0, dtype, method, global_batch)

# --- copy to here ----------------------------------------------------------------------------

# ---- 5. Model: backbone -> projector -> normalization layer -> (predictor) --------------------------
def make_backbone(arch):
    """-> (net: N x 3 x H x W -> N x F, F): torchvision's ResNet-18 in its CIFAR form, or [fdsl] 4 conv-BN-ReLU."""
    if arch == "resnet18":
        net = torchvision.models.resnet18()
        net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)  # 32 px images: keep the resolution
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")  # as every other conv
        net.maxpool, net.fc = nn.Identity(), nn.Identity()
        return net, 512
    layers = []
    for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2)):
        layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 256

def mlp(in_dim, hidden, out_dim, linear=False):
    """Linear-BN-ReLU-Linear: projector F -> proj_hidden -> D, predictor D -> 256 -> D; linear: no BN, ReLU."""
    middle = [] if linear else [nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
    return nn.Sequential(nn.Linear(in_dim, hidden), *middle, nn.Linear(hidden, out_dim))

class SiameseNet(nn.Module):
    """One network, called once per view as the authors (BatchNorm and the layer see one view): forward(x1, x2),
    N x 3 x H x W each -> (p1, p2, z1, z2), N x D, z the layer's output, p = predictor(z) or z."""
    def __init__(self, backbone, feat_dim, projector, norm, predictor=None):
        super().__init__()
        self.backbone, self.feat_dim, self.projector = backbone, feat_dim, projector
        self.norm, self.predictor = norm, predictor
    def project(self, x):  # the projector's output h, before the layer: N x 3 x H x W -> N x D
        return self.projector(self.backbone(x))
    def forward(self, x1, x2):
        z1 = self.norm(self.project(x1).float())  # float32 under autocast too: the layer keeps its input's dtype
        z2 = self.norm(self.project(x2).float())
        if self.predictor is None:
            return z1, z2, z1, z2
        return self.predictor(z1), self.predictor(z2), z1, z2

def build_model(cfg, method="eigh", dtype=torch.float64, global_batch=False):
    """The network of cfg, one of the paper's layers after the projector; method, dtype, global_batch: the layer's."""
    backbone, feat_dim = make_backbone(cfg.arch)
    if cfg.decorr == "zca":  # finding 3: neither collapse
        norm = GroupWhitening(cfg.proj_dim, cfg.groups, cfg.shuffle, cfg.eps, dtype, method, global_batch)
    elif cfg.decorr == "bn":  # finding 2: dimensional collapse
        norm = Standardize(cfg.proj_dim, dtype, method, global_batch)
    else:  # finding 1: complete collapse
        norm = nn.Identity()
    predictor = mlp(cfg.proj_dim, 256, cfg.proj_dim) if cfg.predictor else None  # drawn first, as the runs on record
    projector = mlp(feat_dim, cfg.proj_hidden, cfg.proj_dim, cfg.linear_projector)
    return SiameseNet(backbone, feat_dim, projector, norm, predictor)

def autocast(cfg):
    """The network in cfg.amp (None: float32); no cache of casts, which a CUDA graph would keep from its capture."""
    if cfg.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(cfg.device.split(":")[0], getattr(torch, cfg.amp), cache_enabled=False)

# ---- 6. Loss -----------------------------------------------------------------------------------
def siamese_loss(p1, p2, z1, z2, kind="l2", stop_grad=False):
    """Symmetric distance of each view's prediction p to the other view's output z, N x D each. l2: the mean of
    ||p - z||^2, the paper's loss (without predictor ||z1 - z2||^2: 2D for two unrelated whitened outputs, less
    as the views agree); cosine: SimSiam's; stop_grad: no gradient to z. -> a scalar."""
    if stop_grad:
        z1, z2 = z1.detach(), z2.detach()
    def distance(p, z):
        if kind == "l2":
            return (p.float() - z.float()).pow(2).sum(1).mean()
        return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()
    return 0.5 * (distance(p1, z2) + distance(p2, z1))

# ---- 7. Collapse metrics -----------------------------------------------------------------------
@torch.no_grad()
def collapse_metrics(feats):
    """Measures of collapse of features f: N x D, in float64, and which collapse each sees:
      std           mean over axes of the per-axis std. Near 0: complete collapse (finding 1).
      std_l2        the same for f / ||f||: about 1/sqrt(D) spread over the sphere, 0 pointing one way.
      corr_strength mean |R_ij|, i != j, of the Pearson correlations (constant axes: uncorrelated). 1 on one
                    direction: dimensional collapse (finding 2; rank 2: 0.64, rank 4: 0.42 at D = 512).
      eff_rank      exp(entropy of q), q = singular values of the centred f / their sum (RankMe): 1 for
                    rank-1 features, D for isotropic ones.
      spectrum      the covariance's eigenvalues, descending, divided by the largest (D floats).
    corr and eff_rank are blind to complete collapse (one point plus noise of std 0.01: corr 0.02, eff_rank
    494.7 of 512, as isotropic noise): read them beside std. -> a dict of floats."""
    f = (feats.cpu() if feats.device.type == "mps" else feats).detach().double()  # Apple's GPU has no float64
    (n, d), std = f.shape, f.std(0, correction=0)
    std_l2 = F.normalize(f, dim=1).std(0, correction=0)
    fc = f - f.mean(0)
    cov = fc.T @ fc / n
    sd = cov.diagonal().clamp_min(0).sqrt()
    denom = torch.outer(sd, sd)
    r = torch.where(denom > 0, cov / denom.clamp_min(1e-300), torch.zeros_like(cov))
    corr = r.abs()[~torch.eye(d, dtype=torch.bool, device=f.device)].mean() if d > 1 else torch.zeros(())
    evals = small_eigh(cov, eigenvalues_only=True).flip(0).clamp_min(0)
    sv = (evals * n).sqrt()
    eff_rank, spectrum = torch.zeros(()), torch.zeros(d)
    if sv.sum() > 0:
        q = sv / sv.sum()
        eff_rank, spectrum = torch.exp(-(q * q.clamp_min(1e-300).log()).sum()), evals / evals[0]
    return {"std": std.mean().item(), "std_l2": std_l2.mean().item(), "corr_strength": corr.item(),
            "eff_rank": eff_rank.item(), "spectrum": [float(f"{v:.4g}") for v in spectrum.tolist()]}

# ---- 8. Evaluation: the k-NN monitor, collapse at three stages, the linear probe ---------------
def check_finite(what, tensors):  # one read from the device: nothing non-finite is saved or scored
    if not torch.stack([torch.isfinite(t).all() for t in tensors]).all().item():
        raise FloatingPointError(f"{what} are not finite")

@torch.no_grad()
def encode(backbone, x, cfg):  # the eval-mode backbone's features of uint8 images x: N x F float32
    backbone.eval()  # the next epoch puts it back in train mode
    with autocast(cfg):
        return torch.cat([backbone(network_input(part)).float() for part in x.split(1024)])

@torch.no_grad()
def knn_accuracy(train_feats, train_labels, test_feats, test_labels, k=200, t=0.1):
    """Weighted k-NN (Wu et al. 2018): a test point's k most cosine-similar training points vote for their
    class with weight exp(sim / t). train_feats: M x F, test_feats: N x F, the whole test set. -> percent."""
    bank, bank_y = F.normalize(train_feats.float(), dim=1), train_labels.to(train_feats.device)
    num_classes, k, correct = int(max(bank_y.max().item(), test_labels.max().item())) + 1, min(k, len(bank)), 0
    for q, labels in zip(test_feats.split(1024), test_labels.split(1024)):
        sim, idx = (F.normalize(q.float().to(bank.device), dim=1) @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), num_classes, device=bank.device).scatter_add_(1, bank_y[idx], (sim / t).exp())
        correct += (votes.argmax(1) == labels.to(bank.device)).sum().item()
    return 100.0 * correct / len(test_feats)

@torch.no_grad()
def train_mode_outputs(net, x, cfg):
    """The projector's h and the layer's z, N x D, for images x in train mode and training batches, on a copy
    (eval mode's running averages lag, and can make a collapse look healthy)."""
    probe = copy.deepcopy(net).train()
    with autocast(cfg):
        hs = [probe.project(network_input(part)).float() for part in x.split(cfg.batch_size)]
    check_finite("the projector's outputs", hs)  # a diverged network stops here, not inside the layer
    return torch.cat(hs), torch.cat([probe.norm(h) for h in hs])

def evaluate(net, data, cfg):
    """k-NN accuracy; collapse metrics of the backbone (test images, as k-NN sees them), of the projector's h and
    the layer's z (fixed training images); for at most 3 axes z of 1,024 test images (Figure 2). -> a row."""
    train_f, test_f = encode(net.backbone, data["bank"], cfg), encode(net.backbone, data["test"], cfg)
    check_finite("the backbone's features", [train_f, test_f])
    h, z = train_mode_outputs(net, data["metric"], cfg)
    collapse = {"backbone": collapse_metrics(test_f), "projector": collapse_metrics(h),
                "normalized": collapse_metrics(z)}
    if cfg.decorr == "zca" and collapse["normalized"]["std"] < 0.9:  # variance down near e x m
        say(f"warning: the whitened output is not white (std {collapse['normalized']['std']:.2f}, should be 1): "
            f"eps is damping directions the network collapsed; try a smaller --eps")
    row = {"knn_acc": knn_accuracy(train_f, data["train_y"], test_f, data["test_y"]), "collapse": collapse}
    n = min(1024, len(data["test_y"])) // cfg.batch_size * cfg.batch_size
    if cfg.proj_dim <= 3 and n > 0:  # points in whole units of a scale (3 digits): a small log
        shown = torch.randperm(len(data["test_y"]), generator=torch.Generator().manual_seed(cfg.seed))[:n]
        z = train_mode_outputs(net, data["test"][shown.to(data["test"].device)], cfg)[1]
        scale = float(f"{z.abs().max().item() / 999:.4g}") or 1.0
        row["projection"] = {"scale": scale, "points": (z / scale).round().int().tolist(),
                             "labels": data["test_y"][shown].tolist()}
    return row

def linear_probe(backbone, feat_dim, data, cfg):
    """Linear(F, classes) on the frozen backbone, SGD momentum 0.9, lr 30, batch 256, cosine, on new
    RandomResizedCrop(0.08-1, bicubic) + flip crops each epoch, tested on the evaluation view. -> percent."""
    device, n = data["train_x"].device, len(data["train_y"])
    crops, order = torch.Generator(device=device).manual_seed(cfg.seed + 7919), torch.Generator().manual_seed(cfg.seed)
    clf, labels = nn.Linear(feat_dim, len(data["classes"])).to(device), data["train_y"].to(device)
    opt, steps = torch.optim.SGD(clf.parameters(), lr=30.0, momentum=0.9), math.ceil(n / 256) * cfg.linear_epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    backbone.eval()
    for _ in tqdm(range(cfg.linear_epochs), desc="linear probe", disable=not cfg.progress or cfg.rank > 0, leave=False):
        with torch.no_grad(), autocast(cfg):
            feats = torch.cat([backbone(network_input(random_resized_crop_flip(
                part.float() / 255, scale=(0.08, 1.0), generator=crops, mode="bicubic"))).float()
                for part in data["train_x"].split(1024)])
        check_finite("the backbone's features", [feats])  # once per epoch: a NaN is never scored
        for idx in torch.randperm(n, generator=order).to(device).split(256):
            loss = F.cross_entropy(clf(feats[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        logits = clf(encode(backbone, data["test"], cfg))
    check_finite("the classifier's outputs", [logits])
    return 100.0 * (logits.argmax(1) == data["test_y"].to(device)).float().mean().item()

# ---- 9. The machine: device, precision, several processes, the training step as a CUDA graph ---
def setup_machine(cfg):
    """Sets cfg.device, cfg.amp (autocast's dtype; None: float32), cfg.rank, cfg.world (torchrun's processes,
    started here), cfg.step ("graph" on one CUDA GPU in bf16 or fp32, else "eager") and cfg.whiten_method."""
    if cfg.device == "auto":
        cfg.device = "cuda" if torch.cuda.is_available() else "cpu"  # Apple's GPU only when asked
    if not {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}.get(cfg.device, True):
        fail(f"--device {cfg.device}: no such GPU is visible here")
    cfg.rank, cfg.world, precision = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), cfg.precision
    if cfg.device == "cuda":
        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
        torch.cuda.set_device(cfg.device)
        torch.backends.cudnn.benchmark = torch.backends.cudnn.allow_tf32 = True  # TF32 convolutions; not matmuls
        capability = torch.cuda.get_device_capability()
        if precision == "auto" and capability >= (7, 0):  # bf16 from 8.0 (A100, H100); 7.x (V100, T4) has none
            precision = "bf16" if capability >= (8, 0) else "fp16"
    if (cfg.device, precision) in (("cpu", "fp16"), ("mps", "fp16"), ("mps", "bf16")):
        fail(f"--precision {precision} is not supported on {cfg.device}: use fp32, or bf16 on a CPU")
    cfg.amp = {"bf16": "bfloat16", "fp16": "float16"}.get(precision)
    if cfg.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
        box = [cfg.out]  # every process the same folder, whatever its clock said
        dist.broadcast_object_list(box, 0)
        cfg.out = box[0]
    # eager: fp16 (its loss scaler is read on the host), torchrun, old torch; eigh waits for the host: not graphed
    graphable = cfg.amp != "float16" and cfg.world == 1 and hasattr(torch.cuda.CUDAGraph, "register_generator_state")
    cfg.step = "graph" if cfg.device.startswith("cuda") and cfg.graph and graphable else "eager"
    cfg.whiten_method = "newton" if cfg.step == "graph" else "eigh"
    if cfg.device == "cpu" and cfg.arch == "resnet18":
        say("note: no CUDA GPU: the paper's recipe (ResNet-18, 200 epochs) takes days on a CPU; --laptop runs the "
            "laptop recipe (small network, 5,000 / 2,000 images, 10 epochs: minutes)")
    if cfg.device == "mps":
        say("note: fdsl is unmeasured on Apple's GPU, and the layer runs there in float32 (no float64): eps is at "
            "least 3.8e-6 for groups of 32, within 3x of the 1e-5 that let a network collapse; watch for 'not white'")

def capture(fn, generator):
    """fn() recorded as a CUDA graph after 3 warm-up calls on a side stream. -> (fn's output, replay)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    if torch.__version__ < (2, 14):  # later versions register a generator used in a capture by themselves
        graph.register_generator_state(generator)
    with torch.cuda.graph(graph):
        out = fn()
    return out, graph.replay

def graph_step(step, batch, net, opt, sched, generator):
    """step recorded once as a CUDA graph, replayed for every batch. From one state, batch and random streams at
    the peak lr, an eager step and a replay must change loss and parameters alike to 1% first (bf16 rounds to
    0.2%; a replay that skips or repeats the update is off by 100%); if not, one line why, and step trains."""
    static_x, saved, lrs = batch.clone(), copy.deepcopy(net.state_dict()), [g["lr"] for g in opt.param_groups]
    momenta = {p: s["momentum_buffer"].clone() for p, s in opt.state.items()}  # a resumed run's (else none yet)
    for group, lr in zip(opt.param_groups, lrs):  # SGD as a graph holds it: lr a tensor, filled in place
        group.update(lr=torch.tensor(lr, device=batch.device), fused=True, foreach=False)
    def reset(lrs):  # the saved state, into the same tensors (the graph holds their addresses), as at the start
        net.load_state_dict(saved)
        for p, state in opt.state.items():
            state["momentum_buffer"].zero_().add_(momenta.get(p, 0))
        for group, lr in zip(opt.param_groups, lrs):
            group["lr"].fill_(lr)
    def update(fn):  # -> (loss, parameter change) of fn() from the saved state at the peak lr (the first is 0)
        reset(sched.base_lrs)
        torch.manual_seed(0)  # the whitening's shuffles
        generator.manual_seed(0)  # the augmentations
        loss = float(fn())
        return loss, torch.cat([(p.detach() - saved[name]).flatten() for name, p in net.named_parameters()])
    try:
        with torch.random.fork_rng(devices=[batch.device] if batch.device.type == "cuda" else []):
            loss, replay = capture(lambda: step(static_x), generator)
            (loss_e, change_e), (loss_g, change_g) = update(lambda: step(static_x)), update(lambda: (replay(), loss)[1])
        off = ((change_g - change_e).norm() / change_e.norm()).item()
        if not abs(loss_g - loss_e) <= 0.01 * abs(loss_e) or not off <= 0.01:
            raise RuntimeError(f"its replay differs from the eager step: loss {loss_g:.6g} against {loss_e:.6g}, "
                               f"update off by {off:.1%}")
    except Exception as e:
        reset(lrs)
        for group in opt.param_groups:
            group.update(lr=float(group["lr"]), fused=None, foreach=None)
        say(f"note: the CUDA graph is not used ({type(e).__name__}: {str(e).strip()[:200]}); the eager step trains")
        return step
    reset(lrs)
    def replayed(x):
        static_x.copy_(x)
        replay()
        return loss.clone()  # the next replay overwrites loss
    return replayed

# ---- 10. Training, and the run folder: config.json, log.jsonl, checkpoint.pt, then results.json -------
def build_training(cfg, steps_per_epoch):
    """Network (torchrun: SyncBatchNorm, DDP), SGD at lr x batch / 256, its schedule, loss scaler, and step(x)."""
    torch.manual_seed(cfg.seed)
    dtype = torch.float32 if cfg.device == "mps" else torch.float64  # the layer's; Apple's GPU has no float64
    net = build_model(cfg, cfg.whiten_method, dtype, cfg.world > 1).to(cfg.device, memory_format=torch.channels_last)
    if cfg.world > 1 and cfg.device.startswith("cuda"):  # BatchNorm's statistics over every GPU's images
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = net if cfg.world == 1 else nn.parallel.DistributedDataParallel(net)  # gradients averaged over all
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr * cfg.batch_size / 256, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    def lr_factor(i):  # a multiple of the peak lr
        if i < warmup:
            return i / warmup
        return 0.5 * (1 + math.cos(math.pi * (i - warmup) / max(1, total - warmup)))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    scaler = torch.amp.GradScaler(cfg.device.split(":")[0], enabled=cfg.amp == "float16")
    generator = torch.Generator(device=cfg.device)  # the augmentations' random stream, on the device
    def step(x):  # two views, the network on each in its own call, the loss, backward, update
        x1, x2 = augment(torch.cat([x, x]), generator).chunk(2)  # one call, each image its own draws: 2 views
        with autocast(cfg):
            loss = siamese_loss(*model(x1, x2), cfg.loss, cfg.stop_grad)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        return loss.detach()  # on the device: reading it would wait for the GPU
    return net, {"model": net, "optimizer": opt, "scheduler": sched, "scaler": scaler}, step, generator

def train_epoch(step, net, sched, generator, train_x, epoch, cfg):
    """An epoch, every random stream seeded from (seed, epoch): a resumed run draws what an uninterrupted one
    would. Process r takes the r-th share of each batch; the last partial batch is dropped. -> (loss, img/s)."""
    def seed(stream, rank=0):
        return (cfg.seed * 1_000_003 + epoch) * 1009 + stream * 101 + rank
    order = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed(1))).to(train_x.device)
    generator.manual_seed(seed(2, cfg.rank))  # the augmentations: each process its own
    torch.manual_seed(seed(0))  # the whitening's shuffles: the same on every process
    net.train()
    steps, loss_sum, t0 = len(train_x) // cfg.batch_size, torch.zeros((), device=train_x.device), time.perf_counter()
    bar = tqdm(range(steps), desc=f"epoch {epoch}/{cfg.epochs}", disable=not cfg.progress or cfg.rank > 0, leave=False)
    for i in bar:
        loss_sum += step(train_x[order[i * cfg.batch_size:(i + 1) * cfg.batch_size][cfg.rank::cfg.world]])
        sched.step()
        if i % 25 == 24 or i == steps - 1:  # .item() waits for the GPU: only now and then
            mean = loss_sum.item() / (i + 1)
            if not math.isfinite(mean):
                raise FloatingPointError(f"the loss is {mean} at epoch {epoch}, step {i + 1} (read every 25 steps: "
                                         f"it may have turned earlier)")
            bar.set_postfix(loss=f"{mean:.4g}")
    check_finite(f"the weights after epoch {epoch}", [*net.parameters(), *net.buffers()])  # (the GPU is done)
    return loss_sum.item() / max(1, steps), steps * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)

def provenance(cfg):
    """What made a run's numbers: versions, the device by name, fdsl.py's git commit (in a checkout) and sha256."""
    git = ["git", "-C", os.path.dirname(os.path.abspath(__file__)), "rev-parse", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip() if shutil.which("git") else ""
    with open(__file__, "rb") as f:
        version = f"{commit} sha256:{hashlib.sha256(f.read()).hexdigest()[:16]}".strip()
    name = torch.cuda.get_device_name() if cfg.device.startswith("cuda") else cfg.device
    if cfg.device == "cpu" and os.path.isfile("/proc/cpuinfo"):  # Linux names the CPU model
        models = [line.split(":")[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
        name = f"{(models or ['CPU'])[0]}, {os.cpu_count()} CPUs"
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version(),
            "device_name": name, "fdsl_version": version}

def load_checkpoint(cfg, parts):
    """--resume: the checkpoint loaded, read as data (a file holding code is refused). -> (its epoch, seconds)."""
    start, elapsed, checkpoint = 0, 0.0, os.path.join(cfg.out, "checkpoint.pt")
    if cfg.resume:
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            for name, part in parts.items():
                part.load_state_dict(state[name])
            start, elapsed = state["epoch"], state["elapsed"]
        except Exception as e:  # UnpicklingError: objects; another network: RuntimeError, KeyError, ValueError
            refused = "Weights only load failed" in str(e) or type(e).__name__ == "UnpicklingError"
            fail(f"{checkpoint}: " + ("it holds objects that could run code; refused" if refused else
                 f"damaged, or not this network's ({type(e).__name__}: {str(e).splitlines()[0][:120]})"))
    return start, elapsed

COLUMNS = [("epoch", 5, "d"), ("loss", 10, ".4g"), ("lr", 9, ".3g"), ("img/s", 8, ".0f"), ("knn %", 6, ".2f"),
           ("proj. std", 10, ".4g"), ("corr", 5, ".2f"), ("erank", 6, ".1f"), ("time", 7, ".1f")]  # the table
def train(step, net, parts, generator, data, cfg, start, elapsed):
    """config.json; epoch 0 evaluates the random network; each epoch trains, evaluates when due, logs a row (log.jsonl,
    the table) and saves the checkpoint, whole or not at all: an interruption loses an epoch at most."""
    layer = f"decorr={cfg.decorr}" + (f" groups={cfg.groups} shuffle={cfg.shuffle}" if cfg.decorr == "zca" else "")
    say(f"fdsl: {cfg.dataset} ({len(data['train_y'])} / {len(data['test_y'])} images), {cfg.arch}, {layer}, batch "
        f"{cfg.batch_size}, lr {cfg.lr * cfg.batch_size / 256:.4g} (--lr {cfg.lr:g} per 256 images), {cfg.epochs} "
        f"epochs, {cfg.device} x{cfg.world}, {cfg.step} step -> {cfg.out}",
        " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS))
    if cfg.rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump({**vars(cfg), **provenance(cfg)}, f, indent=2)
    t0, final, path = time.perf_counter() - elapsed, None, os.path.join(cfg.out, "checkpoint.pt")
    for epoch in range(start + 1 if cfg.resume else 0, cfg.epochs + 1):
        row = {"epoch": epoch, "loss": None, "lr": None, "images_per_s": None}
        if epoch > 0:
            row["loss"], row["images_per_s"] = train_epoch(step, net, parts["scheduler"], generator, data["train_x"],
                                                           epoch, cfg)
            row["lr"] = float(parts["optimizer"].param_groups[0]["lr"])
        if epoch in (0, cfg.epochs) or (cfg.eval_every and epoch % cfg.eval_every == 0):
            final = evaluate(net, data, cfg)
            row.update(final)
        row["time"] = time.perf_counter() - t0
        if cfg.rank > 0:
            continue
        with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")  # compact: a 2-d run logs its points
        p = row.get("collapse", {}).get("projector", {})
        values = [epoch, row["loss"], row["lr"], row["images_per_s"], row.get("knn_acc"), p.get("std"),
                  p.get("corr_strength"), p.get("eff_rank"), row["time"]]
        say(" ".join(" " * w if v is None else format(v, f"{w}{f}") for v, (_, w, f) in zip(values, COLUMNS)))
        state = {name: part.state_dict() for name, part in parts.items()}
        for group in state["optimizer"]["param_groups"]:
            group.update(lr=float(group["lr"]), fused=None, foreach=None)
        torch.save({**state, "epoch": epoch, "elapsed": row["time"], "config": vars(cfg)}, path + ".tmp")
        os.replace(path + ".tmp", path)
    return final, time.perf_counter() - t0

# ---- 11. Main: settings -> machine -> data -> model -> training -> linear probe -> results.json ---
def main(argv=None):
    """Bad input: a line, exit 2; NaN: a line naming the last good checkpoint, exit 1; Ctrl-C: how to resume, 130."""
    cfg = check_settings(parse_settings(list(sys.argv[1:] if argv is None else argv)))
    try:
        setup_machine(cfg)
        if cfg.resume and os.path.isfile(os.path.join(cfg.out, "results.json")):
            say(f"fdsl: {cfg.out} is a finished run; start a new one to train longer")
            return read_json(os.path.join(cfg.out, "results.json"))
        data = load_data(cfg)
        net, parts, step, generator = build_training(cfg, len(data["train_x"]) // cfg.batch_size)
        start, elapsed = load_checkpoint(cfg, parts)
        if cfg.step == "graph":
            graphed = graph_step(step, data["train_x"][:cfg.batch_size], net, parts["optimizer"], parts["scheduler"],
                                 generator)
            step, cfg.step = graphed, "graph" if graphed is not step else "eager"  # eager: the check failed
        final, seconds = train(step, net, parts, generator, data, cfg, start, elapsed)
        results, t0 = {**(final or evaluate(net, data, cfg)), "epochs": cfg.epochs}, time.perf_counter()
        if cfg.linear_epochs > 0:  # (final is None when a run resumes after its last epoch)
            results["linear_acc"] = linear_probe(net.backbone, net.feat_dim, data, cfg)
            say(f"linear probe ({cfg.linear_epochs} epochs): {results['linear_acc']:.2f}%")
        results.update(time_s=seconds + time.perf_counter() - t0, step=cfg.step, device=f"{cfg.device} x{cfg.world}",
                       **provenance(cfg))
        if cfg.rank == 0:
            with open(os.path.join(cfg.out, "results.json"), "w") as f:
                json.dump(results, f, indent=2)
        say(f"k-NN {results['knn_acc']:.2f}% after {cfg.epochs} epochs; results in {cfg.out}/results.json")
        return results
    except (FloatingPointError, torch.linalg.LinAlgError) as e:  # NaN or inf in the loss, weights or features
        say(f"fdsl: stopped: {e}; the last good checkpoint is {cfg.out}/checkpoint.pt; try a lower --lr",
            file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        saved = os.path.exists(os.path.join(cfg.out, "checkpoint.pt"))  # how to go on, in one line
        say(f"\nfdsl: interrupted; " + (f"go on: python fdsl.py --resume {cfg.out}" if saved else "nothing saved yet"),
            file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
