"""The joint-evaluation benchmark (benchmarks/joint_eval.py, joint_tasks.py): its scoring, the
Ensemble baseline and the linear search against references written here; the task splits; and a
small end-to-end run on the shipped adapters."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import joint_eval as je  # noqa: E402
import joint_tasks as jt  # noqa: E402
from merge_refs import Terminal  # noqa: E402


def fake_inputs(n_per_task=(7, 5), classes=(["business", "sport", "politics"], ["negative", "positive"]), seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = []
    for t, (n, cls) in enumerate(zip(n_per_task, classes)):
        task = jt.Task(f"task{t}", list(cls))
        labels = torch.randint(len(cls), (n,), generator=g).tolist()
        task.splits["test"] = jt.Split([f"text {t} {i}" for i in range(n)], labels)
        tasks.append(task)
    return je.Inputs(tasks, "test")


def rank_of(scores_row, target):
    """Position of target when the row is sorted by decreasing score (float64, by hand)."""
    order = sorted(range(len(scores_row)), key=lambda j: -float(scores_row[j]))
    return order.index(int(target))


def test_hits_at_matches_ranks():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(50, 9, generator=g)
    target = torch.randint(9, (50,), generator=g)
    for k in (1, 3, 9, 20):
        expected = sum(rank_of(scores[i], target[i]) < k for i in range(50)) / 50
        assert je.hits_at(scores, target, k) == pytest.approx(expected)


def test_score_per_task_and_joint():
    inputs = fake_inputs()
    g = torch.Generator().manual_seed(2)
    emb = torch.nn.functional.normalize(torch.randn(len(inputs.texts), 16, generator=g), dim=1)
    heads = torch.nn.functional.normalize(torch.randn(len(jt.JOINT_LABELS), 16, generator=g), dim=1)
    got = je.score(emb, inputs, heads)
    sims = (emb.double() @ heads.double().T)
    row = 0
    for task in inputs.tasks:
        ids = [jt.JOINT_LABELS.index(c) for c in task.classes]
        s = task.splits["test"]
        correct = sum(max(range(len(ids)), key=lambda j: sims[row + i, ids[j]]) == y for i, y in enumerate(s.labels))
        assert got["acc"][task.name] == pytest.approx(correct / len(s.labels))
        row += len(s.labels)
    # the joint label space: the union of the tasks' classes only (5 of the 15 labels here)
    columns = sorted({jt.JOINT_LABELS.index(c) for t in inputs.tasks for c in t.classes})
    assert len(columns) == 5
    joint = [columns.index(jt.JOINT_LABELS.index(t.classes[y])) for t in inputs.tasks for y in t.splits["test"].labels]
    for k, key in ((1, "hits1"), (3, "hits3")):
        expected = sum(rank_of(sims[i, columns], joint[i]) < k for i in range(len(joint))) / len(joint)
        assert got[key] == pytest.approx(expected)
        assert got["correct"][key].double().mean().item() == pytest.approx(expected)


def test_ensemble_takes_the_most_confident_model():
    inputs = fake_inputs(seed=3)
    g = torch.Generator().manual_seed(4)
    heads = torch.nn.functional.normalize(torch.randn(len(jt.JOINT_LABELS), 16, generator=g), dim=1)
    embs = [torch.nn.functional.normalize(torch.randn(len(inputs.texts), 16, generator=g), dim=1) for _ in range(3)]
    got = je.ensemble_score(embs, inputs, heads)
    row = 0
    for task in inputs.tasks:
        ids = [jt.JOINT_LABELS.index(c) for c in task.classes]
        correct = 0
        for i, y in enumerate(task.splits["test"].labels):
            best_conf, best_pred = -1.0, None
            for e in embs:  # each model's softmax over the task's classes; most confident wins
                logits = [jt.SCALE * float(e[row + i].double() @ heads[j].double()) for j in ids]
                p = torch.softmax(torch.tensor(logits, dtype=torch.float64), 0)
                if p.max() > best_conf:
                    best_conf, best_pred = float(p.max()), int(p.argmax())
            correct += best_pred == y
        assert got["acc"][task.name] == pytest.approx(correct / len(task.splits["test"].labels))
        row += len(task.splits["test"].labels)
    columns = sorted({jt.JOINT_LABELS.index(c) for t in inputs.tasks for c in t.classes})
    probs = torch.stack([torch.softmax(jt.SCALE * e.double() @ heads[columns].double().T, 1) for e in embs]).amax(0)
    top1 = probs.argmax(1)
    assert got["hits1"] == pytest.approx((top1 == inputs.joint).double().mean().item())


def test_ensemble_of_one_model_is_that_model():
    inputs = fake_inputs(seed=5)
    g = torch.Generator().manual_seed(6)
    heads = torch.nn.functional.normalize(torch.randn(len(jt.JOINT_LABELS), 16, generator=g), dim=1)
    emb = torch.nn.functional.normalize(torch.randn(len(inputs.texts), 16, generator=g), dim=1)
    one, plain = je.ensemble_score([emb], inputs, heads), je.score(emb, inputs, heads)
    assert one["acc"] == pytest.approx(plain["acc"])
    assert one["hits1"] == pytest.approx(plain["hits1"]) and one["hits3"] == pytest.approx(plain["hits3"])


def test_bootstrap_interval_of_a_mean_matches_the_normal_approximation():
    # 0/1 outcomes, p = 0.7, n = 400: the percentile interval is close to p +- 1.96 sqrt(p(1-p)/n)
    x = np.array([1] * 280 + [0] * 120, dtype=float)
    lo, hi = jt.bootstrap_interval(lambda idx: x[idx[0]].mean(), [len(x)], reps=4000)
    half = 1.96 * (0.7 * 0.3 / 400) ** 0.5
    assert lo == pytest.approx(0.7 - half, abs=0.01) and hi == pytest.approx(0.7 + half, abs=0.01)
    assert jt.bootstrap_interval(lambda idx: np.ones(5)[idx[0]].mean(), [5]) == (1.0, 1.0)


def test_bootstrap_interval_resamples_each_stratum_alike_for_every_statistic():
    a, b = np.arange(10.0), np.arange(10.0)[::-1].copy()
    first = jt.bootstrap_interval(lambda idx: a[idx[0]].mean() + a[idx[1]].sum(), [10, 10])
    # the same draws (sizes and seed only): b reversed, drawn at 9 - i, gives a's statistic
    again = jt.bootstrap_interval(lambda idx: b[9 - idx[0]].mean() + b[9 - idx[1]].sum(), [10, 10])
    assert first == again
    # strata are resampled separately: a stratum of one example never varies
    assert jt.bootstrap_interval(lambda idx: idx[0].sum() + 0.0, [1, 50]) == (0.0, 0.0)


def two_finetuned_and_others(seed: int, others: int):
    """Two tasks of 60 and 40 test inputs, random heads, two random "finetuned" models' correct
    vectors and `others` more models' embeddings."""
    inputs = fake_inputs(n_per_task=(60, 40), seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    heads = torch.nn.functional.normalize(torch.randn(len(jt.JOINT_LABELS), 16, generator=g), dim=1)
    embs = [torch.nn.functional.normalize(torch.randn(len(inputs.texts), 16, generator=g), dim=1)
            for _ in range(2 + others)]
    return inputs, heads, [je.score(e, inputs, heads)["correct"] for e in embs[:2]], embs[2:]


def test_intervals_of_a_result():
    inputs, heads, ft, (emb,) = two_finetuned_and_others(8, 1)
    res = je.score(emb, inputs, heads)
    ci = je.intervals(res, ft, inputs)
    avg = sum(res["acc"].values()) / 2
    assert ci["avg"][0] <= avg <= ci["avg"][1] and ci["avg"][0] < ci["avg"][1]
    assert ci["hits1"][0] <= res["hits1"] <= ci["hits1"][1] and ci["hits3"][0] <= res["hits3"] <= ci["hits3"][1]
    # a finetuned model against itself: normalized accuracy exactly 1 in every resample
    own = {"correct": {"acc": torch.cat([ft[0]["acc"][:60], ft[1]["acc"][60:]])}}
    got = je.intervals(own, ft, inputs)
    assert got["normalized"] == (1.0, 1.0) and set(got) == {"avg", "normalized"}  # no joint result given
    # paired: a result against itself differs by exactly 0 on every resample
    assert set(je.intervals(res, ft, inputs, minus=res).values()) == {(0.0, 0.0)}


def test_difference_of_two_methods():
    inputs, heads, ft, embs = two_finetuned_and_others(10, 2)
    a, b = ({"per_task": je.score(e, inputs, heads), "joint": je.score(e, inputs, heads)} for e in embs)
    got = je.difference(a, b, ft, inputs)
    ft_acc = [ft[t]["acc"][inputs.rows(t)].double().mean().item() for t in range(2)]
    expected = sum((a["per_task"]["acc"][f"task{t}"] - b["per_task"]["acc"][f"task{t}"]) / ft_acc[t]
                   for t in range(2)) / 2
    assert got["normalized"][0] == pytest.approx(expected)
    assert got["hits1"][0] == pytest.approx(a["joint"]["hits1"] - b["joint"]["hits1"])
    for d, lo, hi in got.values():
        assert lo <= d <= hi and lo < hi


def test_linear_search_sweeps_each_parameter_in_order():
    seen = []

    def evaluate(cfg):
        seen.append(dict(cfg))
        # the best lam depends on top_k (0.47 at the default 0.3, 0.72 at 0.8), so the second lam
        # sweep must move it; top_k's own term dominates its sweep
        return (-(cfg["lam"] - 0.5 * cfg["top_k"] - 0.32) ** 2 - 100 * (cfg["top_k"] - 0.8) ** 2
                - (cfg["dare_p"] - 0.4) ** 2)

    best = je.linear_search(evaluate, ["lam", "top_k", "dare_p"], criterion=lambda r: r)
    assert best == {"lam": 0.7, "top_k": 0.8, "dare_p": 0.4}
    grid = je.GRID
    n_lam = len(grid["lam"])
    assert all(c["lam"] == 0.5 for c in seen[n_lam:n_lam + len(grid["top_k"])])  # after the first lam sweep
    assert len(seen) == 2 * len(grid["lam"]) + len(grid["top_k"]) + len(grid["dare_p"])
    first = seen[:len(grid["lam"])]  # lam swept first, the others at their defaults
    assert [c["lam"] for c in first] == grid["lam"]
    assert all(c["top_k"] == je.DEFAULTS["top_k"] and c["dare_p"] == je.DEFAULTS["dare_p"] for c in first)


def test_linear_search_keeps_first_of_equal_scores():
    best = je.linear_search(lambda cfg: cfg, ["lam"], criterion=lambda r: 1.0)
    assert best == {"lam": je.GRID["lam"][0]}


def test_normalized_accuracy():
    assert je.normalized({"a": 0.5, "b": 0.9}, {"a": 1.0, "b": 0.9}) == pytest.approx(0.75)


def test_method_params():
    assert je.method_params("ta") == ["lam"]
    assert je.method_params("knots-ties") == ["lam", "top_k"]
    assert je.method_params("knots-dare-ties") == ["lam", "top_k", "dare_p"]
    assert je.method_params("core-dare-ta") == ["lam", "dare_p"]


# ---- the real data and model (benchmarks/joint_data.txt) ----------------------------------------

def _norm(text):
    return " ".join(text.split()).lower()


@pytest.mark.parametrize("name", jt.HARD_TASK_NAMES)
def test_task_splits_are_fixed_disjoint_and_labelled(name):
    a, b = jt.load_task(name), jt.load_task(name)
    for split in ("train", "val", "test"):
        assert a.splits[split].texts == b.splits[split].texts
        assert a.splits[split].labels == b.splits[split].labels
        assert all(0 <= y < len(a.classes) for y in a.splits[split].labels)
    assert len(a.splits["test"].texts) == jt.TEST_SIZE and len(a.splits["val"].texts) == jt.VAL_SIZE
    sets = {s: {_norm(t) for t in a.splits[s].texts} for s in a.splits}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert set(a.splits["train"].labels) == set(range(len(a.classes)))  # every class is trained
    assert all(c in jt.JOINT_LABELS for c in a.classes)
    texts = [t for s in a.splits.values() for t in s.texts]
    assert all(t.strip() for t in texts)
    assert not any("&#039;" in t or "&amp;" in t or "\nham\t" in t or "\nspam\t" in t for t in texts)


@pytest.mark.parametrize("setting, rank", [(je.STANDARD, 8), (je.HARDER, 16)])
def test_shipped_adapters_cover_the_attention_projections(setting, rank):
    import knots_ext

    for name in setting.tasks:
        a = knots_ext.io.load_adapter(str(setting.adapters / name))
        assert len(a.modules) == 6 * 4 and {a.rank(m) for m in a.modules} == {rank}
        assert all(m.rsplit("encoder.layer.", 1)[1].split(".", 1)[1] in
                   ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense")
                   for m in a.modules)


def test_quick_run_end_to_end(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "stderr", Terminal())
    je.main(["--quick", "--tasks", "questions,sms_spam", "--methods", "ta,knots-ta,knots-ties",
             "--out", str(out)])
    # progress on a terminal: a bar over the encoder passes that ends at its total, with the time left
    # shown on the way (2 finetuned models, zero-shot, one pass per distinct merge of the 3 methods)
    bar = sys.stderr.getvalue()
    total = int(re.search(r"encoder passes: +\d+%\|.*\| *\d+/(\d+)", bar).group(1))
    assert 2 + 1 + 3 <= total <= 2 + 1 + 6 and f"{total}/{total}" in bar and "<" in bar
    assert "knots-ties" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    for f in ("results.md", "normalized_accuracy.png", "joint_hits1.png", "cka_heatmaps.png"):
        assert (out / f).stat().st_size > 0
    rows = res["rows"]
    for task in ("questions", "sms_spam"):
        # the shipped adapter does its job: finetuned beats the zero-shot prompts on its task
        assert rows["finetuned"]["per_task"]["acc"][task] > rows["zero-shot"]["per_task"]["acc"][task]
    # knots-ta is ta exactly; with the same lam the predictions agree
    if rows["ta"]["per_task"]["params"] == rows["knots-ta"]["per_task"]["params"]:
        assert rows["ta"]["per_task"]["acc"] == pytest.approx(rows["knots-ta"]["per_task"]["acc"], abs=1 / 200)
    for space in ("raw", "knots"):
        for m in res["cka"][space].values():
            m = torch.tensor(m)
            assert m.shape == (2, 2) and torch.allclose(m, m.T) and torch.allclose(m.diagonal(), torch.ones(2))
            assert 0.0 <= float(m[0, 1]) <= 1.0
    assert "| knots-ties |" in (out / "results.md").read_text()
    d, lo, hi = res["differences"]["knots-ties - ta"]["hits1"]
    assert d == pytest.approx(rows["knots-ties"]["joint"]["hits1"] - rows["ta"]["joint"]["hits1"]) and lo <= d <= hi
    assert "| knots-ties - ta |" in (out / "results.md").read_text()


def test_missing_adapters_is_one_error_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        je.main(["--quick", "--tasks", "sms_spam", "--adapters", str(tmp_path), "--out", str(tmp_path / "o")])
    assert "sms_spam" in str(exc.value) and "no adapter" in str(exc.value)
    assert not (tmp_path / "o").exists()


def test_with_intervals_takes_a_rerun_only_if_it_reproduces_the_shipped_figures():
    def row(acc, hits1, ci=None):
        r = {"per_task": {"params": {"lam": 0.5}, "acc": {"a": acc}}, "joint": {"params": {}, "hits1": hits1}}
        if ci:
            r["per_task"]["avg_ci"] = ci
        return r

    full = {"rows": {"ta": row(0.7649999856948853, 0.3)}, "mode": "full"}
    rerun = {"rows": {"ta": row(0.765, 0.30000001192092896, ci=[0.7, 0.8])}, "seconds": 1, "differences": {}}
    got = je.with_intervals(full, rerun, Path("r.json"))  # float32 rounding of the same figures
    assert got["rows"]["ta"]["per_task"]["avg_ci"] == [0.7, 0.8] and got["mode"] == "full"
    with pytest.raises(SystemExit, match=r"r\.json: row ta: the re-run's per_task acc"):
        je.with_intervals({"rows": {"ta": row(0.765, 0.3)}}, {"rows": {"ta": row(0.77, 0.3)}, "seconds": 1},
                          Path("r.json"))  # one flipped prediction of 200


def test_harder_setting_quick_run(tmp_path):
    """--harder: its own tasks, rank-16 adapters and shipped choices, on two of its new tasks."""
    out = tmp_path / "hard"
    je.main(["--quick", "--harder", "--tasks", "movie_reviews,subjectivity", "--methods", "ta,knots-ties",
             "--silent", "--out", str(out)])
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert res["joint_labels"] == ["negative", "positive", "plot", "review"]  # only the classes in play
    for task in ("movie_reviews", "subjectivity"):
        assert rows["finetuned"]["per_task"]["acc"][task] > rows["zero-shot"]["per_task"]["acc"][task]
    assert set(res["differences"]) == {"knots-ties - ta"}


def test_train_joint_adapters_writes_a_peft_adapter(tmp_path):
    import train_joint_adapters as tja

    import knots_ext

    tja.main(["--tasks", "sms_spam", "--steps", "2", "--batch-size", "4", "--rank", "4", "--out", str(tmp_path)])
    a = knots_ext.io.load_adapter(str(tmp_path / "sms_spam"))
    assert len(a.modules) == 24 and {a.rank(m) for m in a.modules} == {4}
    assert json.loads((tmp_path / "training.json").read_text())["tasks"]["sms_spam"]["steps"] == 2
    # the shipped harder adapters were trained with the --harder preset
    shipped = json.loads((je.HARDER.adapters / "training.json").read_text())
    assert {k: shipped["settings"][k] for k in ("rank", "alpha", "steps")} == \
        {k: tja.HARDER[k] for k in ("rank", "alpha", "steps")}
    assert list(shipped["tasks"]) == jt.HARD_TASK_NAMES == tja.HARDER["tasks"].split(",")
