"""Adaptive merging from a pool of LoRAs: merge coefficients learned on a few target examples
(LoraHub, AdaMerging; recycled at scale in "Appeal and Reality of Recycling LoRAs with Adaptive
Merging", ICML 2026).

A module's merged update is sum_i c_i s_i B_i A_i over the pool's adapters that have it, applied
as one LoRA of rank sum_i r_i built from the concatenated factors, never dense:
B_cat = [s_1 B_1 | ... | s_m B_m] with each column scaled by its adapter's coefficient and
A_cat = [A_1; ...; A_m], so a Linear module's output gains x A_cat^T (B_cat diag(c))^T. The
coefficients' gradients are autograd's through that one forward pass: exact.

    pool = Pool.load(paths)                        # any format knots_ext.io reads
    coefs = pool.coefficients(per_module=False)    # 1/m each (per adapter, or per adapter and module)
    with pool.attached(model, coefs):              # forward hooks on the model's Linear modules
        loss = loss_fn(model)                      # ... and coefs.values.grad after backward()
    coefs, history = learn_coefficients(pool, model, loss_fn, per_module=True)   # Adam
    coefs, history = search_coefficients(pool, model, loss_fn)   # gradient-free (nevergrad NGOpt)
    factors, history = train_lora(pool, model, loss_fn, rank=16)   # the new-LoRA control
    ranked, losses = retrieve(pool, model, loss_fn)   # candidates by their target loss alone
    pool.save(out_dir, coefs)                      # a PEFT adapter of the merged update

Model modules are found by the adapters' module names without PEFT's "base_model.model."."""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import io
from .engine import PEFT_PREFIX, _load


@dataclass
class Coefficients:
    """The merge coefficients: values[i, j] scales adapter i's update in module group j, with one
    group for all modules (per adapter) or one per module (per adapter and module, in the pool's
    module order)."""

    values: torch.Tensor  # (m, 1) or (m, n_modules), float64
    modules: list  # the pool's modules, in the order of values' columns when per module

    def of(self, module_index: int) -> torch.Tensor:
        """The coefficient of each adapter in module `module_index` (m,)."""
        return self.values[:, module_index if self.values.shape[1] > 1 else 0]

    def as_dict(self) -> dict:
        """Plain values: {"per_module": bool, "values": [[...], ...]} (adapters x groups)."""
        return {"per_module": self.values.shape[1] > 1, "values": self.values.detach().cpu().tolist()}


