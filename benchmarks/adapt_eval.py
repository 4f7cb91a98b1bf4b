"""Adaptive merging from a pool of LoRAs (issue 14), offline on the joint-evaluation model and tasks
(benchmarks/joint_tasks.py: all-MiniLM-L6-v2, frozen prompt heads, 5 text-classification tasks).

The pool: the 5 shipped task adapters (benchmarks/joint_adapters/) and 15 more
(benchmarks/adapt_pool/, train_joint_adapters.py --shards 3: per task 3 adapters, each on its own
third of the training split, without one class where the task has 3 or more). Each task in turn
is the target: the pool is every adapter NOT trained on the target's data (16), and k target
examples (drawn from its training split, per seed) are all the method sees. Rows:

  zero-shot          the base model
  uniform ta / ties / knots-ties
                     knots_ext.merge of the retrieved top-m adapters: TA with lam 1/m (their mean),
                     TIES and KnOTS-TIES with top_k 0.3 and lam 1 (defaults, not tuned)
  adaptive-grad      learn_coefficients on the retrieved adapters, per (adapter, module): Adam, lr
                     5e-2, 100 steps, from 1/m (the study's)
  adaptive-free      search_coefficients, per adapter: nevergrad NGOpt, L1 0.05, bounds 1.5, budget 40
  ...-random         the same two on the random pool (each retrieved adapter's factors replaced by
                     random ones of the same shapes and norms, seeded)
  new-lora           train_lora: a new rank-8 LoRA on the same modules, Adam lr 1e-3, 100 steps
  own adapter        the target task's own shipped adapter (the ceiling)

Retrieval: the pool ranked by the target examples' loss with each adapter alone; the top m (5).
Loss: cross-entropy of SCALE x cosine(embedding, the target's class prompts), as the adapters were
trained. Accuracy on the target's 200 test examples, mean over seeds, with a bootstrap 95%
interval over test examples (the same resamples for every seed and row). Nothing is tuned toward a method.

    python benchmarks/adapt_eval.py --quick      # k = 16, one seed: ~10 min on 2 cores
    python benchmarks/adapt_eval.py              # k = 16 and 64, seeds 0, 1, 2 (hours on 2 cores;
                                                 # --resume goes on from OUT/partial.json)
    python benchmarks/adapt_eval.py --timing     # the speed targets: 30 adapters' per-module
                                                 # coefficients vs a new LoRA; retrieval of 100

Writes results.json, results.md and a plot to --out (default benchmarks/adapt_results/, and its
quick/ for --quick, so that a quick run leaves the full run's results alone)."""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import joint_tasks as jt  # noqa: E402

import knots_ext  # noqa: E402
from knots_ext.adaptive import Pool, learn_coefficients, retrieve, search_coefficients, train_lora  # noqa: E402

TASK_ADAPTERS = HERE / "joint_adapters"
POOL_ADAPTERS = HERE / "adapt_pool"
DEFAULT_OUT = HERE / "adapt_results"
TOP_M = 5
ROWS = ["zero-shot", "uniform ta", "uniform ties", "uniform knots-ties", "adaptive-grad", "adaptive-free",
        "adaptive-grad-random", "adaptive-free-random", "new-lora", "own adapter"]


def pool_paths() -> dict:
    """{adapter path: the task whose data trained it}."""
    out = {}
    for task in jt.TASK_NAMES:
        out[str(TASK_ADAPTERS / task)] = task
        for shard in sorted(POOL_ADAPTERS.glob(f"{task}-shard*")):
            out[str(shard)] = task
    for path in out:
        if not Path(path, "adapter_config.json").exists():
            raise SystemExit(f"error: {path}: no adapter (python benchmarks/train_joint_adapters.py --shards 3 "
                             f"--out benchmarks/adapt_pool)")
    return out


