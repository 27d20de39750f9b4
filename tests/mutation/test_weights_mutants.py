"""Checkpoint behaviours that mutation testing (mutation/README.md) found unpinned: dtype names and the device
default, float64 tensors, the .pth reader (memory-mapped, no code run from a pickle, the error's first line),
every loader error's whole advice, load_weights into hand-built models (root tensors, buffers, quantized
layers, the default device), saving over a folder, and the pid check of stale temporary folders. Checkpoints
are written here with the safetensors package and torch.save; logits are compared with transformers'."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, error_message, hf_model
from safetensors.torch import load_file, save_file

from ventoux import weights
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.qlinear import Int8Linear
from ventoux.weights import check_config, load_model, load_weights, parse_dtype, save_consolidated

CFG = TINY.replace(n_layers=1)
TOKENS = torch.randint(0, CFG.vocab_size, (1, 10), generator=torch.Generator().manual_seed(4))


_error = functools.partial(error_message, VentouxError)


def _hf_folder(folder: Path, edit=None, seed: int = 0):
    """An HF checkpoint written by the safetensors package from transformers' own state_dict: (folder, model)."""
    hf = hf_model(CFG, seed)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(hf.config.to_json_string())
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if edit:
        edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})
    return folder, hf


def _consolidated(folder: Path, sd: dict) -> Path:
    """A consolidated.safetensors folder with these (ventoux-named) tensors."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "consolidated.safetensors")
    return folder


def _ventoux_sd(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    return {k: v.detach() for k, v in Transformer(CFG).state_dict().items()}


# ---- parse_dtype -------------------------------------------------------------------------------------
def test_parse_dtype_names_defaults_and_refusals(monkeypatch):
    assert parse_dtype("torch.float16") is torch.float16 and parse_dtype("Torch.BFloat16") is torch.bfloat16
    assert parse_dtype(None) is torch.float32  # no device: the CPU's choice
    for junk in (torch.int8, torch.float64, 3):
        with pytest.raises(VentouxError, match="use float32, bfloat16 or float16"):
            parse_dtype(junk)
    for bf16 in (True, False):  # CUDA: bfloat16 where the GPU has it, else float16 (asked of torch, mocked here)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, bf16=bf16, **k: bf16)
        assert parse_dtype(None, "cuda") is (torch.bfloat16 if bf16 else torch.float16)
        assert parse_dtype(None, torch.device("cuda", 1)) is (torch.bfloat16 if bf16 else torch.float16)


# ---- reading --------------------------------------------------------------------------------------------
def test_float64_tensors_load_cast_to_the_requested_dtype(tmp_path):
    folder, hf = _hf_folder(tmp_path / "m", lambda sd: sd.update(
        {"model.norm.weight": sd["model.norm.weight"].double()}))
    assert load_file(folder / "model.safetensors")["model.norm.weight"].dtype == torch.float64
    with torch.no_grad():
        torch.testing.assert_close(load_model(folder, CFG, torch.float32)(TOKENS), hf(TOKENS).logits,
                                   atol=1e-5, rtol=0)


def _pth_folder(folder: Path, obj) -> Path:
    folder.mkdir()
    torch.save(obj, folder / "consolidated.00.pth")
    return folder


class _Mkdir:
    """Unpickling this runs os.mkdir(path): what a hostile .pth could do with any function."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_pth_is_memory_mapped_and_runs_no_code_from_its_pickle(tmp_path):
    sd = _ventoux_sd()
    folder = _pth_folder(tmp_path / "ok", sd)
    file = weights._open_pth(folder / "consolidated.00.pth")
    assert file.path == folder / "consolidated.00.pth"
    assert torch.equal(file.get("norm.weight"), sd["norm.weight"])
    maps = Path("/proc/self/maps")
    if maps.exists():  # Linux: the file is mapped, not read into memory
        assert str(folder / "consolidated.00.pth") in maps.read_text()

    marker = tmp_path / "pwned"
    bad = _pth_folder(tmp_path / "bad", {"norm.weight": torch.ones(CFG.dim), "x": _Mkdir(marker)})
    with pytest.raises(Exception) as ref:  # torch's own refusal, whose first line the error quotes
        torch.load(bad / "consolidated.00.pth", weights_only=True)
    first, *rest = str(ref.value).strip().splitlines()
    assert rest, "expected torch's multi-line refusal"
    msg = _error(load_model, bad, CFG, torch.float32)
    assert not marker.exists()
    assert msg == f"{bad / 'consolidated.00.pth'} is truncated or corrupt ({first}); re-download it"


