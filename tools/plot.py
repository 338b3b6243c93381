"""
Figures and a table of fdsl.py's runs, finished or still running.

    python tools/plot.py RUN_DIR [RUN_DIR ...] [--out FIG.png]

FIG.png: six panels, per setting over training the k-NN accuracy, the projector's std (complete collapse: 0), its
correlation strength (dimensional collapse: 1) and effective rank, the final covariance spectra, and the backbone's
correlation against k-NN accuracy (correlation as an unsupervised metric). FIG.md: the final numbers as a Markdown
table with Spearman's rank correlations, printed too. Runs that logged 2-d or 3-d outputs: the paper's Figure 2,
FIG-2d.png, and in motion FIG-2d.gif. Runs of several batch sizes: accuracy against the batch, FIG-batch.png.
Default FIG: comparison.png in the runs' common parent folder. Runs that differ only in --seed are one setting:
their mean and a min-max band in the figure, mean ± std in the table. A run still training counts with its last
evaluated epoch. Needs matplotlib (pip install matplotlib), which fdsl's training does not.
"""
import argparse
import json
import math
import os
import statistics
import sys

# What defines a run's training, most telling first (two settings with one label are told apart in this order).
SETTING_KEYS = ("batch_size", "epochs", "decorr", "groups", "shuffle", "lr", "weight_decay", "warmup_epochs",
                "dataset", "arch", "proj_hidden", "proj_dim", "linear_projector", "eps", "predictor", "pred_hidden",
                "stop_grad", "loss", "momentum", "eval_every", "linear_epochs", "train_subset", "test_subset",
                "image_size", "data_dir", "precision", "amp", "whiten_method", "whiten_dtype", "knn_k", "knn_t",
                "metric_samples", "raw_eval")
# What does not: the seed, where and how a run ran (same arithmetic), what made it. Every flag of fdsl.RECIPE is in
# one of the two lists (a test checks it); fdsl itself is not imported: its torch would take seconds to load.
NOT_SETTING = ("seed", "out", "resume", "command", "device", "progress", "graph", "laptop", "rank", "world", "step",
               "train_step", "whiten", "sync_bn", "benchmark", "benchmark_steps", "plot", "torch", "torchvision",
               "python", "device_name", "fdsl_version")
LAYER_KEYS = ("groups", "shuffle", "eps", "whiten_method", "whiten_dtype")  # nothing without whitening
# Keys some configs lack: the older fdsl had no such flag, or the newer one fixed the value: what they used
# (whiten_dtype: float32 on Apple's GPU, which the newer fdsl does not record).
UNRECORDED = {"linear_projector": False, "pred_hidden": 256, "knn_k": 200, "knn_t": 0.1, "metric_samples": 2048,
              "raw_eval": False, "whiten_dtype": "float64"}
# Runs that agree in these evaluated the same random network at epoch 0 (counted once in Spearman's rank).
SAME_START = ("seed", "arch", "dataset", "train_subset", "test_subset", "image_size", "raw_eval", "knn_k", "knn_t",
              "precision", "amp")
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "synthetic": 5000}  # a folder's: unknown
COLUMNS = ("setting", "runs", "k-NN %", "linear %", "projector std", "projector corr", "projector eff. rank",
           "backbone corr", "epochs", "steps", "batch", "made with")


# ---- command line and run files -------------------------------------------------------------------
def fail(message):
    """Bad input: one line on stderr, exit code 2, no traceback."""
    print(f"plot.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv):
    """RUN_DIR ... and --out; a mistake in them: one line, exit code 2."""
    parser = argparse.ArgumentParser(prog="tools/plot.py", description=__doc__.strip().split("\n\n")[0],
                                     allow_abbrev=False)
    parser.error = lambda message: fail(f"{message} (see --help)")  # not argparse's whole usage block
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="fdsl run folders (config.json, log.jsonl)")
    parser.add_argument("--out", default="", metavar="FIG.png",
                        help="the figure; the table is FIG.md beside it (default: comparison.png beside the runs)")
    return parser.parse_args(argv)


