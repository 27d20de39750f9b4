"""The llama.cpp peer's plumbing (ventoux/bench/llamacpp.py) with pip, the converter and llama-cpp-python replaced:
the GGUF type of each technique, the build folder's key, a failed build, the converter taken from the sdist, the
GGUF cache and its key, the quantizer's child process and call, and the bytes a GGUF file's tensors read.
test_bench.py covers the native / AVX2 builds' flags."""

from __future__ import annotations

import ctypes
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import types
from pathlib import Path

import pytest

import ventoux.cpu_kernels as cpu_kernels
from ventoux.bench import llamacpp
from ventoux.errors import VentouxError

QUIET = [].append


@pytest.fixture(autouse=True)
def no_real_processes(monkeypatch):
    """Never a real pip or converter run (a build takes 10 minutes): a test fakes the ones it expects."""

    def refuse(cmd, **kw):
        raise AssertionError(f"unexpected subprocess {cmd}")

    monkeypatch.setattr(llamacpp.subprocess, "run", refuse)


@pytest.mark.parametrize("dtype,quantize,types_", [
    ("bfloat16", None, ["BF16", "F16"]), ("float16", None, ["F16", "BF16"]), ("float32", None, ["F32"]),
    ("bfloat16", "int8", ["Q8_0"]), ("float32", "int8-g32", ["Q8_0"]), ("bfloat16", "int4", ["Q4_0", "Q4_K_M"]),
    ("bfloat16", "int4+output", ["Q4_0", "Q4_K_M"]), ("bfloat16", "int6", ["Q6_K"]),
    ("bfloat16", "int6-g128", ["Q6_K"]), ("bfloat16", "int4-g64+output=int6", ["Q4_0", "Q4_K_M"])])
def test_each_technique_has_the_llama_cpp_types_of_its_precision(dtype, quantize, types_):
    assert llamacpp.gguf_types(dtype, quantize) == types_


def test_a_scheme_without_a_counterpart_is_refused_whole():
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_types("bfloat16", "nf4")
    assert str(e.value) == "--quantize 'nf4' has no llama.cpp counterpart to compare with (int8, int6, int4)"


def test_the_native_build_is_the_default_and_an_amx_cpu_gets_every_option_named():
    zen4 = frozenset({"avx", "avx2", "fma", "f16c", "avx512f"})
    assert llamacpp.cmake_args(flags=zen4) == "-DGGML_NATIVE=ON"
    assert llamacpp.cmake_args(flags=zen4 | {"amx_int8"}) == (
        "-DGGML_NATIVE=OFF -DGGML_SSE42=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
        "-DGGML_BMI2=OFF -DGGML_AVX_VNNI=OFF -DGGML_AVX512=ON -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF "
        "-DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
    with pytest.raises(VentouxError) as e:
        llamacpp.cmake_args("sse2", zen4)
    assert str(e.value) == "unknown llama.cpp build 'sse2': use one of native, avx2"


def test_the_avx2_run_compares_with_the_avx2_build_every_other_with_the_native_one():
    assert [llamacpp.build_for(i) for i in ("avx2", None, "avx512", "native")] == ["avx2"] + ["native"] * 3


@pytest.fixture()
def cpu(monkeypatch, tmp_path):
    """This CPU, as cpu_kernels sees it: a model name, its flags and the kernels' cache folder."""
    machine = types.SimpleNamespace(model="Some CPU", flags=frozenset({"fma", "avx2"}))
    monkeypatch.setattr(cpu_kernels, "cpu_model", lambda: machine.model)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: machine.flags)
    monkeypatch.setattr(cpu_kernels, "cache_dir", lambda: tmp_path / "ventoux" / "kernels")
    return machine


def test_a_build_folder_is_keyed_by_the_cpu_its_flags_and_the_build(cpu, tmp_path):
    # The key is pinned: a new one would rebuild llama.cpp (10 minutes or more) for the same CPU and flags
    key = hashlib.sha1(b"Some CPU|avx2 fma|-DGGML_NATIVE=ON").hexdigest()[:10]
    native = llamacpp.install_dir("native")
    assert native == tmp_path / "ventoux" / "llama-cpp" / f"native-{key}"
    assert llamacpp.install_dir() == native
    avx2 = llamacpp.install_dir("avx2")
    assert avx2.name == "avx2-" + hashlib.sha1(f"Some CPU|avx2 fma|{llamacpp.AVX2_ONLY}".encode()).hexdigest()[:10]
    cpu.model = "Other CPU"
    assert llamacpp.install_dir("native") != native
    cpu.model, cpu.flags = "Some CPU", frozenset({"fma", "avx2", "avx512f"})
    assert llamacpp.install_dir("native") != native
    assert llamacpp.cpu_model() == "Some CPU"


