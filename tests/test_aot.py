"""Ahead-of-time compile of every Triton kernel in gtacore/kernels/*.py for sm_80 and sm_90, no GPU needed.

The CPU interpreter (TRITON_INTERPRET=1, what the other tests run) executes the kernels' Python
with numpy and accepts code that the GPU compiler rejects (a loop-carried variable that changes
type, for one: see the negative test) and says nothing about registers. This module compiles each kernel the way
a GPU launch would, down to the cubin, with `triton.compile(ASTSource(...), target=GPUTarget(
"cuda", arch, 32))`, and fails on a compile error or on any register spill.

What is compiled follows the launchers, not typed-in numbers: each launcher
(`gtacore.kernels.selective_logprobs._rows_forward` / `_rows_backward`) is called on small CPU tensors
shaped like a real batch (one row of V logits, V in VOCABS) with the kernel's `run` replaced by a
recorder, so the block size, num_warps and which optional pointers are None are whatever the
launcher itself passes. The recorded arguments are then turned into the signature, constexprs,
divisibility attributes and options that `JITFunction.run` derives (see `_specialize`). Each
launch is compiled twice: as launched (all pointers and ints 16-aligned, as for fresh tensors and
these V) and with no alignment facts (a sliced or offset tensor), the two extremes the JIT picks.

Why a subprocess. With TRITON_INTERPRET=1 set when triton is imported, `@triton.jit` returns an
InterpretedFunction, and so do the jit functions of triton.language itself (tl.max, tl.sum are
@jit in triton/language/standard.py). Wrapping the kernel as `JITFunction(kernel.fn)` is not
enough: the code generator then meets the interpreted tl.max and fails ("'ir.value' object has no
attribute 'data'"). So the compiles run in `python tests/test_aot.py --json ...` with
TRITON_INTERPRET removed from the environment, where triton and the kernel modules import as on a
GPU machine (and `_block_config` takes its CUDA branch on its own). Each test process gets an
empty TRITON_CACHE_DIR (and TRITON_ALWAYS_COMPILE=1), so no cached cubin can hide an error.
Registers and spills: `CompiledKernel.n_regs` / `n_spills` are filled only by `_init_handles`,
which loads the cubin through the CUDA driver, so they are read from the ptxas -v log of the very
ptxas run that made the cubin (TRITON_DUMP_PTXAS_LOG=1); if that log is missing (another triton
version), ptxas from the triton wheel is run again on the PTX.

Table for an issue note:  python tests/test_aot.py   (Markdown on stdout; exit 1 on any problem)
"""

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_DIR = ROOT / "gtacore" / "kernels"
ARCHS = (80, 90)
# Vocabularies of the target models: 49152 (SmolLM2), 128256 (Llama 3), 151936 / 152064 (Qwen2.5).
VOCABS = (49152, 128256, 151936, 152064)
LOGIT_DTYPES = ("bfloat16", "float16", "float32", "float64")  # fp64: "works too" (selective_logprobs doc)
ALIGNMENTS = ("16B", "none")  # as launched (fresh tensors, V % 16 == 0) / no alignment facts

pytestmark = pytest.mark.aot


# ----------------------------------------------------------------------------------------------
# Kernel discovery (no import: collection must not import triton in interpreter mode for this).


def _is_jit_decorator(node: ast.expr) -> bool:
    node = node.func if isinstance(node, ast.Call) else node
    name = node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")
    return name == "jit"


def jit_kernels_in_sources(kernel_dir: Path = KERNEL_DIR) -> list[tuple[str, str]]:
    """(module stem, function name) of every @triton.jit function in kernel_dir/*.py."""
    found = []
    for path in sorted(kernel_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef) and any(_is_jit_decorator(d) for d in node.decorator_list):
                found.append((path.stem, node.name))
    return found


# ----------------------------------------------------------------------------------------------
# Launch enumeration: call the launchers, record what they pass to the kernels.


