"""What a careless or hostile user tries (issue 13): each case ends in a result or in one VentouxError line,
with nothing written or damaged. CLI cases run the CLI (in a subprocess where standard input, exit codes and
tracebacks are what is tested; in process otherwise, which sees the same one-line error path); API cases
call the API. A property test feeds random junk to the public entry points that take user input."""

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mistral_common
import pytest
import torch
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import ventoux
from ventoux.cli import main
from ventoux.config import ModelConfig, read_config
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.params import SamplingParams
from ventoux.qlinear import dequantize_int8
from ventoux.tokenizer import load_tokenizer
from ventoux.weights import load_model, save_hf

DATA = Path(mistral_common.__file__).parent / "data"
V1 = DATA / "tokenizer.model.v1"  # 32000 pieces
TEKKEN = DATA / "tekken_240911.json"  # 131072 pieces
CFG = TINY.replace(vocab_size=32000)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hard") / "tiny"
    torch.manual_seed(0)
    save_hf(Transformer(CFG), folder)
    shutil.copy(V1, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def llm(model_dir):
    return ventoux.load(str(model_dir), dtype="float32", device="cpu")


def copy_of(src: Path, dst: Path, config_edit=None, tensors_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors_edit:
        sd = load_file(dst / "model.safetensors")
        tensors_edit(sd)
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cli(*args, stdin: bytes | None = None):
    return subprocess.run([sys.executable, "-m", "ventoux", *args], input=stdin, capture_output=True, timeout=120)


def assert_one_line(r, *words):
    err = r.stderr.decode()
    assert r.returncode == 1, err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("ventoux: error:"), err
    for w in words:
        assert w in err, err


def fails(capsys, argv, *words):
    """In process: exit code 1 and one line naming `words` (any other exception fails the test)."""
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ventoux: error:"), err
    for w in words:
        assert w in err, err
    return err


# ---- 1. convert of a quantized checkpoint -------------------------------------------------------------
@pytest.fixture(scope="module")
def int8_dir(model_dir, tmp_path_factory):
    from ventoux.quantize import quantize_checkpoint

    return quantize_checkpoint(model_dir, tmp_path_factory.mktemp("q") / "int8", "int8")


TOKENS = torch.randint(3, 32000, (1, 12), generator=torch.Generator().manual_seed(1))


def logits_of(folder):
    with torch.no_grad():
        return ventoux.load(str(folder), dtype="float32", device="cpu").model(TOKENS)


def test_convert_quantized_keeps_its_scheme_in_the_hf_layout(int8_dir, tmp_path, capsys):
    assert main(["convert", str(int8_dir), str(tmp_path / "out"), "--format", "hf"]) == 0
    assert "still int8" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]["scheme"] == "int8"
    assert torch.equal(logits_of(tmp_path / "out"), logits_of(int8_dir))


def test_convert_quantized_with_dtype_dequantizes(int8_dir, tmp_path, capsys):
    assert main(["convert", str(int8_dir), str(tmp_path / "out"), "--format", "consolidated", "--dtype", "f32"]) == 0
    assert "dequantized from int8" in capsys.readouterr().out
    assert not any(k.endswith("qweight") for k in load_file(tmp_path / "out" / "consolidated.safetensors"))
    out = load_model(tmp_path / "out", CFG, torch.float32).state_dict()
    stored = load_file(int8_dir / "model.safetensors")
    for name, q in stored.items():  # each weight is its int8 codes times its row scale
        if name.endswith(".qweight"):
            vx = ventoux.weights._hf_to_vx(name.removesuffix("qweight") + "weight")
            expected = dequantize_int8(q, stored[name.removesuffix("qweight") + "scales"])
            torch.testing.assert_close(out[vx], expected[:, : out[vx].shape[1]], atol=0, rtol=0)
    assert torch.equal(out["norm.weight"], stored["model.norm.weight"].float())


def test_convert_quantized_to_consolidated_without_dtype_is_refused(int8_dir, tmp_path, capsys):
    before = digest(int8_dir)
    fails(capsys, ["convert", int8_dir, tmp_path / "out", "--format", "consolidated"], "int8", "--dtype")
    assert not (tmp_path / "out").exists() and digest(int8_dir) == before


def test_saving_quantized_layers_without_their_scheme_is_refused(int8_dir, tmp_path):
    from ventoux.api import load_model

    model = load_model(int8_dir, read_config(int8_dir), torch.float32)
    with pytest.raises(VentouxError, match="quantized layers"):
        save_hf(model, tmp_path / "a")
    with pytest.raises(VentouxError, match="quantized layers"):
        ventoux.weights.save_consolidated(model, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# ---- 2. absurd configs, and configs that contradict their weights --------------------------------------
def test_a_billion_layers_is_refused_at_once_by_the_cli(model_dir, tmp_path):
    bad = copy_of(model_dir, tmp_path / "m", lambda c: c.update(num_hidden_layers=10**9))
    assert_one_line(cli("generate", "--model", str(bad), "Hello"), "n_layers=1000000000", "at most 1024")


def test_layer_count_is_checked_against_the_weights_before_building(model_dir, tmp_path):
    bad = copy_of(model_dir, tmp_path / "m", lambda c: c.update(num_hidden_layers=900))
    with pytest.raises(VentouxError, match=r"asks for 900 layers but the weights .* hold layers 3 \(0\.\.2\)"):
        ventoux.load(str(bad))


def test_too_many_parameters_is_refused():
    with pytest.raises(VentouxError, match="limit of 2000 B"):
        CFG.replace(n_layers=1024, dim=2**16, n_heads=512, n_kv_heads=512, head_dim=128, hidden_dim=2**18)


# ---- 4. config values and weights that would generate garbage ----------------------------------------
@pytest.mark.parametrize("field, value, words", [
    ("rms_norm_eps", -1e-5, "norm_eps"),
    ("rms_norm_eps", 0, "norm_eps"),
    ("rope_theta", float("nan"), "rope_theta"),
    ("rope_theta", -10000.0, "rope_theta"),
    ("rope_theta", "big", "rope_theta"),
    ("bos_token_id", 32000, "bos_id"),
    ("eos_token_id", -1, "eos_id"),
    ("eos_token_id", [], "eos_id"),
    ("max_position_embeddings", 10**12, "max_seq_len"),
    ("num_attention_heads", 0, "n_heads"),
    ("hidden_size", "64", "dim"),
    ("num_hidden_layers", 3.0, "n_layers"),
    ("vocab_size", True, "vocab_size"),
    ("sliding_window", -8, "sliding_window"),
])
def test_invalid_config_values_are_named_with_their_file(model_dir, tmp_path, field, value, words):
    bad = copy_of(model_dir, tmp_path / "m", lambda c: c.update({field: value}))
    with pytest.raises(VentouxError, match=rf"config\.json: .*{words}") as e:
        ventoux.load(str(bad))
    assert "\n" not in str(e.value)


def test_a_config_that_is_not_an_object_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(VentouxError, match="JSON object"):
        read_config(tmp_path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_named_at_load(model_dir, tmp_path, value):
    def poison(sd):
        sd["model.layers.1.mlp.up_proj.weight"][3, 5] = value

    bad = copy_of(model_dir, tmp_path / "m", tensors_edit=poison)
    with pytest.raises(VentouxError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' .* holds 1 NaN or infinite"):
        ventoux.load(str(bad), dtype="float32")


def test_non_finite_weights_are_found_in_any_chunk(model_dir, tmp_path, monkeypatch):
    """The check sums a chunk at a time (no float32 copy of a whole bf16 tensor): a NaN past the first chunk,
    and an inf in the last, partial one, are found too."""
    import ventoux.weights

    bad = copy_of(model_dir, tmp_path / "m", tensors_edit=lambda sd: sd["model.layers.0.mlp.up_proj.weight"]
                  .view(-1)[450:451].fill_(float("nan")))
    monkeypatch.setattr(ventoux.weights, "FINITE_CHUNK", 100)
    with pytest.raises(VentouxError, match=r"'model\.layers\.0\.mlp\.up_proj\.weight' .* holds 1 NaN"):
        ventoux.load(str(bad), dtype="bfloat16")
    monkeypatch.setattr(ventoux.weights, "FINITE_CHUNK", 1000)  # the inf alone, in a last partial chunk
    bad = copy_of(model_dir, tmp_path / "m2", tensors_edit=lambda sd: sd["model.layers.1.mlp.up_proj.weight"]
                  .view(-1)[-1:].fill_(float("inf")))
    with pytest.raises(VentouxError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' .* holds 1 NaN"):
        ventoux.load(str(bad), dtype="bfloat16")


def test_values_that_overflow_the_dtype_are_named(model_dir, tmp_path):
    bad = copy_of(model_dir, tmp_path / "m", tensors_edit=lambda sd: sd["model.norm.weight"].fill_(1e6))
    ventoux.load(str(bad), dtype="float32")  # fine in float32
    with pytest.raises(VentouxError, match=r"'model\.norm\.weight' .*\(as torch\.float16\)"):
        ventoux.load(str(bad), dtype="float16")


# ---- 5. one line, not a traceback -----------------------------------------------------------------------
def test_integer_tensor_where_a_float_is_expected(model_dir, tmp_path):
    def to_int(sd):
        sd["model.layers.0.self_attn.q_proj.weight"] = sd["model.layers.0.self_attn.q_proj.weight"].to(torch.int32)

    bad = copy_of(model_dir, tmp_path / "m", tensors_edit=to_int)
    with pytest.raises(VentouxError, match=r"'model\.layers\.0\.self_attn\.q_proj\.weight' .* int32 .* floating"):
        load_model(bad, CFG, torch.float32)


@pytest.mark.parametrize("command", [["convert", "--format", "hf"], ["quantize", "--scheme", "int8"]])
def test_output_folder_whose_parent_is_a_file(model_dir, tmp_path, capsys, command):
    (tmp_path / "afile").write_text("x")
    name, *flags = command
    fails(capsys, [name, model_dir, tmp_path / "afile" / "out", *flags], "afile", "output")
    assert (tmp_path / "afile").read_text() == "x"


def test_invalid_utf8_on_standard_input(model_dir):
    r = cli("generate", "--model", str(model_dir), "--max-tokens", "3", "-", stdin=b"caf\xe9 au lait")
    assert_one_line(r, "not valid UTF-8", "0xe9", "offset 3")
    assert r.stdout == b""


def test_seed_beyond_64_bits_is_refused_before_loading(tmp_path):
    r = cli("generate", "--model", str(tmp_path / "missing"), "--seed", str(2**64), "Hello")
    assert_one_line(r, "seed=18446744073709551616", "64 bits")


def test_generate_with_no_prompt_or_a_wrong_type(llm):
    for prompt in (None, 5, 2.5, {"a": 1}, [1.5], [[1, "x"]], b"bytes"):
        with pytest.raises(VentouxError, match="prompt"):
            llm.generate(prompt, max_tokens=2)


def test_other_entry_points_refuse_junk_in_one_line(llm, tmp_path):
    with pytest.raises(VentouxError, match="model source"):
        ventoux.load(123)
    with pytest.raises(VentouxError, match="not valid Unicode"):
        llm.generate("caf\udce9", max_tokens=2)
    with pytest.raises(VentouxError, match="token id 99999"):
        llm.tokenizer.decode([5, 99999])
    with pytest.raises(VentouxError, match="outside the vocabulary|vocabulary"):
        llm.generate([5, 10**6], max_tokens=2)
    with pytest.raises(VentouxError, match="stop_token_ids"):
        llm.generate("Hi", max_tokens=2, stop_token_ids=[-3])


# ---- 6. every flag checked before anything loads (and before the prompt is echoed) ---------------------
@pytest.mark.parametrize("flags, word", [
    (["--top-p", "1.5"], "top_p"), (["--min-p", "nan"], "min_p"), (["--max-tokens", "0"], "max_tokens"),
    (["--dtype", "float8"], "float8"), (["--quantize", "int3"], "int3"), (["--device", "tpu"], "tpu"),
    (["--temperature", "1e300"], "temperature"), (["--repetition-penalty", "1e-300"], "repetition_penalty"),
])
def test_flags_are_checked_before_the_model_is_loaded(tmp_path, capsys, flags, word):
    """The model folder does not exist: the error names the flag, so nothing was loaded first."""
    err = fails(capsys, ["generate", "--model", tmp_path / "missing", *flags, "Hello"], word)
    assert "missing" not in err and capsys.readouterr().out == ""


# ---- 7. the tokenizer must fit the model -----------------------------------------------------------------
def test_the_tokenizer_matching_the_models_vocabulary_is_chosen(model_dir, tmp_path):
    folder = copy_of(model_dir, tmp_path / "m")
    shutil.copy(TEKKEN, folder / "tekken.json")  # 131K pieces, preferred by name, beside the 32K model's own
    assert load_tokenizer(folder).vocab_size == 32000
    assert ventoux.load(str(folder)).tokenizer.vocab_size == 32000


def test_a_tokenizer_larger_than_the_model_is_refused_naming_both_sizes(model_dir, tmp_path, capsys):
    folder = copy_of(model_dir, tmp_path / "m")
    (folder / "tokenizer.model").unlink()
    shutil.copy(TEKKEN, folder / "tekken.json")
    fails(capsys, ["generate", "--model", folder, "--max-tokens", "2", "Hello"], "tekken.json has 131072",
          "is 32000")


# ---- 8. index paths that leave the folder, stale temporary folders ----------------------------------------
@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", 7])
def test_index_naming_files_outside_the_folder_is_refused(model_dir, tmp_path, shard):
    folder = copy_of(model_dir, tmp_path / "m")
    index = {"weight_map": {"model.embed_tokens.weight": shard, "model.norm.weight": "model.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(VentouxError, match="not a file name inside|not a valid safetensors index"):
        load_model(folder, CFG, torch.float32)


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def test_stale_temporary_folders_of_killed_converts_are_cleaned(model_dir, tmp_path, capsys):
    dead = tmp_path / f".out.tmp-{_dead_pid()}"
    live = tmp_path / f".out.tmp-{os.getppid()}"  # a running process's: still being written, kept
    for d in (dead, live):
        d.mkdir()
        (d / "model.safetensors").write_bytes(b"partial")
    assert main(["convert", str(model_dir), str(tmp_path / "out"), "--format", "hf"]) == 0
    assert not dead.exists() and live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".out.tmp-" + live.name.rpartition("-")[2], "out"])


# ---- random junk at every entry point that takes user input ----------------------------------------------
JUNK = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                 st.text(max_size=8), st.lists(st.integers(-5, 40000), max_size=4), st.just([""]))
SMALL = settings(max_examples=60, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@SMALL
@given(st.dictionaries(st.sampled_from(sorted(SamplingParams.names())), JUNK, max_size=4))
def test_sampling_params_junk(kwargs):
    try:
        SamplingParams(**kwargs)
    except VentouxError:
        pass


VALID_PROMPTS = st.one_of(st.text(min_size=1, max_size=20), st.lists(st.integers(0, 31999), min_size=1, max_size=6),
                          st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=3))
PROMPTS = st.one_of(VALID_PROMPTS, st.text(max_size=20), st.lists(st.integers(-3, 33000), max_size=6),
                    st.lists(st.text(max_size=6), max_size=3), st.none(), st.integers(), st.binary(max_size=4))
VALID_KWARGS = st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(st.just(0.0), st.floats(1e-4, 100)), "top_p": st.floats(1e-6, 1),
    "top_k": st.integers(0, 99),
    "min_p": st.floats(0, 0.99), "repetition_penalty": st.floats(0.01, 100), "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2), "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=2), "stop_token_ids": st.lists(st.integers(0, 40000)),
    "logprobs": st.integers(0, 20), "prefill_chunk": st.integers(1, 9), "ignore_eos": st.booleans()})
JUNK_KWARGS = st.dictionaries(st.sampled_from(sorted(SamplingParams.names() - {"max_tokens"})), JUNK, max_size=4)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(prompt=PROMPTS, kwargs=st.one_of(VALID_KWARGS, VALID_KWARGS, JUNK_KWARGS))
def test_generate_junk(llm, prompt, kwargs):
    """Any prompt and parameters: a completion (max_tokens kept small) or a VentouxError."""
    try:
        out = llm.generate(prompt, max_tokens=3, **kwargs)
    except VentouxError:
        return
    for c in out if isinstance(out, list) else [out]:
        assert c.finish_reason in ("stop", "length") and len(c.tokens) <= 3


MESSAGES = st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "assistant", "system"]),
                                                             JUNK),
                                           "content": st.one_of(st.text(max_size=10), JUNK)}), max_size=3)


