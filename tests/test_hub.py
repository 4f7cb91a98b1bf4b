"""Adapters named org/name[@revision], found in a Hugging Face Hub cache the tests build (the
hub's layout: models--org--name/{refs/<branch>, snapshots/<commit>/<file> -> ../../blobs/<hash>}),
never downloaded; merge(), merge_to() and the CLI."""
from __future__ import annotations

import hashlib
import os

import pytest
import yaml

import knots_ext
from knots_ext import cli
from knots_ext.io import AdapterError
from merge_refs import close, read_updates, write_adapter

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def cache_repo(cache, repo, adapter, commit, refs=("main",)):
    """Puts the files of the adapter folder into the cache as huggingface_hub lays them out."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / commit
    (folder / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for f in sorted(adapter.iterdir()):
        data = f.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (folder / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (folder / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache holding org/alpha (main and tag v1 at COMMIT; OTHER_COMMIT another version), and a
    local adapter; HF_HUB_CACHE points at the cache."""
    cache = tmp_path / "hf-cache"
    sources = [write_adapter(tmp_path / "src" / n, r, 2 * r, seed=s) for n, r, s in (("a", 2, 1), ("b", 3, 2))]
    cache_repo(cache, "org/alpha", sources[0], COMMIT, refs=("main", "v1"))
    cache_repo(cache, "org/alpha", sources[1], OTHER_COMMIT, refs=())
    local = write_adapter(tmp_path / "local", 4, 4, seed=3)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (resolution never goes online anyway)
    return cache, sources, local


def ta_reference(adapters):
    updates = [read_updates(p) for p in adapters]
    names = set().union(*updates)
    return {n: sum(u[n] for u in updates if n in u) for n in names}


@pytest.mark.parametrize("name,source", [("org/alpha", 0), ("org/alpha@main", 0), ("org/alpha@v1", 0),
                                         (f"org/alpha@{OTHER_COMMIT}", 1)])
def test_merge_resolves_hub_names_in_the_cache(hub, name, source):
    cache, sources, local = hub
    res = knots_ext.merge([name, local], method="ta")
    want = ta_reference([sources[source], local])
    for n, w in want.items():
        close(res.delta(n), w, 1e-5, n)
    commit = OTHER_COMMIT if source else COMMIT
    assert res.inputs[0] == str(cache / "models--org--alpha" / "snapshots" / commit)


def test_not_cached_is_one_clear_line(hub, tmp_path):
    cache, _, local = hub
    for name, revision in (("org/beta", "main"), ("org/alpha@v2", "v2"), ("org/alpha@" + "1" * 40, "1" * 40)):
        with pytest.raises(AdapterError) as e:
            knots_ext.merge([name, local], method="ta")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(name + ": ")
        assert f"{name.split('@')[0]} (revision {revision})" in msg and str(cache) in msg and "not cached" in msg


def test_a_local_path_wins_over_a_hub_name(hub, tmp_path, monkeypatch):
    _, sources, local = hub
    write_adapter(tmp_path / "org" / "alpha", 2, 2, seed=7)
    monkeypatch.chdir(tmp_path)
    res = knots_ext.merge(["org/alpha", local], method="ta")
    assert os.path.abspath(res.inputs[0]) == str(tmp_path / "org" / "alpha")
    for n, w in ta_reference([tmp_path / "org" / "alpha", local]).items():
        close(res.delta(n), w, 1e-5, n)


def test_cli_and_recipe_with_hub_names(hub, tmp_path, capsys):
    cache, sources, local = hub
    out = tmp_path / "out"
    assert cli.main(["org/alpha@v1", str(local), "-o", str(out), "--method", "ta", "--quiet"]) == 0
    for n, w in ta_reference([sources[0], local]).items():
        close(read_updates(out)[n], w, 1e-5, n)
    entry = yaml.safe_load((out / "recipe.yaml").read_text())["adapters"][0]
    assert entry["hub"] == f"org/alpha@{COMMIT}"
    assert entry["path"] == str(cache / "models--org--alpha" / "snapshots" / COMMIT)
    # a recipe naming the Hub repo; and one whose snapshot path is gone but whose hub entry is cached
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"adapters": [f"org/alpha@{OTHER_COMMIT}", str(local)], "method": "ta"}))
    assert cli.main(["--config", str(recipe), "-o", str(tmp_path / "o2"), "--quiet"]) == 0
    for n, w in ta_reference([sources[1], local]).items():
        close(read_updates(tmp_path / "o2")[n], w, 1e-5, n)
    moved = {"adapters": [{"path": str(tmp_path / "old-cache" / "snapshot"), "hub": f"org/alpha@{COMMIT}"},
                          str(local)], "method": "ta"}
    recipe.write_text(yaml.safe_dump(moved))
    assert cli.main(["--config", str(recipe), "-o", str(tmp_path / "o3"), "--quiet"]) == 0
    assert read_updates(tmp_path / "o3").keys() == read_updates(out).keys()
    capsys.readouterr()
    # not cached: exit 2, one line naming the repo, revision and cache
    assert cli.main(["org/gamma@dev", str(local), "-o", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "org/gamma (revision dev)" in err[0] and str(cache) in err[0], err
    recipe.write_text(yaml.safe_dump({"adapters": ["org/gamma", str(local)], "method": "ta"}))
    assert cli.main(["--config", str(recipe), "-o", str(tmp_path / "o4")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{recipe}: adapters[0]: " in err[0] and "org/gamma (revision main)" in err[0], err
    assert not (tmp_path / "o4").exists()


def test_names_that_are_not_hub_names_stay_paths(hub, tmp_path):
    from knots_ext import hub as hub_module

    for name in ("./org/alpha", "/abs/org/alpha", "org/alpha/sub", "org", "org/../x", "org--x/y"):
        assert hub_module.split_name(name) is None, name
        assert hub_module.local_path(name) == name
    with pytest.raises(AdapterError, match="no such file or directory"):
        knots_ext.merge(["./org/alpha", hub[2]], method="ta")


def test_without_huggingface_hub_the_error_says_so(hub, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # (import then raises ImportError)
    with pytest.raises(AdapterError, match="org/alpha: no such file or directory, and huggingface_hub .* not installed"):
        knots_ext.merge(["org/alpha", hub[2]], method="ta")