def test_pth_saved_on_a_gpu_loads_on_the_cpu(tmp_path, monkeypatch):
    """Many consolidated.00.pth files were saved from CUDA tensors: their storages say cuda:0."""
    sd = _ventoux_sd()
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        folder = _pth_folder(tmp_path / "m", sd)
    assert b"cuda:0" in (folder / "consolidated.00.pth").read_bytes()
    model = load_model(folder, CFG, torch.float32)
    assert torch.equal(model.norm.weight, sd["norm.weight"]) and model.norm.weight.device.type == "cpu"


def test_model_parallel_and_missing_weights_are_named(tmp_path):
    folder = _pth_folder(tmp_path / "mp", _ventoux_sd())
    (folder / "consolidated.01.pth").write_bytes((folder / "consolidated.00.pth").read_bytes())
    assert _error(load_model, folder, CFG, torch.float32) == \
        f"{folder} holds a model-parallel checkpoint (consolidated.0N.pth); merge it into one file first"
    (tmp_path / "empty").mkdir()
    assert _error(load_model, tmp_path / "empty", CFG, torch.float32) == (
        f"{tmp_path / 'empty'} has no weights: expected model.safetensors, {weights.HF_INDEX}, "
        "consolidated.safetensors or consolidated.00.pth")


def test_pth_error_without_a_message_names_the_exception(tmp_path, monkeypatch):
    folder = _pth_folder(tmp_path / "m", _ventoux_sd())

    def fail(*a, **k):
        raise EOFError()

    monkeypatch.setattr(torch, "load", fail)
    assert _error(load_model, folder, CFG, torch.float32) == \
        f"{folder / 'consolidated.00.pth'} is truncated or corrupt (EOFError); re-download it"


@pytest.mark.parametrize("obj", [{"norm.weight": torch.ones(3), "step": 3}, [torch.ones(3)]])
def test_pth_that_is_not_a_dict_of_tensors(tmp_path, obj):
    folder = _pth_folder(tmp_path / "m", obj)
    assert _error(load_model, folder, CFG, torch.float32) == \
        f"{folder / 'consolidated.00.pth'} does not hold a dict of tensors; it is not a consolidated checkpoint"


def test_pth_wrong_shape_names_the_pth_file(tmp_path):
    sd = _ventoux_sd()
    sd["norm.weight"] = torch.ones(CFG.dim + 1)
    folder = _pth_folder(tmp_path / "m", sd)
    assert f"in {folder / 'consolidated.00.pth'} has shape" in _error(load_model, folder, CFG, torch.float32)


# ---- the loader's errors, whole --------------------------------------------------------------------
def test_plan_errors_give_their_whole_advice(tmp_path):
    extra, _ = _hf_folder(tmp_path / "extra", lambda sd: sd.update({"model.vision_tower.weight": torch.ones(2)}))
    assert _error(load_model, extra, CFG, torch.float32) == (
        f"{extra / 'model.safetensors'} holds tensor 'model.vision_tower.weight', which this model config does "
        "not have; the config contradicts the weights (check n_layers) or this is not a Mistral checkpoint")
    missing, _ = _hf_folder(tmp_path / "missing", lambda sd: sd.pop("model.norm.weight"))
    assert _error(load_model, missing, CFG, torch.float32) == (
        f"tensor 'model.norm.weight' is missing from {missing / 'model.safetensors'}; the file is incomplete "
        "(re-download it) or the config contradicts the weights")
    as_int, _ = _hf_folder(tmp_path / "int", lambda sd: sd.update({"model.norm.weight": torch.ones(CFG.dim,
                                                                                                    dtype=torch.int32)}))
    assert _error(load_model, as_int, CFG, torch.float32) == (
        f"tensor 'model.norm.weight' in {as_int / 'model.safetensors'} is stored as int32 but the model needs a "
        "floating-point tensor there; the file is not a (float or ventoux-quantized) Mistral checkpoint")


