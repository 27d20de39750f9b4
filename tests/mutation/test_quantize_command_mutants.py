"""`ventoux quantize` (commands/quantize.py) where mutation testing (mutation/README.md, through
mutation/fresh_module.sh) found it unpinned: the defaults a user gets without flags (int4 in groups of 32, the
head in int8), --include-output, a --group-size that is not a number; --output-scheme and --group-size with int6
and int8."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY

from ventoux.api import load_model
from ventoux.cli import main
from ventoux.config import read_config
from ventoux.model import Transformer
from ventoux.qlinear import Int4Linear, Int6Linear, Int8Linear
from ventoux.weights import save_hf

CFG = TINY.replace(dim=128, hidden_dim=256, head_dim=32)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    return save_hf(Transformer(CFG), tmp_path_factory.mktemp("float") / "model")


def written(folder):
    entry = json.loads((folder / "config.json").read_text())["quantization"]
    model = load_model(folder, read_config(folder), torch.float32, "cpu")
    return entry, model


def test_without_flags_the_blocks_are_int4_in_groups_of_32_and_the_head_int8(src, tmp_path, capsys):
    assert main(["quantize", str(src), str(tmp_path / "q")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'q'} (int4)\n"
    entry, model = written(tmp_path / "q")
    assert (entry["scheme"], entry["group_size"], entry["output_scheme"]) == ("int4", 32, "int8")
    assert isinstance(model.layers[0].attention.wq, Int4Linear) and model.layers[0].attention.wq.group_size == 32
    assert isinstance(model.output, Int8Linear)


def test_include_output_puts_the_head_in_the_blocks_scheme(src, tmp_path, capsys):
    assert main(["quantize", str(src), str(tmp_path / "q"), "--group-size", "64", "--include-output"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'q'} (int4-g64)\n"
    entry, model = written(tmp_path / "q")
    assert (entry["scheme"], entry["group_size"], entry["output_scheme"]) == ("int4", 64, "int4-g64")
    assert isinstance(model.output, Int4Linear) and model.output.group_size == 64


def test_a_group_size_that_is_not_a_number_is_argparses_error(src, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), str(tmp_path / "q"), "--group-size", "sixty"])
    assert e.value.code == 2 and "argument --group-size: invalid int value: 'sixty'" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_output_scheme_names_the_heads_format(src, tmp_path, capsys):
    # int4-g64 with an int6 head: llama.cpp Q4_0's bytes
    assert main(["quantize", str(src), str(tmp_path / "q"), "--group-size", "64", "--output-scheme", "int6"]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'q'} (int4-g64)\n"
    entry, model = written(tmp_path / "q")
    assert (entry["scheme"], entry["group_size"], entry["output_scheme"]) == ("int4", 64, "int6-g64")
    assert isinstance(model.output, Int6Linear) and model.output.group_size == 64
    assert main(["quantize", str(src), str(tmp_path / "f"), "--output-scheme", "float"]) == 0
    entry, model = written(tmp_path / "f")
    assert (entry["include_output"], entry["output_scheme"]) == (False, None)


@pytest.mark.parametrize("scheme,group,expected", [("int6", "128", ("int6", 128)), ("int8", "32", ("int8", 32))])
def test_group_size_goes_with_every_base_scheme(src, tmp_path, scheme, group, expected):
    assert main(["quantize", str(src), str(tmp_path / "q"), "--scheme", scheme, "--group-size", group]) == 0
    entry, _ = written(tmp_path / "q")
    assert (entry["scheme"], entry["group_size"], entry["output_scheme"]) == (*expected, "int8")


def test_flags_that_contradict_are_refused_before_anything_is_written(src, tmp_path, capsys):
    assert main(["quantize", str(src), str(tmp_path / "q"), "--scheme", "int4-g64", "--group-size", "32"]) == 1
    assert capsys.readouterr().err == ("ventoux: error: --group-size goes with --scheme int8, int6 or int4, not "
                                       "'int4-g64': pass 'int4-g64' alone, or its base with --group-size\n")
    assert main(["quantize", str(src), str(tmp_path / "q"), "--output-scheme", "int5"]) == 1
    assert "unknown quantization scheme 'int5'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(src), str(tmp_path / "q"), "--include-output", "--output-scheme", "int6"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "q").exists()