@SMALL
@given(messages=st.one_of(MESSAGES, JUNK), text=st.text(max_size=30), ids=st.lists(JUNK, max_size=3))
def test_tokenizer_junk(llm, messages, text, ids):
    tok = llm.tokenizer
    for call in (lambda: tok.encode_chat(messages), lambda: tok.decode(tok.encode(text)), lambda: tok.decode(ids)):
        try:
            call()
        except VentouxError:
            pass


V03_HF = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
          "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
          "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "vocab_size": 32768}


@SMALL
@given(st.dictionaries(st.sampled_from(sorted(V03_HF) + ["head_dim", "sliding_window", "bos_token_id",
                                                        "eos_token_id", "rope_parameters", "model_type"]),
                       st.one_of(JUNK, st.dictionaries(st.text(max_size=3), JUNK, max_size=2)), max_size=3))
def test_config_junk(changes):
    try:
        cfg = ModelConfig.from_hf({**V03_HF, **changes})
    except VentouxError:
        return
    assert cfg.norm_eps > 0 and math.isfinite(cfg.rope_theta) and 0 <= cfg.eos_id < cfg.vocab_size


@SMALL
@given(st.one_of(st.text(max_size=12), JUNK))
def test_small_parsers_junk(text):
    from ventoux.api import pick_device
    from ventoux.cli import parse_size
    from ventoux.quantize import parse_quantize
    from ventoux.weights import parse_dtype

    for parse in (parse_dtype, parse_quantize, lambda t: parse_size(str(t), "--max-shard-size"),
                  lambda t: pick_device(t) if t not in (None, "auto") else None):
        try:
            parse(text)
        except VentouxError:
            pass