def _int8_head_model():
    """A meta Transformer whose output head is an Int8Linear (what a quantized checkpoint loads into)."""
    with torch.device("meta"):
        model = Transformer(CFG)
    n, k = CFG.vocab_size, CFG.dim
    model.output = Int8Linear(torch.empty(n, 128, dtype=torch.int8, device="meta"),
                              torch.empty(n, dtype=torch.bfloat16, device="meta"), in_features=k)
    return model


def test_integer_tensor_stored_as_float_names_the_integer_dtype(tmp_path):
    sd = _ventoux_sd()
    w = sd.pop("output.weight")
    sd["output.qweight"] = torch.zeros(w.shape[0], 128)  # float32 where int8 codes belong
    sd["output.scales"] = torch.ones(w.shape[0], dtype=torch.bfloat16)
    folder = _consolidated(tmp_path / "m", sd)
    assert _error(load_weights, _int8_head_model(), folder, torch.float32) == (
        f"tensor 'output.qweight' in {folder / 'consolidated.safetensors'} is stored as float32 but the model "
        "needs an int8 tensor there; the file is not a (float or ventoux-quantized) Mistral checkpoint")


def test_missing_quantized_tensor_blames_the_quantization(tmp_path):
    sd = _ventoux_sd()
    w = sd.pop("output.weight")
    sd["output.qweight"] = torch.zeros(w.shape[0], 128, dtype=torch.int8)  # its scales left out
    folder = _consolidated(tmp_path / "m", sd)
    assert _error(load_weights, _int8_head_model(), folder, torch.float32) == (
        f"tensor 'output.scales' is missing from {folder / 'consolidated.safetensors'}: the checkpoint's "
        "quantization does not match its config.json's (which declares it quantized); fix the \"quantization\" "
        "entry of config.json, or quantize the float checkpoint again with `ventoux quantize`")


def test_a_quantized_tensor_of_a_layer_the_config_lacks_blames_n_layers(tmp_path):
    """A quantized checkpoint with more layers than its config: the layer count is wrong, not the quantization."""
    extra = "model.layers.5.mlp.down_proj.qweight"
    folder, _ = _hf_folder(tmp_path / "m", lambda sd: sd.update({extra: torch.ones(2, dtype=torch.int8)}))
    assert _error(load_model, folder, CFG, torch.float32) == (
        f"{folder / 'model.safetensors'} holds tensor {extra!r}, which this model config does not have; the "
        "config contradicts the weights (check n_layers) or this is not a Mistral checkpoint")


def test_non_finite_error_gives_its_whole_advice(tmp_path):
    folder, _ = _hf_folder(tmp_path / "m", lambda sd: sd["model.norm.weight"].__setitem__(0, float("nan")))
    assert _error(load_model, folder, CFG, torch.float32) == (
        f"tensor 'model.norm.weight' in {folder / 'model.safetensors'} holds 1 NaN or infinite value(s) (as "
        "torch.float32); the checkpoint is corrupt (re-download it), or its values overflow this dtype (load as "
        "float32 or bfloat16)")


def test_layer_check_when_the_weights_hold_no_layer(tmp_path):
    folder = _consolidated(tmp_path / "m", {"tok_embeddings.weight": torch.ones(CFG.vocab_size, CFG.dim)})
    msg = _error(check_config, folder, CFG, tmp_path / "params.json")
    assert msg.endswith("hold layers none; fix the layer count (num_hidden_layers / n_layers) in the config")


# ---- load_weights into hand-built models -------------------------------------------------------------
def test_load_weights_default_device_root_tensors_and_buffers(tmp_path):
    """Every tensor a module owns is filled, whatever its place: at the root, a persistent buffer registered
    after a non-persistent one (which the file does not hold); the default device is the CPU."""
    sd = _ventoux_sd()
    sd["extra"], sd["norm.kept"] = torch.arange(3.0), torch.arange(5.0)
    folder = _consolidated(tmp_path / "m", sd)
    with torch.device("meta"):
        model = Transformer(CFG)
    model.register_parameter("extra", torch.nn.Parameter(torch.empty(3, device="meta")))
    model.norm.register_buffer("scratch", torch.zeros(2), persistent=False)  # already real: not loaded
    model.norm.register_buffer("kept", torch.empty(5, device="meta"))
    loaded = load_weights(model, folder, torch.float32)
    assert torch.equal(loaded.extra, sd["extra"]) and torch.equal(loaded.norm.kept, sd["norm.kept"])
    assert torch.equal(loaded.norm.weight, sd["norm.weight"]) and loaded.norm.weight.device.type == "cpu"


