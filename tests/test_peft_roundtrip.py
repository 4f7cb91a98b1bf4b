"""End to end with PEFT itself: adapters made by peft on a tiny Llama, merged by knots_ext,
saved, and loaded back by peft.PeftModel.from_pretrained: its outputs equal the base model's with
the merged updates added by hand (W + dW, computed here from res.delta)."""
from __future__ import annotations

import copy
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import knots_ext  # noqa: E402


def tiny_llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def make_adapter(base, path, r, alpha, targets, seed, rslora=False):
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                                                                     use_rslora=rslora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(path))
    return path


@pytest.mark.parametrize("method,kw", [("knots-ties", dict(top_k=0.5)), ("ta", dict(lam=0.5)),
                                       ("ties", dict(top_k=0.3)), ("knots-dare-ties", dict(top_k=0.5, dare_p=0.3))])
def test_saved_merge_loads_in_peft(tmp_path, method, kw):
    base = tiny_llama()
    paths = [make_adapter(base, tmp_path / "a", 4, 8, ["q_proj", "v_proj"], 1),
             make_adapter(base, tmp_path / "b", 8, 8, ["q_proj", "v_proj", "k_proj"], 2, rslora=True),
             make_adapter(base, tmp_path / "c", 2, 4, ["q_proj", "v_proj"], 3)]
    res = knots_ext.merge(paths, method=method, **kw)
    out = tmp_path / "merged"
    res.save(out, rank=None if method.startswith("knots") or method == "ta" else 12)

    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(out)).eval()
    by_hand = copy.deepcopy(base)
    params = dict(by_hand.named_parameters())
    with torch.no_grad():
        for name, upd in res.factors(None if method.startswith("knots") or method == "ta" else 12).items():
            key = name.removeprefix("base_model.model.") + ".weight"
            params[key] += (upd[0].double() @ upd[1].double()).float()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        want = by_hand(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    assert (got - plain).abs().max() > 1e-3  # the merged adapter does something
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_fold_into_matches_delta(tmp_path):
    base = tiny_llama()
    paths = [make_adapter(base, tmp_path / "a", 4, 8, ["q_proj", "v_proj"], 1),
             make_adapter(base, tmp_path / "b", 4, 16, ["q_proj", "v_proj"], 2)]
    res = knots_ext.merge(paths, method="knots-ties", top_k=0.4)
    folded = res.fold_into(copy.deepcopy(base))
    before, after = dict(base.named_parameters()), dict(folded.named_parameters())
    for name in res.modules:
        key = name.removeprefix("base_model.model.") + ".weight"
        torch.testing.assert_close(after[key] - before[key], res.delta(name), rtol=1e-4, atol=1e-6)
    sd = res.fold_into(base.state_dict())
    torch.testing.assert_close(sd[key], after[key])
