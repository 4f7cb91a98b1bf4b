"""Joint-evaluation benchmark (the KnOTS paper's per-task and joint settings) on a real model,
offline: all-MiniLM-L6-v2 with one shipped LoRA adapter per task (benchmarks/joint_adapters/,
trained by train_joint_adapters.py), tasks and frozen prompt heads from joint_tasks.py.

For every merge method in knots_ext.methods.METHODS, the zero-shot base model, each finetuned
model, and the Ensemble baseline (every finetuned model runs, the most confident prediction wins):
- per-task setting: each task's test inputs against its own classes; accuracy, and normalized
  accuracy = merged / finetuned accuracy, averaged over tasks;
- joint setting: the test inputs of all tasks against the union of all classes, Hits@1 / Hits@3;
- CKA alignment (knots_ext.analysis) between the tasks' updates, per layer, raw LoRA vs KnOTS.

Hyperparameters are chosen on the validation split only, by the KnOTS reference code's linear
search: starting from lam 0.6, top_k 0.3, dare_p 0.1, each parameter in turn (lam, top_k, dare_p,
then lam again) is swept over its grid (lam 0.1..1.0, top_k 1.0..0.1, dare_p 0.1..0.9) with the
others held, keeping the best; separately for the per-task setting (criterion: mean normalized
validation accuracy) and for the joint one (validation Hits@1). Test numbers use those choices.

    python benchmarks/joint_eval.py --quick   # shipped adapters and choices: test only (minutes)
    python benchmarks/joint_eval.py           # the search too; writes benchmarks/joint_results/
    python benchmarks/joint_eval.py --add-intervals   # the shipped run's test figures again, with
                                              # bootstrap intervals added to benchmarks/joint_results/

Writes results.json, results.md and PNG plots (normalized accuracy per method, joint Hits@1, CKA
heatmaps) to --out."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import joint_tasks as jt  # noqa: E402

import knots_ext  # noqa: E402
from knots_ext import analysis  # noqa: E402
from knots_ext.grams import collect_grams, load_grams, save_grams  # noqa: E402
from knots_ext.methods import METHODS  # noqa: E402


class Setting:
    """Which tasks, adapters and methods; where the full run's results are shipped."""

    def __init__(self, tasks: list, adapters: Path, results: Path, methods: list):
        self.tasks, self.adapters, self.results, self.methods = tasks, adapters, results, methods


STANDARD = Setting(jt.TASK_NAMES, HERE / "joint_adapters", HERE / "joint_results", list(METHODS))
# The harder setting (issue 14): 8 tasks, rank-16 adapters trained 4x longer (train_joint_adapters.py
# --harder), KnOTS-TIES / KnOTS-DARE-TIES against the plain merges (knots-ta
# is TA exactly, so it is left out).
HARDER = Setting(jt.HARD_TASK_NAMES, HERE / "joint_adapters_hard", HERE / "joint_results_hard",
                 ["ta", "ties", "dare-ties", "knots-ties", "knots-dare-ties"])
GRID = {
    "lam": [round(0.1 * i, 1) for i in range(1, 11)],
    "top_k": [round(0.1 * i, 1) for i in range(10, 0, -1)],
    "dare_p": [round(0.1 * i, 1) for i in range(1, 10)],
}
DEFAULTS = {"lam": 0.6, "top_k": 0.3, "dare_p": 0.1}
SEARCH_ORDER = ["lam", "top_k", "dare_p", "lam"]
SETTINGS = ("per_task", "joint")
DARE_SEED = 0
GRAM_EXAMPLES = 64  # training inputs per task for RegMean's Grams
CKA_EXAMPLES = 32  # validation inputs per task for the CKA analysis


def method_params(name: str) -> list:
    """The hyperparameters searched for a method: those of lam, top_k, dare_p it declares."""
    return [p for p in ("lam", "top_k", "dare_p") if p in METHODS[name].param_names]


# ---- scoring (pure functions of embeddings) -----------------------------------------------------

