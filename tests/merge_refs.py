"""Merge-level float64 references shared by the merge tests, written from DESIGN.md §1 on
materialised matrices (independently of the package), and a hand-written PEFT adapter writer."""
from __future__ import annotations

import io
import json
import math

import torch
from safetensors.torch import save_file

from conftest import ref_threshold, ref_ties

F64 = torch.float64
PREFIX = "base_model.model.model.layers"
# (module, d_out, d_in): non-square shapes on purpose
SHAPES = {"self_attn.q_proj": (24, 16), "self_attn.v_proj": (12, 16), "mlp.down_proj": (16, 40)}


def write_adapter(path, ranks, alpha, *, layers=2, modules=SHAPES, rslora=False, dtype=torch.float32,
                  seed=0, zero=False, rank_pattern=None, alpha_pattern=None):
    """A PEFT-format LoRA adapter written by hand (safetensors + adapter_config.json)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, (d_out, d_in) in modules.items():
            r = ranks[mod] if isinstance(ranks, dict) else ranks
            name = f"{PREFIX}.{layer}.{mod}"
            A = torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)
            B = torch.randn(d_out, r, generator=gen) * (0.0 if zero else 1.0)
            tensors[f"{name}.lora_A.weight"] = A.to(dtype)
            tensors[f"{name}.lora_B.weight"] = B.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    if not isinstance(ranks, int):  # per-module ranks are declared as PEFT does, by rank_pattern
        rank_pattern = {**{m: r for m, r in ranks.items()}, **(rank_pattern or {})}
    config = {"peft_type": "LORA", "r": ranks if isinstance(ranks, int) else max(ranks.values()),
              "lora_alpha": alpha, "use_rslora": rslora, "target_modules": sorted({m.split(".")[-1] for m in modules}),
              "base_model_name_or_path": "tiny-base", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
              "rank_pattern": rank_pattern or {}, "alpha_pattern": alpha_pattern or {}}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def lattice_factors(m, c):
    """(P, Q) of rank 16 whose product is 1 on the sampled thresholds' lattice and 0 elsewhere:
    blocks of 4 rows x 16 columns, in row block ib the column blocks jb = (5 ib) mod 16 + 16 j
    (csrc/common/magnitude_select.h: sample_first_block). A sample of it sees only ones."""
    rows, cols = torch.arange(m), torch.arange(c)
    P, Q = torch.zeros(m, 16), torch.zeros(16, c)
    P[rows, (5 * (rows // 4)) % 16] = 1.0
    Q[(cols // 16) % 16, cols] = 1.0
    return P, Q


def write_lattice_adapter(path, module, shape):
    """A rank-16 adapter (alpha 16: scale 1) of one layer and one module whose update is
    lattice_factors' product: with top_k 0.5 its sampled window misses its threshold (0)."""
    write_adapter(path, 16, 16, layers=1, modules={module: shape})
    B, A = lattice_factors(*shape)
    save_file({f"{PREFIX}.0.{module}.lora_B.weight": B, f"{PREFIX}.0.{module}.lora_A.weight": A},
              str(path / "adapter_model.safetensors"))
    return path


def read_scaled_factors(path):
    """(s * B, A) per module in float64, from a hand-written adapter (the test's own reader)."""
    from safetensors.torch import load_file

    cfg = json.loads((path / "adapter_config.json").read_text())
    t = load_file(str(path / "adapter_model.safetensors"))
    out = {}
    for key in t:
        if key.endswith(".lora_A.weight"):
            name = key[: -len(".lora_A.weight")]
            A, B = t[key].to(F64), t[name + ".lora_B.weight"].to(F64)
            r = A.shape[0]
            alpha = cfg["lora_alpha"]
            for pat, a in cfg.get("alpha_pattern", {}).items():
                if name.endswith("." + pat):
                    alpha = a
            s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            out[name] = (s * B, A)
    return out


def read_updates(path):
    """Float64 dense updates s * B @ A of a hand-written adapter."""
    return {name: sB @ A for name, (sB, A) in read_scaled_factors(path).items()}


def ref_global_ties(reps, names, shapes, top_k, lam):
    """TIES with per-task thresholds over all of the task's modules and one majority sign over
    every position of every module (the KnOTS reference flattens all modules into one vector)."""
    thresholds = []
    for r in reps:
        v = torch.cat([r[n_].reshape(-1) for n_ in names if n_ in r])
        thresholds.append(ref_threshold(v, top_k))
    big = torch.stack([torch.cat([r[n_].reshape(-1) if n_ in r else torch.zeros(math.prod(shapes[n_]), dtype=F64)
                                  for n_ in names]) for r in reps])
    ref = ref_ties(big, lam=lam, thresholds=thresholds)
    out, off = {}, 0
    for n_ in names:
        size = math.prod(shapes[n_])
        out[n_] = ref.out[off:off + size].reshape(shapes[n_])
        off += size
    return out


def signs_fixed(U, Vh=None):
    """DESIGN's sign convention, written for the tests: each column of U negated where needed so
    that its largest-magnitude entry (the first one on ties) is positive; Vh's rows follow."""
    flip = torch.ones(U.shape[1], dtype=U.dtype)
    for j in range(U.shape[1]):
        col = U[:, j].abs()
        i = int(torch.nonzero(col == col.max())[0])
        if U[i, j] < 0:
            flip[j] = -1.0
    return U * flip, (None if Vh is None else Vh * flip[:, None])