def test_a_failed_build_names_pips_last_words_and_the_command_and_leaves_no_build(cpu, monkeypatch):
    runs = []

    def pip(cmd, env, capture_output, text, stdin):
        runs.append((cmd, env))
        assert capture_output is True and text is True and stdin is subprocess.DEVNULL
        return subprocess.CompletedProcess(cmd, 1, "", "Building wheel ...\nCMake Error: no compiler\n" * len(runs))

    monkeypatch.setattr(llamacpp.subprocess, "run", pip)
    monkeypatch.setattr(llamacpp.os, "cpu_count", lambda: 6)
    log = []
    with pytest.raises(VentouxError) as e:
        llamacpp.ensure_installed("native", log.append)
    target = llamacpp.install_dir("native")
    cmd, env = runs[0]
    assert cmd == [sys.executable, "-m", "pip", "install", "--no-binary", "llama-cpp-python", "--no-cache-dir",
                   "--target", str(target) + ".tmp", "--upgrade", "llama-cpp-python==0.3.*", "gguf"]
    assert env["CMAKE_ARGS"] == "-DGGML_NATIVE=ON" and env["CMAKE_BUILD_PARALLEL_LEVEL"] == "6"
    assert env["PATH"] == os.environ["PATH"]  # the environment, plus the build's settings
    assert str(e.value) == (f"building llama-cpp-python failed (CMake Error: no compiler); run `{' '.join(cmd)}` "
                            "with CMAKE_ARGS='-DGGML_NATIVE=ON' to see why, or drop --compare llama.cpp")
    assert log == [f"building llama-cpp-python 0.3.* from source (-DGGML_NATIVE=ON) into {target}: this can take "
                   "10 minutes or more ..."]
    assert not target.exists() and target.parent.is_dir()
    monkeypatch.setattr(llamacpp.os, "cpu_count", lambda: None)
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, env, **kw: runs.append((cmd, env))
                        or subprocess.CompletedProcess(cmd, 1, "", " \n"))
    with pytest.raises(VentouxError, match=r"^building llama-cpp-python failed \(unknown error\); run `"):
        llamacpp.ensure_installed("native", QUIET)
    assert runs[-1][1]["CMAKE_BUILD_PARALLEL_LEVEL"] == "1"  # a CPU count unknown


def test_a_build_is_used_where_it_is_without_pip(cpu, monkeypatch):
    target = llamacpp.install_dir("native")
    (target / "llama_cpp").mkdir(parents=True)
    monkeypatch.setattr(llamacpp.subprocess, "run", None)  # any call fails
    monkeypatch.setattr(sys, "path", ["first"])
    assert llamacpp.ensure_installed(log=QUIET) == target and sys.path == ["first", str(target)]
    llamacpp.use(target)
    llamacpp.use(str(target))
    assert sys.path == ["first", str(target)]  # appended once: the environment's own packages still win


def test_system_info_is_llama_cpps_own_line(monkeypatch):
    lib = types.SimpleNamespace(llama_print_system_info=lambda: b"  CPU : AVX2 = 1 | AVX512 = 1 | \n")
    monkeypatch.setitem(sys.modules, "llama_cpp", lib)
    assert llamacpp.system_info() == "CPU : AVX2 = 1 | AVX512 = 1 |"


def _sdist(folder: Path, version: str, extra: dict | None = None) -> Path:
    """A llama-cpp-python source archive: the vendored llama.cpp's Python side and its C sources."""
    top = f"llama_cpp_python-{version}"
    files = {"vendor/llama.cpp/convert_hf_to_gguf.py": "# the converter", "vendor/llama.cpp/gguf-py/gguf/gguf.py": "",
             "vendor/llama.cpp/gguf-py/pyproject.toml": "[project]", "vendor/llama.cpp/tools/helper.py": "",
             "vendor/llama.cpp/ggml/src/ggml.c": "int x;", "llama_cpp/llama.py": "", "README.md": ""}
    files = {"PKG-INFO": "Name: llama_cpp_python", **files, **(extra or {})}  # the first entry names the top folder
    path = folder / f"{top}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(f"{top}/vendor/llama.cpp/scripts.py")  # a folder, however it is named
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for name, text in files.items():
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    return path