def load_pyplot():
    """matplotlib's pyplot, drawing into files (no window), or one line saying how to install it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("drawing needs matplotlib, which fdsl's training does not: pip install matplotlib")
    return plt


def read_json(path):
    """A JSON file, or one line saying why it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{path}: cannot be read as JSON ({type(e).__name__}: {e})")


def read_log(path):
    """log.jsonl's rows in epoch order: a half-written last line (the run writing it) left out, a damaged line
    before it skipped with a warning; an epoch logged twice (a run resumed after a crash between its row and its
    checkpoint): its last row."""
    try:
        with open(path) as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except OSError:
        return []
    by_epoch = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and "epoch" in row:
            by_epoch[row["epoch"]] = row
        elif i < len(lines) - 1:
            print(f"plot.py: warning: {path}, line {i + 1}: not a log row; skipped", file=sys.stderr)
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def read_run(path):
    """A run folder: its settings, evaluated rows, results (none while it trains), final metrics (results.json's,
    else the last evaluated row's), the label of its layer and its setting."""
    if not os.path.exists(path):
        fail(f"{path}: no such folder")
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = ""
        if os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n, "config.json")) for n in os.listdir(path)):
            hint = f"; the runs in it: {os.path.join(path, '*')}"
        fail(f"{path}: not a run folder (no config.json){hint}")
    cfg = read_json(os.path.join(path, "config.json"))
    if not isinstance(cfg, dict):
        fail(f"{path}/config.json: not an fdsl config (a JSON object of settings)")
    log = os.path.join(path, "log.jsonl")
    rows = [row for row in read_log(log) if "knn_acc" in row and "collapse" in row]
    if not rows:
        fail(f"{path}: no evaluated epoch yet in {log}")
    results = {}
    if os.path.isfile(os.path.join(path, "results.json")):
        results = read_json(os.path.join(path, "results.json"))
    if not isinstance(results, dict):
        fail(f"{path}/results.json: not an fdsl results file (a JSON object)")
    return {"name": os.path.basename(os.path.abspath(path)), "cfg": cfg, "rows": rows, "results": results,
            "final": results.get("collapse") or rows[-1]["collapse"], "linear": results.get("linear_acc"),
            "knn": results.get("knn_acc", rows[-1]["knn_acc"]), "label": layer_label(cfg), "setting": setting_of(cfg)}


# ---- settings: which runs are one, their names and order ------------------------------------------
def setting_of(cfg):
    """What defines a run's training, {key: value}; a key a config lacks: None (or UNRECORDED's value)."""
    setting = {key: cfg.get(key, UNRECORDED.get(key)) for key in SETTING_KEYS}
    if setting["decorr"] != "zca":
        setting.update(dict.fromkeys(LAYER_KEYS))
    if setting["dataset"] != "folder":  # the data is named by the dataset, wherever it is kept
        setting["data_dir"] = None
    return setting


def layer_label(cfg):
    """none, bn, "zca, full ZCA", "zca, G shuffled groups" or "zca, G fixed groups"."""
    decorr, groups = cfg.get("decorr"), cfg.get("groups", 16)
    if decorr != "zca":
        return str(decorr)
    if groups == 1:
        return "zca, full ZCA"
    return f"zca, {groups} {'shuffled' if cfg.get('shuffle', True) else 'fixed'} groups"


def paper_name(cfg):
    """The paper's name for the layer: no normalization, BN, DBN (full ZCA), DBN in fixed groups, Shuffled-DBN."""
    decorr = cfg.get("decorr")
    if decorr != "zca":
        return {"none": "no normalization", "bn": "BN"}.get(decorr, str(decorr))
    if cfg.get("groups", 16) == 1:
        return "DBN (full ZCA)"
    if cfg.get("shuffle", True):
        return "Shuffled-DBN"
    return "DBN, fixed groups"


def paper_order(entry):
    """The paper's order: none, bn, zca (full ZCA, fixed groups, shuffled groups); then batch size, epochs, groups."""
    cfg = entry["cfg"]
    kind = 0
    if cfg.get("decorr") == "zca" and cfg.get("groups", 16) != 1:
        kind = 2 if cfg.get("shuffle", True) else 1
    return ({"none": 0, "bn": 1, "zca": 2}.get(cfg.get("decorr"), 3), kind, cfg.get("batch_size") or 0,
            cfg.get("epochs") or 0, entry["setting"].get("groups") or 0)