class Pool:
    """m LoRA adapters merged as sum_i c_i s_i B_i A_i; per module, the concatenated factors of
    the adapters that have it (float32, on the CPU, loaded once)."""

    def __init__(self, adapters: list, factors: dict, base_model: str | None = None):
        self.adapters = adapters  # loaded adapters (for their paths and formats)
        self.modules = sorted(factors)
        # module -> (B_cat: d_out x R, the s_i B_i side by side; A_cat: R x d_in; owner: R adapter indices)
        self._factors = factors
        self.base_model = base_model

    @classmethod
    def load(cls, adapters, alpha: float | None = None) -> Pool:
        """The pool of these adapters (paths, or loaded io adapters)."""
        loaded = _load(adapters, alpha)
        io.check_compatible(loaded)
        names = sorted(set().union(*(a.modules for a in loaded)))
        factors = {}
        for name in names:
            Bs, As, owner = [], [], []
            for i, a in enumerate(loaded):
                if name not in a.modules:
                    continue
                if getattr(a, "fan_in_fan_out", False):
                    raise io.AdapterError(a.path, "fan_in_fan_out adapters are not supported by adaptive merging")
                B, A = a.factors(name)
                Bs.append(B * a.scale(name))
                As.append(A)
                owner += [i] * A.shape[0]
            factors[name] = (torch.cat(Bs, 1), torch.cat(As, 0), torch.tensor(owner, dtype=torch.long))
        return cls(loaded, factors, loaded[0].base_model)

    @property
    def size(self) -> int:
        return len(self.adapters)

    def factors(self, module: str) -> tuple:
        """(B_cat, A_cat, owner) of a module: B_cat's columns are the s_i B_i, A_cat's rows the A_i,
        owner[j] the adapter of column j."""
        return self._factors[module]

    def subset(self, indices) -> Pool:
        """The pool of adapters `indices` (in that order), e.g. retrieve()'s top candidates."""
        indices = [int(i) for i in indices]
        new_index = {old: new for new, old in enumerate(indices)}
        factors = {}
        for name in self.modules:
            B, A, owner = self._factors[name]
            keep = [j for j, i in enumerate(owner.tolist()) if i in new_index]
            if not keep:
                continue
            # columns regrouped in the subset's adapter order
            keep.sort(key=lambda j: (new_index[int(owner[j])], j))
            cols = torch.tensor(keep, dtype=torch.long)
            factors[name] = (B[:, cols], A[cols], torch.tensor([new_index[int(owner[j])] for j in keep]))
        return Pool([self.adapters[i] for i in indices], factors, self.base_model)

    @classmethod
    def concat(cls, pools: list) -> Pool:
        """The pools' adapters one after another (e.g. a real pool and random ones)."""
        factors: dict = {}
        offset = 0
        for p in pools:
            for name in p.modules:
                B, A, owner = p._factors[name]
                if name in factors:
                    B0, A0, o0 = factors[name]
                    factors[name] = (torch.cat([B0, B], 1), torch.cat([A0, A], 0), torch.cat([o0, owner + offset]))
                else:
                    factors[name] = (B, A, owner + offset)
            offset += p.size
        return cls([a for p in pools for a in p.adapters], factors, pools[0].base_model)

    def coefficients(self, per_module: bool = False, init: float | None = None) -> Coefficients:
        """Coefficients of init (default 1/m, the study's start) each, requiring grad."""
        value = 1.0 / self.size if init is None else float(init)
        groups = len(self.modules) if per_module else 1
        values = torch.full((self.size, groups), value, dtype=torch.float64, requires_grad=True)
        return Coefficients(values, list(self.modules))

    def merged_factors(self, coefs: Coefficients) -> dict:
        """{module: (B, A)} of the merged update, B @ A = sum_i c_i s_i B_i A_i (rank sum r_i)."""
        out = {}
        for j, name in enumerate(self.modules):
            B, A, owner = self._factors[name]
            c = coefs.of(j).detach().to(torch.float64)[owner]
            out[name] = ((B.double() * c).float(), A.clone())
        return out

    def save(self, out_dir, coefs: Coefficients, *, overwrite: bool = False, dtype=torch.float32) -> None:
        """A PEFT adapter of the merged update, its coefficients and inputs in knots_merge.json."""
        io.save_adapter(
            out_dir,
            self.merged_factors(coefs),
            base_model=self.base_model,
            dtype=dtype,
            overwrite=overwrite,
            inputs=[a.path for a in self.adapters],
            manifest={
                "method": "adaptive",
                "coefficients": coefs.as_dict(),
                "adapters": [os.fspath(a.path) for a in self.adapters],
            },
        )

    def random_like(self, seed: int = 0) -> Pool:
        """The random-LoRA control: each adapter's factors of each module replaced by Gaussian ones
        of the same shapes and Frobenius norms (s_i B_i and A_i each), seeded by (seed, adapter,
        module): the same pool for the same seed, whatever else runs."""
        factors = {}
        for name in self.modules:
            B, A, owner = self._factors[name]
            newB, newA = torch.empty_like(B), torch.empty_like(A)
            for i in owner.unique().tolist():
                cols = (owner == i).nonzero().reshape(-1)
                gen = torch.Generator().manual_seed(_seed_of(seed, i, name))
                for src, dst, view in ((B[:, cols], newB, (slice(None), cols)), (A[cols], newA, (cols,))):
                    r = torch.randn(src.shape, generator=gen, dtype=torch.float64)
                    norm = float(src.double().norm())
                    dst[view] = (r * (norm / float(r.norm())) if norm > 0 else torch.zeros_like(r)).float()
            factors[name] = (newB, newA, owner)
        return Pool(self.adapters, factors, self.base_model)

    @contextmanager
    def attached(self, model: torch.nn.Module, coefs: Coefficients):
        """The merged update added to the outputs of the model's Linear modules (forward hooks)
        while inside; gradients reach coefs.values. One ValueError if a module is missing or not
        a Linear of the adapters' shape."""
        hooks = []
        try:
            for j, name in enumerate(self.modules):
                target = _linear_of(model, name, self._factors[name])
                hooks.append(target.register_forward_hook(_hook(self._factors[name], coefs, j)))
            yield coefs
        finally:
            for h in hooks:
                h.remove()


