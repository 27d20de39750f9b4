"""The llama.cpp peer: llama-cpp-python, and GGUF files converted from the very weights ventoux runs.

    path = gguf_file("ckpt-folder", "Q4_0", cache_dir)    # converted once, then reused from the cache

llama-cpp-python is never a dependency of ventoux: when it is missing, the benchmark installs it with
pip (it compiles llama.cpp, for this CPU). The converter is llama.cpp's own convert_hf_to_gguf.py, taken
from the source distribution of the installed llama-cpp-python (it vendors llama.cpp), so the GGUF
format always matches the library that reads it. Q4_0 is made from the BF16 file with llama.cpp's
quantizer; BF16, F16, F32 and Q8_0 come straight from the converter.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import VentouxError

CONVERTER_TYPES = ("F32", "F16", "BF16", "Q8_0")  # --outtype of convert_hf_to_gguf.py, lower-cased
QUANTIZER_TYPES = {"Q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "Q4_K_M": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
                   "Q6_K": "LLAMA_FTYPE_MOSTLY_Q6_K"}  # made from the BF16 file


def gguf_types(dtype: str, quantize: str | None) -> list[str]:
    """The llama.cpp types of the same precision as a ventoux technique."""
    if quantize:
        if quantize.startswith("int8"):
            return ["Q8_0"]
        if quantize.startswith("int6"):
            return ["Q6_K"]
        if quantize.startswith("int4"):  # Q4_0: the same bytes as int4-g64; Q4_K_M: Ollama's default 4-bit type
            return ["Q4_0", "Q4_K_M"]
        raise VentouxError(f"--quantize {quantize!r} has no llama.cpp counterpart to compare with (int8, int6, int4)")
    return {"bfloat16": ["BF16", "F16"], "float16": ["F16", "BF16"], "float32": ["F32"]}[dtype]


# How llama.cpp is compiled for each --isa of the benchmarks: for this CPU ("native"), or for AVX2 CPUs only.
BUILDS = ("native", "avx2")
VERSION = "0.3.*"
AVX2_ONLY = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
# llama.cpp's option for each x86 feature (a /proc/cpuinfo flag) a native build without AMX names one by one
X86_OPTIONS = {"sse4_2": "SSE42", "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "f16c": "F16C", "bmi2": "BMI2",
               "avx_vnni": "AVX_VNNI", "avx512f": "AVX512", "avx512vbmi": "AVX512_VBMI",
               "avx512_vnni": "AVX512_VNNI", "avx512_bf16": "AVX512_BF16"}


def cmake_args(isa: str = "native", flags: frozenset[str] | None = None) -> str:
    """llama.cpp's CMake options for a build: "-DGGML_NATIVE=ON" (-march=native), except on CPUs with AMX.
    There a native build repacks Q4_0 / Q8_0 weights for its AMX backend, which segfaults in its first
    product on this project's Sapphire Rapids VM, as reported upstream (ggml-org/llama.cpp#20824; dspy's CI
    dropped that variant for it): those CPUs get every other instruction set they have, named one by one,
    and llama.cpp's AVX-512 CPU_REPACK path."""
    if isa == "avx2":
        return AVX2_ONLY
    if isa != "native":
        raise VentouxError(f"unknown llama.cpp build {isa!r}: use one of {', '.join(BUILDS)}")
    from ..cpu_kernels import cpu_flags

    flags = cpu_flags() if flags is None else flags
    if "amx_int8" not in flags:
        return "-DGGML_NATIVE=ON"
    named = [f"-DGGML_{option}={'ON' if flag in flags else 'OFF'}" for flag, option in X86_OPTIONS.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *named, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"])


def install_dir(isa: str = "native") -> Path:
    """Where llama-cpp-python built for `isa` on this CPU lives: one folder per build and CPU, so a
    build is never reused on another machine (nor a native build as the AVX2 one)."""
    from ..cpu_kernels import cache_dir, cpu_flags, cpu_model

    key = hashlib.sha1(f"{cpu_model()}|{' '.join(sorted(cpu_flags()))}|{cmake_args(isa)}".encode()).hexdigest()
    return cache_dir().parent / "llama-cpp" / f"{isa}-{key[:10]}"


def build_for(isa: str | None) -> str:
    """The llama.cpp build to compare with ventoux running its `isa` kernels: AVX2-only for avx2, else native."""
    return "avx2" if isa == "avx2" else "native"


def cpu_model() -> str:
    """cpu_kernels.cpu_model (this module imports PyTorch's side lazily)."""
    from ..cpu_kernels import cpu_model

    return cpu_model()


def ensure_installed(isa: str = "native", log: Callable[[str], None] = print) -> Path:
    """The folder of llama-cpp-python (and gguf) compiled from source for this CPU (`isa` "native") or for
    AVX2 only; built with pip on first use (10 minutes or more), never from a wheel built elsewhere.
    The folder is appended to sys.path (after the environment's own packages) and returned."""
    target = install_dir(isa)
    if not (target / "llama_cpp").is_dir():
        options = cmake_args(isa)
        env = {**os.environ, "CMAKE_ARGS": options, "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
        log(f"building llama-cpp-python {VERSION} from source ({options}) into {target}: this can take "
            "10 minutes or more ...")
        tmp = target.with_name(target.name + ".tmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "--no-cache-dir",
               "--target", str(tmp), "--upgrade", f"llama-cpp-python=={VERSION}", "gguf"]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode:
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise VentouxError(f"building llama-cpp-python failed ({last}); run `{' '.join(cmd)}` with "
                               f"CMAKE_ARGS='{options}' to see why, or drop --compare llama.cpp")
        tmp.rename(target)
    use(target)
    return target


def use(folder: str | Path) -> None:
    """Make a build folder importable; appended, so the environment's own numpy etc. still win."""
    if str(folder) not in sys.path:
        sys.path.append(str(folder))


def system_info() -> str:
    """llama.cpp's own account of the instruction sets it was compiled with (AVX2 = 1, AVX512 = 1, ...)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def converter(cache_dir: Path, log: Callable[[str], None] = print) -> Path:
    """llama.cpp's convert_hf_to_gguf.py, from the sdist of the installed llama-cpp-python."""
    ensure_installed("native", log)
    import llama_cpp

    version = llama_cpp.__version__
    root = cache_dir / f"llama-cpp-python-{version}"
    script = root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    log(f"fetching the llama-cpp-python {version} source for llama.cpp's GGUF converter ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python", "--no-deps", "-q",
               f"llama-cpp-python=={version}", "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode or not archives:
            last = (proc.stderr.strip().splitlines() or ["no archive"])[-1]
            raise VentouxError(f"downloading the llama-cpp-python {version} source failed ({last}); "
                               "the GGUF converter comes from it")
        with tarfile.open(archives[0]) as tar:
            # Only the Python side of the vendored llama.cpp: the converter, its modules and gguf-py.
            prefix = tar.getnames()[0].split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix) and m.isfile()
                       and (m.name.endswith(".py") or "/gguf-py/" in m.name)]
            for m in members:
                m.name = m.name[len(prefix.split("/")[0]) + 1:]  # drop the top folder of the archive
            tar.extractall(root, members=members, filter="data")
    return script


def _source_key(folder: Path) -> str:
    """Identifies the checkpoint's weights: a new or rewritten file gives a new GGUF."""
    h = hashlib.sha1(str(folder.resolve()).encode())
    for p in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def gguf_file(folder: str | Path, gguf_type: str, cache_dir: str | Path, log: Callable[[str], None] = print) -> Path:
    """A GGUF file of `gguf_type` holding the weights of the HF checkpoint `folder`; cached in cache_dir."""
    folder, cache_dir = Path(folder), Path(cache_dir)
    if not (folder / "config.json").is_file() or not list(folder.glob("*.safetensors")):
        raise VentouxError(f"{folder} is not an HF-layout checkpoint (config.json + safetensors), which llama.cpp's "
                           "converter needs: write one with `ventoux convert SRC DST --format hf`")
    if not (folder / "tokenizer.model").is_file():
        raise VentouxError(f"{folder} has no tokenizer.model (sentencepiece), which llama.cpp's converter needs: "
                           "copy the checkpoint's tokenizer.model.v1/v3 there as tokenizer.model")
    if gguf_type not in CONVERTER_TYPES and gguf_type not in QUANTIZER_TYPES:
        raise VentouxError(f"unknown GGUF type {gguf_type!r}: use one of {CONVERTER_TYPES + tuple(QUANTIZER_TYPES)}")
    out = cache_dir / f"{folder.name}-{_source_key(folder)}-{gguf_type}.gguf"
    if out.exists():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    if gguf_type in QUANTIZER_TYPES:
        source = gguf_file(folder, "BF16", cache_dir, log)
        log(f"quantizing {source.name} to {gguf_type} with llama.cpp ...")
        _quantize(source, tmp, gguf_type)
    else:
        script = converter(cache_dir, log)
        log(f"converting {folder} to GGUF {gguf_type} with llama.cpp's convert_hf_to_gguf.py ...")
        cmd = [sys.executable, str(script), str(folder), "--outtype", gguf_type.lower(), "--outfile", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if proc.returncode:
            tmp.unlink(missing_ok=True)
            last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
            raise VentouxError(f"llama.cpp's converter failed on {folder} ({last})")
    tmp.rename(out)
    return out


def _quantize(source: Path, dest: Path, gguf_type: str) -> None:
    # In a subprocess: llama.cpp logs every tensor to stderr, which is kept for an error message only.
    cmd = [sys.executable, "-m", "ventoux.bench.llamacpp", str(source), str(dest), gguf_type]
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode:
        dest.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise VentouxError(f"llama.cpp could not quantize {source} to {gguf_type} ({last})")


def _quantize_here(source: str, dest: str, gguf_type: str) -> int:
    use(install_dir("native"))
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZER_TYPES[gguf_type])
    params.nthread = os.cpu_count() or 1
    return llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))


def gguf_weight_bytes(path: str | Path) -> int:
    """Bytes of every tensor of a GGUF file but the token embedding (only indexed when decoding)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


if __name__ == "__main__":  # python -m ventoux.bench.llamacpp SOURCE.gguf DEST.gguf TYPE (see _quantize)
    sys.exit(_quantize_here(*sys.argv[1:4]))