@contextlib.contextmanager
def _recording(kernel):
    """Replace `kernel.run` (what `kernel[grid](...)` calls) by a recorder of (args, kwargs)."""
    calls = []

    def run(*args, grid, warmup, **kwargs):
        calls.append((args, kwargs))

    kernel.run = run
    try:
        yield calls
    finally:
        del kernel.run


def _selective_logprobs_launches(mod):
    """Every launch `_rows_forward` / `_rows_backward` can make: logits dtype x mask None or not
    (x entropy None or not, forward) x V. Callers: selective_logprobs (mask optional, entropy
    optional), gta_loss (mask, entropy), fused_linear_logprobs (mask optional, no entropy),
    fused_linear_gta_loss (mask, entropy). targets are long, mask bool, dlogprobs fp32 (the grad of
    the fp32 logprobs), dlogits has the logits dtype (a new buffer or the logits themselves)."""
    import torch

    for dtype_name in LOGIT_DTYPES:
        dtype = getattr(torch, dtype_name)
        for V in VOCABS:
            logits = torch.zeros(1, V, dtype=dtype)
            targets = torch.zeros(1, dtype=torch.long)
            for mask in (None, torch.ones(1, dtype=torch.bool)):
                base = {"logits": dtype_name.replace("bfloat", "bf").replace("float", "fp"),
                        "mask": "none" if mask is None else "bool"}
                for with_entropy in (False, True):
                    with _recording(mod._selective_logprobs_fwd_kernel) as calls:
                        mod._rows_forward(logits, targets, mask, 1.0, with_entropy)
                    for args, kwargs in calls:
                        config = dict(base, entropy="fp32" if with_entropy else "none")
                        yield "_selective_logprobs_fwd_kernel", config, V, args, kwargs
                lse = torch.zeros(1, dtype=torch.float32)
                dlogprobs = torch.ones(1, dtype=torch.float32)
                with _recording(mod._selective_logprobs_bwd_kernel) as calls:
                    mod._rows_backward(logits, targets, mask, lse, dlogprobs, 1.0, torch.empty_like(logits))
                for args, kwargs in calls:
                    yield "_selective_logprobs_bwd_kernel", base, V, args, kwargs


# Module stem -> enumerator of (kernel name, configuration, V, args, kwargs). A new @triton.jit
# kernel fails test_aot_compile until its launches are enumerated here.
LAUNCHES = {"selective_logprobs": _selective_logprobs_launches}


# ----------------------------------------------------------------------------------------------
# Compilation (worker process only: triton imported without TRITON_INTERPRET).


def _specialize(kernel, args, kwargs):
    """signature, constexprs, attrs, options as JITFunction.run derives them from a launch:
    constexpr parameters and None arguments become constexprs, an int equal to 1 too (unless
    do_not_specialize), other types by `mangle_type` (torch.bool -> *u1 on 3.7, int -> i32/i64,
    float -> fp32); tensors with data_ptr % 16 == 0 and ints % 16 == 0 get tt.divisibility 16."""
    from triton.runtime.jit import mangle_type

    names = list(kernel.arg_names)
    params = {p.name: p for p in kernel.params}
    bound = inspect.signature(kernel.fn).bind(*args, **{k: v for k, v in kwargs.items() if k in names})
    bound.apply_defaults()
    options = {k: v for k, v in kwargs.items() if k not in names}
    signature, constexprs, attrs = {}, {}, {}
    for index, name in enumerate(names):
        value, param = bound.arguments[name], params[name]
        no_spec = getattr(param, "do_not_specialize", False)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if param.is_constexpr or value is None or (is_int and value == 1 and not no_spec):
            signature[name], constexprs[name] = "constexpr", value
            continue
        annotation = getattr(param, "annotation_type", None)
        signature[name] = annotation if isinstance(annotation, str) and annotation else mangle_type(value)
        if no_spec or getattr(param, "do_not_specialize_on_alignment", False):
            continue
        if (hasattr(value, "data_ptr") and value.data_ptr() % 16 == 0) or (is_int and value % 16 == 0):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs, options


