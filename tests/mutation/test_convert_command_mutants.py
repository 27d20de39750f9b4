"""`ventoux convert` and `ventoux info` (commands/convert.py) where mutation testing (mutation/README.md, through
mutation/fresh_module.sh) found them unpinned: every row `info` prints, checked against transformers' own count
of Mistral 7B's parameters and against the bytes `ventoux quantize` writes, and the sizes --max-shard-size
reads."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import transformers
from conftest import TINY

from ventoux.cli import main, parse_size
from ventoux.commands.convert import _gb, _kernels_line, _mb
from ventoux.errors import VentouxError
from ventoux.model import Transformer
from ventoux.weights import save_hf


def info(capsys, folder) -> dict[str, str]:
    assert main(["info", str(folder)]) == 0
    lines = capsys.readouterr().out.splitlines()  # "key" padded to the longest, two spaces, "value"
    return {key: value.strip() for key, value in (line.split("  ", 1) for line in lines)}


def stored_bytes(folder) -> int:
    """The tensors' bytes in a safetensors file, from its header (what the weights take, without the header)."""
    with open(folder / "model.safetensors", "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    offsets = [t["data_offsets"] for name, t in header.items() if name != "__metadata__"]
    return sum(end - start for start, end in offsets)


def test_info_of_mistral_7b_from_its_config_alone(tmp_path, capsys):
    config = transformers.MistralConfig()  # transformers' defaults are Mistral-7B-v0.1's
    config.to_json_file(tmp_path / "config.json")
    with torch.device("meta"):
        n = sum(p.numel() for p in transformers.MistralForCausalLM(config).parameters())
    rows = info(capsys, tmp_path)
    assert rows["source"] == str(tmp_path) and "weights" not in rows
    assert rows["architecture"] == ("dim 4096, 32 layers, 32 heads (8 kv heads), head_dim 128, hidden 14336, "
                                    "vocab 32000")
    assert rows["parameters"] == f"{n / 1e9:.3f} B" == "7.242 B"
    assert rows["attention"] == "sliding window 4096"
    assert rows["rope theta"] == "10000" and rows["context"] == "131072 tokens"
    # 2 (K and V) x 32 layers x 8 kv heads x 128 x 2 bytes = 128 KiB a token
    per_token = 2 * 32 * 8 * 128 * 2
    assert rows["kv cache"] == (f"{1024 * per_token / 1e6:.1f} MB per 1K tokens in bf16/fp16 "
                                f"({2048 * per_token / 1e6:.1f} MB in float32), per sequence; capped at the window: "
                                f"{4096 * per_token / 1e6:.1f} MB in bf16")
    memory = dict(part.split(" ", 1) for part in rows["memory"].split(" | "))
    assert memory["float32"] == f"{4 * n / 1e9:.2f} GB" and memory["bfloat16"] == f"{2 * n / 1e9:.2f} GB"
    # int4: 4 bits a block weight and a bf16 scale and zero per 32; int8 head and table with a bf16 scale a row
    blocks = n - 2 * 32000 * 4096 - 4096 * 65  # the norms (2 a layer, 1 final) stay bf16
    int8_rows = 32 * (32 * 128 + 2 * 8 * 128 + 2 * 4096 + 2 * 14336)
    int4 = blocks // 2 + blocks // 32 * 4 + 2 * (32000 * 4096 + 32000) + 2 * 4096 * 65
    int8 = blocks + 2 * int8_rows + 2 * (32000 * 4096 + 32000) + 2 * 4096 * 65
    assert memory["int8"] == f"{int8 / 1e9:.2f} GB" == "7.24 GB"
    assert memory["int4"] == f"{int4 / 1e9:.2f} GB" == "4.62 GB"
    assert rows["threads"] == f"torch uses {torch.get_num_threads()} threads (set OMP_NUM_THREADS to change)"


def test_info_of_a_checkpoint_reports_its_files_and_what_quantize_writes(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = TINY.replace(dim=128, hidden_dim=256, head_dim=32, sliding_window=None)
    save_hf(Transformer(cfg).to(torch.bfloat16), tmp_path / "float")
    rows = info(capsys, tmp_path / "float")
    size = (tmp_path / "float" / "model.safetensors").stat().st_size
    assert rows["weights"] == f"hf layout, 1 file(s), {size / 1e6:.2f} MB on disk, stored as bfloat16"
    assert rows["attention"] == "full attention" and rows["kv cache"].endswith("per sequence")
    memory = dict(part.split(" ", 1) for part in rows["memory"].split(" | "))
    assert memory["bfloat16"] == f"{stored_bytes(tmp_path / 'float') / 1e6:.2f} MB"
    for scheme in ("int8", "int4"):
        assert main(["quantize", str(tmp_path / "float"), str(tmp_path / scheme), "--scheme", scheme]) == 0
        assert memory[scheme] == f"{stored_bytes(tmp_path / scheme) / 1e6:.2f} MB", scheme
    capsys.readouterr()
    kernels = info(capsys, tmp_path / "int4")["cpu kernels"]
    assert kernels.startswith("bf16/fp16: ") and "; int8: " in kernels and "; int4: " in kernels


@pytest.mark.parametrize("text, size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2kb", 2000), ("1.5GiB", int(1.5 * 2**30)), (" 7 MiB ", 7 * 2**20),
    ("3KiB", 3 * 2**10), ("123", 123), ("64B", 64), ("2G", 2 * 10**9), ("0.5M", 500_000), ("9K", 9000),
])
def test_max_shard_size_reads_decimal_and_binary_units(text, size):
    assert parse_size(text, "--max-shard-size") == size


@pytest.mark.parametrize("text", ["0GB", "0", "5TB", "-1GB", "GB", "1e3", "5 GB B", "", "1.GB", "5Gi", "5iB"])
def test_max_shard_size_refuses_what_is_not_a_size(text):
    with pytest.raises(VentouxError) as e:
        parse_size(text, "--max-shard-size")
    assert str(e.value) == f"--max-shard-size {text!r} is not a size; write e.g. 5GB, 500MB or a number of bytes"


def test_sizes_are_printed_in_the_unit_that_reads_best():
    assert (_gb(10**8), _gb(10**8 - 1), _gb(156_000)) == ("0.10 GB", "100.00 MB", "0.16 MB")
    assert (_mb(10**5), _mb(10**5 - 1), _mb(1500)) == ("0.1 MB", "100.0 KB", "1.5 KB")


@pytest.mark.parametrize("works, half", [(True, "ventoux's (AVX-512)"), (False, "PyTorch's F.linear")])
def test_the_kernels_line_names_the_kernel_loading_picks(monkeypatch, works, half):
    import ventoux.fastlinear
    from ventoux.qlinear import Int4Linear, Int8Linear

    monkeypatch.setattr(ventoux.fastlinear, "kernel_works", lambda: works)
    monkeypatch.setattr(Int8Linear, "kernels", classmethod(lambda cls, device: ["first8", "second8"]))
    monkeypatch.setattr(Int4Linear, "kernels", classmethod(lambda cls, device: ["first4", "second4"]))
    assert _kernels_line() == f"bf16/fp16: {half}; int8: first8; int4: first4"


@pytest.mark.parametrize("flags, error", [
    ([], "the following arguments are required: --format"),
    (["--format", "gguf"], "argument --format: invalid choice: 'gguf'"),
])
def test_the_format_is_required_and_one_of_two(tmp_path, capsys, flags, error):
    with pytest.raises(SystemExit) as e:
        main(["convert", str(tmp_path), str(tmp_path / "out"), *flags])
    assert e.value.code == 2 and error in capsys.readouterr().err