def _seed_of(seed: int, adapter: int, module: str) -> int:
    digest = hashlib.sha256(f"{seed}:{adapter}:{module}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _linear_of(model: torch.nn.Module, name: str, factors) -> torch.nn.Linear:
    path = name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"the model has no module {path!r} (adapter module {name!r})") from None
    B, A, _ = factors
    if not isinstance(module, torch.nn.Linear) or tuple(module.weight.shape) != (B.shape[0], A.shape[1]):
        raise ValueError(
            f"model module {path!r} is not a Linear of shape {(B.shape[0], A.shape[1])} (out, in) as the "
            f"adapters' {name!r}"
        )
    return module


def _hook(factors, coefs: Coefficients, j: int):
    B, A, owner = factors

    def hook(module, inputs, output):
        x = inputs[0]
        c = coefs.of(j)[owner].to(x.dtype)
        Bx, Ax = B.to(device=x.device, dtype=x.dtype), A.to(device=x.device, dtype=x.dtype)
        return output + (x @ Ax.T) @ (Bx * c).T

    return hook


def learn_coefficients(
    pool: Pool,
    model: torch.nn.Module,
    loss_fn,
    *,
    per_module: bool = False,
    steps: int = 100,
    lr: float = 5e-2,
    init: float | None = None,
) -> tuple[Coefficients, list]:
    """Adam on the coefficients (the study's lr 5e-2, 100 steps, start 1/m) minimising
    loss_fn(model) with the merged update attached; the model's own parameters stay as they are.
    Returns the coefficients (detached) and the loss before each step."""
    check_settings(steps=steps, lr=lr)
    coefs = pool.coefficients(per_module, init)
    history = _adam(pool, coefs, model, loss_fn, [coefs.values], steps, lr)
    return Coefficients(coefs.values.detach().clone(), coefs.modules), history


def _adam(pool: Pool, coefs: Coefficients, model, loss_fn, params: list, steps: int, lr: float) -> list:
    """Adam on params minimising loss_fn(model) with the pool attached, the model frozen; the loss
    before each step."""
    opt = torch.optim.Adam(params, lr=lr)
    history = []
    with _frozen(model), pool.attached(model, coefs):
        for _ in range(int(steps)):
            opt.zero_grad()
            loss = loss_fn(model)
            loss.backward()
            history.append(float(loss.detach()))
            opt.step()
    return history


def retrieve(pool: Pool, model: torch.nn.Module, loss_fn, top: int | None = None) -> tuple[list, list]:
    """The pool's adapters ranked by loss_fn(model) with each one alone attached (coefficient 1,
    the others 0), lowest first: (indices, their losses), the first `top` of them."""
    check_settings(top=top)
    losses = []
    with torch.no_grad():
        for i in range(pool.size):
            alone = pool.subset([i])  # (its own factors only: one forward costs one adapter's LoRA)
            coefs = alone.coefficients(per_module=False, init=1.0)
            with alone.attached(model, coefs):
                losses.append(float(loss_fn(model)))
    order = sorted(range(pool.size), key=lambda i: (losses[i], i))[: top if top is not None else pool.size]
    return order, [losses[i] for i in order]


