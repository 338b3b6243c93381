"""
Times fdsl.py's training step on random images (their content does not change the speed).

    python tools/bench.py [fdsl.py's flags] [--steps N] [--out DIR]

Rows: the bare model (backbone and projector, forward and backward on both views: the floor a step is measured
against), the eager full step (augmentation, network, layer, loss, backward, SGD; the whitening by eigh) and, on a
CUDA GPU, the same step recorded as one CUDA graph (the whitening by Newton-Schulz), each in ms and images per
second, the mean of N calls after 3 untimed ones. --out DIR keeps the table in DIR/benchmark.md, the figures in
DIR/benchmark.json.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import fdsl  # noqa: E402  (the repository's root, wherever this is run from)


def timed(fn, steps, device):
    """Mean seconds per call of fn after 3 untimed ones, the GPU waited for at both ends."""
    for _ in range(3):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def bare_model(net, x, cfg):
    """Forward and backward of backbone and projector on two views of x, as the step runs them, nothing else."""
    views = fdsl.network_input(torch.cat([x, x])).chunk(2)

    def call():
        with fdsl.autocast(cfg):
            total = sum(net.project(view).float().sum() for view in views)
        net.zero_grad(set_to_none=True)
        total.backward()
    return call


def training(cfg):
    """fdsl's parts and step for these settings, as a run builds them. -> (parts, step, generator)"""
    parts = fdsl.build_training(cfg, 50_000 // cfg.batch_size)
    generator = torch.Generator(device=cfg.device)
    return parts, fdsl.make_step(cfg, parts, generator), generator


def scheduled(step, x, parts):
    """A call of step on x followed by the schedule's step, as training makes it."""
    def call():
        step(x)
        parts["scheduler"].step()
    return call


def measure(cfg, steps):
    """The rows of the table: {name: seconds per call, or a word why not}."""
    x = torch.randint(0, 256, (cfg.batch_size, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8,
                      device=cfg.device)
    planned = cfg.step
    cfg.whiten_method = "eigh"
    parts, step, _ = training(cfg)
    rows = {"bare model": timed(bare_model(parts["model"], x, cfg), steps, cfg.device),
            "eager full step (eigh)": timed(scheduled(step, x, parts), steps, cfg.device)}
    if planned != "graph":
        rows["graphed full step (newton)"] = "needs CUDA" if not cfg.device.startswith("cuda") else "not planned"
        return rows
    cfg.whiten_method = "newton"
    parts, step, generator = training(cfg)
    graphed = fdsl.graph_step(step, x, parts, generator, cfg)
    if graphed is step:  # the capture or its check failed; graph_step said why
        rows["graphed full step (newton)"] = "failed"
    else:
        rows["graphed full step (newton)"] = timed(scheduled(graphed, x, parts), steps, cfg.device)
    return rows


def table(cfg, rows, steps):
    """The printed table: a line on what was timed, a row per measurement, the epoch it implies."""
    layer = cfg.decorr + (f" ({cfg.groups} groups, {'shuffled' if cfg.shuffle else 'fixed'})" if cfg.decorr == "zca"
                          else "")
    info = fdsl.provenance(cfg)
    lines = [f"benchmark: {cfg.arch}, batch {cfg.batch_size}, {cfg.image_size} px, decorr {layer}, "
             f"{cfg.amp or 'float32'}, channels_last, {info['device_name']}, torch {info['torch']}, "
             f"fdsl {info['fdsl_version']}; mean of {steps} calls after 3 untimed ones"]
    for name, value in rows.items():
        if isinstance(value, float):
            lines.append(f"  {name:<34}{value * 1e3:9.2f} ms {cfg.batch_size / value:10.0f} img/s")
        else:
            lines.append(f"  {name:<34}{value:>12}")
    timings = {name: value for name, value in rows.items() if isinstance(value, float) and "full step" in name}
    fastest = min(timings, key=timings.get)
    lines.append(f"  a 50,000-image epoch at the {fastest.split(' (')[0]}: "
                 f"{50_000 // cfg.batch_size * timings[fastest]:.1f} s of training steps")
    return lines


def parse(argv):
    """This tool's --steps and --out, and fdsl.py's settings from the other flags. -> (own flags, cfg)."""
    parser = argparse.ArgumentParser(prog="tools/bench.py", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--steps", type=int, default=50, help="timed calls per row (default: 50)")
    parser.add_argument("--out", default="", help="folder for benchmark.md and benchmark.json (default: none)")
    own, rest = parser.parse_known_args(argv)
    if own.steps < 1:
        fdsl.fail("--steps must be at least 1")
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        fdsl.fail("tools/bench.py times one process; run it without torchrun")
    return own, fdsl.settings(rest)


def main(argv=None):
    """The command line: this tool's --steps and --out, and fdsl.py's flags for the rest. -> the rows."""
    own, cfg = parse(argv)
    fdsl.start_machine(cfg)
    rows = measure(cfg, own.steps)
    lines = table(cfg, rows, own.steps)
    print("\n".join(lines))
    if own.out:
        os.makedirs(own.out, exist_ok=True)
        command = "python tools/bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
        with open(os.path.join(own.out, "benchmark.md"), "w") as f:
            f.write(f"`{command}`\n\n```\n" + "\n".join(lines) + "\n```\n")
        with open(os.path.join(own.out, "benchmark.json"), "w") as f:
            json.dump({"seconds": rows, "settings": vars(cfg), **fdsl.provenance(cfg)}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