def group_settings(runs):
    """Runs of one setting together, in the paper's order: entries {runs, cfg, setting, label, title, legend}."""
    settings = {}
    for run in runs:
        settings.setdefault(json.dumps(run["setting"], sort_keys=True), []).append(run)
    entries = sorted(({"runs": same, "cfg": same[0]["cfg"], "setting": same[0]["setting"], "label": same[0]["label"]}
                      for same in settings.values()), key=paper_order)
    name_settings(entries)
    return entries


def describe(key, value):
    """A setting's value in words: "batch 512", "96 epochs", "lr 0.1", "predictor", "no stop grad"."""
    if isinstance(value, bool):
        return key.replace("_", " ") if value else "no " + key.replace("_", " ")
    if key == "batch_size":
        return f"batch {value}"
    if key == "epochs":
        return f"{value} epochs"
    return f"{key.replace('_', ' ')} {value}"


def name_settings(entries):
    """Each setting's title: its label and, where settings share one, the fewest of the keys in which they differ
    (in SETTING_KEYS' order) that tell them apart, e.g. "bn (batch 512, 96 epochs)"; the legend adds the seeds."""
    by_label = {}
    for entry in entries:
        by_label.setdefault(entry["label"], []).append(entry)
    for same in by_label.values():
        keys = list(dict.fromkeys(key for entry in same for key in entry["setting"]))
        keys = [key for key in keys if len({json.dumps(e["setting"].get(key)) for e in same}) > 1]
        notes = [""] * len(same)
        for n in range(1, len(keys) + 1):
            notes = [", ".join(describe(key, e["setting"].get(key)) for key in keys[:n]) for e in same]
            if len(set(notes)) == len(notes):
                break
        for entry, note in zip(same, notes):
            entry["title"] = entry["label"] + (f" ({note})" if note else "")
            seeds = f"{len(entry['runs'])} seeds"
            if len(entry["runs"]) == 1:
                entry["legend"] = entry["title"]
            elif note:
                entry["legend"] = f"{entry['label']} ({note}; {seeds})"
            else:
                entry["legend"] = f"{entry['label']} ({seeds})"


# ---- numbers: seeds merged, Spearman's rank correlation --------------------------------------------
def seed_stats(runs, value):
    """The epochs every run of a setting evaluated, and there the mean, min and max over the runs of value(row)."""
    by_epoch = [{row["epoch"]: row for row in run["rows"]} for run in runs]
    epochs = sorted(set.intersection(*(set(rows) for rows in by_epoch)))
    values = [[value(rows[epoch]) for rows in by_epoch] for epoch in epochs]
    return epochs, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def metric_points(runs):
    """(backbone correlation strength, k-NN accuracy) at every evaluation of the runs, each network once: runs
    that agree in SAME_START evaluated the same random network at epoch 0 (it depends on nothing else)."""
    points = {}
    for run in runs:
        for row in run["rows"]:
            key = (run["name"], row["epoch"])
            if row["epoch"] == 0:
                key = ("epoch 0",) + tuple(json.dumps(run["cfg"].get(k, UNRECORDED.get(k))) for k in SAME_START)
            points.setdefault(key, (row["collapse"]["backbone"]["corr_strength"], row["knn_acc"]))
    return list(points.values())


def ranks(values):
    """0-based ranks, tied values given their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result, start = [0.0] * len(values), 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            result[i] = (start + end) / 2
        start = end + 1
    return result


def spearman(x, y):
    """Spearman's rank correlation: the Pearson correlation of the ranks (NaN where either is constant)."""
    rx, ry = ranks(list(x)), ranks(list(y))
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    dx, dy = [v - mx for v in rx], [v - my for v in ry]
    norm = math.sqrt(sum(v * v for v in dx) * sum(v * v for v in dy))
    if norm == 0:
        return math.nan
    return sum(a * b for a, b in zip(dx, dy)) / norm