class Target:
    """One target task: its k examples (per seed), its heads, the model, the loss and accuracy."""

    def __init__(self, task, tokenizer, model, heads, k: int, seed: int):
        self.task, self.tokenizer, self.model = task, tokenizer, model
        self.head = heads[task.joint_ids()]
        train = task.splits["train"]
        idx = np.random.RandomState(1000 + seed).choice(len(train.texts), size=k, replace=False)
        self.batch = jt.tokenize(tokenizer, [train.texts[i] for i in idx])
        self.labels = torch.tensor([train.labels[i] for i in idx])
        self.base_state = {n: p.detach().clone() for n, p in model.state_dict().items()}

    def loss(self, model) -> torch.Tensor:
        logits = jt.SCALE * jt.sentence_embeddings(model, self.batch) @ self.head.T
        return torch.nn.functional.cross_entropy(logits, self.labels)

    def correct(self, updates: dict | None = None) -> np.ndarray:
        """Per test example, whether the model with the dense updates {module: dW} folded in is right."""
        model = copy.deepcopy(self.model)
        if updates:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for name, dW in updates.items():
                    key = name.removeprefix("base_model.model.") + ".weight"
                    params[key].add_(dW.to(params[key].dtype))
        test = self.task.splits["test"]
        emb = jt.embed(model, self.tokenizer, test.texts)
        pred = (emb @ self.head.T).argmax(1).numpy()
        return pred == np.array(test.labels)


def dense(factors: dict) -> dict:
    return {name: (B.double() @ A.double()).float() for name, (B, A) in factors.items()}


def merge_dense(paths: list, method: str, **params) -> dict:
    result = knots_ext.merge(paths, method, **params)
    return {name: result.delta(name) for name in result.modules}


def run_target(target: Target, pool_list: list, own: str, args, timings: dict) -> dict:
    """{row: correct vector} for one target, k and seed."""
    out = {"zero-shot": target.correct(), "own adapter": target.correct(merge_dense([own], "ta"))}
    pool = Pool.load(pool_list)
    t0 = time.perf_counter()
    order, _ = retrieve(pool, target.model, target.loss, top=args.top_m)
    timings.setdefault("retrieve", []).append((pool.size, time.perf_counter() - t0))
    chosen = [pool_list[i] for i in order]
    sub = pool.subset(order)
    m = len(chosen)
    out["uniform ta"] = target.correct(merge_dense(chosen, "ta", lam=1.0 / m))
    out["uniform ties"] = target.correct(merge_dense(chosen, "ties", top_k=0.3, lam=1.0))
    out["uniform knots-ties"] = target.correct(merge_dense(chosen, "knots-ties", top_k=0.3, lam=1.0))
    random_pool = sub.random_like(seed=args.seed_now)
    for suffix, p in (("", sub), ("-random", random_pool)):
        t0 = time.perf_counter()
        coefs, _ = learn_coefficients(p, target.model, target.loss, per_module=True, steps=args.steps, lr=5e-2)
        timings.setdefault("adaptive-grad", []).append(time.perf_counter() - t0)
        out[f"adaptive-grad{suffix}"] = target.correct(dense(p.merged_factors(coefs)))
        coefs, _ = search_coefficients(p, target.model, target.loss, budget=40, seed=args.seed_now)
        out[f"adaptive-free{suffix}"] = target.correct(dense(p.merged_factors(coefs)))
    t0 = time.perf_counter()
    factors, _ = train_lora(sub, target.model, target.loss, rank=8, steps=args.steps, lr=1e-3, seed=args.seed_now)
    timings.setdefault("new-lora", []).append(time.perf_counter() - t0)
    out["new-lora"] = target.correct(dense(factors))
    return out