def test_transform_sees_exactly_the_modules_that_own_tensors(tmp_path):
    sd = _ventoux_sd()
    w = sd.pop("output.weight")
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(-127, 128, (w.shape[0], 128), dtype=torch.int8, generator=gen)
    q[:, CFG.dim:] = 0
    sd["output.qweight"], sd["output.scales"] = q, torch.rand(w.shape[0], generator=gen).to(torch.bfloat16)
    folder = _consolidated(tmp_path / "m", sd)
    model = _int8_head_model()
    owners = sorted({k.rpartition(".")[0] for k in model.state_dict()})  # modules with tensors of their own
    seen = []
    load_weights(model, folder, torch.float32, transform=lambda name, m: seen.append(name))
    assert sorted(seen) == owners and len(seen) == len(owners)
    x = torch.randn(2, CFG.dim, generator=gen)
    ref = x @ (q[:, :CFG.dim].float() * sd["output.scales"].float()[:, None]).T  # plain dequantize-and-matmul
    # (within the int8-activation error of the vnni kernel, which the loaded module may pick)
    torch.testing.assert_close(model.output(x), ref, atol=0.02 * ref.abs().max().item(), rtol=0.02)


# ---- writing ----------------------------------------------------------------------------------------
def test_save_consolidated_over_a_folder(tmp_path):
    folder, hf = _hf_folder(tmp_path / "src")
    model = load_model(folder, CFG, torch.float32)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert _error(save_consolidated, model, out) == f"{out} already exists; choose a new output folder or remove it"
    assert _error(save_consolidated, model, out, overwrite=True).startswith(f"{out} holds stale.txt, which is not")
    (out / "stale.txt").unlink()  # a file ventoux writes is replaced
    (out / "model-00001-of-00002.safetensors").write_text("old")
    save_consolidated(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["consolidated.safetensors", "params.json"]
    with torch.no_grad():
        torch.testing.assert_close(load_model(out, CFG, torch.float32)(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=0)


def test_save_consolidated_refuses_quantized_layers_whole(tmp_path):
    folder, _ = _hf_folder(tmp_path / "src")
    model = load_model(folder, CFG, torch.float32)
    model.output = Int8Linear.from_float(model.output.weight.detach(), kernel="fallback")
    assert _error(save_consolidated, model, tmp_path / "out") == (
        "the model has quantized layers (output, ...): save it with the HF layout (quantize.save_quantized): "
        "Mistral's layout has no quantized form, or dequantize it first")


def test_checking_a_pid_sends_it_no_signal(tmp_path):
    code = ("import signal, time; signal.signal(signal.SIGHUP, signal.SIG_DFL); print('ready', flush=True); "
            "time.sleep(60)")  # SIGHUP kills it, even started under nohup
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        assert weights._alive(child.pid)
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)  # still running: signal 0 only asks
    finally:
        child.kill()
        child.wait()
    assert not weights._alive(child.pid)


def test_stale_folder_of_a_pid_the_os_cannot_ask_about_is_kept(tmp_path):
    odd = tmp_path / f".out.tmp-{2**70}"  # os.kill overflows: someone's, maybe; left alone
    odd.mkdir()
    weights.check_output_folder(tmp_path / "out")
    assert odd.exists()


def test_tensors_left_on_the_meta_device_are_named(tmp_path):
    folder = _consolidated(tmp_path / "m", _ventoux_sd())
    with torch.device("meta"):
        model = Transformer(CFG)
    for i in range(4):  # not in the file (non-persistent), and never materialised: the loader says so
        model.norm.register_buffer(f"scratch{i}", torch.empty(2, device="meta"), persistent=False)
    with pytest.raises(RuntimeError) as e:
        load_weights(model, folder, torch.float32)
    assert str(e.value) == "tensors left on the meta device after loading: ['norm.scratch0', 'norm.scratch1', " \
                           "'norm.scratch2']"


@pytest.mark.parametrize("shard", ["", ".."])
def test_index_naming_an_empty_or_parent_name_is_refused(tmp_path, shard):
    folder, _ = _hf_folder(tmp_path / "m")
    index = folder / weights.HF_INDEX
    index.write_text(json.dumps({"weight_map": {"model.norm.weight": shard}}))
    assert _error(load_model, folder, CFG, torch.float32) == (
        f"{index} names the weight file {shard!r}, which is not a file name inside {folder}; an index may only "
        "name files beside it (re-download the checkpoint)")


# ---- save_hf against Hugging Face's conventions ------------------------------------------------------
def _ventoux_model(seed: int = 0):
    torch.manual_seed(seed)
    return Transformer(CFG).eval()


# limits at the sum of tensors first:last (3:8: the second shard ends exactly at the limit)
@pytest.mark.parametrize("first,last", [(0, 3), (0, 4), (0, 6), (3, 8)])
def test_save_hf_shards_as_hugging_face_splits_them(tmp_path, first, last):
    from huggingface_hub import split_torch_state_dict_into_shards

    model = _ventoux_model()
    ordered = {weights._vx_to_hf(k): v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    limit = sum(t.numel() * 2 for t in list(ordered.values())[first:last])
    ref = split_torch_state_dict_into_shards(ordered, max_shard_size=limit)
    out = weights.save_hf(model, tmp_path / "o", dtype=torch.bfloat16, max_shard_bytes=limit)
    index = json.loads((out / weights.HF_INDEX).read_text())
    assert index["weight_map"] == ref.tensor_to_filename and index["metadata"] == ref.metadata
    n = len(ref.filename_to_tensors)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"model-{i:05d}-of-{n:05d}.safetensors"
                                                                 for i in range(1, n + 1)]
    for name, file in index["weight_map"].items():
        t = load_file(out / file)[name]
        assert t.dtype == torch.bfloat16 and torch.equal(t, ordered[name])
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(out).torch_dtype == torch.bfloat16


def test_save_hf_single_file_dtype_overwrite_and_refusals(tmp_path):
    from transformers import AutoConfig

    model = _ventoux_model()
    out = weights.save_hf(model, tmp_path / "o", dtype=torch.float16)
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float16}
    assert AutoConfig.from_pretrained(out).torch_dtype == torch.float16
    (out / "stale.txt").write_text("old")
    assert _error(weights.save_hf, model, out, overwrite=True).startswith(f"{out} holds stale.txt, which is not")
    assert (out / "stale.txt").exists()  # refused: nothing deleted
    (out / "stale.txt").unlink()
    (out / "model-00001-of-00002.safetensors").write_text("old")  # a file ventoux writes is replaced
    weights.save_hf(model, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.float32}

    model.register_buffer("extra", torch.ones(2))
    assert _error(weights.save_hf, model, tmp_path / "x") == \
        "cannot save tensor 'extra': it has no name in the HF layout"
    del model._buffers["extra"]
    model.output = Int8Linear.from_float(model.output.weight.detach(), kernel="fallback")
    assert _error(weights.save_hf, model, tmp_path / "q") == (
        "the model has quantized layers (output, ...): save it with quantize.save_quantized, which records the "
        "scheme in config.json, or dequantize it first")


