"""The PEFT drop-in on the bundled example adapters: a tiny Llama-style model built from a config
(the shape examples/adapters/ fit: 4 layers, hidden 128; random weights, nothing downloaded), the
three adapters loaded into one PeftModel, merged by knots_ext.peft.add_weighted_adapter with PEFT's
arguments, the result activated, and its logits checked against the base model with the merged
update added to its weights by hand.

    python examples/peft_dropin.py [--combination-type knots_ties] [--density 0.5]"""
from __future__ import annotations

import argparse
import copy
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402

from knots_ext.peft import add_weighted_adapter  # noqa: E402

ADAPTERS = Path(__file__).resolve().parent / "adapters"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--combination-type", default="knots_ties")
    ap.add_argument("--density", type=float, default=0.5)
    args = ap.parse_args(argv)
    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    plain = copy.deepcopy(base)

    model = PeftModel.from_pretrained(base, str(ADAPTERS / "task_a"), adapter_name="task_a")
    model.load_adapter(str(ADAPTERS / "task_b"), adapter_name="task_b")
    model.load_adapter(str(ADAPTERS / "task_c"), adapter_name="task_c")
    res = add_weighted_adapter(model, ["task_a", "task_b", "task_c"], [1.0, 0.5, -0.25], "merged",
                               combination_type=args.combination_type, density=args.density)
    model.set_adapter("merged")
    ranks = sorted({model.get_submodule(m).r["merged"] for m in res.modules})
    print(f"added adapter 'merged' ({res.method}, {res.params}) on {len(res.modules)} modules, ranks {ranks}")

    by_hand = res.fold_into(copy.deepcopy(plain))  # W + dW for every merged module
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want, before = model(input_ids=ids).logits, by_hand(input_ids=ids).logits, plain(input_ids=ids).logits
    print(f"logits with 'merged' active vs base + merged update: max |diff| {float((got - want).abs().max()):.2e} "
          f"(the update itself moves them by {float((want - before).abs().max()):.2e})")


if __name__ == "__main__":
    main()
