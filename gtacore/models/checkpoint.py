"""Hugging Face-layout checkpoints: safetensors only, never pickle.

Reading: single-file `model.safetensors` or sharded with
`model.safetensors.index.json`. The model is built on the meta device and each
tensor is assigned straight from the file (cast to the asked dtype), so peak
memory is one copy of the weights. Every missing, unexpected or wrongly shaped
tensor is reported by name before anything is assigned.

Writing: config.json, safetensors shards (with an index when more than one),
the tokenizer files. Everything is written into a temporary sibling folder and
renamed into place, so a crash mid-write never leaves a half-written checkpoint
where a complete one is expected.

Sharing: `link_pretrained` makes a second HF folder whose weight files are hard
links to another's (one copy on disk; a copy where the filesystem refuses links).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(ValueError):
    """A checkpoint we cannot load; the message names the file and tensor."""


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map each tensor name to the file that holds it."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: malformed index (weight_map must map tensor names to shard file names)")
        files = {name: path / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not shard.is_file():
                raise CheckpointError(f"{index}: names shard {shard.name}, which does not exist")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in _keys(single)}
    pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
    hint = f" (found {', '.join(pickled)}: pickle files are never loaded; convert them to safetensors)" if pickled else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def _keys(file: Path) -> list[str]:
    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from e


def read_tensors(
    path: str | Path,
    expected: dict[str, tuple[torch.Size, torch.dtype]],
    optional: set[str] = frozenset(),
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
):
    """Yield (name, tensor) for every expected tensor, after checking names and shapes.

    expected: name -> (shape, dtype the model wants when `dtype` is None).
    optional: names that may be absent (e.g. `lm_head.weight` with tied embeddings).
    """
    path = Path(path)
    files = _tensor_files(path)
    missing = sorted(set(expected) - set(files) - set(optional))
    unexpected = sorted(set(files) - set(expected))
    if missing:
        raise CheckpointError(f"{path}: missing tensors: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors: {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else ""))
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name in files:
            by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        try:
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                absent = sorted(set(names) - set(f.keys()))
                if absent:  # only a sharded index can place a tensor in a file that lacks it
                    raise CheckpointError(f"{file}: does not hold tensors {', '.join(absent[:10])}, which {INDEX_FILE} places there")
                for name in names:
                    shape = torch.Size(f.get_slice(name).get_shape())
                    if shape != expected[name][0]:
                        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(shape)}, expected {tuple(expected[name][0])}")
                for name in names:
                    t = f.get_tensor(name)
                    if not (t.is_floating_point()):
                        raise CheckpointError(f"{file}: tensor {name} has dtype {t.dtype}, expected a floating-point tensor")
                    yield name, t.to(dtype or expected[name][1])
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e}); is it truncated?") from e


def write_checkpoint(
    path: str | Path,
    tensors: dict[str, torch.Tensor],
    config: dict,
    tokenizer_dir: str | Path | None = None,
    extra_files: dict[str, str] | None = None,
    max_shard_bytes: int = 5 * 1024**3,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write an HF-layout checkpoint atomically: temp folder, then rename into place.

    tensors: HF parameter names -> tensors (moved to CPU and made contiguous here).
    extra_files: file name -> text, written beside the weights (e.g. tokenizer.json).
    write_extra: called with the temporary folder to add more files (e.g. trainer
    state) before the folder is renamed into place, so they appear atomically too.
    """
    path = Path(path)
    with _atomic_folder(path) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = t.detach().to("cpu").contiguous()
            size += nbytes
        if len(shards) == 1:
            save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if "torch_dtype" in config and "dtype" in config:  # transformers >= 4.56 reads "dtype": keep both spellings true
            config = {**config, "dtype": config["torch_dtype"]}
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        if tokenizer_dir is not None:
            for fname in TOKENIZER_FILES:
                src = Path(tokenizer_dir) / fname
                if src.is_file():
                    shutil.copyfile(src, tmp / fname)
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text, encoding="utf-8")
        if write_extra is not None:
            write_extra(tmp)
    return path


def link_pretrained(src: str | Path, dst: str | Path) -> bool:
    """Make `dst` an HF-layout folder holding `src`'s weights, config and tokenizer files (not
    its trainer state), atomically as `write_checkpoint` does. The weight files are hard links
    to `src`'s, so the weights are on disk once; deleting either folder later leaves the other
    whole. Where the filesystem refuses hard links (another filesystem, no link support) they
    are copied. The small files are always copied, so editing one folder's config.json never
    changes the other's. Returns True when every weight file is shared.

    Either folder's weight files must then only ever be replaced, never rewritten in place
    (which `write_checkpoint` and transformers' save_pretrained do).
    """
    src, dst = Path(src), Path(dst)
    weights = sorted({f.name for f in _tensor_files(src).values()})  # checks src has weights
    shared = True
    with _atomic_folder(dst) as tmp:
        for name in weights:
            try:
                os.link(src / name, tmp / name)
            except OSError:  # EXDEV, EPERM, ENOTSUP, EMLINK...: a plain copy
                shutil.copyfile(src / name, tmp / name)
                shared = False
        for name in ("config.json", INDEX_FILE, *TOKENIZER_FILES):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
    return shared


@contextlib.contextmanager
def _atomic_folder(path: Path) -> Iterator[Path]:
    """A temporary sibling folder to fill; on success its files are fsynced and it replaces
    `path` in one rename, on any error it is removed and `path` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        _apply_umask(tmp)
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _apply_umask(folder: Path) -> None:
    """The modes a plain mkdir / open would give under the user's umask (0755 / 0644 under 022), so
    that a server running as another user can load the folder. mkdtemp makes 0700 and
    safetensors writes 0600, whatever the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _fsync_dir(folder: Path) -> None:
    for p in folder.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def _replace_dir(src: Path, dst: Path) -> None:
    """Move a finished folder into place; an existing one is moved aside first and removed last."""
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)