def train_images(cfg):
    """The images a run trained on: its train_subset (at most the dataset), else the whole dataset's (a folder's:
    unknown, None)."""
    whole, subset = TRAIN_IMAGES.get(cfg.get("dataset")), cfg.get("train_subset") or 0
    if subset > 0:
        return min(subset, whole or subset)
    return whole


def training_steps(cfg):
    """Optimizer steps a run takes, epochs x whole batches per epoch; None when the image count is unknown."""
    images, batch, epochs = train_images(cfg), cfg.get("batch_size"), cfg.get("epochs")
    if not images or not batch or not epochs:
        return None
    return epochs * (images // batch)


# ---- the table --------------------------------------------------------------------------------------
def spread(values, fmt):
    """One value as it is; several: mean ± standard deviation."""
    if len(values) == 1:
        return f"{values[0]:{fmt}}"
    return f"{statistics.fmean(values):{fmt}} ± {statistics.stdev(values):{fmt}}"


def epochs_cell(runs):
    """The setting's epochs; with a run still training, how far each got: "32 of 96"."""
    epochs = runs[0]["cfg"].get("epochs")
    if all(run["results"] for run in runs):
        return str(epochs)
    reached = sorted({epochs if run["results"] else run["rows"][-1]["epoch"] for run in runs})
    return f"{', '.join(str(e) for e in reached)} of {epochs}"


def made_with(runs):
    """Device, torch and fdsl version of the runs, each once (results.json's, or config.json's while training)."""
    seen = []
    for run in runs:
        info = run["results"] if "torch" in run["results"] else run["cfg"]
        if "torch" in info:
            version = short_version(info.get("fdsl_version", ""))
            seen.append(f"{info.get('device_name')}, torch {info['torch']}, fdsl {version}")
    return "; ".join(dict.fromkeys(seen))


def short_version(version):
    """fdsl's version in short: its git commit's first 12 digits (+modified where it says so) and the sha256 of
    fdsl.py, where recorded, in 8."""
    parts = []
    for token in str(version).split():
        if token.startswith("sha256:"):
            parts.append(token[:15])
        else:
            parts.append(token[:12] + ("+modified" if token.endswith("+modified") else ""))
    return " ".join(parts)


def table_row(entry):
    """A setting's row: final accuracies and collapse metrics (seeds: mean ± std), how long, what made it."""
    runs = entry["runs"]

    def final(where, key, fmt):
        return spread([run["final"][where][key] for run in runs], fmt)
    names = ", ".join(run["name"] for run in runs) + (f" (n={len(runs)})" if len(runs) > 1 else "")
    linear = ""
    if all(run["linear"] is not None for run in runs):
        linear = spread([run["linear"] for run in runs], ".2f")
    steps = training_steps(entry["cfg"])
    cells = [entry["title"], names, spread([run["knn"] for run in runs], ".2f"), linear,
             final("projector", "std", ".3g"), final("projector", "corr_strength", ".2f"),
             final("projector", "eff_rank", ".1f"), final("backbone", "corr_strength", ".2f"), epochs_cell(runs),
             "" if steps is None else str(steps), str(entry["cfg"].get("batch_size")), made_with(runs)]
    return "| " + " | ".join(cells) + " |"


def spearman_lines(entries):
    """How well the backbone's correlation (no labels) ranks the accuracies: over every evaluation, each network
    once, and over the runs' ends (final k-NN, and linear accuracy when every run has it)."""
    runs = [run for entry in entries for run in entry["runs"]]
    points = metric_points(runs)
    final_corr = [run["final"]["backbone"]["corr_strength"] for run in runs]
    lines = [f"Spearman's rank correlation of the backbone's correlation strength with k-NN accuracy over every "
             f"evaluation of every run, each network once ({len(points)} points): {spearman(*zip(*points)):+.2f}.",
             f"Over the runs' final correlation ({len(runs)} runs): with final k-NN accuracy "
             f"{spearman(final_corr, [run['knn'] for run in runs]):+.2f}"]
    if all(run["linear"] is not None for run in runs):
        lines[-1] += f", with linear accuracy {spearman(final_corr, [run['linear'] for run in runs]):+.2f}"
    lines[-1] += "."
    return lines


def runs_table(entries):
    """The final numbers as a Markdown table, a row per setting, then the Spearman lines."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += [table_row(entry) for entry in entries]
    return "\n".join(lines + [""] + spearman_lines(entries)) + "\n"


# ---- the six-panel figure ---------------------------------------------------------------------------
def collapse_value(where, key):
    """A log row -> one collapse metric of one place (backbone, projector or normalized)."""
    return lambda row: row["collapse"][where][key]


def draw_curves(axes, entry, color):
    """A setting's curves over epochs in the four training panels: the mean over seeds, a min-max band."""
    (ax_knn, ax_std, ax_corr), (ax_rank, _, _) = axes
    curves = ((ax_knn, lambda row: row["knn_acc"], "o-"), (ax_std, collapse_value("projector", "std"), "-"),
              (ax_corr, collapse_value("projector", "corr_strength"), "-"),
              (ax_corr, collapse_value("backbone", "corr_strength"), "--"),
              (ax_rank, collapse_value("projector", "eff_rank"), "-"),
              (ax_rank, collapse_value("backbone", "eff_rank"), "--"))
    for ax, value, style in curves:
        epochs, mean, low, high = seed_stats(entry["runs"], value)
        ax.plot(epochs, mean, style, ms=3, color=color, label=entry["legend"])
        if len(entry["runs"]) > 1:
            ax.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)


