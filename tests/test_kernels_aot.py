"""kernels.aot: the Triton kernels compiled for real (sm_90 and sm_80) on a machine without a GPU.

A bounded matrix (expert parallelism 8, a decode and a prefill bucket, both weight kinds, both
architectures) keeps this to some seconds per kernel; `python -m kernels.aot` compiles all of it.
"""
from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from kernels import aot

# Legend: T = tokens, EP = expert-parallel ranks.


@pytest.fixture(scope="module")
def bounded_matrix(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "rows.json"
    code = aot.main(["--ep", "8", "--buckets", "1,4096", "--json", str(out)])
    return code, json.loads(out.read_text())


def test_every_kernel_compiles_for_hopper_and_ampere_without_spills(bounded_matrix):
    code, rows = bounded_matrix
    assert code == 0, [r for r in rows if r["failures"]]
    kinds = {(r["kernel"], r["arch"], r["weights"]) for r in rows}
    for arch in aot.ARCHS:
        assert ("gating", arch, "-") in kinds
        for weights in aot.WEIGHTS:
            assert {("gate_up", arch, weights), ("down", arch, weights)} <= kinds
    for r in rows:
        assert 0 < r["regs"] <= 255 and r["spill_bytes"] == 0 and r["smem"] <= r["smem_limit"], r


def test_gemm_main_loops_run_on_tensor_cores(bounded_matrix):
    _, rows = bounded_matrix
    for r in rows:
        if r["kernel"] == "gating":
            continue
        # Hopper's warpgroup MMA needs 64 rows per warpgroup: the prefill tiles (BLOCK_M 128) get it.
        prefill = "T4096" in r["uses"]
        want = "wgmma" if r["arch"] == "sm90" and prefill else "mma"
        assert r["mma"] == want, r


def test_a_spilling_config_fails_the_run(tmp_path, capsys):
    from kernels.tile_config import GemmTiles, MoeTileConfig, format_config_file

    # Two int8 weight tiles of 128 x 128 per K step hold more than 255 registers per thread.
    tiles = GemmTiles(block_n=128, block_k=128, num_warps=4, num_stages=3)
    (tmp_path / "e1_d6144_f32768.json").write_text(format_config_file(
        {"shape": {"local_experts": 1, "hidden": 6144, "ffn": 32768}},
        {"int8": {16: MoeTileConfig(32, tiles, tiles)}}))
    code = aot.main(["--ep", "8", "--arch", "sm90", "--weights", "int8", "--kernels", "gate_up",
                     "--config-dir", str(tmp_path)])
    assert code == 1
    assert "spills" in capsys.readouterr().out


def test_the_launch_is_specialized_as_the_jit_does():
    from kernels.tile_config import GemmTiles, MoeTileConfig

    tiles = GemmTiles(64, 128)
    variant = aot.Variant("down", "sm90", "int8", 8, 16, MoeTileConfig(16, tiles, tiles))
    _, (_, _, _, signature, _, attrs, keywords) = aot.prepare(variant)
    # Unit strides become constants and 16-divisible sizes get the divisibility hint, as at run time.
    assert signature["stride_wn"] == "constexpr" and signature["stride_hf"] == "constexpr"
    assert signature["w_ptr"] == "*i8" and signature["h_ptr"] == "*bf16"
    assert keywords["SCALES"] == "row_blocks"
    assert any(["tt.divisibility", 16] in v for v in attrs.values())


def test_scale_mode_scales_the_accumulator_wherever_tiles_fit_in_scale_blocks():
    import torch

    from kernels.triton_tiles import scale_mode

    w = torch.zeros(1, 32768, 64, dtype=torch.int8)
    assert scale_mode(w, None, 128) == (32768, "none")
    assert scale_mode(w, torch.ones(1, 1, 64), 128) == (32768, "columns")
    assert scale_mode(w, torch.ones(1, 8, 64), 128) == (4096, "row_blocks")  # linear_1 as released
    assert scale_mode(w, torch.ones(1, 8, 64), 8192) == (4096, "per_element")
