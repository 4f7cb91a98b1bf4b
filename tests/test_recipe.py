"""Recipes: knots-merge --config (YAML / JSON), flags over the recipe, the recipe every output
carries (recipe.yaml, safetensors metadata, README.md) and reproducing a merge from it bit for bit."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
from dataclasses import dataclass

import pytest
import torch
import yaml
from safetensors import safe_open

import knots_ext
from knots_ext import cli
from knots_ext.recipe import hash_side_by_side, sha256_file
from knots_ext.io import AdapterError, save_adapter
from merge_refs import close, read_updates, write_adapter

PFX = "base_model.model.model.layers"
OUT_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "knots_merge.json", "recipe.yaml"]


@pytest.fixture
def three(tmp_path):
    return [write_adapter(tmp_path / f"a{i}", r, 2 * r, seed=i) for i, r in enumerate((2, 3, 4))]


@dataclass
class Done:
    returncode: int
    stderr: str


def run_cli(*args):
    """knots-merge in this process (the CLI tests in test_cli.py run it as a program)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in args])
    return Done(code, err.getvalue())


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def header_and_data(path):
    """(safetensors header without its metadata, the tensor bytes) of a written adapter."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    return header.pop("__metadata__"), header, raw[8 + n :]


def recipe_of(out):
    return yaml.safe_load((out / "recipe.yaml").read_text())


def test_every_output_carries_its_recipe(three, tmp_path):
    out = tmp_path / "out"
    knots_ext.merge_to(out, three, method="ties", top_k=0.5, weights=[1.0, -0.5, 2.0],
                       module_weights=[["q_proj", 0.25]], rank=3, dtype=torch.bfloat16)
    assert sorted(os.listdir(out)) == OUT_FILES
    assert json.loads((out / "knots_merge.json").read_text())["files"] == OUT_FILES
    recipe = recipe_of(out)
    assert recipe["method"] == "ties" and recipe["params"] == {"top_k": 0.5, "top_k_scope": "task", "lam": 1.0}
    assert recipe["weights"] == [1.0, -0.5, 2.0] and recipe["module_weights"] == [["q_proj", 0.25]]
    assert recipe["rank"] == 3 and recipe["dtype"] == "bfloat16" and recipe["output"] == str(out)
    assert recipe["knots_ext_version"] == knots_ext.__version__ and recipe["date"][:2] == "20"
    assert [a["path"] for a in recipe["adapters"]] == [str(p) for p in three]
    for entry, path in zip(recipe["adapters"], three):
        assert entry["sha256"] == {"adapter_model.safetensors": sha256(path / "adapter_model.safetensors"),
                                   "adapter_config.json": sha256(path / "adapter_config.json")}
    # the same recipe, as JSON, in the safetensors metadata (PEFT and safetensors ignore it)
    metadata, _, _ = header_and_data(out / "adapter_model.safetensors")
    assert metadata["format"] == "pt" and json.loads(metadata["knots_ext.recipe"]) == recipe
    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as f:
        assert json.loads(f.metadata()["knots_ext.recipe"])["method"] == "ties"
    card = (out / "README.md").read_text()
    assert "`ties`" in card and "knots-merge --config recipe.yaml -o" in card and "top_k = 0.5" in card
    assert "| 1 | `" + str(three[1]) + "` | -0.5 |" in card


def test_merge_result_save_carries_its_recipe(three, tmp_path):
    res = knots_ext.merge(three, method="knots-ta", weights=[1, 2, 3])
    res.save(tmp_path / "saved", rank=2)
    recipe = recipe_of(tmp_path / "saved")
    assert recipe["method"] == "knots-ta" and recipe["rank"] == 2 and recipe["weights"] == [1.0, 2.0, 3.0]
    assert recipe["adapters"][2]["sha256"]["adapter_model.safetensors"] == sha256(three[2] / "adapter_model.safetensors")


@pytest.mark.parametrize("method,flags", [
    ("knots-ties", ["--top-k", "0.4", "--weights", "1", "0.5", "-1", "--module-weights", "v_proj=0", "--rank", "3"]),
    ("dare-ties", ["--dare-p", "0.3", "--seed", "7", "--top-k", "0.6", "--dtype", "bfloat16"]),
])
def test_config_of_an_output_reproduces_it_bit_for_bit(three, tmp_path, method, flags):
    first = tmp_path / "first"
    done = run_cli(*three, "-o", first, "--method", method, *flags, "--quiet")
    assert done.returncode == 0, done.stderr
    again = tmp_path / "again"
    done = run_cli("--config", first / "recipe.yaml", "-o", again, "--quiet")
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert (again / "adapter_config.json").read_bytes() == (first / "adapter_config.json").read_bytes()
    meta1, header1, data1 = header_and_data(first / "adapter_model.safetensors")
    meta2, header2, data2 = header_and_data(again / "adapter_model.safetensors")
    assert header1 == header2 and data1 == data2  # the tensors, bit for bit
    r1, r2 = recipe_of(first), recipe_of(again)
    assert r2["output"] == str(again)
    for r in (r1, r2):
        del r["output"], r["date"]
    assert r1 == r2
    assert json.loads(meta2["knots_ext.recipe"])["output"] == str(again)


def test_handwritten_yaml_and_json_recipes(three, tmp_path, monkeypatch):
    """Relative paths are relative to the recipe's folder; JSON works as YAML does; the result is
    the merge the same flags give, and that merge matches a float64 TA reference."""
    (tmp_path / "recipes").mkdir()
    text = ("adapters: [../a0, ../a1, ../a2]\nmethod: ta\nweights: [1, 0.5, -2]\n"
            "module_weights: [[\"layers\\\\.1\\\\.\", 3]]\noutput: ../from-yaml\n")
    (tmp_path / "recipes" / "r.yaml").write_text(text)
    monkeypatch.chdir("/")
    done = run_cli("--config", tmp_path / "recipes" / "r.yaml", "--quiet")
    assert done.returncode == 0, done.stderr
    as_json = {"adapters": [str(p) for p in three], "method": "ta", "weights": [1, 0.5, -2],
               "module_weights": [["layers\\.1\\.", 3]], "output": "from-json"}
    (tmp_path / "recipes" / "r.json").write_text(json.dumps(as_json))
    assert run_cli("--config", tmp_path / "recipes" / "r.json", "--quiet").returncode == 0
    got_yaml, got_json = read_updates(tmp_path / "from-yaml"), read_updates(tmp_path / "recipes" / "from-json")
    inputs = [read_updates(p) for p in three]
    for name in got_yaml:
        scale = 3.0 if ".1." in name else 1.0
        want = sum(w * scale * upd[name] for w, upd in zip((1.0, 0.5, -2.0), inputs))
        close(got_yaml[name], want, 1e-5, name)
        assert torch.equal(got_yaml[name], got_json[name]), name


def test_flags_override_the_recipe(three, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"adapters": [str(p) for p in three], "method": "ties",
                                      "params": {"top_k": 0.5, "lam": 2.0}, "output": str(tmp_path / "unused"),
                                      "rank": 2}))
    done = run_cli("--config", recipe, "-o", tmp_path / "o", "--top-k", "0.3", "--rank", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "unused").exists()
    assert run_cli(*three, "-o", tmp_path / "flags", "--method", "ties", "--top-k", "0.3", "--lam", "2", "--rank", "4",
                   "--quiet").returncode == 0
    assert header_and_data(tmp_path / "o" / "adapter_model.safetensors")[1:] == \
        header_and_data(tmp_path / "flags" / "adapter_model.safetensors")[1:]
    r = recipe_of(tmp_path / "o")
    assert r["params"] == {"top_k": 0.3, "top_k_scope": "task", "lam": 2.0} and r["rank"] == 4
    # adapters on the command line replace the recipe's; another --method keeps only the params it takes
    done = run_cli("--config", recipe, three[0], three[1], "-o", tmp_path / "o2", "--method", "ta", "--quiet")
    assert done.returncode == 0, done.stderr
    r = recipe_of(tmp_path / "o2")
    assert r["method"] == "ta" and r["params"] == {"lam": 2.0} and len(r["adapters"]) == 2


def _spoil(key, value):
    def spoil(recipe):
        recipe[key] = value
        return recipe

    return spoil


@pytest.mark.parametrize("spoil,needle", [
    (_spoil("methd", "ta"), "unknown key 'methd'"),
    (_spoil("method", "tie"), "method: must be one of"),
    (_spoil("params", {"top_k": "0.5"}), "params.top_k: must be a number, got a string"),
    (_spoil("params", {"top_k": 5}), "params.top_k: top_k must be in (0, 1]"),
    (_spoil("params", {"topk": 0.5}), "params.topk: unknown method parameter"),
    (_spoil("weights", "1 2 3"), "weights: must be a list of numbers"),
    (_spoil("weights", [1, 2]), "weights: 2 values for 3 adapters"),
    (_spoil("weights", [1, "x", 2]), "weights[1]: must be a finite number"),
    (_spoil("module_weights", [["(a+)+", 1]]), "module_weights:"),
    (_spoil("rank", 0), "rank: must be an integer >= 1"),
    (_spoil("force", "yes"), "force: must be true or false"),
    (_spoil("dtype", "float8"), "dtype: must be one of"),
    (_spoil("adapters", []), "adapters: must be a non-empty list"),
    (lambda r: {**r, "adapters": [r["adapters"][0], "missing-adapter"]}, "adapters[1]:"),
    (lambda r: {**r, "adapters": [{"path": r["adapters"][0], "sha": "x"}]}, "adapters[0]: unknown key 'sha'"),
    (lambda r: [r], "a recipe must be a mapping"),
])
def test_bad_recipe_is_one_line_naming_file_and_key(three, tmp_path, spoil, needle):
    recipe = {"adapters": [str(p) for p in three], "method": "ties", "params": {"top_k": 0.5}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spoil(recipe)))
    done = run_cli("--config", path, "-o", tmp_path / "o")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"knots-merge: error: {path}: "), done.stderr
    assert needle in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name,text,needle", [
    ("r.yaml", "adapters: [a\nmethod: ta\n", "invalid recipe YAML"),
    ("r.json", '{"adapters": [}', "invalid recipe JSON"),
    ("r.txt", "adapters: [a]\n", "a recipe is a .yaml, .yml or .json file"),
    ("r.yaml", "!!python/object/apply:os.system [echo hi]\n", "invalid recipe YAML"),  # safe_load only
])
def test_unreadable_recipe(tmp_path, name, text, needle):
    (tmp_path / name).write_text(text)
    done = run_cli("--config", tmp_path / name, "-o", tmp_path / "o")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"{tmp_path / name}: {needle}" in done.stderr


def test_no_adapters_or_output_exits_2(three, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"adapters": [str(three[0])], "method": "ta"}))
    done = run_cli("--config", recipe)
    assert done.returncode == 2 and "no output folder" in done.stderr
    done = run_cli("-o", tmp_path / "o")
    assert done.returncode == 2 and "no adapters to merge" in done.stderr


def test_changed_adapter_warns_and_merges_as_it_is(three, tmp_path):
    out = tmp_path / "out"
    knots_ext.merge_to(out, three, method="ta")
    write_adapter(three[1], 3, 6, seed=99)  # retrained in place
    done = run_cli("--config", out / "recipe.yaml", "-o", tmp_path / "again", "--quiet")
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("knots-merge: warning: ") and "adapters[1]" in lines[0]
    assert str(three[1] / "adapter_model.safetensors") in lines[0]
    new = recipe_of(tmp_path / "again")["adapters"][1]["sha256"]["adapter_model.safetensors"]
    assert new == sha256(three[1] / "adapter_model.safetensors") != \
        recipe_of(out)["adapters"][1]["sha256"]["adapter_model.safetensors"]
    want = sum(read_updates(p)[f"{PFX}.0.self_attn.q_proj"] for p in three)
    close(read_updates(tmp_path / "again")[f"{PFX}.0.self_attn.q_proj"], want, 1e-5)


def test_rerun_in_place_with_overwrite(three, tmp_path):
    out = tmp_path / "out"
    assert run_cli(*three, "-o", out, "--method", "ta", "--quiet").returncode == 0
    done = run_cli("--config", out / "recipe.yaml", "--quiet")
    assert done.returncode == 2 and "--overwrite" in done.stderr
    before = header_and_data(out / "adapter_model.safetensors")[1:]
    assert run_cli("--config", out / "recipe.yaml", "--overwrite", "--quiet").returncode == 0
    assert header_and_data(out / "adapter_model.safetensors")[1:] == before
    assert sorted(os.listdir(out)) == OUT_FILES


def test_a_users_readme_is_never_replaced(three, tmp_path):
    """An output of an older version (its manifest lists no README.md) with the user's README.md
    beside it: overwriting it is refused before the merge, the README kept."""
    out = tmp_path / "out"
    save_adapter(out, {f"{PFX}.0.m": (torch.ones(2, 1), torch.ones(1, 2))}, base_model=None)
    (out / "README.md").write_text("my notes")
    with pytest.raises(AdapterError, match="holds a README.md that knots-merge did not write"):
        knots_ext.merge_to(out, three, method="ta", overwrite=True)
    assert (out / "README.md").read_text() == "my notes"
    assert cli.main([*map(str, three), "-o", str(out), "--method", "ta", "--overwrite", "--quiet"]) == 2
    assert (out / "README.md").read_text() == "my notes"
    (out / "README.md").unlink()  # gone: the output is replaced, README.md and recipe.yaml included
    knots_ext.merge_to(out, three, method="ta", overwrite=True)
    assert sorted(os.listdir(out)) == OUT_FILES


def test_bare_files_and_the_python_api(three, tmp_path):
    """Bare .safetensors inputs (with alpha): the recipe hashes the file itself and keeps alpha;
    recipe.load(...).merge_kwargs() runs it again from Python."""
    bare = []
    for p in three[:2]:
        bare.append(tmp_path / f"{p.name}.safetensors")
        (p / "adapter_model.safetensors").rename(bare[-1])
    out = tmp_path / "out"
    knots_ext.merge_to(out, bare, method="ta", alpha=6.0, rank=2)
    r = recipe_of(out)
    assert r["alpha"] == 6.0 and [a["sha256"] for a in r["adapters"]] == [{b.name: sha256(b)} for b in bare]
    loaded = knots_ext.recipe.load(out / "recipe.yaml")
    kwargs = loaded.merge_kwargs()
    assert kwargs["out_dir"] == str(out) and kwargs["alpha"] == 6.0 and kwargs["rank"] == 2
    kwargs["out_dir"] = tmp_path / "again"
    knots_ext.merge_to(**kwargs)
    assert header_and_data(out / "adapter_model.safetensors")[1:] == \
        header_and_data(tmp_path / "again" / "adapter_model.safetensors")[1:]
    assert loaded.hash_warnings() == []
    bare[0].write_bytes(bare[1].read_bytes())
    assert [w.split(": ")[1] for w in loaded.hash_warnings()] == ["adapters[0]"]


def test_the_example_recipe_is_the_flags_merge(tmp_path):
    examples = os.path.join(os.path.dirname(__file__), "..", "examples")
    assert run_cli("--config", os.path.join(examples, "recipe.yaml"), "-o", tmp_path / "r", "--quiet").returncode == 0
    adapters = [os.path.join(examples, "adapters", t) for t in ("task_a", "task_b", "task_c")]
    done = run_cli(*adapters, "-o", tmp_path / "f", "--method", "knots-ties", "--top-k", "0.5", "--weights", "1",
                   "0.5", "1", "--module-weights", "layers\\.0\\.=0.5", "--quiet")
    assert done.returncode == 0, done.stderr
    assert header_and_data(tmp_path / "r" / "adapter_model.safetensors")[1:] == \
        header_and_data(tmp_path / "f" / "adapter_model.safetensors")[1:]
    assert recipe_of(tmp_path / "r")["module_weights"] == [["layers\\.0\\.", 0.5]]


def test_sources_of_files_and_of_adapters_in_memory(three):
    from types import SimpleNamespace

    loaded = knots_ext.io.load_adapter(three[0])
    assert knots_ext.recipe.sources([loaded, SimpleNamespace(path="peft:task_b", weights_path=None)]) == [
        (str(three[0]), [str(three[0] / "adapter_model.safetensors"), str(three[0] / "adapter_config.json")]),
        ("peft:task_b", []),
    ]


def test_inputs_hashed_side_by_side_as_one_by_one(tmp_path):
    """hash_side_by_side fills sha256_file's cache with each file's own digest, and leaves a path
    it cannot hash (a folder, a missing file) for sha256_file to report, one clear line."""
    files = []
    for i in range(5):
        files.append(tmp_path / f"f{i}.bin")
        files[-1].write_bytes(bytes([i]) * (3 << 20 if i == 2 else 1000 + i))
    hash_side_by_side([*files, tmp_path, tmp_path / "missing"], threads=3)
    assert [sha256_file(f) for f in files] == [sha256(f) for f in files]
    for bad in (tmp_path, tmp_path / "missing"):
        with pytest.raises(AdapterError, match=str(bad)):
            sha256_file(bad)