def draw_spectra(ax, entry, color):
    """A setting's final covariance spectra (mean over seeds), projector and backbone, on a log scale."""
    for where, style in (("projector", "-"), ("backbone", "--")):
        spectra = [run["final"][where]["spectrum"] for run in entry["runs"]]
        shown = [(i + 1, statistics.fmean(v)) for i, v in enumerate(zip(*spectra)) if statistics.fmean(v) > 0]
        if shown:  # zeros have no place on a log scale
            ax.semilogy(*zip(*shown), style, color=color)


def label_panels(plt, axes, entries):
    """Titles, axes and the line-style keys of the six panels; the last one's title gives Spearman's rank."""
    (ax_knn, ax_std, ax_corr), (ax_rank, ax_spec, ax_metric) = axes
    for ax, title, ylabel in ((ax_knn, "k-NN accuracy of the backbone", "k-NN accuracy (%)"),
                              (ax_std, "projector output: std (0 = complete collapse)", "mean per-axis std"),
                              (ax_corr, "correlation strength (1 = dimensional collapse)", "mean |corr|"),
                              (ax_rank, "effective rank", "effective rank")):
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
    ax_std.set_yscale("log")
    ax_spec.set(title="final covariance spectrum", xlabel="eigenvalue index (largest first)",
                ylabel="eigenvalue / largest", ylim=(1e-8, 2))
    rho = spearman(*zip(*metric_points([run for entry in entries for run in entry["runs"]])))
    ax_metric.set(title=f"correlation as an unsupervised metric (Spearman {rho:+.2f})", ylabel="k-NN accuracy (%)",
                  xlabel="backbone correlation strength (no labels), every evaluation")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    for ax in (ax_corr, ax_rank, ax_spec):
        ax.legend(handles=[plt.Line2D([], [], color="0.3", ls="-", label="projector"),
                           plt.Line2D([], [], color="0.3", ls="--", label="backbone")], fontsize=8)


def draw_runs(plt, entries):
    """The six-panel figure: four panels over training (a line per setting, seeds: mean and min-max band), the
    final spectra, and backbone correlation against k-NN accuracy at every evaluation. -> the figure"""
    fig, axes = plt.subplots(2, 3, figsize=(16, 9.5))
    for i, entry in enumerate(entries):
        color = f"C{i % 10}"
        draw_curves(axes, entry, color)
        draw_spectra(axes[1][1], entry, color)
        axes[1][2].scatter(*zip(*metric_points(entry["runs"])), s=14, color=color)
    label_panels(plt, axes, entries)
    legend_rows = math.ceil(len(entries) / 4)
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=min(len(entries), 4), fontsize=9)
    fig.tight_layout(rect=(0, 0.02 + 0.03 * legend_rows, 1, 1))
    return fig