@contextmanager
def _frozen(model: torch.nn.Module):
    """The model's parameters without gradients while inside (their own flags back after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def check_settings(**settings) -> None:
    """One ValueError line for a setting out of range: steps, budget, rank and top are integers
    >= 1 (top may be None), lr and bound finite and > 0, l1 finite and >= 0."""
    for name, value in settings.items():
        if name in ("steps", "budget", "rank", "top"):
            if value is None and name == "top":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        else:
            least = 0.0 if name == "l1" else None
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or (value < least if least is not None else value <= 0):
                bound = ">= 0" if least is not None else "> 0"
                raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def search_coefficients(
    pool: Pool,
    model: torch.nn.Module,
    loss_fn,
    *,
    per_module: bool = False,
    budget: int = 40,
    l1: float = 0.05,
    bound: float = 1.5,
    init: float | None = None,
    seed: int = 0,
) -> tuple[Coefficients, list]:
    """LoraHub's gradient-free search: nevergrad's NGOpt over the coefficients in [-bound, bound],
    minimising loss_fn(model) + l1 * sum |c| with `budget` evaluations, from 1/m each (init).
    Returns the recommended coefficients and each evaluation's objective. Needs nevergrad
    (pip install 'knots-ext[adapt]')."""
    check_settings(budget=budget, l1=l1, bound=bound)
    try:
        import nevergrad as ng
    except ImportError:
        raise ValueError("search_coefficients needs nevergrad: pip install 'knots-ext[adapt]'") from None
    import numpy as np

    coefs = pool.coefficients(per_module, init)
    coefs.values.requires_grad_(False)
    start = coefs.values.clamp(-bound, bound).numpy().copy()
    param = ng.p.Array(init=start, lower=-bound, upper=bound)
    param.random_state = np.random.RandomState(seed)
    optimizer = ng.optimizers.NGOpt(parametrization=param, budget=int(budget), num_workers=1)
    history = []

    def objective(x) -> float:
        coefs.values.copy_(torch.as_tensor(x, dtype=torch.float64))
        return float(loss_fn(model)) + l1 * float(np.abs(x).sum())

    with _frozen(model), pool.attached(model, coefs), torch.no_grad():
        for _ in range(int(budget)):
            candidate = optimizer.ask()
            value = objective(candidate.value)
            optimizer.tell(candidate, value)
            history.append(value)
    best = torch.as_tensor(optimizer.provide_recommendation().value, dtype=torch.float64)
    return Coefficients(best.reshape(coefs.values.shape).clone(), coefs.modules), history


def train_lora(
    pool: Pool,
    model: torch.nn.Module,
    loss_fn,
    *,
    rank: int = 16,
    steps: int = 100,
    lr: float = 1e-3,
    seed: int = 0,
) -> tuple[dict, list]:
    """The new-LoRA control: a LoRA of `rank` on the pool's modules (A Gaussian / sqrt(d_in), B
    zero, as PEFT starts one), trained by Adam on loss_fn(model) for `steps`, the budget of the
    coefficient search. Returns {module: (B, A)} (scale 1) and the loss before each step."""
    check_settings(rank=rank, steps=steps, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    factors, params = {}, []
    for name in pool.modules:
        B0, A0, _ = pool.factors(name)
        A = (torch.randn(rank, A0.shape[1], generator=gen) / math.sqrt(A0.shape[1])).requires_grad_()
        B = torch.zeros(B0.shape[0], rank, requires_grad=True)
        factors[name] = (B, A, torch.zeros(rank, dtype=torch.long))
        params += [B, A]
    trainee = Pool([None], factors, pool.base_model)
    coefs = trainee.coefficients(init=1.0)
    coefs.values.requires_grad_(False)
    history = _adam(trainee, coefs, model, loss_fn, params, steps, lr)
    return {name: (B.detach().clone(), A.detach().clone()) for name, (B, A, _) in factors.items()}, history
