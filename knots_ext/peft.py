"""A drop-in for PEFT's `LoraModel.add_weighted_adapter` on a live peft.PeftModel:

    from knots_ext.peft import add_weighted_adapter
    add_weighted_adapter(model, ["math", "code"], [1.0, 1.0], "merged", combination_type="knots_ties", density=0.2)
    model.set_adapter("merged")

The loaded adapters' LoRA factors are read from the model (no files), merged by knots_ext with
the method `combination_type` names, and the result is added to the model as a new LoRA adapter
with scale 1 whose lora_B @ lora_A is the merged update.

Every method merges the full updates w_i * s_i * B_i @ A_i (DESIGN.md §1). PEFT's own `linear`,
`ties`, `dare_linear` and `dare_ties` merge the lora_A and the lora_B matrices separately, which
is not the merge of the updates (the product of sums is not the sum of products): here they are
exact. The names map as follows (`_` and `-` are the same; `density` is PEFT's):

    cat, linear              ta: the weighted sum of the updates, exact (factors concatenated, rank sum r_i)
    svd                      ta, truncated to svd_rank
    ties, ties_svd           ties with top_k = density (ties_svd: truncated to svd_rank)
    dare_linear(_svd)        dare-ta with dare_p = 1 - density (PEFT's density is DARE's keep fraction)
    dare_ties(_svd)          dare-ties with dare_p = 1 - density and no magnitude trim (top_k = 1), as PEFT
    any knots_ext method     e.g. knots_ties, knots_dare_ties, core_ties, tsv_m: density is top_k where
                             the method trims (TIES), ignored otherwise

`linear` is PEFT's weighted sum, not knots_ext's `linear` method (the mean: weights 1/n give it).
magnitude_prune(_svd) (a trim with no sign election) has no counterpart and is refused, as is
majority_sign_method="frequency" (knots_ext elects the sign of the weighted sum, PEFT's "total")
and svd_clamp. The *_svd names truncate to svd_rank (default: the largest rank among the merged
adapters, as PEFT); svd_rank given with any other name truncates too (the best rank-svd_rank
approximation of each module's update, from its factors); otherwise the new adapter is lossless.
Merges that yield dense updates (ties, dare_*) are full-rank in practice, so the lossless adapter
has rank min(d_out, d_in): give svd_rank for a small one. svd_full_matrices and svd_driver are
accepted and change nothing. TIES's trim threshold is global per task over all modules (the KnOTS
reference's rule, knots_ext's default); PEFT trims each module separately: top_k_scope="module".
Only LoRA factors are merged: the new adapter has no modules_to_save.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from .engine import MergeResult, check_rank, merge
from .io._common import PEFT_PREFIX, AdapterError, relative_name
from .io.memory import MemoryAdapter
from .io.save import rank_config
from .methods import METHODS


@dataclass(frozen=True)
class Combination:
    """What a combination_type runs: a knots_ext method, what PEFT's density means for it
    ("top_k", "dare_keep" or None: unused) and whether PEFT truncates it to svd_rank."""

    method: str
    density: str | None
    svd: bool = False


# PEFT's names (LoraModel.add_weighted_adapter), normalised to underscores.
PEFT_COMBINATIONS = {
    "cat": Combination("ta", None),
    "linear": Combination("ta", None),
    "svd": Combination("ta", None, svd=True),
    "ties": Combination("ties", "top_k"),
    "ties_svd": Combination("ties", "top_k", svd=True),
    "dare_linear": Combination("dare-ta", "dare_keep"),
    "dare_linear_svd": Combination("dare-ta", "dare_keep", svd=True),
    "dare_ties": Combination("dare-ties", "dare_keep"),
    "dare_ties_svd": Combination("dare-ties", "dare_keep", svd=True),
}
_REFUSED = {
    "magnitude_prune": "PEFT's magnitude_prune (a trim, then a weighted sum with no sign election) has no "
    "knots_ext counterpart; ties trims and elects signs",
}
_REFUSED["magnitude_prune_svd"] = _REFUSED["magnitude_prune"]


def combination(name) -> Combination:
    """The Combination a combination_type names (PEFT's names first, then knots_ext's methods,
    with "_" and "-" alike), or a ValueError listing the names accepted."""
    if not isinstance(name, str):
        raise ValueError(f"combination_type must be a string, got {name!r}")
    key = name.strip().lower().replace("-", "_")
    if key in PEFT_COMBINATIONS:
        return PEFT_COMBINATIONS[key]
    if key in _REFUSED:
        raise ValueError(f"combination_type {name!r}: {_REFUSED[key]}")
    ours = {m.replace("-", "_"): m for m in METHODS}
    if key in ours:
        method = ours[key]
        return Combination(method, "top_k" if "top_k" in METHODS[method].param_names else None)
    raise ValueError(
        f"unknown combination_type {name!r}; choose one of PEFT's {', '.join(PEFT_COMBINATIONS)} "
        f"or a knots_ext method: {', '.join(sorted(ours))}"
    )


def _peft_classes():
    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraConfig, LoraLayer
    except ImportError:
        raise ImportError("knots_ext.peft needs the peft package (pip install peft)") from None
    return PeftModel, LoraConfig, LoraLayer


def _check_model(model) -> None:
    PeftModel, _, _ = _peft_classes()
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"model must be a peft.PeftModel (from get_peft_model or PeftModel.from_pretrained), "
            f"got a {type(model).__name__}"
        )


def _check_adapter_names(model, adapters) -> list:
    if isinstance(adapters, str) or not hasattr(adapters, "__iter__"):
        raise ValueError(f"adapters must be a list of adapter names, got {adapters!r}")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("no adapters to merge")
    for a in adapters:
        if a not in model.peft_config:
            raise ValueError(f"adapter {a!r} does not exist; the model has {', '.join(map(repr, model.peft_config))}")
    return adapters


def adapter_from_peft(model, adapter_name: str) -> MemoryAdapter:
    """The LoRA adapter `adapter_name` loaded in a peft.PeftModel, as a MemoryAdapter named
    "<peft:adapter_name>": each LoRA Linear layer's lora_B / lora_A weights and its scaling (PEFT's
    lora_alpha / r, rslora and alpha_pattern already applied), under the module keys PEFT's
    adapter files use. The tensors are the model's own (copied when read). Refused, with a
    ValueError naming the adapter and module: LoRA on embeddings, convolutions or nn.Parameter
    targets, DoRA and other LoRA variants, LoRA biases."""
    _check_model(model)
    _check_adapter_names(model, [adapter_name])
    _, LoraConfig, LoraLayer = _peft_classes()
    where = f"<peft:{adapter_name}>"
    config = model.peft_config[adapter_name]
    if not isinstance(config, LoraConfig):
        raise AdapterError(where, f"not a LoRA adapter ({type(config).__name__}); only LoRA adapters are merged")
    if config.target_parameters:
        raise AdapterError(where, "LoRA on nn.Parameter targets (target_parameters) is not supported")
    factors, scales, fan_in_fan_out = {}, {}, set()
    for name, layer in model.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if adapter_name in layer.lora_embedding_A:
            raise AdapterError(where, f"module {name}: LoRA on embedding layers is not supported")
        if adapter_name not in layer.lora_A:
            continue
        if adapter_name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter_name):
            raise AdapterError(where, f"module {name}: DoRA and other LoRA variants are not supported")
        if layer.lora_bias.get(adapter_name):
            raise AdapterError(where, f"module {name}: adapters with a LoRA bias (lora_bias) are not supported")
        A, B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if A.dim() != 2 or B.dim() != 2:
            raise AdapterError(
                where, f"module {name}: lora_A has shape {list(A.shape)}: only LoRA on Linear layers is supported"
            )
        factors[name], scales[name] = (B, A), layer.scaling[adapter_name]
        fan_in_fan_out.add(bool(getattr(layer, "fan_in_fan_out", False)))
    if not factors:
        raise AdapterError(where, "no LoRA Linear layers hold this adapter")
    return MemoryAdapter(
        where,
        factors,
        scales,
        base_model=config.base_model_name_or_path,
        fan_in_fan_out=fan_in_fan_out == {True},
        config={"task_type": getattr(config, "task_type", None)},
    )


def _method_params(combo: Combination, density, svd_clamp, majority_sign_method, params: dict) -> dict:
    """The knots_ext method's keywords: PEFT's density mapped as `combo` says, below the ones
    given explicitly (which win)."""
    if svd_clamp is not None:
        raise ValueError("svd_clamp is not supported (it clips the factors, so B @ A is no longer the merge)")
    if majority_sign_method != "total":
        raise ValueError(
            f"majority_sign_method {majority_sign_method!r} is not supported: knots_ext's TIES elects the sign of "
            "the sum of the (weighted) entries, PEFT's 'total'"
        )
    if combo.density is None:
        return dict(params)
    keep = float(density) if isinstance(density, numbers.Real) and not isinstance(density, bool) else math.nan
    if not 0 < keep <= 1:
        raise ValueError(f"density must be a fraction in (0, 1] (the share of entries kept), got {density!r}")
    mapped: dict = {}
    if combo.density == "top_k":
        mapped["top_k"] = keep
    elif keep < 1:  # DARE keeps each entry with probability density
        mapped["dare_p"] = 1.0 - keep
    return {**mapped, **params}


def _resolved_method(combo: Combination, params: dict) -> str:
    """The method to run: dare_* with nothing dropped (density 1) is the same merge without DARE
    (its seed, then meaningless, is dropped from params)."""
    if combo.density == "dare_keep" and "dare_p" not in params:
        params.pop("seed", None)
        return {"dare-ta": "ta", "dare-ties": "ties"}[combo.method]
    return combo.method


def add_weighted_adapter(
    model,
    adapters,
    weights,
    adapter_name: str,
    combination_type: str = "knots_ties",
    svd_rank: int | None = None,
    svd_clamp=None,
    svd_full_matrices: bool = True,
    svd_driver: str | None = None,
    density: float = 0.2,
    majority_sign_method: str = "total",
    *,
    device="cpu",
    quiet: bool = True,
    **params,
) -> MergeResult:
    """Merges the LoRA adapters named `adapters` of the peft.PeftModel `model` and adds the
    result as the new adapter `adapter_name` (activate it with model.set_adapter(adapter_name)).

    PEFT's arguments (LoraModel.add_weighted_adapter) with their meaning there; the module
    docstring maps combination_type and density. Unlike PEFT, the merge is of the full updates
    B_i @ A_i, so it is exact where PEFT's linear / ties / dare_* merge A and B separately.
    weights: one number per adapter (None: all 1), adapter i's update scaled by it before the
    method runs (negative: task negation). params: the knots_ext method's own parameters (lam,
    top_k, top_k_scope, dare_p, seed, tol, ...; given ones win over density's mapping). device:
    where the merge runs ("cpu" or "cuda[:N]"). The new adapter has scale 1 (lora_alpha = r per
    module), its factors in the dtype and on the device of the merged adapters' (in each layer the
    first one's there), and is frozen as PEFT's is. Returns the knots_ext MergeResult
    (res.delta(module) is each update).

    Errors (ValueError, one line): unknown adapters or combination_type, an existing
    adapter_name, weights of the wrong length, adapters knots_ext cannot read (DoRA, embedding or
    convolution LoRA), and the method's own parameter checks. Nothing is added on an error.
    """
    _check_model(model)
    adapters = _check_adapter_names(model, adapters)
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in model.peft_config:
        raise ValueError(f"adapter {adapter_name!r} already exists; choose a new adapter_name (or delete_adapter it)")
    check_rank(svd_rank)
    combo = combination(combination_type)
    params = _method_params(combo, density, svd_clamp, majority_sign_method, params)
    method = _resolved_method(combo, params)
    loaded = [adapter_from_peft(model, a) for a in adapters]
    if svd_rank is None and combo.svd:  # PEFT's default: the largest rank among the adapters
        svd_rank = max(a.rank(m) for a in loaded for m in a.modules)
    result = merge(loaded, method, weights=weights, device=device, force=True, quiet=quiet, **params)
    _add_adapter(model, adapter_name, adapters, result.factors(svd_rank))
    return result


def _add_adapter(model, adapter_name: str, sources: list, factors: dict) -> None:
    """Adds `factors` ({module key: (B, A)}) to the model as the LoRA adapter `adapter_name`,
    with scale 1 and the task type and fan_in_fan_out of sources[0]; in each layer its factors
    take the dtype and device of the first source adapter there. Removed again if anything goes
    wrong."""
    _, LoraConfig, _ = _peft_classes()
    ranks = {relative_name(m): int(B.shape[1]) for m, (B, _) in factors.items()}
    r, rank_pattern, alpha_pattern = rank_config(ranks)
    template = model.peft_config[sources[0]]
    config = LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        target_modules=sorted(ranks),
        fan_in_fan_out=template.fan_in_fan_out,
        task_type=template.task_type,
        base_model_name_or_path=template.base_model_name_or_path,
        lora_dropout=0.0,
        bias="none",
        inference_mode=True,
    )
    # The new layers' weights are made on the meta device: PEFT's random initialisation, which the
    # factors replace anyway, would cost more than the merge for a dense (full-rank) result.
    model.add_adapter(adapter_name, config, low_cpu_mem_usage=True)
    try:
        for m, (B, A) in factors.items():
            layer = model.get_submodule(m if m.startswith(PEFT_PREFIX) else PEFT_PREFIX + m)
            if adapter_name not in layer.lora_A or not math.isclose(layer.scaling[adapter_name], 1.0, rel_tol=0):
                raise RuntimeError(f"internal error: PEFT did not add {adapter_name!r} to {m} with scale 1")
            like = next(layer.lora_A[a].weight for a in sources if a in layer.lora_A)
            for holder, value in ((layer.lora_A[adapter_name], A), (layer.lora_B[adapter_name], B)):
                if tuple(holder.weight.shape) != tuple(value.shape):
                    raise RuntimeError(f"internal error: {m}: PEFT made {adapter_name!r} {list(holder.weight.shape)}")
                holder.weight = torch.nn.Parameter(value.to(device=like.device, dtype=like.dtype), requires_grad=False)
    except BaseException:
        model.delete_adapter(adapter_name)
        raise