# ---- accuracy against the batch size ----------------------------------------------------------------
def batch_series(entries):
    """The batch figure's lines: one per layer (the paper's name) and epoch count, so a batch trained longer (e.g.
    to as many steps as a smaller batch) is its own series; -> [(legend, entries, colour, style)]."""
    series, families = {}, []
    for entry in entries:
        family = paper_name(entry["cfg"])
        if family not in families:
            families.append(family)
        series.setdefault((family, entry["cfg"].get("epochs")), []).append(entry)
    result = []
    for family in families:
        lines = sorted((es for (name, _), es in series.items() if name == family), key=len, reverse=True)
        for i, es in enumerate(lines):
            label = f"{family}, {es[0]['cfg'].get('epochs')} epochs"
            if i > 0:
                label += equal_steps_note(es, lines[0])
            label += training_note(es)
            result.append((label, es, f"C{families.index(family) % 10}", ("o-", "s--", "^:", "D-.")[i % 4]))
    return result


def equal_steps_note(entries, main):
    """" (1824 steps, batch 64's 1872)" when a one-batch series takes within 10% of the steps that a batch of the
    layer's main series does, else ""."""
    steps = training_steps(entries[0]["cfg"])
    if len(entries) != 1 or not steps:
        return ""
    for entry in main:
        other = training_steps(entry["cfg"])
        if other and abs(other - steps) <= 0.1 * steps:
            return f" ({steps} steps, batch {entry['cfg'].get('batch_size')}'s {other})"
    return ""


def training_note(entries):
    """"; at epoch 32 so far" when a run of the series is still training (its last evaluation is drawn), else ""."""
    reached = sorted({run["rows"][-1]["epoch"] for e in entries for run in e["runs"] if not run["results"]})
    if not reached:
        return ""
    return f"; at epoch {', '.join(str(epoch) for epoch in reached)} so far"


