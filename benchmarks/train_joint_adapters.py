"""Trains the joint-evaluation benchmark's LoRA adapters: one per task, on all-MiniLM-L6-v2's
attention projections (query, key, value, attention output) of every layer, with the frozen
prompt heads of joint_tasks (logits = SCALE * cosine to the task's class prompts, cross-entropy).
Fixed seeds; the adapters are written in PEFT's format to benchmarks/joint_adapters/<task>/ (the
repository ships them, so the benchmark does not retrain).

    python benchmarks/train_joint_adapters.py            # all tasks, ~2 min each on 2 CPU cores
    python benchmarks/train_joint_adapters.py --tasks tweets --steps 50 --out /tmp/adapters
    python benchmarks/train_joint_adapters.py --harder   # joint_eval.py --harder's adapters: 8 tasks,
        # rank 16 (alpha 32), 320 steps, in benchmarks/joint_adapters_hard/ (~4.5 min each)
    python benchmarks/train_joint_adapters.py --shards 3 --out benchmarks/adapt_pool
        # the adaptive-merging pool's other adapters: per task, 3 more, each on its own third of
        # the training split and (tasks of 3 or more classes) without one class, seeds 1, 2, 3
"""
from __future__ import annotations

import argparse
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

DEFAULT_OUT = HERE / "joint_adapters"
# The harder setting: more tasks, twice the rank (alpha / rank kept at 2), 4x the steps.
HARDER = {"tasks": ",".join(jt.HARD_TASK_NAMES), "rank": 16, "alpha": 32.0, "steps": 320,
          "out": str(HERE / "joint_adapters_hard")}


def shard_of(task, shard: int, shards: int):
    """(name, Task) of shard `shard`: its own 1/shards of the training split, and for tasks of 3 or
    more classes without class shard % classes (a label subset: its head leaves that class out)."""
    train = task.splits["train"]
    drop = shard % len(task.classes) if len(task.classes) >= 3 else None
    classes = [c for k, c in enumerate(task.classes) if k != drop]
    rows = [(t, task.classes[y]) for i, (t, y) in enumerate(zip(train.texts, train.labels))
            if i % shards == shard and y != drop]
    sub = jt.Task(f"{task.name}-shard{shard}", classes)
    sub.splits["train"] = jt.Split([t for t, _ in rows], [classes.index(c) for _, c in rows])
    return sub


def train_task(task, tokenizer, heads, args, out_dir: Path, seed=None) -> dict:
    from peft import LoraConfig, get_peft_model

    seed = args.seed if seed is None else seed
    torch.manual_seed(seed)
    _, base = jt.load_base_model()
    config = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=jt.LORA_TARGETS)
    model = get_peft_model(base, config)
    head = heads[task.joint_ids()]  # this task's class prompts only
    train = task.splits["train"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / args.steps)
    rng = np.random.RandomState(seed)
    labels = torch.tensor(train.labels)
    model.train()
    t0, losses = time.perf_counter(), []
    for step in range(args.steps):
        idx = rng.choice(len(train.texts), size=args.batch_size, replace=False)
        batch = jt.tokenize(tokenizer, [train.texts[i] for i in idx])
        logits = jt.SCALE * jt.sentence_embeddings(model, batch) @ head.T
        loss = torch.nn.functional.cross_entropy(logits, labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"  {task.name} step {step + 1}/{args.steps} loss {np.mean(losses[-25:]):.3f}", flush=True)
    model.eval()
    target = out_dir / task.name
    model.save_pretrained(str(target))
    # Name the base model by its hub id, not this machine's package path.
    cfg_path = target / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = jt.BASE_MODEL_NAME
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (target / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
    return {"steps": args.steps, "seconds": round(time.perf_counter() - t0, 1),
            "final_loss": round(float(np.mean(losses[-25:])), 4)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default=",".join(jt.TASK_NAMES))
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--shards", type=int, default=0,
                    help="instead of one adapter per task, this many per task on shards of it (shard_of)")
    ap.add_argument("--harder", action="store_true", help="the harder setting's adapters: " + str(HARDER))
    args = ap.parse_args(argv)
    if args.harder:
        vars(args).update(HARDER)
    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, base = jt.load_base_model()
    heads = jt.class_embeddings(base, tokenizer)
    log_path = out_dir / "training.json"
    log = json.loads(log_path.read_text())["tasks"] if log_path.exists() else {}
    for name in args.tasks.split(","):
        full = jt.load_task(name)
        for seed_offset, task in enumerate([shard_of(full, i, args.shards) for i in range(args.shards)] or [full]):
            print(f"training {task.name}: {len(task.splits['train'].texts)} examples", flush=True)
            log[task.name] = train_task(task, tokenizer, heads, args, out_dir,
                                        seed=args.seed + (1 + seed_offset if args.shards else 0))
            log[task.name]["classes"] = task.classes
            print(f"  {task.name}: {log[task.name]}", flush=True)
            settings = {k: v for k, v in vars(args).items() if k not in ("out", "tasks", "threads", "harder")}
            log_path.write_text(json.dumps({"settings": settings, "tasks": log}, indent=2) + "\n")


if __name__ == "__main__":
    main()