class Inputs:
    """One split of every task, concatenated: texts, each text's task, its label within the task
    and its label in the joint label space (the union of the tasks' classes, in JOINT_LABELS order;
    columns are those classes' rows of the heads)."""

    def __init__(self, tasks, split: str):
        self.tasks = tasks
        self.columns = sorted({i for task in tasks for i in task.joint_ids()})
        self.texts, self.task, self.label, self.joint = [], [], [], []
        for t, task in enumerate(tasks):
            s = task.splits[split]
            ids = [self.columns.index(i) for i in task.joint_ids()]
            self.texts += s.texts
            self.task += [t] * len(s.texts)
            self.label += s.labels
            self.joint += [ids[y] for y in s.labels]
        self.task = torch.tensor(self.task)
        self.label = torch.tensor(self.label)
        self.joint = torch.tensor(self.joint)

    def rows(self, t: int) -> torch.Tensor:
        return (self.task == t).nonzero().squeeze(1)


def hits_rows(scores: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, whether its target is among the k highest scores (ties: lower index first)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == target[:, None]).any(1)


def hits_at(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of rows whose target is among the k highest scores."""
    return hits_rows(scores, target, k).double().mean().item()


def scored(inputs: Inputs, task_scores, joint_scores: torch.Tensor) -> dict:
    """Per-task accuracy and joint Hits@1/@3 from scores: task_scores(t, rows) gives task t's
    inputs' scores over its own classes, joint_scores all inputs' over the joint label space.
    "correct" keeps the per-input results (for the bootstrap intervals)."""
    own = torch.zeros(len(inputs.texts), dtype=torch.bool)
    for t in range(len(inputs.tasks)):
        rows = inputs.rows(t)
        own[rows] = hits_rows(task_scores(t, rows), inputs.label[rows], 1)
    hits = {k: hits_rows(joint_scores, inputs.joint, k) for k in (1, 3)}
    acc = {task.name: own[inputs.rows(t)].double().mean().item() for t, task in enumerate(inputs.tasks)}
    return {"acc": acc, "hits1": hits[1].double().mean().item(), "hits3": hits[3].double().mean().item(),
            "correct": {"acc": own, "hits1": hits[1], "hits3": hits[3]}}


def score(emb: torch.Tensor, inputs: Inputs, heads: torch.Tensor) -> dict:
    """Per-task accuracy (each task's inputs against its own classes) and joint Hits@1/@3 (all
    inputs against all the tasks' classes) of one model's embeddings."""
    sims = emb @ heads.T
    return scored(inputs, lambda t, rows: sims[rows][:, inputs.tasks[t].joint_ids()], sims[:, inputs.columns])


def ensemble_score(embs: list, inputs: Inputs, heads: torch.Tensor) -> dict:
    """The Ensemble baseline: every finetuned model scores every input; a class's score is the
    highest probability any model gives it (softmax over the classes in play), so the top class
    is the most confident model's prediction."""
    joint_heads = heads[inputs.columns]
    joint = torch.stack([torch.softmax(jt.SCALE * e @ joint_heads.T, dim=1) for e in embs]).amax(0)

    def task_scores(t, rows):
        ids = inputs.tasks[t].joint_ids()
        return torch.stack([torch.softmax(jt.SCALE * e[rows] @ heads[ids].T, dim=1) for e in embs]).amax(0)

    return scored(inputs, task_scores, joint)


def normalized(acc: dict, finetuned: dict) -> float:
    return sum(acc[t] / finetuned[t] for t in finetuned) / len(finetuned)


def intervals(result: dict, finetuned: list, inputs: Inputs, minus: dict | None = None) -> dict:
    """Bootstrap 95% intervals of a test result's average accuracy, normalized accuracy and joint
    Hits@1/@3 (where the result has them), resampling each task's test inputs (stratified by task;
    the finetuned models' results on the same resampled inputs are the denominators). finetuned: per
    task, the correct vectors of its finetuned model. minus: another result; the intervals are then
    of the difference result - minus on the same resampled inputs (paired)."""
    rows = [inputs.rows(t).numpy() for t in range(len(inputs.tasks))]
    ft = [finetuned[t]["acc"].numpy()[r].astype(float) for t, r in enumerate(rows)]
    sizes = [len(r) for r in rows]

    def per_task(res: dict, key: str) -> list:
        return [res["correct"][key].numpy()[r].astype(float) for r in rows]

    def avg(parts, idx):
        return np.mean([a[i].mean() for a, i in zip(parts, idx)])

    def norm(parts, idx):
        return np.mean([a[i].mean() / max(f[i].mean(), 1e-12) for a, f, i in zip(parts, ft, idx)])

    def pooled(parts, idx):
        return np.concatenate([a[i] for a, i in zip(parts, idx)]).mean()

    out = {}
    for name, key, stat in (("avg", "acc", avg), ("normalized", "acc", norm), ("hits1", "hits1", pooled),
                            ("hits3", "hits3", pooled)):
        if key in result["correct"]:  # no joint results for the finetuned row
            a = per_task(result, key)
            b = per_task(minus, key) if minus is not None else None
            out[name] = jt.bootstrap_interval(
                lambda idx, stat=stat, a=a, b=b: stat(a, idx) - (stat(b, idx) if b else 0.0), sizes)
    return out


# KnOTS against the merges it builds on: paired differences reported with intervals.
DIFFERENCES = [("knots-ties", "ties"), ("knots-ties", "ta"), ("knots-dare-ties", "dare-ties"),
               ("knots-dare-ties", "ta")]


def difference(a: dict, b: dict, finetuned: list, inputs: Inputs) -> dict:
    """Method a - method b on test, each with its own chosen hyperparameters per setting (a and b:
    {setting: result}): normalized accuracy and joint Hits@1 as [difference, low, high]."""
    norm = intervals(a["per_task"], finetuned, inputs, minus=b["per_task"])["normalized"]
    hits = intervals(a["joint"], finetuned, inputs, minus=b["joint"])["hits1"]
    ft = {t.name: finetuned[i]["acc"][inputs.rows(i)].double().mean().item() for i, t in enumerate(inputs.tasks)}
    return {"normalized": [normalized(a["per_task"]["acc"], ft) - normalized(b["per_task"]["acc"], ft), *norm],
            "hits1": [a["joint"]["hits1"] - b["joint"]["hits1"], *hits]}


# ---- models ------------------------------------------------------------------------------------

class Bench:
    """The base model, its weights, the heads and the adapters; embeds splits with a merged update
    folded into the base weights (merges cached by method and hyperparameters)."""

    def __init__(self, tasks, adapter_dir: Path, top_k_scope: str = "task"):
        self.tasks = tasks
        self.top_k_scope = top_k_scope
        self.tokenizer, self.model = jt.load_base_model()
        self.base_state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.heads = jt.class_embeddings(self.model, self.tokenizer)
        self.adapters = [str(adapter_dir / t.name) for t in tasks]
        for path in self.adapters:
            if not Path(path).is_dir():
                raise SystemExit(f"error: {path}: no adapter (train them: python benchmarks/train_joint_adapters.py)")
        self.modules = knots_ext.io.load_adapter(self.adapters[0]).modules  # the adapted modules
        self.inputs = {s: Inputs(tasks, s) for s in ("val", "test")}
        self.grams = None
        self.cache = {}
        self.evaluations = 0
        self.embed_seconds = 0.0
        self.on_pass = lambda: None  # called after each encoder pass (the progress bar)

    def reset(self):
        self.model.load_state_dict(self.base_state)

    def embed(self, split: str, update=None) -> torch.Tensor:
        self.reset()
        if update is not None:
            update.fold_into(self.model)
        t0 = time.perf_counter()
        emb = jt.embed(self.model, self.tokenizer, self.inputs[split].texts)
        self.embed_seconds += time.perf_counter() - t0
        self.evaluations += 1
        self.on_pass()
        self.reset()
        return emb

    def merged(self, method: str, params: dict):
        declared = METHODS[method].param_names
        extra = {"grams": self.regmean_grams()} if "grams" in declared else {}
        fixed = dict(seed=DARE_SEED, top_k_scope=self.top_k_scope)
        kw = {k: v for k, v in {**fixed, **params}.items() if k in declared}
        return knots_ext.merge(self.adapters, method, **kw, **extra)

    def evaluate(self, method: str, params: dict, split: str) -> dict:
        key = (method, tuple(sorted(params.items())), split)
        if key not in self.cache:
            emb = self.embed(split, self.merged(method, params))
            self.cache[key] = score(emb, self.inputs[split], self.heads)
        return self.cache[key]

    def single(self, i: int):
        return knots_ext.merge([self.adapters[i]], "ta")

    def regmean_grams(self):
        """Per task, the Grams of every adapted module's inputs in that task's finetuned model,
        over GRAM_EXAMPLES training inputs fed one at a time (no padding counted)."""
        if self.grams is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="joint-grams-")
            self.grams = []
            for i, task in enumerate(self.tasks):
                self.reset()
                self.single(i).fold_into(self.model)
                texts = task.splits["train"].texts[:GRAM_EXAMPLES]
                batches = (jt.tokenize(self.tokenizer, [t]) for t in texts)
                path = Path(self._tmp.name) / f"{task.name}.safetensors"
                save_grams(path, collect_grams(self.model, batches, module_names=self.modules))
                self.grams.append(load_grams(path))
            self.reset()
        return self.grams

    def module_inputs(self, texts) -> dict:
        """Each adapted module's inputs in the base model (real tokens only), N x d_in."""
        modules = self.modules
        prefix = "base_model.model."
        named = dict(self.model.named_modules())
        seen = {m: [] for m in modules}
        batch = jt.tokenize(self.tokenizer, texts)
        mask = batch["attention_mask"].bool()
        hooks = [named[m[len(prefix):] if m.startswith(prefix) else m].register_forward_hook(
            lambda mod, args, out, m=m: seen[m].append(args[0][mask])) for m in modules]
        try:
            self.reset()
            with torch.inference_mode():
                self.model(**batch)
        finally:
            for h in hooks:
                h.remove()
        return {m: torch.cat(v).double() for m, v in seen.items()}


# ---- search -------------------------------------------------------------------------------------

def linear_search(evaluate, params: list, criterion, grid: dict = GRID) -> dict:
    """The KnOTS reference code's linear search: each parameter in SEARCH_ORDER swept over its
    grid with the others held at their current best (first best wins a tie)."""
    best = {p: DEFAULTS[p] for p in params}
    for p in SEARCH_ORDER:
        if p in params:
            values = [(criterion(evaluate({**best, p: v})), v) for v in grid[p]]
            best[p] = max(values, key=lambda sv: sv[0])[1]
    return best


# ---- CKA ----------------------------------------------------------------------------------------

def cka_summary(bench: Bench) -> dict:
    texts = [t for task in bench.tasks for t in task.splits["val"].texts[:CKA_EXAMPLES]]
    inputs = bench.module_inputs(texts)
    out = {}
    for space in ("raw", "knots"):
        per_module = analysis.adapter_cka(bench.adapters, inputs, space=space)
        out[space] = {m: c.tolist() for m, c in per_module.items()}
    return out


def layer_of(module: str) -> int:
    return int(module.split("encoder.layer.")[1].split(".")[0])


def mean_offdiag(matrix) -> float:
    m = torch.tensor(matrix)
    n = m.shape[0]
    return ((m.sum() - m.diagonal().sum()) / (n * n - n)).item()


# ---- outputs ------------------------------------------------------------------------------------

def fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in params.items()) or "-"