def draw_batch_sizes(plt, entries):
    """A batch-size study: each series' final k-NN and linear accuracy against the batch, mean ± std over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    sizes = sorted({entry["cfg"].get("batch_size") for entry in entries})
    for ax, name, key in ((axes[0], "k-NN", "knn"), (axes[1], "linear", "linear")):
        for label, es, color, style in batch_series(entries):
            points = [(e["cfg"].get("batch_size"), [run[key] for run in e["runs"] if run[key] is not None])
                      for e in sorted(es, key=lambda e: e["cfg"].get("batch_size"))]
            points = [(batch, values) for batch, values in points if values]
            if not points:
                continue
            ax.errorbar([batch for batch, _ in points], [statistics.fmean(v) for _, v in points],
                        [statistics.stdev(v) if len(v) > 1 else 0 for _, v in points], fmt=style, capsize=3,
                        color=color, label=label)
        ax.set(title=f"{name} accuracy against the batch size (mean ± std)", xlabel="batch size", ylabel="%")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(b) for b in sizes])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---- the paper's Figure 2: 2-d outputs -------------------------------------------------------------
def projection_rows(run):
    """A run's evaluated rows that logged the layer's output points (runs of 2 or 3 output axes)."""
    return [row for row in run["rows"] if row.get("projection", {}).get("points")]


def projection_xy(row):
    """A row's points, the first two axes (1 axis: y = 0), in the layer's units (logged: whole units of scale)."""
    scale, points = row["projection"].get("scale", 1), row["projection"]["points"]
    return [p[0] * scale for p in points], [p[1] * scale if len(p) > 1 else 0.0 for p in points]


def projection_limit(runs):
    """Half the width of every panel: 1.1 x the 99.5th percentile of |coordinate| (the rarest may leave it)."""
    values = sorted(abs(v) for run in runs for row in projection_rows(run) for xy in projection_xy(row) for v in xy)
    position = 0.995 * (len(values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(values) - 1)
    value = values[low] + (values[high] - values[low]) * (position - low)
    return 1.1 * value or 1.0


def draw_projection(ax, row, title, limit):
    """One panel: the points coloured by class, on the common axes."""
    ax.set(xlim=(-limit, limit), ylim=(-limit, limit), aspect="equal", xticks=[], yticks=[])
    x, y = projection_xy(row)
    ax.scatter(x, y, c=row["projection"]["labels"], cmap="tab10", vmin=-0.5, vmax=9.5, s=2, rasterized=True)
    ax.set_title(title, fontsize=10)


def draw_projections(plt, runs):
    """The paper's Figure 2: a row per run, its outputs at up to 4 evaluations, every panel on the same axes, so
    a collapsed output is drawn as the point it is. -> the figure"""
    limit = projection_limit(runs)
    picks = []
    for run in runs:
        rows = projection_rows(run)
        picks.append([rows[round(i * (len(rows) - 1) / 3)] for i in range(4)] if len(rows) > 4 else rows)
    width = max(len(rows) for rows in picks)
    fig, axes = plt.subplots(len(runs), width, figsize=(2.8 * width, 2.8 * len(runs)), squeeze=False)
    for ax_row, run, rows in zip(axes, runs, picks):
        for j, ax in enumerate(ax_row):
            if j < len(rows):
                draw_projection(ax, rows[j], f"epoch {rows[j]['epoch']}", limit)
            else:
                ax.set_axis_off()
        ax_row[0].set_ylabel(run["title"], fontsize=10)
    fig.suptitle("2-d projection spaces (colours: classes), every panel on the same axes", fontsize=11)
    fig.tight_layout()
    return fig


def animate_projections(plt, runs, path):
    """Figure 2 in motion (a GIF by Pillow): the runs side by side, a frame per evaluated epoch, each run at its
    latest evaluation up to that epoch, every frame on the same axes."""
    from matplotlib.animation import FuncAnimation, PillowWriter
    limit, rows = projection_limit(runs), [projection_rows(run) for run in runs]
    fig, axes = plt.subplots(1, len(runs), figsize=(2.6 * len(runs), 2.9), squeeze=False)

    def frame(epoch):
        for ax, run, run_rows in zip(axes[0], runs, rows):
            ax.clear()
            shown = [row for row in run_rows if row["epoch"] <= epoch] or run_rows
            draw_projection(ax, shown[-1], run["title"], limit)
        fig.suptitle(f"epoch {epoch}", fontsize=11)
    epochs = sorted({row["epoch"] for run_rows in rows for row in run_rows})
    FuncAnimation(fig, frame, frames=epochs).save(path, PillowWriter(fps=4), dpi=72)
    plt.close(fig)


# ---- main -------------------------------------------------------------------------------------------
def save(plt, fig, path):
    """Writes the figure and frees it."""
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    """Reads the runs, writes the figures and the table (printed too). -> the figure's path"""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    paths = list(dict.fromkeys(os.path.normpath(path) for path in args.runs))  # a folder named twice: once
    runs = [read_run(path) for path in paths]
    plt = load_pyplot()
    entries = group_settings(runs)
    for entry in entries:
        for run in entry["runs"]:
            seed = f", seed {run['cfg'].get('seed')}" if len(entry["runs"]) > 1 else ""
            run["title"] = entry["title"] + seed
    out = args.out or os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths]),
                                   "comparison.png")
    stem = os.path.splitext(out)[0]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save(plt, draw_runs(plt, entries), out)
    table, written = runs_table(entries), [out, stem + ".md"]
    with open(stem + ".md", "w") as f:
        f.write(table)
    flat = [run for entry in entries for run in entry["runs"] if projection_rows(run)]  # the paper's order
    if flat:
        animate_projections(plt, flat, stem + "-2d.gif")
        save(plt, draw_projections(plt, flat), stem + "-2d.png")
        written += [stem + "-2d.png", stem + "-2d.gif"]
    if len({entry["cfg"].get("batch_size") for entry in entries}) > 1:
        save(plt, draw_batch_sizes(plt, entries), stem + "-batch.png")
        written.append(stem + "-batch.png")
    print(table + f"\nplot.py: {len(runs)} run(s), {len(entries)} setting(s): " + ", ".join(written))
    return out


if __name__ == "__main__":
    main()
