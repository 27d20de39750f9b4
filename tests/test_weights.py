"""Checkpoints: HF (single, sharded) and consolidated (safetensors, .pth) against transformers and against the
rotary math itself; every bad input fails with one VentouxError naming the culprit."""

import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, hf_model
from safetensors.torch import load_file, save_file

from ventoux import weights
from ventoux.cli import main
from ventoux.config import read_config
from ventoux.errors import VentouxError
from ventoux.weights import load_model, parse_dtype, save_consolidated, save_hf

TOKENS = torch.randint(0, TINY.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def hf():
    return hf_model(TINY)


@pytest.fixture(scope="module")
def ref_logits(hf):
    with torch.no_grad():
        return hf(TOKENS).logits


@pytest.fixture(scope="module")
def hf_dir(hf, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "hf"
    hf.save_pretrained(folder)
    (folder / "tokenizer.model").write_bytes(b"not a real tokenizer")
    return folder


@pytest.fixture(scope="module")
def consolidated_dir(hf_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "consolidated"
    save_consolidated(load_model(hf_dir, TINY, torch.float32), folder)
    return folder


def logits(folder, dtype=torch.float32, cfg=None):
    model = load_model(folder, cfg or read_config(folder), dtype)
    with torch.no_grad():
        return model(TOKENS)


def test_hf_single_and_sharded_match_transformers(hf, hf_dir, ref_logits, tmp_path):
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / weights.HF_INDEX).exists() and len(list(tmp_path.glob("model-*.safetensors"))) > 2
    single, sharded = logits(hf_dir), logits(tmp_path)
    torch.testing.assert_close(single, ref_logits, atol=1e-5, rtol=0)
    assert torch.equal(single, sharded)


def test_consolidated_rows_follow_the_rotary_layout(hf, consolidated_dir):
    """Consolidated row 2i of each head is HF row i, row 2i+1 is HF row i + D/2 (built here with loops)."""
    hf_sd, cons = hf.state_dict(), load_file(consolidated_dir / "consolidated.safetensors")
    d = TINY.head_dim
    for layer in range(TINY.n_layers):
        for short, long, heads in (("wq", "q_proj", TINY.n_heads), ("wk", "k_proj", TINY.n_kv_heads)):
            src = hf_sd[f"model.layers.{layer}.self_attn.{long}.weight"]
            expected = torch.empty_like(src)
            for h in range(heads):
                for i in range(d // 2):
                    expected[h * d + 2 * i] = src[h * d + i]
                    expected[h * d + 2 * i + 1] = src[h * d + i + d // 2]
            assert torch.equal(cons[f"layers.{layer}.attention.{short}.weight"], expected)
        for cons_name, hf_name in (("attention.wv", "self_attn.v_proj"), ("attention.wo", "self_attn.o_proj"),
                                   ("feed_forward.w1", "mlp.gate_proj"), ("feed_forward.w2", "mlp.down_proj"),
                                   ("feed_forward.w3", "mlp.up_proj")):  # unpermuted (MISTRAL.md's table)
            hf_weight = hf_sd[f"model.layers.{layer}.{hf_name}.weight"]
            assert torch.equal(cons[f"layers.{layer}.{cons_name}.weight"], hf_weight)
    assert torch.equal(cons["output.weight"], hf_sd["lm_head.weight"])
    assert json.loads((consolidated_dir / "params.json").read_text())["n_kv_heads"] == TINY.n_kv_heads


def test_consolidated_with_mistral_rotary_gives_hf_attention_scores(hf, consolidated_dir):
    """Mistral's reference rotary (complex pairs 2i, 2i+1) on consolidated q/k == HF's rotate-half on HF q/k."""
    x = torch.randn(7, TINY.dim)
    pos = torch.arange(7).float()
    d = TINY.head_dim
    freqs = torch.outer(pos, 1.0 / TINY.rope_theta ** (torch.arange(0, d, 2).float() / d))  # (T, D/2)

    def mistral_rope(t):  # (T, H, D) pairs as complex numbers, as in mistral-inference
        c = torch.view_as_complex(t.reshape(*t.shape[:-1], d // 2, 2))
        return torch.view_as_real(c * torch.polar(torch.ones_like(freqs), freqs)[:, None]).flatten(-2)

    def hf_rope(t):
        cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
        return t * cos + torch.cat([-t[..., d // 2:], t[..., :d // 2]], -1) * sin

    hf_sd, cons = hf.state_dict(), load_file(consolidated_dir / "consolidated.safetensors")
    with torch.no_grad():
        q_h = hf_rope((x @ hf_sd["model.layers.1.self_attn.q_proj.weight"].T).view(7, -1, d))
        k_h = hf_rope((x @ hf_sd["model.layers.1.self_attn.k_proj.weight"].T).view(7, -1, d))
        q_c = mistral_rope((x @ cons["layers.1.attention.wq.weight"].T).view(7, -1, d))
        k_c = mistral_rope((x @ cons["layers.1.attention.wk.weight"].T).view(7, -1, d))
    group = TINY.n_heads // TINY.n_kv_heads
    scores_h = torch.einsum("thd,shd->hts", q_h, k_h.repeat_interleave(group, 1))
    scores_c = torch.einsum("thd,shd->hts", q_c, k_c.repeat_interleave(group, 1))
    torch.testing.assert_close(scores_c, scores_h, atol=1e-5, rtol=1e-5)


def test_consolidated_reload_and_pth_give_identical_logits(hf_dir, consolidated_dir, tmp_path):
    assert torch.equal(logits(consolidated_dir), logits(hf_dir))
    pth = tmp_path / "pth"
    pth.mkdir()
    torch.save(load_file(consolidated_dir / "consolidated.safetensors"), pth / "consolidated.00.pth")
    (pth / "params.json").write_text((consolidated_dir / "params.json").read_text())
    assert torch.equal(logits(pth), logits(hf_dir))


@pytest.mark.parametrize("shard_bytes", [10**9, 60_000])
def test_ventoux_hf_folder_loads_in_transformers(hf_dir, consolidated_dir, ref_logits, tmp_path, shard_bytes):
    from transformers import MistralForCausalLM

    out = tmp_path / "out"
    model = load_model(consolidated_dir, read_config(consolidated_dir), torch.float32)
    save_hf(model, out, max_shard_bytes=shard_bytes, extra_files=weights.tokenizer_files(hf_dir))
    assert (out / weights.HF_INDEX).exists() == (shard_bytes < 10**9)
    assert (out / "tokenizer.model").read_bytes() == b"not a real tokenizer"
    reloaded = MistralForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, ref_logits)
    assert not list(tmp_path.glob(".out.*"))  # no temporary folder left behind


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_in_half_precision(hf_dir, ref_logits, dtype):
    model = load_model(hf_dir, TINY, dtype)
    assert {p.dtype for p in model.parameters()} == {dtype}
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS), ref_logits, atol=0.05, rtol=0.05)


def test_save_in_another_dtype(hf_dir, tmp_path):
    save_consolidated(load_model(hf_dir, TINY, torch.float32), tmp_path / "c", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(tmp_path / "c" / "consolidated.safetensors").values()} == {torch.bfloat16}


def test_transform_sees_each_loaded_module_and_can_replace_it(hf_dir):
    seen = []

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    def transform(name, module):
        assert all(not p.is_meta and p.dtype == torch.bfloat16 for p in module.parameters())
        seen.append(name)
        return Wrapped(module) if name == "output" else None

    model = load_model(hf_dir, TINY, torch.bfloat16, transform=transform)
    assert seen[0] == "tok_embeddings" and seen[-1] == "output" and "layers.2.feed_forward.w2" in seen
    assert len(seen) == 2 + TINY.n_layers * 9 + 1  # embeddings, final norm, 9 per block, head
    assert isinstance(model.output, Wrapped)


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("Float16") is torch.float16
    assert parse_dtype(torch.float32) is torch.float32
    assert parse_dtype(None, "cpu") is torch.float32 and parse_dtype(None, "mps") is torch.float16
    with pytest.raises(VentouxError, match="'int3'.*float32, bfloat16 or float16"):
        parse_dtype("int3")
    with pytest.raises(VentouxError, match="'gpu'"):
        parse_dtype(None, "gpu")


# ---- bad input ---------------------------------------------------------------------------------------
def _copy_with(src: Path, dst: Path, edit) -> Path:
    """A copy of an HF checkpoint folder whose model.safetensors tensors went through edit(dict)."""
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    sd = load_file(src / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_missing_tensor_is_named_with_its_file(hf_dir, consolidated_dir, tmp_path):
    bad = _copy_with(hf_dir, tmp_path / "hf", lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    culprit = r"'model\.layers\.1\.mlp\.up_proj\.weight' is missing from .*model\.safetensors"
    with pytest.raises(VentouxError, match=culprit):
        load_model(bad, TINY, torch.float32)
    cons = tmp_path / "cons"
    cons.mkdir()
    sd = load_file(consolidated_dir / "consolidated.safetensors")
    del sd["layers.2.attention.wk.weight"]
    save_file(sd, cons / "consolidated.safetensors")
    culprit = r"'layers\.2\.attention\.wk\.weight' is missing from .*consolidated\.safetensors"
    with pytest.raises(VentouxError, match=culprit):
        load_model(cons, TINY, torch.float32)


def test_wrong_shape_says_config_contradicts_weights(hf_dir):
    culprit = (r"'model\.layers\.0\.mlp\.gate_proj\.weight' in .*model\.safetensors has shape \[160, 64\] "
               r"but the config expects \[128, 64\]; the config contradicts the weights")
    with pytest.raises(VentouxError, match=culprit):
        load_model(hf_dir, TINY.replace(hidden_dim=128), torch.float32)


def test_extra_tensors(hf_dir, tmp_path):
    with pytest.raises(VentouxError, match=r"'model\.layers\.2\.[^']+'.*contradicts the weights \(check n_layers\)"):
        load_model(hf_dir, TINY.replace(n_layers=2), torch.float32)
    stray = _copy_with(hf_dir, tmp_path / "stray", lambda sd: sd.update({"model.vision_tower.weight": torch.ones(2)}))
    with pytest.raises(VentouxError, match="'model.vision_tower.weight'"):
        load_model(stray, TINY, torch.float32)
    harmless = _copy_with(hf_dir, tmp_path / "ok", lambda sd: sd.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(TINY.head_dim // 2)}))
    assert torch.equal(logits(harmless), logits(hf_dir))


def test_truncated_or_corrupt_files(hf_dir, consolidated_dir, tmp_path):
    cut = _copy_with(hf_dir, tmp_path / "cut", lambda sd: None)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(VentouxError, match=r"cut/model\.safetensors is truncated or corrupt .*re-download it"):
        load_model(cut, TINY, torch.float32)
    pth = tmp_path / "pth"
    pth.mkdir()
    (pth / "consolidated.00.pth").write_bytes(b"\x80\x02garbage" * 100)
    with pytest.raises(VentouxError, match=r"consolidated\.00\.pth is truncated or corrupt"):
        load_model(pth, TINY, torch.float32)


def test_missing_folder_weights_and_shards(hf, tmp_path):
    with pytest.raises(VentouxError, match="no such folder: .*nowhere"):
        load_model(tmp_path / "nowhere", TINY, torch.float32)
    with pytest.raises(VentouxError, match="has no weights: expected model.safetensors"):
        load_model(tmp_path, TINY, torch.float32)
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    (tmp_path / "sharded" / "model-00002-of-00007.safetensors").unlink()
    with pytest.raises(VentouxError, match=r"index\.json refers to model-00002-of-00007\.safetensors, which is not in"):
        load_model(tmp_path / "sharded", TINY, torch.float32)


def test_existing_output_and_crash_leave_nothing_half_written(hf_dir, monkeypatch, tmp_path):
    model = load_model(hf_dir, TINY, torch.float32)
    with pytest.raises(VentouxError, match="already exists"):
        save_hf(model, hf_dir)

    def crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(weights, "save_file", crash)
    with pytest.raises(VentouxError) as e:  # one line naming the folder asked for, not the temporary one
        save_hf(model, tmp_path / "out", max_shard_bytes=60_000)
    assert str(e.value) == (f"cannot write the output folder {tmp_path / 'out'}: No space left on device; "
                            "free some space or choose another output path")
    assert list(tmp_path.iterdir()) == []


# ---- the CLI -----------------------------------------------------------------------------------------
def test_cli_convert_both_ways_and_info(hf_dir, tmp_path, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "c"), "--format", "consolidated", "--dtype", "bf16"]) == 0
    assert (tmp_path / "c" / "tokenizer.model").exists()
    assert main(["convert", str(tmp_path / "c"), str(tmp_path / "h"), "--format", "hf",
                 "--max-shard-size", "50KB"]) == 0
    assert (tmp_path / "h" / weights.HF_INDEX).exists()
    assert torch.equal(logits(tmp_path / "h", torch.bfloat16), logits(hf_dir, torch.bfloat16))
    capsys.readouterr()
    assert main(["info", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "parameters    0.156 M" in out and "stored as bfloat16" in out and "threads" in out


@pytest.mark.parametrize("argv, culprit", [
    (["convert", "/no/such/dir", "OUT", "--format", "hf"], "no such folder: /no/such/dir"),
    (["convert", "SRC", "OUT", "--format", "hf", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["convert", "SRC", "OUT", "--format", "hf", "--max-shard-size", "big"], "--max-shard-size 'big'"),
    (["convert", "SRC", "SRC", "--format", "hf"], "already exists"),
])
def test_cli_errors_are_one_line(hf_dir, tmp_path, capsys, argv, culprit):
    argv = [a.replace("SRC", str(hf_dir)).replace("OUT", str(tmp_path / "out")) for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and culprit in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_subprocess_bad_folder(tmp_path):
    r = subprocess.run([sys.executable, "-m", "ventoux.cli", "convert", str(tmp_path / "missing"),
                        str(tmp_path / "out"), "--format", "hf"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "no such folder" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss is in KB on Linux only")
def test_peak_memory_stays_near_one_copy(tmp_path):
    """bf16 file -> float32 model: the peak grows by about the float32 weights, not by weights + file."""
    from ventoux.model import Transformer

    cfg = TINY.replace(dim=512, n_layers=4, n_heads=8, n_kv_heads=2, head_dim=64, hidden_dim=2048, vocab_size=32000)
    save_hf(Transformer(cfg).to(torch.bfloat16), tmp_path / "m", max_shard_bytes=40_000_000)
    script = """
import resource, sys, torch
from ventoux.config import read_config
from ventoux.model import Transformer
from ventoux.weights import load_model
cfg = read_config(sys.argv[1])
with torch.device("meta"):  # one-time costs first: torch's meta-device machinery, the bf16 -> f32 kernel
    Transformer(cfg)
torch.ones(8, dtype=torch.bfloat16).float()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model = load_model(sys.argv[1], cfg, torch.float32)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(after - before, sum(p.numel() * 4 for p in model.parameters()))
"""
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "m")], capture_output=True, text=True,
                       timeout=120, check=True)
    grown, weight_bytes = map(int, r.stdout.split())
    assert grown < 1.25 * weight_bytes, (grown, weight_bytes)


def test_names_round_trip_and_unknown_names_are_none():
    from ventoux import names

    for vx in ["tok_embeddings.weight", "norm.weight", "output.weight", "layers.31.attention.wq.weight",
               "layers.0.feed_forward.w2.weight", "layers.7.ffn_norm.weight"]:
        assert names.from_hf(names.to_hf(vx)) == vx
    assert names.to_hf("layers.3.attention.wq.weight") == "model.layers.3.self_attn.q_proj.weight"
    for unknown in ["layers.0.attention.rotary.weight", "layers.x.attention.wq.weight", "vision.weight", ""]:
        assert names.to_hf(unknown) is None
    for unknown in ["model.layers.0.self_attn.rotary.weight", "model.layers.0.mlp.gate_proj", "lm_head.bias"]:
        assert names.from_hf(unknown) is None


def _mapped_from(t: torch.Tensor, folder: Path) -> bool:
    """Whether t's data lies in a memory map of a file in `folder` (/proc/self/maps)."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        if start <= t.data_ptr() < end:
            return f"{folder}/" in line
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_no_mmap_copies_the_weights_off_their_files(tmp_path, monkeypatch):
    # ventoux.load(mmap=False), the CLI's --no-mmap: a bf16 model's weights, which its kernels read in place from
    # the files' memory maps, copied into memory, those of 2 MB or more from a 2 MB boundary (on 2 MB pages where
    # Linux has them); the same values and tokens
    import shutil

    import mistral_common

    import ventoux
    from ventoux.cpu_kernels import HUGE_PAGES_VARIABLE
    from ventoux.model import Transformer

    monkeypatch.delenv(HUGE_PAGES_VARIABLE, raising=False)
    tok = tmp_path / "tokenizer.model"
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", tok)
    torch.manual_seed(0)
    folder = save_hf(Transformer(TINY.replace(vocab_size=32000)).to(torch.bfloat16), tmp_path / "m", extra_files=[tok])
    mapped, copied = (ventoux.load(str(folder), dtype="bfloat16", device="cpu", mmap=m) for m in (True, False))
    assert any(_mapped_from(p, folder) for p in mapped.model.parameters())  # the default reads the files' maps
    assert not any(_mapped_from(p, folder) for p in copied.model.parameters())
    head = copied.model.output.weight  # 32000 x 64 bf16: 4 MB
    assert head.nbytes >= 2 << 20 and head.data_ptr() % (2 << 20) == 0
    assert all(torch.equal(a, b) for a, b in zip(mapped.model.parameters(), copied.model.parameters()))
    prompt = [1, 851, 349, 264]
    assert (copied.generate(prompt, max_tokens=6, temperature=0).tokens
            == mapped.generate(prompt, max_tokens=6, temperature=0).tokens)