# ---- output folders the OS refuses; quantization that contradicts config.json -----------------------------
@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys, where no one may create folders")
def test_an_output_folder_the_os_refuses_is_named_before_loading(model_dir, capsys):
    for argv in (["quantize", model_dir, "/sys/ventoux-out", "--scheme", "int8"],
                 ["convert", model_dir, "/sys/ventoux-out", "--format", "hf"]):
        err = fails(capsys, argv, "/sys")
        assert "tmp-" not in err and "Errno" not in err, err
        assert err.rstrip().endswith("; choose another output path"), err


def _without_quantization(cfg):
    del cfg["quantization"]


@pytest.mark.parametrize("source, edit", [("int8", _without_quantization),
                                          ("float", lambda c: c.update(quantization={"scheme": "int8"}))],
                         ids=["quantized-weights-float-config", "float-weights-quantized-config"])
def test_quantization_that_contradicts_config_json_is_named(model_dir, int8_dir, tmp_path, source, edit):
    bad = copy_of(int8_dir if source == "int8" else model_dir, tmp_path / "m", config_edit=edit)
    with pytest.raises(VentouxError, match="quantization does not match its config.json's") as e:
        ventoux.load(str(bad), dtype="float32", device="cpu")
    assert "n_layers" not in str(e.value)
    tensor, why = (("lm_head.qweight", "the weights are quantized there, in a scheme config.json does not declare")
                   if source == "int8" else
                   ("model.layers.0.mlp.down_proj.weight", "the weights are float there, but config.json declares "
                    "them quantized"))
    assert str(e.value) == (
        f"{bad / 'model.safetensors'} holds tensor {tensor!r}, which this model config does not have: the "
        f"checkpoint's quantization does not match its config.json's ({why}); fix the \"quantization\" entry of "
        "config.json, or quantize the float checkpoint again with `ventoux quantize`")


