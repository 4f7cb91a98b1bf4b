"""knots-merge on bad input: exit code 2, one error line naming the file, nothing written."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from test_merge import write_adapter


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "knots_ext.cli", *map(str, args)], capture_output=True, text=True)


def corrupt(path):
    f = path / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    return f


def pickled(path):
    (path / "adapter_model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, path / "adapter_model.bin")
    return path / "adapter_model.bin"


def dora(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def nan_weights(path):
    from safetensors.torch import load_file

    t = load_file(str(path / "adapter_model.safetensors"))
    key = sorted(k for k in t if k.endswith("lora_A.weight"))[0]
    t[key][0, 0] = float("nan")
    save_file(t, str(path / "adapter_model.safetensors"))
    return path / "adapter_model.safetensors"


def other_base(path):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "some/other-model"
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


def wrong_shape(path):
    write_adapter(path, 4, 8, seed=9, modules={"self_attn.q_proj": (24, 20)})
    return path


@pytest.mark.parametrize("spoil,needle", [(corrupt, "safetensors"), (pickled, "pickle"), (dora, "DoRA"),
                                          (nan_weights, "NaN"), (other_base, "base model"), (wrong_shape, "shape")])
def test_bad_input_exits_2_with_one_line(tmp_path, spoil, needle):
    good = write_adapter(tmp_path / "good", 4, 8, seed=1)
    bad = write_adapter(tmp_path / "bad", 4, 8, seed=2)
    named = spoil(bad)
    out = tmp_path / "out"
    done = run_cli(good, bad, "-o", out, "--method", "knots-ties", "--top-k", "0.5")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle.lower() in lines[0].lower(), lines[0]
    assert str(named.parent if named.is_file() else named).split("/")[-1] in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out") or "tmp" in p.name]


def test_bad_parameters_exit_2(tmp_path):
    a = write_adapter(tmp_path / "a", 4, 8, seed=1)
    for args in (["--method", "dare-ties"], ["--top-k", "-1"], ["--rank", "0"]):
        done = run_cli(a, "-o", tmp_path / "o", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert not (tmp_path / "o").exists()