def ref_knots(updates, names, tol=1e-5, round_to=None):
    """Dense float64 SVD of each module's concatenated updates, signs fixed: (U, per-task reps).
    round_to=torch.float32 rounds the reps as the package's float32 task rows are, so that reps
    that cancel exactly (an adapter and its negation) still do."""
    U_of, reps = {}, [dict() for _ in updates]
    for name in names:
        tasks = [i for i, u in enumerate(updates) if name in u]
        cat = torch.cat([updates[i][name] for i in tasks], dim=1)
        U, S, Vh = torch.linalg.svd(cat, full_matrices=False)
        keep = S > tol
        U, Vh = signs_fixed(U[:, keep], Vh[keep])
        S = S[keep]
        d_in = updates[tasks[0]][name].shape[1]
        U_of[name] = U
        for j, i in enumerate(tasks):
            rep = S[:, None] * Vh[:, j * d_in:(j + 1) * d_in]
            reps[i][name] = rep if round_to is None else rep.to(round_to).to(F64)
    return U_of, reps


def close(got, want, rtol=1e-4, what=""):
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= rtol * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def numerical_range(M):
    """Left singular vectors of M over its numerical rank (S > S_max * max(shape) * eps)."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    return U[:, S > S[0] * max(M.shape) * torch.finfo(M.dtype).eps]


def ref_core(updates, factors, names, round_to=None):
    """Core Space reference: bases from dense SVDs of [s_i B_i] and [A_i] over the tasks that have
    the module (float64, numerical rank, signs fixed), cores U_B^T dW_i V_A computed on the materialised dW_i
    (rounded to round_to if given, see ref_knots)."""
    bases, cores = {}, [dict() for _ in updates]
    for name in names:
        tasks = [i for i, f in enumerate(factors) if name in f]
        B_cat = torch.cat([factors[i][name][0] for i in tasks], dim=1)
        A_cat = torch.cat([factors[i][name][1] for i in tasks], dim=0)
        U_B = signs_fixed(numerical_range(B_cat))[0]
        V_A = signs_fixed(numerical_range(A_cat.T))[0]
        bases[name] = (U_B, V_A)
        for i in tasks:
            core = U_B.T @ updates[i][name] @ V_A
            cores[i][name] = core if round_to is None else core.to(round_to).to(F64)
    return bases, cores


def polar64(M):
    """The nearest matrix with orthonormal columns (float64 SVD)."""
    P, _, Qt = torch.linalg.svd(M, full_matrices=False)
    return P @ Qt


def ref_tsv_m(updates, lam):
    """TSV-M of one module's dense updates: each task's top min(d)/n singular directions (at most
    its rank), U and V concatenations replaced by their polar factors."""
    d = min(updates[0].shape)
    per_task = max(1, d // len(updates))
    Us, Ss, Vs = [], [], []
    for u in updates:
        U, S, Vh = torch.linalg.svd(u, full_matrices=False)
        r = int((S > 1e-9 * S[0]).sum())  # the task's LoRA rank
        keep = min(r, per_task)
        Us.append(U[:, :keep]), Ss.append(S[:keep]), Vs.append(Vh[:keep].T)
    return lam * polar64(torch.cat(Us, 1)) @ torch.diag(torch.cat(Ss)) @ polar64(torch.cat(Vs, 1)).T


def write_random_grams(path, layers=2, modules=SHAPES, seed=0):
    """A Gram file (knots_ext.grams.save_grams) of random positive definite Grams X^T X, one per
    module of write_adapter's layout (keyed as in the base model); returns {key: float64 Gram}."""
    from knots_ext.grams import save_grams

    gen = torch.Generator().manual_seed(seed)
    grams = {}
    for layer in range(layers):
        for mod, (_, d_in) in modules.items():
            X = torch.randn(3 * d_in, d_in, generator=gen, dtype=F64)
            grams[f"model.layers.{layer}.{mod}"] = X.T @ X
    save_grams(path, grams)
    return grams


def read_kohya_updates(path):
    """Float64 updates of a kohya / sd-scripts LoRA file, read by the test's own rules: per module
    "<name>.lora_up.weight" @ "<name>.lora_down.weight" (conv factors flattened to 2-D: up
    (c_out, r, 1, 1) -> c_out x r, down (r, c_in, kh, kw) -> r x c_in*kh*kw) times alpha / r, with
    alpha missing or 0 taken as r (sd-scripts' LoRAModule)."""
    from safetensors.torch import load_file

    t = load_file(str(path))
    out = {}
    for key in t:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down = t[key].to(F64).reshape(t[key].shape[0], -1)
            up = t[name + ".lora_up.weight"].to(F64).reshape(-1, down.shape[0])
            r = down.shape[0]
            alpha = float(t[name + ".alpha"]) if name + ".alpha" in t else 0.0
            out[name] = (alpha / r if alpha else 1.0) * up @ down
    return out


class Terminal(io.StringIO):
    """A stderr stand-in that says it is a terminal (progress bars show on terminals only)."""

    def isatty(self):
        return True