@pytest.mark.parametrize("file_scheme, config_scheme", [("int6", "int4"), ("int4", "int6")])
def test_int6_against_int4_in_config_json_is_named(model_dir, tmp_path, file_scheme, config_scheme):
    # the same codes, scales and zeros but for int6's top bits (qhigh): the file or the config.json lacks them
    from ventoux.quantize import quantize_checkpoint

    made = quantize_checkpoint(model_dir, tmp_path / "q", f"{file_scheme}-g64")
    bad = copy_of(made, tmp_path / "m", config_edit=lambda c: c["quantization"].update(scheme=config_scheme))
    with pytest.raises(VentouxError) as e:
        ventoux.load(str(bad), dtype="float32", device="cpu")
    # the first tensor in the file's order (an extra one), or in the model's (a missing one)
    module = "mlp.down_proj" if file_scheme == "int6" else "self_attn.q_proj"
    tensor = f"'model.layers.0.{module}.qhigh'"
    assert str(e.value) == (
        f"{bad / 'model.safetensors'} holds tensor {tensor}, which this model config does not have: the "
        "checkpoint's quantization does not match its config.json's (the weights are quantized there, in a scheme "
        "config.json does not declare); " if file_scheme == "int6" else
        f"tensor {tensor} is missing from {bad / 'model.safetensors'}: the checkpoint's quantization does not "
        "match its config.json's (which declares it quantized); ") + (
        "fix the \"quantization\" entry of config.json, or quantize the float checkpoint again with "
        "`ventoux quantize`")


def test_quantize_of_a_quantized_checkpoint_is_refused(int8_dir, tmp_path, capsys):
    fails(capsys, ["quantize", int8_dir, tmp_path / "out", "--scheme", "int4"], "already quantized (int8)")
    assert not (tmp_path / "out").exists()