def timing(tokenizer, model, heads, owners: dict) -> dict:
    """The issue's speed targets, in one run: per-module coefficients for a pool of 30 adapters on 64
    examples vs a new LoRA for the same steps; retrieval over 100 candidates. The pool's 20 real
    adapters are topped up with random-pool copies (same shapes and norms: the same cost)."""
    task = jt.load_task("tweets")
    target = Target(task, tokenizer, model, heads, 64, 0)
    real = Pool.load(list(owners))
    copies = [real.random_like(seed=s) for s in range(5)]
    pool30 = Pool.concat([real, copies[0]]).subset(range(30))
    steps = 20
    t0 = time.perf_counter()
    learn_coefficients(pool30, model, target.loss, per_module=True, steps=steps)
    learn_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    train_lora(pool30, model, target.loss, rank=8, steps=steps)
    lora_s = time.perf_counter() - t0
    pool100 = Pool.concat([real, *copies[:4]])
    t0 = time.perf_counter()
    retrieve(pool100, model, target.loss)
    retrieve_s = time.perf_counter() - t0
    return {"steps": steps, "examples": 64, "learn_coefficients_30_s": learn_s, "train_lora_s": lora_s,
            "ratio": learn_s / lora_s, "goal_ratio": 2.0, "retrieve_100_s": retrieve_s, "goal_retrieve_s": 60.0,
            "candidates": pool100.size}


def mean_interval(correct: list) -> tuple[float, float, float]:
    """Mean accuracy over seeds and its bootstrap 95% interval over test examples."""
    stack = np.stack(correct).astype(float)  # seeds x examples
    lo, hi = jt.bootstrap_interval(lambda idx: stack[:, idx[0]].mean(), [stack.shape[1]])
    return float(stack.mean()), lo, hi


# The study's questions as paired differences (first row - second), per k, over the five targets.
DIFFERENCES = [("adaptive-grad", "new-lora"), ("adaptive-grad", "adaptive-grad-random"),
               ("adaptive-grad", "uniform knots-ties"), ("uniform knots-ties", "uniform ties"),
               ("uniform knots-ties", "uniform ta")]