def test_the_converter_is_the_vendored_one_of_the_installed_version(monkeypatch, tmp_path):
    installs, downloads = [], []
    monkeypatch.setattr(llamacpp, "ensure_installed", lambda isa, log: installs.append((isa, log)))
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.99"))

    def pip_download(cmd, capture_output, text, stdin):
        downloads.append(cmd)
        assert capture_output is True and text is True and stdin is subprocess.DEVNULL
        _sdist(Path(cmd[cmd.index("-d") + 1]), "0.3.99")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(llamacpp.subprocess, "run", pip_download)
    log = []
    script = llamacpp.converter(tmp_path, log.append)
    root = tmp_path / "llama-cpp-python-0.3.99"
    assert script == root / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py" and script.read_text() == "# the converter"
    assert installs == [("native", log.append)]
    assert log == ["fetching the llama-cpp-python 0.3.99 source for llama.cpp's GGUF converter ..."]
    assert downloads[0][:-1] == [sys.executable, "-m", "pip", "download", "--no-binary", "llama-cpp-python",
                                 "--no-deps", "-q", "llama-cpp-python==0.3.99", "-d"]
    # only the Python side of the vendored llama.cpp: its .py files and gguf-py whole
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        "vendor/llama.cpp/convert_hf_to_gguf.py", "vendor/llama.cpp/gguf-py/gguf/gguf.py",
        "vendor/llama.cpp/gguf-py/pyproject.toml", "vendor/llama.cpp/tools/helper.py"]
    assert not (root / "vendor" / "llama.cpp" / "scripts.py").exists()  # a folder, not a module
    assert llamacpp.converter(tmp_path, log.append) == script and len(downloads) == 1  # fetched once


def test_an_archive_member_that_climbs_out_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(llamacpp, "ensure_installed", lambda isa, log: None)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.99"))
    evil = {"vendor/llama.cpp/../../../../evil.py": "import os"}
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: _sdist(Path(cmd[-1]), "0.3.99", evil)
                        and subprocess.CompletedProcess(cmd, 0, "", ""))
    with pytest.raises(tarfile.OutsideDestinationError):
        llamacpp.converter(tmp_path / "cache", QUIET)
    assert not list(tmp_path.rglob("evil.py"))


@pytest.mark.parametrize("returncode,stderr,archive,why", [
    (1, "ERROR: No matching distribution\n", True, "ERROR: No matching distribution"),
    (0, "", False, "no archive"), (2, "", True, "no archive")])
def test_a_failed_source_download_says_so(monkeypatch, tmp_path, returncode, stderr, archive, why):
    monkeypatch.setattr(llamacpp, "ensure_installed", lambda isa, log: None)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(__version__="0.3.99"))

    def pip_download(cmd, **kw):
        if archive:
            _sdist(Path(cmd[-1]), "0.3.99")
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)

    monkeypatch.setattr(llamacpp.subprocess, "run", pip_download)
    with pytest.raises(VentouxError) as e:
        llamacpp.converter(tmp_path, QUIET)
    assert str(e.value) == (f"downloading the llama-cpp-python 0.3.99 source failed ({why}); "
                            "the GGUF converter comes from it")


def _checkpoint(root: Path, name="ckpt") -> Path:
    folder = root / name
    folder.mkdir()
    for f, text in (("config.json", "{}"), ("model.safetensors", "weights"), ("tokenizer.model", "sp")):
        (folder / f).write_text(text)
    return folder


