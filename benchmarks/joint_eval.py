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

Writes results.json, results.md and PNG plots (normalized accuracy per method, joint Hits@1, CKA
heatmaps) to --out."""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

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

ADAPTERS = HERE / "joint_adapters"
SHIPPED_RESULTS = HERE / "joint_results"
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
    and its label in the joint label space."""

    def __init__(self, tasks, split: str):
        self.tasks = tasks
        self.texts, self.task, self.label, self.joint = [], [], [], []
        for t, task in enumerate(tasks):
            s = task.splits[split]
            ids = task.joint_ids()
            self.texts += s.texts
            self.task += [t] * len(s.texts)
            self.label += s.labels
            self.joint += [ids[y] for y in s.labels]
        self.task = torch.tensor(self.task)
        self.label = torch.tensor(self.label)
        self.joint = torch.tensor(self.joint)

    def rows(self, t: int) -> torch.Tensor:
        return (self.task == t).nonzero().squeeze(1)


def hits_at(scores: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Share of rows whose target is among the k highest scores (ties: lower index first)."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == target[:, None]).any(1).double().mean().item()


def score(emb: torch.Tensor, inputs: Inputs, heads: torch.Tensor) -> dict:
    """Per-task accuracy (each task's inputs against its own classes) and joint Hits@1/@3 (all
    inputs against all classes) of one model's embeddings."""
    sims = emb @ heads.T
    acc = {}
    for t, task in enumerate(inputs.tasks):
        rows = inputs.rows(t)
        acc[task.name] = hits_at(sims[rows][:, task.joint_ids()], inputs.label[rows], 1)
    return {"acc": acc, "hits1": hits_at(sims, inputs.joint, 1), "hits3": hits_at(sims, inputs.joint, 3)}


def ensemble_score(embs: list, inputs: Inputs, heads: torch.Tensor) -> dict:
    """The Ensemble baseline: every finetuned model scores every input; a class's score is the
    highest probability any model gives it (softmax over the classes in play), so the top class
    is the most confident model's prediction."""
    probs_all = [torch.softmax(jt.SCALE * e @ heads.T, dim=1) for e in embs]
    acc = {}
    for t, task in enumerate(inputs.tasks):
        rows, ids = inputs.rows(t), task.joint_ids()
        probs = torch.stack([torch.softmax(jt.SCALE * e[rows] @ heads[ids].T, dim=1) for e in embs])
        acc[task.name] = hits_at(probs.amax(0), inputs.label[rows], 1)
    joint = torch.stack(probs_all).amax(0)
    return {"acc": acc, "hits1": hits_at(joint, inputs.joint, 1), "hits3": hits_at(joint, inputs.joint, 3)}


def normalized(acc: dict, finetuned: dict) -> float:
    return sum(acc[t] / finetuned[t] for t in finetuned) / len(finetuned)


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

def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def fmt_params(params: dict) -> str:
    return " ".join(f"{k}={v:g}" for k, v in params.items()) or "-"


def markdown(results: dict) -> str:
    tasks = results["tasks"]
    head = ["method", "chosen (per-task)"] + tasks + ["avg acc", "norm. acc", "chosen (joint)", "Hits@1", "Hits@3"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results["rows"].items():
        pt, jn = r["per_task"], r["joint"]
        cells = [name, fmt_params(pt["params"])] + [f"{100 * pt['acc'][t]:.1f}" for t in tasks]
        cells += [f"{100 * sum(pt['acc'].values()) / len(tasks):.1f}", f"{100 * pt['normalized']:.1f}",
                  fmt_params(jn["params"]), pct(jn["hits1"]), pct(jn["hits3"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plots(results: dict, out: Path) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [n for n in rows if n != "finetuned"]
    written = []
    for key, title, fname in (("normalized", "Per-task normalized accuracy (test, %)", "normalized_accuracy.png"),
                              ("hits1", "Joint Hits@1 (test, %)", "joint_hits1.png")):
        vals = [100 * (rows[n]["per_task"]["normalized"] if key == "normalized" else rows[n]["joint"]["hits1"])
                for n in names]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        colors = ["tab:orange" if n.startswith("knots") else "tab:gray" if n in ("zero-shot", "ensemble")
                  else "tab:blue" for n in names]
        ax.bar(range(len(names)), vals, color=colors)
        ax.set_xticks(range(len(names)), names, rotation=60, ha="right")
        ax.set_ylim(max(0, min(vals) - 10), min(100, max(vals) + 5) if key == "hits1" else max(vals) + 5)
        ax.set_title(title)
        for i, v in enumerate(vals):
            ax.text(i, v, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
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

def shipped_choices() -> dict:
    path = SHIPPED_RESULTS / "results.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {m: {s: rows[m][s]["params"] for s in SETTINGS} for m in rows if m in METHODS}


def run(args) -> dict:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    tasks = jt.load_tasks(args.tasks.split(",") if args.tasks else None)
    bench = Bench(tasks, Path(args.adapters), args.top_k_scope)
    names = [t.name for t in tasks]
    methods = args.methods.split(",") if args.methods else list(METHODS)
    # Quick mode takes the hyperparameters the shipped full run chose (the defaults where it has none).
    shipped = shipped_choices() if args.quick else {}
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
    ft_acc = {s: {t.name: score(ft_emb[s][i], bench.inputs[s], bench.heads)["acc"][t.name]
                  for i, t in enumerate(tasks)} for s in splits}
    log(f"finetuned test accuracy: {ft_acc['test']}", flush=True)
    criteria = {"per_task": lambda r: normalized(r["acc"], ft_acc.get("val")), "joint": lambda r: r["hits1"]}

    rows = {}

    def add_row(name, per_task_test, joint_test, params=None):
        params = params or {s: {} for s in SETTINGS}
        rows[name] = {"per_task": {"params": params["per_task"], "acc": per_task_test["acc"],
                                   "normalized": normalized(per_task_test["acc"], ft_acc["test"])},
                      "joint": {"params": params["joint"], "hits1": joint_test["hits1"], "hits3": joint_test["hits3"]}}

    zero = score(bench.embed("test"), bench.inputs["test"], bench.heads)
    add_row("zero-shot", zero, zero)
    ens = ensemble_score(ft_emb["test"], bench.inputs["test"], bench.heads)
    add_row("ensemble", ens, ens)
    add_row("finetuned", {"acc": ft_acc["test"]}, {"hits1": None, "hits3": None})  # no joint model

    for method in methods:
        t0 = time.perf_counter()
        params = method_params(method)
        if args.quick:
            chosen = quick[method]
        else:
            chosen = {s: linear_search(lambda cfg: bench.evaluate(method, cfg, "val"), params, criteria[s], grid)
                      for s in SETTINGS}
        test = {s: bench.evaluate(method, chosen[s], "test") for s in SETTINGS}
        add_row(method, test["per_task"], test["joint"], chosen)
        r = rows[method]
        log(f"{method:16s} norm {100 * r['per_task']['normalized']:5.1f} ({fmt_params(chosen['per_task'])})  "
            f"joint H@1 {100 * r['joint']['hits1']:5.1f} ({fmt_params(chosen['joint'])})  "
            f"[{time.perf_counter() - t0:.0f} s]", flush=True)

    results = {
        "mode": "quick" if args.quick else "full", "top_k_scope": args.top_k_scope,
        "model": jt.BASE_MODEL_NAME, "tasks": names,
        "sizes": {t.name: {s: len(t.splits[s].texts) for s in ("train", "val", "test")} for t in tasks},
        "joint_labels": jt.JOINT_LABELS,
        "search": {"grid": grid, "defaults": DEFAULTS, "order": SEARCH_ORDER, "dare_seed": DARE_SEED,
                   "criteria": {"per_task": "mean normalized val accuracy", "joint": "val Hits@1"}},
        "finetuned_val_acc": ft_acc.get("val"),
        "rows": rows,
        "val_evaluations": {f"{m} {fmt_params(dict(p))}": r for (m, p, s), r in bench.cache.items() if s == "val"},
    }
    bar.close()
    results["cka"] = cka_summary(bench)
    results["cka_mean_offdiag"] = {space: {m: mean_offdiag(c) for m, c in per.items()}
                                   for space, per in results["cka"].items()}
    results["seconds"] = {"total": round(time.perf_counter() - t_start, 1), "embedding": round(bench.embed_seconds, 1),
                          "model_evaluations": bench.evaluations}
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="test only, with the hyperparameters chosen by the shipped full run (benchmarks/joint_results)")
    ap.add_argument("--out", default=None, help="output folder (default: joint-eval-out with --quick, "
                                                "else benchmarks/joint_results)")
    ap.add_argument("--adapters", default=str(ADAPTERS))
    ap.add_argument("--tasks", default="", help="comma-separated subset of " + ",".join(jt.TASK_NAMES))
    ap.add_argument("--methods", default="", help="comma-separated subset of the methods (default: all)")
    ap.add_argument("--top-k-scope", choices=("task", "module"), default="task",
                    help="TIES thresholds per task over all modules (the KnOTS reference) or per module")
    ap.add_argument("--lam-max", type=float, default=1.0, help="lam grid 0.1..LAM_MAX (the paper's: 1.0)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--silent", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out or ("joint-eval-out" if args.quick else SHIPPED_RESULTS))
    try:
        results = run(args)
    except jt.DataMissing as e:
        raise SystemExit(f"error: {e}")
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