def ast_source(kernel, signature, constexprs, attrs=None):
    """ASTSource(fn, signature={name: "*bf16" | "i32" | ... | "constexpr"}, constexprs, attrs).
    constexprs are keyed by (parameter index,) tuples, the form every ASTSource that has a
    `constexprs` argument takes (3.7 also converts names to it); older ones (`constants=`) are
    skipped by the tests."""
    from triton.compiler import ASTSource

    names = list(kernel.arg_names)
    keyed = {((names.index(k),) if isinstance(k, str) else k): v for k, v in constexprs.items()}
    return ASTSource(fn=kernel, signature=signature, constexprs=keyed, attrs=attrs or {})


_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_log(ptx: str, arch: int) -> str:
    """ptxas -v of the PTX, with the ptxas the triton wheel ships (fallback, see module doc)."""
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(arch).path if hasattr(nv, "get_ptxas") else nv.knobs.nvidia.ptxas.path
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [ptxas, "-v", f"--gpu-name={nv.sm_arch_from_capability(arch)}", str(src), "-o", str(src) + ".o"]
        return subprocess.run(cmd, capture_output=True, text=True, check=True).stderr


def compile_for(kernel, signature, constexprs, attrs, options, arch) -> dict:
    """Compile to a cubin; {"regs", "spill_stores", "spill_loads", "num_stages", "error", "seconds"}."""
    import triton
    from triton.backends.compiler import GPUTarget

    start = time.perf_counter()
    log = io.StringIO()  # make_cubin prints the ptxas log (TRITON_DUMP_PTXAS_LOG=1) and its errors
    result = {"regs": None, "spill_stores": None, "spill_loads": None, "num_stages": None, "error": None}
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ast_source(kernel, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", arch, 32), options=dict(options))
    except Exception as error:  # compile errors of every stage: the test reports them
        result["error"] = f"{type(error).__name__}: {error}".strip()
    else:
        text = log.getvalue()
        if not _USED.search(text):
            text = _ptxas_log(compiled.asm["ptx"], arch)
        spills = [tuple(map(int, m)) for m in _SPILLS.findall(text)]
        result.update(regs=max(int(n) for n in _USED.findall(text)),
                      spill_stores=sum(s for s, _ in spills), spill_loads=sum(l for _, l in spills),
                      num_stages=compiled.metadata.num_stages)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _load_module(stem: str, module_files: dict[str, str]):
    if stem not in module_files:
        return importlib.import_module(f"gtacore.kernels.{stem}")
    spec = importlib.util.spec_from_file_location(f"aot_copy_of_{stem}", module_files[stem])
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compile_rows(kernels, archs, module_files=None, max_configs=None) -> list[dict]:
    """Compile each launch of each "stem.kernel" for each arch; one row per distinct compile."""
    from triton.runtime.jit import JITFunction

    module_files = module_files or {}
    rows = []
    for qualified in kernels:
        stem, name = qualified.split(".")
        mod = _load_module(stem, module_files)
        kernel = getattr(mod, name)
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(f"{qualified} is a {type(kernel).__name__}, not a JITFunction: is TRITON_INTERPRET set?")
        if stem not in LAUNCHES:
            rows.append({"kernel": name, "error": f"no launches enumerated for gtacore/kernels/{stem}.py in tests/test_aot.py"})
            continue
        distinct = {}  # one compile per distinct (signature, constexprs, attrs, options); V's merged
        for kernel_name, config, V, args, kwargs in LAUNCHES[stem](mod):
            if kernel_name != name:
                continue
            signature, constexprs, attrs, options = _specialize(kernel, args, kwargs)
            for alignment in ALIGNMENTS:
                key_attrs = attrs if alignment == "16B" else {}
                key = json.dumps([config, signature, constexprs, sorted(map(str, key_attrs.items())), options],
                                 sort_keys=True, default=str)
                entry = distinct.setdefault(key, {"config": dict(config, align=alignment), "V": [],
                                                  "spec": (signature, constexprs, key_attrs, options)})
                entry["V"].append(V)
        for entry in list(distinct.values())[:max_configs]:
            signature, constexprs, attrs, options = entry["spec"]
            for arch in archs:
                row = {"kernel": name, "config": entry["config"], "V": entry["V"], "arch": arch,
                       "constexprs": {k: v for k, v in constexprs.items() if v is not None},
                       "num_warps": options.get("num_warps", 4)}
                row.update(compile_for(kernel, signature, constexprs, attrs, options, arch))
                rows.append(row)
    return rows


def problems(rows) -> list[dict]:
    return [r for r in rows if r.get("error") or r.get("spill_stores") or r.get("spill_loads")]


def markdown(rows) -> str:
    lines = ["| kernel | configuration | V | constexprs | warps / stages | arch | registers "
             "| spill stores / loads (bytes) | result |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        config = ", ".join(f"{k}={v}" for k, v in r.get("config", {}).items())
        constexprs = ", ".join(f"{k}={v}" for k, v in r.get("constexprs", {}).items())
        error = r.get("error")
        result = "ok" if not error and not (r.get("spill_stores") or r.get("spill_loads")) else "SPILLS"
        if error:
            result = "ERROR: " + " ".join(error.split())[:300].replace("|", "\\|")
        lines.append(f"| {r['kernel']} | {config} | {', '.join(map(str, r.get('V', [])))} | {constexprs} "
                     f"| {r.get('num_warps')} / {r.get('num_stages')} | sm_{r.get('arch')} | {r.get('regs')} "
                     f"| {r.get('spill_stores')} / {r.get('spill_loads')} | {result} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON here instead of a table")
    parser.add_argument("--kernel", action="append", help="stem.kernel (default: all in gtacore/kernels/*.py)")
    parser.add_argument("--arch", action="append", type=int, help=f"default {ARCHS}")
    parser.add_argument("--module-file", action="append", default=[], metavar="STEM=PATH",
                        help="compile the kernels of gtacore/kernels/STEM.py from this copy instead")
    parser.add_argument("--max-configs", type=int, help="only the first N distinct configurations per kernel")
    args = parser.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("triton was imported with TRITON_INTERPRET=1; run this file as a script")
    # Before triton is imported: real JITFunctions, the ptxas log printed, no cache reuse.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    sys.path.insert(0, str(ROOT))
    kernels = args.kernel or [f"{stem}.{name}" for stem, name in jit_kernels_in_sources()]
    module_files = dict(item.split("=", 1) for item in args.module_file)
    with contextlib.ExitStack() as stack:
        if "TRITON_CACHE_DIR" not in os.environ:
            os.environ["TRITON_CACHE_DIR"] = stack.enter_context(tempfile.TemporaryDirectory(prefix="aot-cache-"))
        start = time.perf_counter()
        rows = compile_rows(kernels, args.arch or ARCHS, module_files, args.max_configs)
        elapsed = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
        return 0
    import triton

    print(f"AOT compile, triton {triton.__version__}, {len(rows)} compiles in {elapsed:.0f} s "
          f"(V: {', '.join(map(str, VOCABS))}; align: 16B = as launched, none = no alignment facts)\n")
    print(markdown(rows))
    return 1 if problems(rows) else 0


# ----------------------------------------------------------------------------------------------
# Tests (pytest process: may have TRITON_INTERPRET=1; compiles run in a clean subprocess).


def _nvidia_backend_or_skip():
    pytest.importorskip("triton")
    if importlib.util.find_spec("triton.backends.nvidia") is None:
        pytest.skip("this triton has no NVIDIA backend")
    from triton.compiler import ASTSource

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this triton's ASTSource predates constexprs= (signature dicts by name)")


def run_worker(tmp_path: Path, *args: str) -> list[dict]:
    """`python tests/test_aot.py --json ...` without TRITON_INTERPRET, with an empty cache."""
    _nvidia_backend_or_skip()
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--json", str(out), *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"AOT worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return json.loads(out.read_text())


KERNELS = jit_kernels_in_sources()


def test_kernels_discovered():
    names = {name for _, name in KERNELS}
    assert {"_selective_logprobs_fwd_kernel", "_selective_logprobs_bwd_kernel"} <= names, KERNELS


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("qualified", [f"{s}.{n}" for s, n in KERNELS])
def test_aot_compile(qualified, arch, tmp_path):
    """Every launch configuration compiles for this arch without register spills."""
    rows = run_worker(tmp_path, "--kernel", qualified, "--arch", str(arch))
    assert rows, f"no launch configurations for {qualified}"
    assert not problems(rows), "\n" + markdown(problems(rows))
    assert all(row["regs"] for row in rows), rows  # the ptxas log was found and read


def _mutant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of gtacore/kernels/selective_logprobs.py with one edit, outside the repository."""
    source = (KERNEL_DIR / "selective_logprobs.py").read_text()
    assert source.count(old) == 1, f"mutation site not found (kernel changed?): {old!r}"
    path = tmp_path / "mutant_selective_logprobs.py"
    path.write_text(source.replace(old, new))
    return path


def _interpreted(path: Path):
    """Import a kernel-module copy in this (interpreter) process, outside the kernels package."""
    spec = importlib.util.spec_from_file_location("aot_interpreted_mutant", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_aot_rejects_a_type_bug_the_interpreter_accepts(tmp_path):
    """`s = 0` instead of `s = 0.0` for the running sum: numpy does not care, and the interpreter
    gives the right answer, but the GPU compiler rejects a loop-carried int32 that becomes fp32."""
    path = _mutant(tmp_path, "        s = 0.0  # sum exp(x - m)\n", "        s = 0  # sum exp(x - m)\n")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import torch

        mod = _interpreted(path)
        assert mod.INTERPRET
        logits = torch.randn(3, 1500, dtype=torch.float32)
        targets = torch.tensor([0, 7, 1499])
        logprobs, _lse, entropy = mod._rows_forward(logits, targets, None, 1.0, True)  # the copy's own kernel
        want = mod.selective_logprobs_reference(logits, targets, with_entropy=True)
        torch.testing.assert_close(logprobs, want.logprobs)
        torch.testing.assert_close(entropy, want.entropy)
    rows = run_worker(tmp_path, "--module-file", f"selective_logprobs={path}", "--max-configs", "1",
                      "--kernel", "selective_logprobs._selective_logprobs_fwd_kernel", "--arch", "90")
    assert rows and all(r["error"] and "Loop-carried variable s" in r["error"] for r in rows), rows


def test_aot_flags_spills(tmp_path):
    """A launcher picking a block too large for registers (the interpreter takes any block, and
    runs its own 1024 anyway): 65536 bf16 logits over 8 warps, 256 per thread, spill."""
    path = _mutant(tmp_path, "(4096 if element_size <= 2 else 2048)", "(65536 if element_size <= 2 else 2048)")
    rows = run_worker(tmp_path, "--module-file", f"selective_logprobs={path}", "--max-configs", "1",
                      "--kernel", "selective_logprobs._selective_logprobs_fwd_kernel", "--arch", "90")
    assert rows and rows[0]["constexprs"] == {"BLOCK_V": 65536}, rows
    assert not rows[0]["error"] and rows[0]["spill_stores"] > 0, rows
    assert problems(rows) == rows


if __name__ == "__main__":
    sys.exit(main())