def with_ci(x, ci) -> str:
    """A percentage and its interval: 74.3 [71.0, 77.5]."""
    return "-" if x is None else f"{100 * x:.1f}" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    head = ["method", "chosen (per-task)"] + tasks + ["avg acc", "norm. acc", "chosen (joint)", "Hits@1", "Hits@3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["rows"].items():
        pt, jn = r["per_task"], r["joint"]
        cells = [name, fmt_params(pt["params"])] + [f"{100 * pt['acc'][t]:.1f}" for t in tasks]
        cells += [with_ci(sum(pt["acc"].values()) / len(tasks), pt.get("avg_ci")),
                  with_ci(pt["normalized"], pt.get("normalized_ci")), fmt_params(jn["params"]),
                  with_ci(jn.get("hits1"), jn.get("hits1_ci")), with_ci(jn.get("hits3"), jn.get("hits3_ci"))]
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("differences"):
        lines += ["", "| paired difference | norm. acc | Hits@1 |", "|---|---|---|"]
        for pair, d in results["differences"].items():
            cells = [f"{100 * v[0]:+.1f} [{100 * v[1]:+.1f}, {100 * v[2]:+.1f}]" for v in (d["normalized"], d["hits1"])]
            lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\n" + INTERVALS_NOTE


INTERVALS_NOTE = ("In brackets: bootstrap 95% intervals over the test inputs (1000 resamples, each task's inputs "
                  "resampled within the task, the same resamples for every row; a paired difference is taken on "
                  "each resample).\n")


def plots(results: dict, out: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [n for n in rows if n != "finetuned"]
    written = []
    for key, title, fname in (("normalized", "Per-task normalized accuracy (test, %; bootstrap 95% intervals)",
                               "normalized_accuracy.png"),
                              ("hits1", "Joint Hits@1 (test, %; bootstrap 95% intervals)", "joint_hits1.png")):
        entries = [rows[n]["per_task"] if key == "normalized" else rows[n]["joint"] for n in names]
        vals = [100 * e[key] for e in entries]
        cis = [[100 * c for c in e.get(f"{key}_ci", (e[key], e[key]))] for e in entries]
        err = [[v - c[0] for v, c in zip(vals, cis)], [c[1] - v for v, c in zip(vals, cis)]]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        colors = ["tab:orange" if n.startswith("knots") else "tab:gray" if n in ("zero-shot", "ensemble")
                  else "tab:blue" for n in names]
        ax.bar(range(len(names)), vals, color=colors, yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        top = max(c[1] for c in cis) + 5
        ax.set_ylim(max(0, min(c[0] for c in cis) - 10), min(100, top) if key == "hits1" else top)
        ax.set_title(title)
        for i, (v, c) in enumerate(zip(vals, cis)):
            ax.text(i, c[1], f"{v:.1f}", ha="center", va="bottom", fontsize=7)  # above the interval
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
        written.append(fname)
    cka = results["cka"]
    layers = sorted({layer_of(m) for m in cka["raw"]})
    tasks = results["tasks"]
    fig, axes = plt.subplots(2, len(layers), figsize=(2.4 * len(layers), 5.2))
    for row, space in enumerate(("raw", "knots")):
        for col, layer in enumerate(layers):
            mats = [torch.tensor(m) for name, m in cka[space].items() if layer_of(name) == layer]
            mean = torch.stack(mats).mean(0)
            ax = axes[row][col]
            ax.imshow(mean, vmin=0, vmax=1, cmap="viridis")
            for i in range(len(tasks)):
                for j in range(len(tasks)):
                    ax.text(j, i, f"{mean[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="k" if mean[i, j] > 0.6 else "w")
            ax.set_xticks([])
            ax.set_yticks(range(len(tasks)) if col == 0 else [], tasks if col == 0 else [], fontsize=7)
            ax.set_title(f"{'LoRA' if space == 'raw' else 'KnOTS'} layer {layer}", fontsize=8)
    fig.suptitle("Pairwise CKA of the task updates' outputs (mean over q, k, v, attn-out)")
    fig.tight_layout()
    fig.savefig(out / "cka_heatmaps.png", dpi=110)
    plt.close(fig)
    written.append("cka_heatmaps.png")
    return written


# ---- main ---------------------------------------------------------------------------------------

def shipped_choices(setting: Setting) -> dict:
    path = setting.results / "results.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {m: {s: rows[m][s]["params"] for s in SETTINGS} for m in rows if m in METHODS}


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    setting = HARDER if args.harder else STANDARD
    tasks = jt.load_tasks(args.tasks.split(",") if args.tasks else setting.tasks)
    bench = Bench(tasks, Path(args.adapters or setting.adapters), args.top_k_scope)
    names = [t.name for t in tasks]
    methods = args.methods.split(",") if args.methods else setting.methods
    # Quick mode takes the hyperparameters the shipped full run chose (the defaults where it has none).
    shipped = shipped_choices(setting) if args.quick else {}
    quick = {m: shipped.get(m) or {s: {p: DEFAULTS[p] for p in method_params(m)} for s in SETTINGS} for m in methods}
    # A bar over the encoder passes (most of the time), with the time left where their number is
    # known in advance (quick mode: the finetuned models, zero-shot, one per distinct merge; the full
    # mode's searches stop early, so no total). tqdm leaves it out when stderr is not a terminal.
    merges = sum(len({tuple(sorted(quick[m][s].items())) for s in SETTINGS}) for m in methods)
    passes = len(tasks) + 1 + merges if args.quick else None
    bar = tqdm(total=passes, desc="encoder passes", unit="pass", file=sys.stderr, disable=True if args.silent else None)
    bench.on_pass = bar.update
    log = (lambda *a, **k: tqdm.write(" ".join(map(str, a)), file=sys.stdout)) if not args.silent else (
        lambda *a, **k: None)
    grid = {**GRID, "lam": [round(0.1 * i, 1) for i in range(1, round(10 * args.lam_max) + 1)]}

    # Finetuned models: each adapter alone, on every input of the split (the Ensemble needs them
    # all); on val only for the search.
    splits = ("test",) if args.quick else ("val", "test")
    ft_emb = {s: [bench.embed(s, bench.single(i)) for i in range(len(tasks))] for s in splits}
    ft_scores = {s: [score(e, bench.inputs[s], bench.heads) for e in ft_emb[s]] for s in splits}
    ft_acc = {s: {t.name: ft_scores[s][i]["acc"][t.name] for i, t in enumerate(tasks)} for s in splits}
    ft_correct = [r["correct"] for r in ft_scores["test"]]
    log(f"finetuned test accuracy: {ft_acc['test']}", flush=True)
    criteria = {"per_task": lambda r: normalized(r["acc"], ft_acc.get("val")), "joint": lambda r: r["hits1"]}

    rows = {}

    def add_row(name, per_task_test, joint_test, params=None):
        params = params or {s: {} for s in SETTINGS}
        ci = intervals(per_task_test, ft_correct, bench.inputs["test"])
        rows[name] = {"per_task": {"params": params["per_task"], "acc": per_task_test["acc"],
                                   "normalized": normalized(per_task_test["acc"], ft_acc["test"]),
                                   "avg_ci": ci["avg"], "normalized_ci": ci["normalized"]},
                      "joint": {"params": params["joint"]}}
        if joint_test is not None:
            ci = intervals(joint_test, ft_correct, bench.inputs["test"])
            rows[name]["joint"].update({k: joint_test[k] for k in ("hits1", "hits3")})
            rows[name]["joint"].update({f"{k}_ci": ci[k] for k in ("hits1", "hits3")})

    zero = score(bench.embed("test"), bench.inputs["test"], bench.heads)
    add_row("zero-shot", zero, zero)
    ens = ensemble_score(ft_emb["test"], bench.inputs["test"], bench.heads)
    add_row("ensemble", ens, ens)
    # The finetuned row: each task's own model on its inputs (no single joint model).
    own = torch.zeros(len(bench.inputs["test"].texts), dtype=torch.bool)
    for t in range(len(tasks)):
        own[bench.inputs["test"].rows(t)] = ft_correct[t]["acc"][bench.inputs["test"].rows(t)]
    add_row("finetuned", {"acc": ft_acc["test"], "correct": {"acc": own}}, None)  # no joint model

    tested = {}
    for method in methods:
        t0 = time.perf_counter()
        params = method_params(method)
        if args.quick:
            chosen = quick[method]
        else:
            chosen = {s: linear_search(lambda cfg: bench.evaluate(method, cfg, "val"), params, criteria[s], grid)
                      for s in SETTINGS}
        test = {s: bench.evaluate(method, chosen[s], "test") for s in SETTINGS}
        tested[method] = test
        add_row(method, test["per_task"], test["joint"], chosen)
        r = rows[method]
        log(f"{method:16s} norm {100 * r['per_task']['normalized']:5.1f} ({fmt_params(chosen['per_task'])})  "
            f"joint H@1 {100 * r['joint']['hits1']:5.1f} ({fmt_params(chosen['joint'])})  "
            f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    results = {
        "mode": "quick" if args.quick else "full", "top_k_scope": args.top_k_scope,
        "model": jt.BASE_MODEL_NAME, "tasks": names,
        "sizes": {t.name: {s: len(t.splits[s].texts) for s in ("train", "val", "test")} for t in tasks},
        "joint_labels": [jt.JOINT_LABELS[i] for i in bench.inputs["test"].columns],
        "search": {"grid": grid, "defaults": DEFAULTS, "order": SEARCH_ORDER, "dare_seed": DARE_SEED,
                   "criteria": {"per_task": "mean normalized val accuracy", "joint": "val Hits@1"}},
        "finetuned_val_acc": ft_acc.get("val"),
        "rows": rows,
        "differences": {f"{a} - {b}": difference(tested[a], tested[b], ft_correct, bench.inputs["test"])
                        for a, b in DIFFERENCES if a in tested and b in tested},
        "val_evaluations": {f"{m} {fmt_params(dict(p))}": {k: v for k, v in r.items() if k != "correct"}
                            for (m, p, s), r in bench.cache.items() if s == "val"},
    }
    bar.close()
    results["cka"] = cka_summary(bench)
    results["cka_mean_offdiag"] = {space: {m: mean_offdiag(c) for m, c in per.items()}
                                   for space, per in results["cka"].items()}
    results["seconds"] = {"total": round(time.perf_counter() - t_start, 1), "embedding": round(bench.embed_seconds, 1),
                          "model_evaluations": bench.evaluations}
    return results


def with_intervals(full: dict, rerun: dict, path: Path) -> dict:
    """The full run's results with the intervals of a test-only re-run on its choices, which must
    reproduce its test figures (to float32 rounding: one flipped prediction moves them >= 1/200)."""

    def same(a, b) -> bool:
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= 1e-6
        return a == b

    for name, row in full["rows"].items():
        new = rerun["rows"].get(name, {"per_task": {}, "joint": {}})
        for setting, key in (("per_task", "params"), ("per_task", "acc"), ("joint", "params"), ("joint", "hits1")):
            if not same(new[setting].get(key), row[setting].get(key)):
                raise SystemExit(f"error: {path}: row {name}: the re-run's {setting} {key} "
                                 f"{new[setting].get(key)} differs from the shipped {row[setting].get(key)}")
        full["rows"][name] = new
    full["differences"] = rerun["differences"]
    full["intervals_seconds"] = rerun["seconds"]
    return full


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="test only, with the hyperparameters chosen by the shipped full run "
                         "(benchmarks/joint_results, with --harder benchmarks/joint_results_hard)")
    ap.add_argument("--out", default=None, help="output folder (default: joint-eval-out with --quick, "
                                                "else benchmarks/joint_results)")
    ap.add_argument("--adapters", default="", help="adapter folder (default: benchmarks/joint_adapters, "
                                                   "with --harder benchmarks/joint_adapters_hard)")
    ap.add_argument("--harder", action="store_true",
                    help="the harder setting: 8 tasks (" + ",".join(jt.HARD_TASK_NAMES) + "), rank-16 adapters "
                         "trained 4x longer, methods " + ",".join(HARDER.methods) + "; results in "
                         "benchmarks/joint_results_hard")
    ap.add_argument("--tasks", default="",
                    help="comma-separated, of " + ",".join(jt.HARD_TASK_NAMES) + " (default: the setting's)")
    ap.add_argument("--methods", default="", help="comma-separated (default: the setting's; the standard one: all)")
    ap.add_argument("--top-k-scope", choices=("task", "module"), default="task",
                    help="TIES thresholds per task over all modules (the KnOTS reference) or per module")
    ap.add_argument("--lam-max", type=float, default=1.0, help="lam grid 0.1..LAM_MAX (the paper's: 1.0)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--silent", action="store_true")
    ap.add_argument("--add-intervals", action="store_true",
                    help="re-run the test split with the shipped full run's choices (as --quick) and add the "
                         "bootstrap intervals to benchmarks/joint_results, its search record kept")
    args = ap.parse_args(argv)
    args.quick = args.quick or args.add_intervals
    shipped = (HARDER if args.harder else STANDARD).results
    out = Path(args.out or ("joint-eval-out" if args.quick and not args.add_intervals else shipped))
    try:
        results = run(args)
    except jt.DataMissing as e:
        raise SystemExit(f"error: {e}")
    if args.add_intervals:
        results = with_intervals(json.loads((shipped / "results.json").read_text()), results, shipped / "results.json")
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(table)
    pngs = plots(results, out)
    print()
    print(table)
    print(f"{results['seconds']['model_evaluations']} model evaluations, {results['seconds']['total']:.0f} s; "
          f"wrote {out}/results.json, results.md, {', '.join(pngs)}")


if __name__ == "__main__":
    main()
