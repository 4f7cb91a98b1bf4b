"""Progress bars: knots-merge shows one per pass over the modules (threshold rounds, merge) on a
terminal, with the time left, and nothing with --quiet or when stderr is not a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading

import pytest

from merge_refs import Terminal, write_adapter


def run_on_terminal(args) -> tuple[int, str]:
    """Runs knots-merge with stderr on a pseudo-terminal; (exit code, what it wrote there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new pty is 0 columns wide
    chunks: list = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the terminal's other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "knots_ext.cli", *args], stderr=slave,
                              stdout=subprocess.DEVNULL, timeout=300)
    finally:
        os.close(slave)
        reader.join(timeout=30)
        os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    return [str(write_adapter(root / f"a{i}", 4, 8, seed=i, layers=6)) for i in range(3)]


def test_bars_on_a_terminal(adapters, tmp_path):
    rc, err = run_on_terminal([*adapters, "-o", str(tmp_path / "out"), "--method", "knots-ties"])
    assert rc == 0, err
    n = 6 * 3  # modules
    for desc in ("knots-ties: thresholds, round 1", "knots-ties: merge"):
        assert desc in err
    assert f"{n}/{n}" in err and ("module/s" in err or "s/module" in err)
    assert "<" in err  # tqdm's elapsed<remaining
    assert "merged 3 adapters, 18 modules" in err


def test_quiet_and_not_a_terminal(adapters, tmp_path):
    rc, err = run_on_terminal([*adapters, "-o", str(tmp_path / "q"), "--method", "knots-ties", "--quiet"])
    assert rc == 0 and err == ""
    proc = subprocess.run([sys.executable, "-m", "knots_ext.cli", *adapters, "-o", str(tmp_path / "p"),
                           "--method", "knots-ties"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "module/s" not in proc.stderr and "%|" not in proc.stderr


def test_save_bar(adapters, tmp_path, monkeypatch):
    """MergeResult.save(quiet=False) shows a bar over the modules it factors (a --rank SVD each)."""
    import knots_ext

    res = knots_ext.merge(adapters, "ties", top_k=0.5)
    monkeypatch.setattr(sys, "stderr", Terminal())
    res.save(tmp_path / "quiet", rank=2)
    assert sys.stderr.getvalue() == ""
    res.save(tmp_path / "shown", rank=2, quiet=False)
    bar = sys.stderr.getvalue()
    assert "save: factors" in bar and "18/18" in bar