def test_the_source_key_follows_the_folder_and_its_files(tmp_path):
    folder = _checkpoint(tmp_path)
    key = llamacpp._source_key(folder)
    assert len(key) == 10 and key == llamacpp._source_key(folder)
    other = _checkpoint(tmp_path, "other")
    for f in folder.iterdir():
        st = f.stat()
        os.utime(other / f.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert llamacpp._source_key(other) != key  # another folder, the same files
    (folder / "model.safetensors").write_text("weights, longer")
    assert llamacpp._source_key(folder) != key
    key = llamacpp._source_key(folder)
    os.utime(folder / "config.json", ns=(1, 1))
    assert llamacpp._source_key(folder) != key
    key = llamacpp._source_key(folder)
    (folder / "model-00002.safetensors").write_text("")
    assert llamacpp._source_key(folder) != key
    key = llamacpp._source_key(folder)
    (folder / "notes.txt").write_text("not weights")
    assert llamacpp._source_key(folder) == key


def test_a_checkpoint_the_converter_cannot_read_is_refused_whole(tmp_path):
    folder = _checkpoint(tmp_path)
    (folder / "tokenizer.model").unlink()
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_file(folder, "BF16", tmp_path / "cache", QUIET)
    assert str(e.value) == (f"{folder} has no tokenizer.model (sentencepiece), which llama.cpp's converter needs: "
                            "copy the checkpoint's tokenizer.model.v1/v3 there as tokenizer.model")
    not_hf = (f"{folder} is not an HF-layout checkpoint (config.json + safetensors), which llama.cpp's converter "
              "needs: write one with `ventoux convert SRC DST --format hf`")
    (folder / "model.safetensors").unlink()
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_file(folder, "BF16", tmp_path / "cache", QUIET)
    assert str(e.value) == not_hf
    (folder / "model.safetensors").write_text("w")
    (folder / "config.json").unlink()
    (folder / "config.json").mkdir()
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_file(str(folder), "BF16", tmp_path / "cache", QUIET)
    assert str(e.value) == not_hf
    folder = _checkpoint(tmp_path, "good")
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_file(folder, "Q5_K", tmp_path / "cache", QUIET)
    assert str(e.value) == ("unknown GGUF type 'Q5_K': use one of ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_K_M', "
                            "'Q6_K')")
    assert not (tmp_path / "cache").exists()


def test_a_gguf_is_converted_once_into_the_cache_and_quantized_from_bf16(tmp_path, monkeypatch):
    folder, cache = _checkpoint(tmp_path), tmp_path / "new" / "cache"
    script = tmp_path / "convert_hf_to_gguf.py"
    converters, runs, quantized = [], [], []
    monkeypatch.setattr(llamacpp, "converter", lambda cache_dir, log: converters.append((cache_dir, log)) or script)

    def convert(cmd, capture_output, text, stdin):
        runs.append(cmd)
        assert capture_output is True and text is True and stdin is subprocess.DEVNULL
        Path(cmd[cmd.index("--outfile") + 1]).write_text(cmd[cmd.index("--outtype") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(llamacpp.subprocess, "run", convert)
    monkeypatch.setattr(llamacpp, "_quantize", lambda source, dest, t: quantized.append((source, dest, t))
                        or dest.write_text(t))
    log = []
    key = llamacpp._source_key(folder)
    bf16 = llamacpp.gguf_file(str(folder), "BF16", str(cache), log.append)
    assert bf16 == cache / f"ckpt-{key}-BF16.gguf" and bf16.read_text() == "bf16"
    assert runs == [[sys.executable, str(script), str(folder), "--outtype", "bf16", "--outfile", str(bf16) + ".tmp"]]
    assert converters == [(cache, log.append)]
    assert log == [f"converting {folder} to GGUF BF16 with llama.cpp's convert_hf_to_gguf.py ..."]
    assert llamacpp.gguf_file(folder, "BF16", cache, log.append) == bf16 and len(runs) == 1  # from the cache
    q4 = llamacpp.gguf_file(folder, "Q4_0", cache, log.append)
    assert q4 == cache / f"ckpt-{key}-Q4_0.gguf" and q4.read_text() == "Q4_0" and len(runs) == 1
    assert quantized == [(bf16, cache / f"ckpt-{key}-Q4_0.gguf.tmp", "Q4_0")]
    assert log[-1] == f"quantizing {bf16.name} to Q4_0 with llama.cpp ..."
    assert sorted(p.name for p in cache.iterdir()) == [bf16.name, q4.name]  # no .tmp left
    log.clear()
    llamacpp.gguf_file(folder, "Q4_K_M", tmp_path / "fresh", log.append)  # a fresh cache: BF16, then quantized
    assert runs[-1][4] == "bf16" and quantized[-1][2] == "Q4_K_M" and converters[-1][1] == log.append
    assert log[0].startswith(f"converting {folder} to GGUF BF16") and log[1].endswith("to Q4_K_M with llama.cpp ...")


def test_a_failed_conversion_leaves_nothing_and_says_why(tmp_path, monkeypatch):
    folder, cache = _checkpoint(tmp_path), tmp_path / "cache"
    monkeypatch.setattr(llamacpp, "converter", lambda cache_dir, log: tmp_path / "convert.py")

    def convert(cmd, **kw):
        Path(cmd[-1]).write_text("half a file")
        return subprocess.CompletedProcess(cmd, 1, "", "Traceback ...\nNotImplementedError: Architecture X\n")

    monkeypatch.setattr(llamacpp.subprocess, "run", convert)
    with pytest.raises(VentouxError) as e:
        llamacpp.gguf_file(folder, "Q8_0", cache, QUIET)
    assert str(e.value) == f"llama.cpp's converter failed on {folder} (NotImplementedError: Architecture X)"
    assert list(cache.iterdir()) == []
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", ""))
    with pytest.raises(VentouxError, match=r"\(unknown error\)$"):
        llamacpp.gguf_file(folder, "F16", cache, QUIET)


def test_quantizing_runs_in_a_child_that_keeps_llama_cpps_log_for_an_error(tmp_path, monkeypatch):
    runs = []

    def child(cmd, capture_output, text, stdin):
        runs.append(cmd)
        assert capture_output is True and text is True and stdin is subprocess.DEVNULL
        Path(cmd[4]).write_text("partial")
        return subprocess.CompletedProcess(cmd, len(runs) - 1, "", "llama_model_quantize: failed\n" * len(runs))

    monkeypatch.setattr(llamacpp.subprocess, "run", child)
    source, dest = tmp_path / "m-BF16.gguf", tmp_path / "m-Q4_0.gguf.tmp"
    llamacpp._quantize(source, dest, "Q4_0")
    assert runs == [[sys.executable, "-m", "ventoux.bench.llamacpp", str(source), str(dest), "Q4_0"]]
    assert dest.read_text() == "partial"
    with pytest.raises(VentouxError) as e:
        llamacpp._quantize(source, dest, "Q4_0")
    assert str(e.value) == f"llama.cpp could not quantize {source} to Q4_0 (llama_model_quantize: failed)"
    assert not dest.exists()
    monkeypatch.setattr(llamacpp.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 3, "", ""))
    with pytest.raises(VentouxError, match=r"\(unknown error\)$"):
        llamacpp._quantize(source, dest, "Q4_0")


def test_the_child_quantizes_with_llama_cpps_call_on_every_core(monkeypatch):
    class Params(ctypes.Structure):
        _fields_ = [("ftype", ctypes.c_int), ("nthread", ctypes.c_int)]

    calls, used = [], []
    params = Params(0, 0)
    lib = types.SimpleNamespace(llama_model_quantize_default_params=lambda: params, LLAMA_FTYPE_MOSTLY_Q4_0=2,
                                LLAMA_FTYPE_MOSTLY_Q4_K_M=15,
                                llama_model_quantize=lambda src, dst, ref: calls.append((src, dst, ref._obj)) or 7)
    monkeypatch.setitem(sys.modules, "llama_cpp", lib)
    monkeypatch.setattr(llamacpp, "install_dir", lambda isa: f"build-{isa}")
    monkeypatch.setattr(llamacpp, "use", used.append)
    monkeypatch.setattr(llamacpp.os, "cpu_count", lambda: 5)
    assert llamacpp._quantize_here("in.gguf", "out.gguf", "Q4_K_M") == 7
    assert used == ["build-native"] and calls == [(b"in.gguf", b"out.gguf", params)]
    assert (params.ftype, params.nthread) == (15, 5)
    monkeypatch.setattr(llamacpp.os, "cpu_count", lambda: None)
    llamacpp._quantize_here("in.gguf", "out.gguf", "Q4_0")
    assert (params.ftype, params.nthread) == (2, 1)


def test_a_gguf_reads_every_tensor_but_the_token_embedding(monkeypatch):
    tensors = [types.SimpleNamespace(name=n, n_bytes=b) for n, b in
               (("token_embd.weight", 1000), ("blk.0.attn_q.weight", 30), ("output.weight", 500), ("output_norm", 2))]
    opened = []
    monkeypatch.setitem(sys.modules, "gguf", types.SimpleNamespace(
        GGUFReader=lambda path: opened.append(path) or types.SimpleNamespace(tensors=tensors)))
    assert llamacpp.gguf_weight_bytes(Path("m.gguf")) == 532 and opened == ["m.gguf"]
