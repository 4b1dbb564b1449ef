"""bench/common.py's kernel categories: how the breakdowns (bench/lora.py, bench/step.py) group a profile."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import common  # noqa: E402

sys.path.remove(str(ROOT / "bench"))


@pytest.mark.parametrize("name,category", [
    # cuBLAS on Hopper (nvjet and the older sm90 xmma names), and a cutlass GEMM
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNN", "gemm (cublas)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1", "gemm (cublas)"),
    ("void cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm_bf16_16x16_128x2_tn_align8>", "gemm (cublas)"),
    # attention before the GEMM rule: memory-efficient attention's name has "cutlass" in it
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false>>", "attention"),
    ("_attn_bwd_dkdv_kernel", "attention"),
    ("_decode_attn_combine_kernel", "attention"),
    # bezoar's Triton kernels by name; the fused norm / SwiGLU + LoRA kernels apart from plain LoRA and norm
    ("_lora_dx_da_kernel", "lora"),
    ("_tma_bwd_kernel", "lora"),
    ("_norm_lora_bwd_kernel", "norm + lora (fused)"),
    ("_swiglu_lora_fwd_kernel", "swiglu + lora (fused)"),
    ("_swiglu_bwd_kernel", "swiglu"),
    ("_rms_norm_fwd_kernel", "rmsnorm"),
    ("_nf4_dequantize_kernel", "nf4 dequantize"),
    ("_nf4_gemv_kernel", "nf4 matmul (triton)"),
    ("_nf4_tma_fwd_kernel", "nf4 matmul (triton)"),
    ("_rope_kernel", "rope"),
    ("_ce_rows_kernel", "cross-entropy"),
    # PyTorch's own kernels
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor<float, 4>>",
     "optimizer"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)",
     "copy / fill"),
    ("Memcpy DtoD (Device -> Device)", "copy / fill"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "copy / fill"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t>>",
     "reduction"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "elementwise"),
    # names from an H100 profile (torch 2.11, CUDA 13): a layout-changing copy, cuBLAS's gemv
    ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
     "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const>", "copy / fill"),
    ("void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, float, 128, 16, 4, 4, false, "
     "false, cublasGemvParams<cublasGemvTensorStridedBatched<__nv_bfloat16 const>>>", "gemm (cublas)"),
    ("_nf4_merge_kernel", "nf4 dequantize"),  # the merged LoRA path's dequantize
    # CPU operators (smoke runs)
    ("aten::addmm_", "gemm (cublas)"),
    ("aten::copy_", "copy / fill"),
    ("something_new", "other"),
])
def test_kernel_category(name, category):
    assert common.kernel_category(name) == category


def test_category_totals_sums_and_orders():
    rows = [{"kernel": "nvjet_tst_a", "calls_per": 2.0, "us_per": 300.0},
            {"kernel": "nvjet_tst_b", "calls_per": 1.0, "us_per": 100.0},
            {"kernel": "_lora_down_kernel", "calls_per": 1.0, "us_per": 50.0},
            {"kernel": "mystery", "calls_per": 3.0, "us_per": 50.0}]
    totals = common.category_totals(rows)
    assert [c["category"] for c in totals][0] == "gemm (cublas)"
    gemm = totals[0]
    assert gemm["kernels"] == 2 and gemm["calls_per"] == 3.0 and gemm["us_per"] == 400.0
    assert gemm["share"] == pytest.approx(0.8)
    assert sum(c["share"] for c in totals) == pytest.approx(1.0)
    assert common.category_totals([]) == []


class _Event:
    def __init__(self, key, us, count=2):
        self.key, self.count, self.self_cpu_time_total = key, count, us


class _Profile:
    def __init__(self, events):
        self.events = events

    def key_averages(self):
        return self.events


def test_kernel_rows_files_each_kernel_by_its_whole_name():
    """Rows show names cut to 90 characters, but the category comes from the whole name: the copy below
    says "copy" only past character 90."""
    long_copy = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
                 "direct_copy_kernel_cuda(at::TensorIteratorBase&)>")
    assert "copy" not in long_copy[:90]
    rows, total = common.kernel_rows(_Profile([_Event(long_copy, 30.0), _Event("aten::mm", 90.0),
                                               _Event("aten::view", 0.0)]), per=2, cuda=False)
    assert total == pytest.approx(60.0)  # us per call over the two calls; zero-time rows dropped
    assert [r["category"] for r in rows] == ["gemm (cublas)", "copy / fill"]
    assert rows[1]["kernel"] == long_copy[:90] and rows[1]["us_per"] == pytest.approx(15.0)
    assert rows[0]["share"] == pytest.approx(0.75) and rows[0]["calls_per"] == pytest.approx(1.0)
    totals = common.category_totals(rows)
    assert [c["category"] for c in totals] == ["gemm (cublas)", "copy / fill"]


def test_wall_ms_times_long_calls_few_times(monkeypatch):
    """wall_ms: one warm-up call, then three timed calls, or one where the warm-up was long (do_bench would
    make about eight of a multi-second generation); the median of what it timed."""
    import common

    calls = []
    durations = iter([5.0, 0.030, 0.010, 0.020])  # seconds: warm-up, then three timed calls

    def fake_call():
        calls.append(1)

    clock = {"now": 0.0}
    pending = []

    def perf_counter():
        # each call of fn advances the clock by its next duration, read at the second stamp of a call
        if pending:
            clock["now"] += pending.pop()
        else:
            pending.append(next(durations))
        return clock["now"]

    monkeypatch.setattr(common.time, "perf_counter", perf_counter)
    assert common.wall_ms(fake_call, long_s=10.0) == pytest.approx(20.0)  # 5 s warm-up under long_s: 3 timed, median 20 ms
    assert len(calls) == 4
    calls.clear()
    durations = iter([5.0, 7.0])
    assert common.wall_ms(fake_call, long_s=2.0) == pytest.approx(7000.0)  # a 5 s warm-up: one timed call
    assert len(calls) == 2
    calls.clear()
    durations = iter([0.001, 0.002])
    assert common.wall_ms(fake_call, smoke=True) == pytest.approx(2.0) and len(calls) == 2


def test_results_name_the_commit_the_call_passes(monkeypatch, tmp_path):
    """On a lent GPU machine git reads the copy's .git, which can be an earlier call's (files said
    764e428b5f1c-dirty for code of a later commit): BEZOAR_COMMIT, which the device call passes, wins, and
    the JSON says where its commit came from; without it, git's HEAD as before."""
    import json

    class Args:
        smoke = False
        out = str(tmp_path)

    monkeypatch.setattr(common, "device_info", lambda: {"device": "cpu"})
    monkeypatch.setenv("BEZOAR_COMMIT", "0123456789ab")
    path = common.write_results("nf4-graph", [{"M": 1}], Args, extra={"complete": True})
    written = json.loads(path.read_text())
    assert written["commit"] == "0123456789ab" and written["commit_source"] == "BEZOAR_COMMIT"
    monkeypatch.delenv("BEZOAR_COMMIT")
    written = json.loads(common.write_results("nf4-graph", [{"M": 1}], Args).read_text())
    assert written["commit"] == common._git_head() and written["commit_source"] == "git"
    assert written["commit"] != "0123456789ab"


def test_results_name_the_peer_libraries_versions():
    """The README's figures quote the transformers and peft versions the peers ran with: every results file
    now records them beside torch, triton and bitsandbytes (None where one is not installed)."""
    import importlib.metadata

    info = common.device_info()
    for name in ("bitsandbytes", "transformers", "peft"):
        try:
            want = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            want = None
        assert info[name] == want, name
