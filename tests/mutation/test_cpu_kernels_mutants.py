"""The kernels' loader (ventoux/cpu_kernels.py) where mutation testing found it unpinned: the cache folder, the
compiler asked for, the CPU vendor, the AVX2 build's flags with and without AVX-VNNI, no build on a CPU with
neither ISA, and an unsupported VENTOUX_CPU_ISA's message whole. test_cpu_kernels.py runs the kernels."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ventoux import cpu_kernels
from ventoux.errors import VentouxError


def test_the_kernels_are_cached_under_xdg_cache_home_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cpu_kernels.cache_dir() == tmp_path / "xdg" / "ventoux" / "kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    assert cpu_kernels.cache_dir() == tmp_path / "home" / ".cache" / "ventoux" / "kernels"


def test_the_compiler_is_cc_unless_the_cc_variable_names_another(monkeypatch):
    asked = []
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: asked.append(name) or f"/usr/bin/{name}")
    monkeypatch.delenv("CC", raising=False)
    assert cpu_kernels.compiler() == "/usr/bin/cc"
    monkeypatch.setenv("CC", "clang")
    assert cpu_kernels.compiler() == "/usr/bin/clang" and asked == ["cc", "clang"]


def test_the_vendor_is_cpuinfos_vendor_id(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_cpuinfo", {"vendor_id": "AuthenticAMD", "model name": "AMD EPYC"}.get)
    assert cpu_kernels.cpu_vendor() == "AuthenticAMD"


def test_the_avx2_build_adds_avx_vnni_only_where_the_cpu_has_it(monkeypatch):
    flags = frozenset({"avx2", "fma", "f16c"})
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: flags)
    assert cpu_kernels.isa_flags("avx2") == ["-march=x86-64-v3", "-mtune=native"]
    flags = flags | {"avx_vnni"}
    assert cpu_kernels.isa_flags("avx2") == ["-march=x86-64-v3", "-mtune=native", "-mavxvnni"]
    assert cpu_kernels.isa_flags("avx512") == ["-march=native"]


def test_a_cpu_with_neither_isa_runs_no_build_and_names_what_it_lacks(monkeypatch):
    monkeypatch.delenv(cpu_kernels.ISA_VARIABLE, raising=False)
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ())
    assert cpu_kernels.isa() is None
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, "avx2")
    with pytest.raises(VentouxError) as e:
        cpu_kernels.isa()
    assert str(e.value) == "VENTOUX_CPU_ISA=avx2: this CPU lacks avx2, fma, f16c; use none"
    monkeypatch.setattr(cpu_kernels, "supported_isas", lambda: ("avx2",))
    monkeypatch.setenv(cpu_kernels.ISA_VARIABLE, " AVX512 ")
    with pytest.raises(VentouxError) as e:
        cpu_kernels.isa()
    assert str(e.value) == ("VENTOUX_CPU_ISA=avx512: this CPU lacks avx512f, avx512bw, avx512vl, avx512_vnni; "
                            "use avx2 or none")


@pytest.mark.parametrize("r0,r1", [(0, 40), (16, 40), (16, 32), (32, 45)])
def test_a_block_of_tiled_rows_and_column_groups_is_that_block_of_the_matrix(r0, r1):
    q = torch.randint(-128, 128, (45, 64), dtype=torch.int8, generator=torch.Generator().manual_seed(r0 + r1))
    tiled = cpu_kernels._interleave(q, 4)  # (3 tiles, 16 groups of 4 columns, 16 rows, 4)
    assert torch.equal(cpu_kernels.untile_block(tiled, r0, r1, 1, 3), q[r0:r1, 4:12])
    assert torch.equal(cpu_kernels._deinterleave(tiled, 45), q)


def test_a_kernel_check_keeps_the_name_and_doc_of_the_check_it_wraps():
    def kernel_works() -> bool:
        """The kernels against PyTorch."""
        return True

    works = cpu_kernels.once_per_build(kernel_works)
    assert (works.__name__, works.__doc__, works.__wrapped__) == ("kernel_works", "The kernels against PyTorch.",
                                                                  kernel_works)