# ---- writing atomically; output folders --------------------------------------------------------------------
def test_files_carry_the_metadata_transformers_writes(tmp_path):
    from safetensors import safe_open

    hf = hf_model(CFG)
    hf.save_pretrained(tmp_path / "ref")
    with safe_open(str(tmp_path / "ref" / "model.safetensors"), "pt") as f:
        ref = f.metadata()
    model = _ventoux_model()
    files = [weights.save_hf(model, tmp_path / "hf") / "model.safetensors",
             save_consolidated(model, tmp_path / "cons") / "consolidated.safetensors"]
    files += list(weights.save_hf(model, tmp_path / "sharded", max_shard_bytes=40_000).glob("*.safetensors"))
    for file in files:
        with safe_open(str(file), "pt") as f:
            assert f.metadata() == ref == {"format": "pt"}, file


def test_output_folders_nested_existing_and_left_by_this_pid(tmp_path):
    model = _ventoux_model()
    out = save_consolidated(model, tmp_path / "a" / "b" / "out")  # parents made
    assert (out / "consolidated.safetensors").is_file()
    assert _error(weights.check_output_folder, out) == f"{out} already exists; choose a new output folder or remove it"
    weights.check_output_folder(out, overwrite=True)
    stale = tmp_path / f".again.tmp-{os.getpid()}"  # an earlier crash of this same pid: replaced
    stale.mkdir()
    (stale / "junk").write_text("x")
    out = weights.save_hf(model, tmp_path / "again")
    assert not stale.exists() and sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "again"]