def differences(correct: dict, ks: list) -> dict:
    """{"a - b/k=K": (mean, lo, hi)}: the mean over targets of row a's accuracy minus row b's (each
    a mean over seeds), with a paired bootstrap 95% interval: each target's test examples resampled
    within the target, the same draws for both rows. correct: {(task, k): {row: seeds x examples}}."""
    out = {}
    for k in ks:
        groups = [rows for (_, kk), rows in correct.items() if kk == k]
        if not groups:
            continue
        for a, b in DIFFERENCES:
            gaps = [g[a].astype(float) - g[b].astype(float) for g in groups]

            def stat(idx, gaps=gaps):
                return float(np.mean([gap[:, i].mean() for gap, i in zip(gaps, idx)]))

            lo, hi = jt.bootstrap_interval(stat, [gap.shape[1] for gap in gaps])
            out[f"{a} - {b}/k={k}"] = (float(np.mean([gap.mean() for gap in gaps])), lo, hi)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="k = 16, seed 0 only")
    ap.add_argument("--ks", default="16,64")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--tasks", default=",".join(jt.TASK_NAMES))
    ap.add_argument("--top-m", type=int, default=TOP_M)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None,
                    help="results folder (default benchmarks/adapt_results/, its quick/ with --quick)")
    ap.add_argument("--timing", action="store_true", help="only the speed targets (timing())")
    ap.add_argument("--resume", action="store_true",
                    help="reuse the runs already in OUT/partial.json (an interrupted run's), run the rest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.quick:
        args.ks, args.seeds = "16", "0"
    if args.out is None:
        args.out = str(DEFAULT_OUT / "quick" if args.quick else DEFAULT_OUT)
    ks, seeds = [int(k) for k in args.ks.split(",")], [int(s) for s in args.seeds.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tokenizer, model = jt.load_base_model()
    for p in model.parameters():
        p.requires_grad_(False)
    heads = jt.class_embeddings(model, tokenizer)
    owners = pool_paths()
    if args.timing:
        t = timing(tokenizer, model, heads, owners)
        print(json.dumps(t, indent=1))
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timing.json").write_text(json.dumps(t, indent=1) + "\n")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # Each (task, k, seed) run's per-example results are kept as they come, so a long run that is
    # stopped resumes where it was (--resume) with the same numbers.
    partial_path = out / "partial.json"
    partial = json.loads(partial_path.read_text()) if args.resume and partial_path.exists() else {}
    results, correct, timings, t_start = {}, {}, {}, time.perf_counter()
    for name in args.tasks.split(","):
        task = jt.load_task(name)
        pool_list = [p for p, t in owners.items() if t != name]
        for k in ks:
            per_row: dict = {r: [] for r in ROWS}
            for seed in seeds:
                key = f"{name}/k={k}/seed={seed}"
                if key not in partial:
                    args.seed_now = seed
                    target = Target(task, tokenizer, model, heads, k, seed)
                    got = run_target(target, pool_list, str(TASK_ADAPTERS / name), args, timings)
                    partial[key] = {r: got[r].astype(int).tolist() for r in ROWS}
                    partial_path.write_text(json.dumps(partial) + "\n")
                    print(f"[{time.perf_counter() - t_start:6.0f} s] {key}: "
                          + ", ".join(f"{r} {got[r].mean():.3f}" for r in ROWS), flush=True)
                for r in ROWS:
                    per_row[r].append(np.array(partial[key][r], dtype=bool))
            results[f"{name}/k={k}"] = {r: mean_interval(v) for r, v in per_row.items()}
            correct[(name, k)] = {r: np.stack(v) for r, v in per_row.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("seed_now", "resume", "threads")}
    gaps = differences(correct, ks)
    summary = {"args": settings, "pool": len(owners), "results": results, "differences": gaps,
               "timings": timings, "seconds": time.perf_counter() - t_start}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results) + "\n" + markdown_differences(gaps))
    plot(results, out / "accuracy.png")
    print(markdown(results) + "\n" + markdown_differences(gaps))
    print(f"wrote {out}/results.json, results.md, accuracy.png ({summary['seconds']:.0f} s)")


def markdown(results: dict) -> str:
    cols = list(results)
    lines = ["| method | " + " | ".join(cols) + " | mean |", "|---|" + "---|" * (len(cols) + 1)]
    for r in ROWS:
        cells = [f"{results[c][r][0]:.3f} [{results[c][r][1]:.3f}, {results[c][r][2]:.3f}]" for c in cols]
        lines.append(f"| {r} | " + " | ".join(cells) + f" | {np.mean([results[c][r][0] for c in cols]):.3f} |")
    return "\n".join(lines) + "\n"


def markdown_differences(gaps: dict) -> str:
    ks = sorted({int(key.rsplit("=", 1)[1]) for key in gaps})
    lines = ["| paired difference, mean over targets | " + " | ".join(f"k = {k}" for k in ks) + " |",
             "|---|" + "---|" * len(ks)]
    for a, b in DIFFERENCES:
        cells = [gaps[f"{a} - {b}/k={k}"] for k in ks]
        lines.append(f"| {a} - {b} | " + " | ".join(f"{m:+.3f} [{lo:+.3f}, {hi:+.3f}]" for m, lo, hi in cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = list(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(cols)), 4.5))
    width = 0.8 / len(ROWS)
    for i, r in enumerate(ROWS):
        mean = [results[c][r][0] for c in cols]
        err = [[results[c][r][0] - results[c][r][1] for c in cols], [results[c][r][2] - results[c][r][0] for c in cols]]
        ax.bar(np.arange(len(cols)) + i * width, mean, width, yerr=err, label=r, capsize=2)
    ax.set_xticks(np.arange(len(cols)) + 0.4 - width / 2, cols, rotation=20, fontsize=8)
    ax.set_ylabel("test accuracy (95% bootstrap interval)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
