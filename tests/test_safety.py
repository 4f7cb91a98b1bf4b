"""Never destroy a user's files (issue 10): refused output paths, --overwrite, temporary folders of
killed runs, Ctrl-C, and inputs that used to crash or hang (deep JSON, FIFOs, slow or
metacharacter regex keys, wrongly typed config fields), each one error line naming the file."""
from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import save_file
from test_merge import write_adapter

from knots_ext import cli, engine
from knots_ext.grams import GramError, load_grams, save_grams
from knots_ext.io import AdapterError, check_output, load_adapter, save_adapter
from knots_ext.io._common import pattern_key_problem
from knots_ext.io.save import rank_config

PFX = "base_model.model."


def run_cli(*args, timeout=120):
    """The CLI in a subprocess: for what could hang or needs a real signal."""
    return subprocess.run([sys.executable, "-m", "knots_ext.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def main(capsys):
    """The CLI in this process (faster): returns an object with returncode and stderr."""
    def run(*args):
        code = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, captured.out, captured.err)
    return run


def one_line(done, code=2):
    assert done.returncode == code, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def snapshot(root):
    """Every path under root with its bytes (None for folders): a refusal must leave it equal."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def factors(r=2, name="model.layers.0.self_attn.q_proj"):
    gen = torch.Generator().manual_seed(r)
    return {name: (torch.randn(8, r, generator=gen), torch.randn(r, 6, generator=gen))}


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def two(tmp_path):
    return [write_adapter(tmp_path / "a", 4, 8, seed=1), write_adapter(tmp_path / "b", 4, 8, seed=2)]


# ------------------------------------------------------------------------------------------
# (8) -o never replaces an input, a user's folder, or (without --overwrite) an earlier output


def _user_folder(tmp_path):
    d = tmp_path / "notes"
    d.mkdir()
    (d / "README.md").write_text("mine")
    return d


@pytest.mark.parametrize("case", ["input", "dot-inside-input", "ancestor", "empty", "user-folder",
                                  "input-config-file"])
def test_cli_refuses_output_paths(tmp_path, two, case, main, monkeypatch):
    out, inputs = None, list(two)
    if case == "input":
        out = two[0]
    elif case == "dot-inside-input":
        monkeypatch.chdir(two[0])
        out, inputs = ".", [".", two[1]]
    elif case == "ancestor":
        out = tmp_path
    elif case == "empty":
        out = ""
    elif case == "user-folder":
        out = _user_folder(tmp_path)
    else:  # an adapter given by its config file: its folder is protected
        inputs[0] = two[0] / "adapter_config.json"
        out = two[0]
    before = snapshot(tmp_path)
    line = one_line(main(*inputs, "-o", out, "--method", "ta", "--overwrite"))
    assert line.startswith("knots-merge: error: "), line
    assert "refusing" in line or "empty" in line, line
    assert snapshot(tmp_path) == before


def test_cli_overwrite_replaces_only_its_own_files(tmp_path, two, main):
    out = tmp_path / "out"
    done = main(*two, "-o", out, "--method", "ta", "--quiet")
    assert done.returncode == 0, done.stderr
    manifest = json.loads((out / "knots_merge.json").read_text())
    assert manifest["tool"] == "knots-ext" and manifest["merge"]["method"] == "ta"
    assert manifest["files"] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "knots_merge.json",
                                 "recipe.yaml"]
    (out / "notes.txt").write_text("keep me")
    before = snapshot(tmp_path)
    line = one_line(main(*two, "-o", out, "--method", "knots-ta"))
    assert "--overwrite" in line and str(out) in line
    assert snapshot(tmp_path) == before
    done = main(*two, "-o", out, "--method", "knots-ta", "--overwrite", "--quiet")
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "knots_merge.json").read_text())["merge"]["method"] == "knots-ta"
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "out"]


def test_cli_checks_output_before_merging(tmp_path, two, monkeypatch, capsys):
    def no_merge(*a, **k):
        raise AssertionError("merge ran before the output path was checked")

    monkeypatch.setattr(engine, "run_merge", no_merge)
    assert cli.main([*map(str, two), "-o", str(two[1]), "--method", "ta"]) == 2
    assert "refusing to write over an input" in capsys.readouterr().err


def test_save_refuses_inputs_through_symlinks_and_bare_files(tmp_path, two):
    link = tmp_path / "link"
    link.symlink_to(two[0], target_is_directory=True)
    with pytest.raises(AdapterError, match="refusing to write over an input"):
        save_adapter(link / ".", factors(), base_model=None, inputs=[two[0]], overwrite=True)
    bare_dir = tmp_path / "bare"
    bare_dir.mkdir()
    save_file({PFX + "m.lora_A.weight": torch.ones(1, 2), PFX + "m.lora_B.weight": torch.ones(2, 1)},
              str(bare_dir / "x.safetensors"))
    with pytest.raises(AdapterError, match="is the input"):
        check_output(bare_dir, inputs=[bare_dir / "x.safetensors"])
    with pytest.raises(AdapterError, match="holds the input"):
        check_output(tmp_path, inputs=[str(two[1])])
    with pytest.raises(AdapterError, match="empty"):
        check_output("")
    check_output(tmp_path / "new", inputs=two)  # checks only: nothing is written
    assert not (tmp_path / "new").exists()


def test_save_overwrite_rules(tmp_path):
    out = tmp_path / "out"
    out.mkdir()  # an empty folder is written into, and kept (same inode)
    inode = out.stat().st_ino
    save_adapter(out, factors(2), base_model=None, manifest={"method": "ta", "params": {"lam": 1.0}})
    assert out.stat().st_ino == inode
    assert json.loads((out / "knots_merge.json").read_text())["merge"] == {"method": "ta", "params": {"lam": 1.0}}
    with pytest.raises(AdapterError, match="pass --overwrite"):
        save_adapter(out, factors(3), base_model=None)
    # a file an older version listed but this one does not write goes; the user's file stays
    m = json.loads((out / "knots_merge.json").read_text())
    m["files"].append("stale.bin")
    (out / "knots_merge.json").write_text(json.dumps(m))
    (out / "stale.bin").write_bytes(b"x")
    (out / "mine.txt").write_text("keep me")
    save_adapter(out, factors(3), base_model=None, overwrite=True)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors", "knots_merge.json",
                                       "mine.txt"]
    assert load_adapter(out).rank(PFX + "model.layers.0.self_attn.q_proj") == 3
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []
    # a manifest that is not ours does not make a folder replaceable
    for text in ('{"tool": "other", "files": []}', '{"tool": "knots-ext", "files": ["../x"]}', "{"):
        (out / "knots_merge.json").write_text(text)
        with pytest.raises(AdapterError, match="knots_merge.json: .*(not a knots-merge manifest|invalid)"):
            save_adapter(out, factors(2), base_model=None, overwrite=True)
    user = tmp_path / "user"
    user.mkdir()
    (user / "adapter_config.json").write_text("{}")  # looks like an adapter, was not written by us
    with pytest.raises(AdapterError, match="not a knots-merge output"):
        save_adapter(user, factors(2), base_model=None, overwrite=True)
    assert os.listdir(user) == ["adapter_config.json"]


# ------------------------------------------------------------------------------------------
# (9) temporary folders of killed runs; Ctrl-C / SIGTERM


def test_save_removes_stale_temp_dirs_of_dead_processes_only(tmp_path):
    dead = dead_pid()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".out.tmp-{dead}-0123abcd": False, f".out.old-{dead}-89abcdef": False,
                 f".out.tmp-{live.pid}-0123abcd": True, f".other.tmp-{dead}-0123abcd": True,
                 f".out.tmp-{dead}-notours": True}
        for name in names:
            (tmp_path / name).mkdir()
            (tmp_path / name / "adapter_model.safetensors").write_bytes(b"x" * 100)
        save_adapter(tmp_path / "out", factors(), base_model=None)
        assert {n: (tmp_path / n).exists() for n in names} == names
    finally:
        live.kill()
        live.wait()


def test_cli_ctrl_c_in_process(tmp_path, two, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "run_merge", interrupted)
    assert cli.main([*map(str, two), "-o", str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "knots-merge: interrupted\n"

    import knots_ext.io.save as save_module

    monkeypatch.undo()
    monkeypatch.setattr(save_module, "fsync_path", interrupted)  # Ctrl-C in the middle of the save
    assert cli.main([*map(str, two), "-o", str(tmp_path / "out"), "--method", "ta"]) == 130
    assert capsys.readouterr().err.splitlines()[-1:] == ["knots-merge: interrupted"]
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_cli_signal_subprocess(tmp_path, two, sig, code, word):
    script = textwrap.dedent(f"""
        import sys, time
        from knots_ext import cli, engine
        def slow(*a, **k):
            print("ready", flush=True)
            time.sleep(60)
        engine.run_merge = slow
        sys.exit(cli.main({[str(p) for p in two]!r} + ["-o", {str(tmp_path / 'out')!r}]))
    """)
    # SIGINT back to its default in the child: a shell's background job (`cmd &`, e.g. this suite
    # run that way) starts with SIGINT ignored, and Python then never raises KeyboardInterrupt.
    p = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert (p.returncode, err) == (code, f"knots-merge: {word}\n")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


# ------------------------------------------------------------------------------------------
# (10) inputs that crashed or hung: one line naming the file


def _set_config(path, **fields):
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg.update(fields)
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def test_deeply_nested_config_refused(tmp_path, two, main):
    cfg = two[1] / "adapter_config.json"
    cfg.write_text('{"a": ' * 100000 + "1" + "}" * 100000)
    with pytest.raises(AdapterError, match=re.escape(str(cfg)) + ": invalid JSON: nested too deeply"):
        load_adapter(two[1])
    line = one_line(main(*two, "-o", tmp_path / "out"))
    assert f"{cfg}: invalid JSON: nested too deeply" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [
    ("use_rslora", "false"), ("fan_in_fan_out", "false"), ("use_dora", "no"), ("r", "4"), ("r", True),
    ("r", 0), ("lora_alpha", "8"), ("rank_pattern", []), ("alpha_pattern", "x"),
    ("base_model_name_or_path", 5), ("peft_type", 1), ("task_type", {"a": 1}),
    ("rank_pattern", {"q_proj": "4"}), ("rank_pattern", {"q_proj": 4.0}), ("alpha_pattern", {"q_proj": "2"}),
])
def test_wrongly_typed_config_fields_refused(tmp_path, two, field, value, main):
    _set_config(two[1], **{field: value})
    cfg = two[1] / "adapter_config.json"
    with pytest.raises(AdapterError, match=re.escape(f"{cfg}: {field}")):
        load_adapter(two[1])
    if field == "use_rslora":
        line = one_line(main(*two, "-o", tmp_path / "out"))
        assert f"{cfg}: use_rslora must be true, false or null, got \"false\" (a string)" in line


@pytest.mark.parametrize("which", ["adapter_model.safetensors", "adapter_config.json", "bare"])
def test_fifo_inputs_refused_without_hanging(tmp_path, two, which):
    args = [*two]
    if which == "bare":
        fifo = tmp_path / "x.safetensors"
        args = [two[0], fifo, "--alpha", "8"]
    else:
        fifo = two[1] / which
        fifo.unlink()
    os.mkfifo(fifo)
    line = one_line(run_cli(*args, "-o", tmp_path / "out", timeout=60))
    assert f"{fifo}: not a regular file" in line
    assert not (tmp_path / "out").exists()


def test_deeply_nested_gram_metadata_refused(tmp_path, two, main):
    g = tmp_path / "g.safetensors"
    save_file({"m": torch.eye(2, dtype=torch.float64)}, str(g),
              metadata={"format": "knots-ext-grams", "num_vectors": "[" * 100000 + "]" * 100000})
    with pytest.raises(GramError, match=re.escape(str(g)) + ": metadata num_vectors is not valid JSON"):
        load_grams(g)
    line = one_line(main(*two, "-o", tmp_path / "out", "--method", "regmean", "--grams", g, g))
    assert str(g) in line
    save_grams(tmp_path / "ok.safetensors", {"m": torch.eye(2)}, num_vectors=3)  # the normal case still reads
    assert load_grams(tmp_path / "ok.safetensors").num_vectors == 3


def peft_rank(pattern: dict, name: str, default):
    """PEFT's get_pattern_key rule, written out here: the first key with
    re.match(rf"(.*\\.)?({key})$", name), else the name itself; then pattern.get(key, default)."""
    key = next((k for k in pattern if re.match(rf"(.*\.)?({k})$", name)), name)
    return pattern.get(key, default)


def test_module_names_with_regex_metacharacters(tmp_path):
    ranks = {"layers.0.attn(x)": 2, "a+b": 3, "aab": 4, "attn[x": 2, "c": 4, "d": 4, "blk.c": 1}
    r0, rp, ap = rank_config(ranks)
    assert r0 == 4 and rp == ap
    assert {n: peft_rank(rp, n, r0) for n in ranks} == ranks
    fs = {}
    for name, r in ranks.items():
        fs.update(factors(r, name))
    save_adapter(tmp_path / "o", fs, base_model=None)
    a = load_adapter(tmp_path / "o")
    assert {n[len(PFX):]: a.rank(n) for n in a.modules} == ranks
    assert all(a.scale(m) == 1.0 for m in a.modules)


@pytest.mark.parametrize("key,ok", [
    ("q_proj", True), ("model.layers.0.self_attn.q_proj", True), (r"^model\.layers\.0\.q\(x\)", True),
    (r"layers\.\d+\.mlp\.\w+", True), (".*q_proj", True), ("(q|k)_proj", True),
    ("(a+)+$", False), ("(a*)*", False), ("(a|aa)+", False), (r"(\w+\.)+x", False), (r"(a)\1", False),
    (".*.*.*x", False), ("a" * 1001, False), ("(", False), ("a{2}{3}", False),
])
def test_pattern_key_safety(key, ok):
    assert (pattern_key_problem(key) is None) == ok


def test_catastrophic_pattern_key_returns_fast(tmp_path):
    name = "a" * 40 + "b"
    d = tmp_path / "evil"
    d.mkdir()
    save_file({f"{PFX}{name}.lora_A.weight": torch.ones(4, 2), f"{PFX}{name}.lora_B.weight": torch.ones(2, 4)},
              str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                       "rank_pattern": {"(a+)+$": 4}}))
    script = textwrap.dedent(f"""
        import time
        from knots_ext.io import AdapterError, load_adapter
        t = time.perf_counter()
        try:
            load_adapter({str(d)!r})
        except AdapterError as e:
            print(e)
        print(time.perf_counter() - t)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          check=False)
    msg, seconds = done.stdout.strip().splitlines()
    assert float(seconds) < 1.0
    assert msg.startswith(f"{d / 'adapter_config.json'}: rank_pattern key '(a+)+$' has a quantifier inside"), msg


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_files_honour_umask(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        save_adapter(tmp_path / "o", factors(), base_model=None)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "o").stat().st_mode) == dir_mode
    for f in (tmp_path / "o").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == file_mode, f.name


def test_time_is_bounded_for_allowed_keys():
    """The worst allowed key (two quantifiers) on a long non-matching name stays fast."""
    name = "a." * 100 + "b"
    t = time.perf_counter()
    assert pattern_key_problem(".*a.*x") is None
    re.match(r"(.*\.)?(.*a.*x)$", name)
    assert time.perf_counter() - t < 0.5