def test_output_folder_under_a_dangling_link_names_the_os_reason(tmp_path):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    out = tmp_path / "dangling" / "sub" / "out"
    with pytest.raises(OSError) as ref:  # what the OS says, asked directly: it names the link, not out's parent
        out.parent.mkdir(parents=True, exist_ok=True)
    assert ref.value.filename != str(out.parent)
    assert _error(weights.check_output_folder, out) == (
        f"cannot create the output folder {out}: {ref.value.strerror} ({ref.value.filename}); "
        "choose another output path")


def test_output_folder_the_os_will_not_let_us_write_into(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a read-only disk answers (root writes anywhere)
    assert _error(weights.check_output_folder, tmp_path / "out") == \
        f"cannot write into {tmp_path} (no permission); choose another output path"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid  # reaped: nobody has it until the kernel hands it out again


def test_stale_folder_of_a_dead_writer_of_a_dashed_name_is_removed(tmp_path):
    stale = tmp_path / f".my-model.tmp-{_dead_pid()}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    weights.check_output_folder(tmp_path / "my-model")
    assert not stale.exists()


def test_a_stale_name_that_is_not_a_folder_is_left_alone(tmp_path):
    """A file named like a dead writer's temporary folder: removing it fails (it is no folder), which must not
    stop the save."""
    odd = tmp_path / f".out.tmp-{_dead_pid()}"
    odd.write_text("not ours")
    out = save_consolidated(_ventoux_model(), tmp_path / "out")
    assert (out / "consolidated.safetensors").is_file() and odd.read_text() == "not ours"


def test_a_disk_that_fills_before_the_first_byte_is_one_line(tmp_path, monkeypatch):
    """The temporary folder cannot be made (the disk filled after the output check): the OS's reason, not a
    FileNotFoundError from cleaning up a folder that never was."""
    mkdir, tries = Path.mkdir, []

    def full(self, *a, **k):
        if self.name.startswith(".out.tmp-"):
            tries.append(self)
            if len(tries) > 1:  # the check's own trial folder is made; the real one is not
                raise OSError(28, "No space left on device")
        return mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", full)
    assert _error(save_consolidated, _ventoux_model(), tmp_path / "out") == (
        f"cannot write the output folder {tmp_path / 'out'}: No space left on device; free some space or choose "
        "another output path")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_overwrite_refusals_are_exact_and_touch_nothing(tmp_path):
    for name in ("/", ".", ".."):  # Path("/").name is ""
        assert _error(weights.check_output_folder, name, overwrite=True) == (
            f"the output folder {name!r} has no name of its own; give a new folder's path such as ./out")
    afile, link, mine = tmp_path / "a.bin", tmp_path / "link", tmp_path / "mine"
    afile.write_text("x")
    link.symlink_to(afile)
    (mine / "sub").mkdir(parents=True)
    tail = ("; --overwrite replaces only a checkpoint or adapter folder ventoux wrote: remove it yourself or choose "
            "another output path")
    assert _error(weights.check_output_folder, afile, overwrite=True) == f"{afile} is not a folder{tail}"
    assert _error(weights.check_output_folder, link, overwrite=True) == f"{link} is a symbolic link{tail}"
    assert _error(weights.check_output_folder, mine, overwrite=True) == (
        f"{mine} holds sub, which is not part of a checkpoint or adapter ventoux writes; --overwrite will not "
        "delete it: remove it yourself or choose another output path")
    (mine / "sub").rmdir()
    (mine / "config.json").symlink_to(afile)  # a link, even under a name ventoux writes, is not its file
    assert _error(weights.check_output_folder, mine, overwrite=True).startswith(f"{mine} holds config.json,")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "link", "mine"] and afile.read_text() == "x"
