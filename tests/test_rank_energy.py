"""Output rank by energy (merge_to(rank_energy=E) / --rank-energy E): each module keeps the fewest
singular directions holding fraction E of its squared Frobenius norm, and the truncation's
relative error is reported. Checked against dense float64 SVDs of the merged updates."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import knots_ext
from knots_ext.cli import main as cli_main
from merge_refs import F64, close, write_adapter


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("energy")
    return [write_adapter(root / f"a{i}", 4, 8, seed=20 + i) for i in range(3)]


def saved_updates(out):
    t = load_file(str(out / "adapter_model.safetensors"))
    return {k[: -len(".lora_B.weight")]: t[k].to(F64) @ t[k.replace("lora_B", "lora_A")].to(F64)
            for k in t if k.endswith(".lora_B.weight")}


def saved_ranks(out):
    t = load_file(str(out / "adapter_model.safetensors"))
    return {k[: -len(".lora_A.weight")]: t[k].shape[0] for k in t if k.endswith(".lora_A.weight")}


def ref_truncation(dW, rank=None, energy=None):
    """(kept rank, best approximation, squared norm dropped, total) from a dense float64 SVD."""
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    sq = S**2
    k = S.numel()
    if energy is not None:
        k = next(j + 1 for j in range(S.numel()) if sq[: j + 1].sum() >= energy * sq.sum())
    if rank is not None:
        k = min(k, rank)
    return k, (U[:, :k] * S[:k]) @ Vh[:k], float(sq[k:].sum()), float(sq.sum())


@pytest.mark.parametrize("method,params", [("ta", {}), ("knots-ties", {"top_k": 0.5}), ("ties", {"top_k": 0.5})])
@pytest.mark.parametrize("energy,rank", [(0.9, None), (0.5, None), (0.99, 3), (1.0, None)])
def test_energy_truncation(adapters, tmp_path, method, params, energy, rank):
    """Factored (ta, knots-ties) and dense (ties) merged updates, truncated by energy (and rank)."""
    full = knots_ext.merge(adapters, method, **params)
    out = tmp_path / "out"
    summary = knots_ext.merge_to(out, adapters, method, rank=rank, rank_energy=energy, **params)
    got, ranks = saved_updates(out), saved_ranks(out)
    dropped = total = worst = 0.0
    for name in full.modules:
        dW = full.delta(name).to(F64)
        k, want, d, t = ref_truncation(dW, rank, energy)
        if energy == 1.0 and rank is None:  # keeps every direction that holds any energy
            close(got[name], dW, 1e-5, f"{name} lossless")
        else:
            assert ranks[name] == k, f"{name}: kept {ranks[name]} directions, the reference keeps {k}"
            close(got[name], want, 1e-5, name)
        dropped, total, worst = dropped + d, total + t, max(worst, math.sqrt(d / t))
    assert summary.truncation is not None
    assert math.isclose(summary.truncation.relative, math.sqrt(dropped / total), rel_tol=1e-4, abs_tol=1e-7)
    assert math.isclose(summary.truncation.worst, worst, rel_tol=1e-4, abs_tol=1e-7)


def test_merge_result_save_with_energy(adapters, tmp_path):
    res = knots_ext.merge(adapters, "ta")
    res.save(tmp_path / "out", rank_energy=0.8)
    got, ranks = saved_updates(tmp_path / "out"), saved_ranks(tmp_path / "out")
    for name in res.modules:
        k, want, _, _ = ref_truncation(res.delta(name).to(F64), energy=0.8)
        assert ranks[name] == k
        close(got[name], want, 1e-5, name)


def test_lossless_has_no_truncation_report(adapters, tmp_path):
    assert knots_ext.merge_to(tmp_path / "out", adapters, "ta").truncation is None


def test_cli_prints_the_truncation_error(adapters, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main([*map(str, adapters), "-o", str(out), "--method", "ta", "--rank-energy", "0.9"]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("truncation (--rank-energy 0.9)"))
    res = knots_ext.merge(adapters, "ta")
    refs = [ref_truncation(res.delta(n).to(F64), energy=0.9) for n in res.modules]
    relative = math.sqrt(sum(r[2] for r in refs) / sum(r[3] for r in refs))
    assert f"of {relative:.3g} over all modules" in line


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1", "nan"])
def test_bad_energy(adapters, tmp_path, capsys, value):
    out = tmp_path / "out"
    rc = cli_main([*map(str, adapters), "-o", str(out), "--method", "ta", "--rank-energy", value])
    err = capsys.readouterr().err
    assert rc == 2 and "--rank-energy must be in (0, 1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ValueError, match="rank_energy must be a fraction"):
        knots_ext.merge_to(out, adapters, "ta", rank_energy=float(value))
