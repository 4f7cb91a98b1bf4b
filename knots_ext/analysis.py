"""Alignment of LoRA task updates, measured with linear CKA (Kornblith et al. 2019), as in the
KnOTS paper's Figure 2 analysis: every task's update of one layer is fed the same inputs X and the
outputs are compared pairwise. A high CKA means the tasks' updates act alike on those inputs.

Everything is computed in float64 from the LoRA factors; no dense d_out x d_in update is formed.
"""

from __future__ import annotations

import os

import torch

from .io import Adapter, load_adapter
from .io._common import PEFT_PREFIX
from .linalg import DEFAULT_TOL, knots_svd

F64 = torch.float64
SPACES = ("raw", "knots", "knots-scaled")


def _check_matrix(X, what: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError(
            f"{what} must be a 2-D tensor (N samples x features), got "
            f"{tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__}"
        )
    if X.shape[0] < 2:
        raise ValueError(
            f"{what} has N={X.shape[0]} samples; CKA needs at least 2 (centring one sample leaves nothing)"
        )
    return X


def _centred(X: torch.Tensor) -> torch.Tensor:
    X = X.to(F64)
    return X - X.mean(dim=0, keepdim=True)


def _self_sim(Xc: torch.Tensor) -> float:
    """||Xc^T Xc||_F (= ||Xc Xc^T||_F), through the smaller of the two Gram matrices."""
    G = Xc.T @ Xc if Xc.shape[1] <= Xc.shape[0] else Xc @ Xc.T
    return float(torch.linalg.matrix_norm(G))


def _cross_sim(Xc: torch.Tensor, Yc: torch.Tensor) -> float:
    """||Yc^T Xc||_F^2 (= tr(Xc Xc^T Yc Yc^T)), through whichever product is cheaper: the
    q x p cross-covariance when the features are few, the N x N Gram matrices when N is small."""
    N, p, q = Xc.shape[0], Xc.shape[1], Yc.shape[1]
    if p * q <= N * N:
        return float(torch.linalg.matrix_norm(Yc.T @ Xc) ** 2)
    return float(((Xc @ Xc.T) * (Yc @ Yc.T)).sum())


def _cka(Xc, Yc, nx: float, ny: float) -> float:
    if nx == 0.0 or ny == 0.0:
        return 0.0
    return _cross_sim(Xc, Yc) / (nx * ny)


def linear_cka(X: torch.Tensor, Y: torch.Tensor) -> float:
    """Linear CKA between two representations of the same N samples, X (N x p) and Y (N x q):
    ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), Xc and Yc column-centred, in float64.

    It is invariant to orthogonal maps and isotropic scaling of either side (not to anisotropic
    scaling), so it compares what two representations encode, not their coordinates. If either
    centred matrix is exactly zero (e.g. a zero update, or constant outputs) CKA is undefined
    (0/0); 0.0 is returned, i.e. "no shared structure", so that a zero task gives no NaN.
    Raises ValueError if the sample counts differ or N < 2."""
    _check_matrix(X, "X")
    _check_matrix(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise ValueError(f"X and Y must hold the same samples: X has N={X.shape[0]} rows, Y has N={Y.shape[0]}")
    Xc, Yc = _centred(X), _centred(Y)
    return _cka(Xc, Yc, _self_sim(Xc), _self_sim(Yc))


def pairwise_cka(reps) -> torch.Tensor:
    """The n x n float64 matrix of linear CKA between n representations (N x p_i each, same N
    samples): symmetric, 1 on the diagonal for a nonzero (centred) representation, 0 for a zero
    one (see linear_cka). Each representation is centred and normed once."""
    reps = [_check_matrix(R, f"representation {i}") for i, R in enumerate(reps)]
    if not reps:
        raise ValueError("pairwise_cka needs at least one representation")
    for i, R in enumerate(reps):
        if R.shape[0] != reps[0].shape[0]:
            raise ValueError(
                f"all representations must hold the same samples: representation {i} has "
                f"N={R.shape[0]} rows, representation 0 has N={reps[0].shape[0]}"
            )
    cs = [_centred(R) for R in reps]
    norms = [_self_sim(c) for c in cs]
    n = len(cs)
    out = torch.zeros(n, n, dtype=F64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = _cka(cs[i], cs[j], norms[i], norms[j])
    return out


def update_outputs(Bs, As, scales, X: torch.Tensor, space: str = "raw", tol: float = DEFAULT_TOL) -> list:
    """Per-task outputs on the inputs X (N x d_in), in float64, in the given space:

    - "raw": dW_i x = s_i B_i A_i x, computed as ((X A_i^T) B_i^T) s_i (N x d_out);
    - "knots": V_i^T x (N x k), task i's coordinates in the KnOTS SVD
      [dW_1 | ... | dW_n] = U diag(S) [V_1^T | ... | V_n^T], as (X A_i^T) (coef_i / S)^T;
    - "knots-scaled": diag(S) V_i^T x (N x k), as (X A_i^T) coef_i^T.

    A task with s_i = 0, B_i = 0 or A_i = 0 gets exact zeros in every space.
    """
    if space not in SPACES:
        raise ValueError(f"space must be one of {', '.join(map(repr, SPACES))}, got {space!r}")
    if not (len(Bs) == len(As) == len(scales)) or not Bs:
        raise ValueError("need one B, A and scale per task, and at least one task")
    _check_matrix(X, "X")
    X64 = X.to(F64)
    for i, (B, A) in enumerate(zip(Bs, As)):
        if B.shape[0] != Bs[0].shape[0] or B.shape[1] != A.shape[0]:
            raise ValueError(
                f"task {i}: B {tuple(B.shape)} and A {tuple(A.shape)} do not chain, or d_out "
                f"differs from task 0's {Bs[0].shape[0]}"
            )
        if A.shape[1] != X.shape[1]:
            raise ValueError(f"task {i}: lora_A has d_in={A.shape[1]} columns but X has {X.shape[1]} features")
    XA = [X64 @ A.to(device=X.device, dtype=F64).T for A in As]  # N x r_i each
    if space == "raw":
        return [(xa @ B.to(device=X.device, dtype=F64).T) * float(s) for xa, B, s in zip(XA, Bs, scales)]
    ks = knots_svd(Bs, As, scales, tol=tol, device=X.device)
    coefs = ks.coef if space == "knots-scaled" else [c / ks.S[:, None] for c in ks.coef]
    # A zero task's block of V comes out of the SVD as rounding noise (~1e-15), not exact zeros,
    # and CKA is scale-free, so that noise would be compared as if it were structure. Its
    # coordinates are set to exact zeros, as its raw outputs are.
    zero = [float(s) == 0.0 or not bool(B.any()) or not bool(A.any()) for B, A, s in zip(Bs, As, scales)]
    return [xa.new_zeros(xa.shape[0], c.shape[0]) if z else xa @ c.T for xa, c, z in zip(XA, coefs, zero)]


def update_cka(Bs, As, scales, X: torch.Tensor, space: str = "raw", tol: float = DEFAULT_TOL) -> torch.Tensor:
    """n x n linear CKA between the n tasks' LoRA updates dW_i = s_i B_i A_i (B_i: d_out x r_i,
    A_i: r_i x d_in) of one layer, fed the same inputs X (N x d_in). See update_outputs for the
    spaces.

    space="raw" compares the updates' outputs dW_i x. space="knots-scaled" compares
    S V_i^T x and gives the raw values exactly (up to rounding): U S V_i^T x = dW_i x, and linear
    CKA is invariant to a map with orthonormal columns such as U applied to either side, so the
    shared singular values keep the raw picture. The KnOTS-aligned comparison is therefore
    space="knots", on the unscaled coordinates V_i^T x: every task is expressed in the same
    orthonormal basis of the joint row space, with unit-scale directions, so CKA asks whether
    the tasks use the same aligned directions instead of being dominated by the few largest
    singular values. `tol` drops singular values <= tol from the KnOTS SVD (as knots_svd does)."""
    return pairwise_cka(update_outputs(Bs, As, scales, X, space=space, tol=tol))


def adapter_cka(adapters, inputs: dict, space: str = "raw", tol: float = DEFAULT_TOL) -> dict:
    """{module: n x n CKA matrix} between n LoRA adapters (paths, opened with load_adapter, or
    Adapter objects), one entry per module key of `inputs` ({module: X, N x d_in}) that every
    adapter has. Keys may be the file's module keys ("base_model.model.<name>") or the names
    without that prefix; the result uses the keys of `inputs`. Modules that are missing from
    some adapter, or have no inputs, are skipped (a partial overlap is normal for adapters
    trained on different target_modules); if no module is left, ValueError.

    Adapter.factors returns B as d_out x r and A as r x d_in whatever fan_in_fan_out says (that
    flag only says the base weight is stored transposed), so X is always N x d_in, the layer's
    input features."""
    opened, ads = [], []
    try:
        for a in adapters:
            if isinstance(a, Adapter):
                ads.append(a)
            else:
                ads.append(load_adapter(os.fspath(a)))
                opened.append(ads[-1])
        if not ads:
            raise ValueError("adapter_cka needs at least one adapter")
        out = {}
        for key, X in inputs.items():
            full = key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key
            mod = key if all(key in a for a in ads) else full
            if not all(mod in a for a in ads):
                continue
            factors = [a.factors(mod, dtype=F64) for a in ads]
            out[key] = update_cka(
                [f[0] for f in factors], [f[1] for f in factors], [a.scale(mod) for a in ads], X, space=space, tol=tol
            )
        if not out:
            raise ValueError(
                f"no module of inputs ({', '.join(list(inputs)[:3])}{', ...' if len(inputs) > 3 else ''}) "
                "is present in every adapter"
            )
        return out
    finally:
        for a in opened:
            a.close()
