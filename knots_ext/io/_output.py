"""Where a merged adapter goes, and what may be replaced there.

Rules (the writer never destroys a user's files):
- OUT must not be, nor hold, an input adapter (the folder of an input file), after resolving
  symlinks; an empty path is refused.
- A missing OUT, or an existing empty folder, is written. Any other existing path is refused,
  except an earlier knots-merge output -- a folder holding the manifest knots_merge.json -- and
  that only with overwrite: then the files this tool writes are replaced one by one (os.replace),
  files the old manifest lists and this save does not write are removed, nothing else is touched;
  a file this save would write that the old manifest does not list (a user's README.md beside it)
  makes it refuse.
- Files are first written into a fresh hidden folder beside OUT, ".<OUT>.tmp-<pid>-<hex>", which
  becomes OUT (or whose files are moved into it). Such folders (and ".<OUT>.old-<pid>-<hex>" of
  older versions) left by a killed process are removed by the next save to the same OUT; those
  of a live process are left alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import stat

from ._common import AdapterError, read_json

MANIFEST_NAME = "knots_merge.json"
RECIPE_NAME = "recipe.yaml"  # the merge's recipe (knots_ext.recipe), loadable by knots-merge --config
CARD_NAME = "README.md"  # the model card
TOOL = "knots-ext"


def _is_inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def _protected_folders(inputs) -> list[str]:
    """Real paths of the folders the inputs live in: an input folder itself, or the folder of an
    input file (a bare .safetensors, an adapter_config.json, an io.Adapter's weights file)."""
    if isinstance(inputs, (str, bytes, os.PathLike)):
        inputs = [inputs]
    folders = []
    for p in inputs:
        real = os.path.realpath(os.fspath(getattr(p, "weights_path", p)))
        if os.path.exists(real):  # an adapter held in memory ("<peft:NAME>") has no folder to protect
            folders.append(real if os.path.isdir(real) else os.path.dirname(real))
    return folders


def plain_file_name(name) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "\0" not in name
        and os.sep not in name
        and (os.altsep is None or os.altsep not in name)
    )


def _manifest_files(path: str) -> list[str]:
    """The files an earlier knots-merge output lists in its manifest."""
    data = read_json(path, "manifest")
    ok = (
        isinstance(data, dict)
        and data.get("tool") == TOOL
        and isinstance(data.get("files"), list)
        and all(plain_file_name(f) for f in data["files"])
    )
    if not ok:
        raise AdapterError(
            path,
            f'not a knots-merge manifest (expected {{"tool": "{TOOL}", "files": [file '
            "names]}); refusing to replace the folder",
        )
    return data["files"]


def inspect_output(out_dir, inputs=(), overwrite: bool = False, files=()) -> tuple[str, list | None]:
    """Runs the refusal checks (module docstring) and returns (OUT as an absolute path, the files
    of the earlier output to replace: None when OUT does not exist, [] for an empty folder).
    `files`, the names about to be written, may replace only files the earlier output wrote."""
    if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir).strip():
        raise AdapterError(f"output path {out_dir!r}: empty or not a path")
    out_dir = os.fspath(out_dir)
    target, real = os.path.abspath(out_dir), os.path.realpath(out_dir)
    if not os.path.basename(target):
        raise AdapterError(out_dir, "not a directory name")
    for folder in _protected_folders(inputs):
        if _is_inside(folder, real):
            what = "is" if folder == real else "holds"
            raise AdapterError(out_dir, f"{what} the input {folder}; refusing to write over an input adapter")
    if not os.path.lexists(target):
        return target, None
    if os.path.islink(target) or not os.path.isdir(target):
        raise AdapterError(out_dir, "exists and is not a directory; refusing to replace it")
    names = os.listdir(target)
    if not names:
        return target, []
    if MANIFEST_NAME not in names:
        raise AdapterError(
            out_dir,
            f"exists, is not empty and is not a knots-merge output (no {MANIFEST_NAME}); refusing to write into it",
        )
    old_files = _manifest_files(os.path.join(target, MANIFEST_NAME))
    if not overwrite:
        raise AdapterError(
            out_dir, "holds an earlier knots-merge output; pass --overwrite (overwrite=True) to replace it"
        )
    for name in sorted(set(files) - set(old_files)):  # e.g. a README.md of the user's beside an older output
        if os.path.lexists(os.path.join(target, name)):
            raise AdapterError(
                out_dir, f"holds a {name} that knots-merge did not write; refusing to replace it (move it away)"
            )
    return target, old_files


def check_output(out_dir, inputs=(), overwrite: bool = False, files=(RECIPE_NAME, CARD_NAME)) -> None:
    """Raises AdapterError if save_adapter(out_dir, ..., inputs=inputs, overwrite=overwrite) would
    refuse the output path (writing `files` besides the adapter's own); writes nothing. Call it
    before a long merge."""
    inspect_output(out_dir, inputs, overwrite, files)


def manifest_text(files, metadata) -> str:
    """The manifest: {"tool": "knots-ext", "version": ..., "files": [...], "merge": metadata}."""
    from .. import __version__

    data: dict = {"tool": TOOL, "version": __version__, "files": sorted(files)}
    if metadata:
        data["merge"] = dict(metadata)
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


# ------------------------------------------------------------------ temporary folders


def _temp_pattern(base: str):
    return re.compile(rf"\.{re.escape(base)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}")


def fresh_temp_name(parent: str, base: str, tag: str = "tmp") -> str:
    while True:
        p = os.path.join(parent, f".{base}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")
        if not os.path.lexists(p):
            return p


def _process_alive(pid: int) -> bool:
    if os.name != "posix" or pid == os.getpid():
        return True  # (os.kill(pid, 0) would terminate the process on Windows)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(parent: str, base: str) -> None:
    """Removes the temporary folders of OUT = parent/base left by processes that are gone."""
    pattern = _temp_pattern(base)
    try:
        names = os.listdir(parent)
    except OSError:
        return
    for name in names:
        m = pattern.fullmatch(name)
        if m and not _process_alive(int(m.group(1))):
            # (rmtree leaves a symlink or a file of that name alone: it refuses them, ignored)
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


# Bytes appended to an output file between two starts of its writeback (start_writeback).
WRITEBACK_CHUNK = 16 << 20


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Asks the kernel to start writing a file's range to disk now, without waiting for it (Linux:
    fadvise DONTNEED starts the writeback of the range's dirty pages; the pages still being
    written stay cached). Written this way as the merge goes, a large output's closing fsync has
    little left to wait for (416 MB: 0.15 s -> ~0 here). Advice only: ignored where unsupported."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is None or length <= 0:
        return
    with contextlib.suppress(OSError):
        advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def fsync_path(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def install(tmp: str, target: str, old_files: list | None) -> None:
    """Puts the files written in `tmp` at `target`: renames the folder when target does not exist;
    otherwise moves each file over its old version (the manifest last, so that the old one keeps
    describing the folder until the end) and removes the old manifest's files not written now."""
    if old_files is None:
        os.rename(tmp, target)
    else:
        new = sorted(os.listdir(tmp), key=lambda n: (n == MANIFEST_NAME, n))
        for name in new:
            os.replace(os.path.join(tmp, name), os.path.join(target, name))
        for name in sorted(set(old_files) - set(new)):
            path = os.path.join(target, name)
            if os.path.lexists(path) and not stat.S_ISDIR(os.lstat(path).st_mode):
                os.unlink(path)
        os.rmdir(tmp)
        fsync_path(target)
    fsync_path(os.path.dirname(target))
