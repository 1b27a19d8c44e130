"""Expert parallelism with data-parallel attention (`gpu.expert_parallel`, `ExpertParallelCost`): the HBM
left for KV, the all-to-alls, the busiest GPU's routed load and weight reads, and the config's edge."""
import math

import pytest

from sim.cli import main
from sim.collectives import LinkAllToAll, alltoall_bytes_per_gpu
from sim.config import load_config
from sim.costmodel import ExpertParallelCost, RooflineCost, build_cost_model, busiest_gpu_pairs
from sim.errors import KvsimError
from sim.models import MODELS, ModelShape

# 2 layers, hidden 64, 4 heads of 16 (2 KV heads), 8 experts of width 32, top-2, vocab 100. Parameters:
# attention 64x64 + 2 x 64x32 + 64x64 = 12,288 a layer; an expert 3 x 64 x 32 = 6,144; the router 64 x 8 = 512;
# embeddings and head 2 x 100 x 64 = 12,800. Non-expert: 2 x (12,288 + 512) + 12,800 = 38,400; routed 2 x 8 x 6,144
# = 98,304.
TINY = ModelShape("tiny-moe", 2, 64, 4, 2, 128, 100, 4096, experts=8, experts_per_token=2, expert_intermediate=32)


def _ep(shape=TINY, gpus=4, alltoall=None, efficiency=None, bw_gbps=1.0):
    # compute 1e18 FLOP/s: every step here is memory-bound; MFU and MBU 1
    return ExpertParallelCost(shape, gpus, 1e18, bw_gbps, 1.0, 1.0, 25.0, 25.0, 6.0, 3.0, alltoall=alltoall,
                              efficiency=efficiency)


def test_each_gpu_holds_the_non_expert_weights_whole_and_its_share_of_the_experts():
    assert TINY.routed_expert_bytes == 98_304 * 2
    # 38,400 x 2 bytes + 98,304 x 2 / 4
    assert TINY.expert_parallel_weight_bytes(4) == 76_800 + 49_152


def _cfg(model, ep, count=8, gpu="h200", **more):
    return load_config("configs/default.yaml", {"model": model, "gpu.name": gpu, "gpu.count": count,
                                                "gpu.expert_parallel": ep, **more})


def test_mla_kv_room_is_n_gpus_worth_under_ep_and_one_copy_under_tp():
    s = MODELS["deepseek-v3"]
    hbm = 8 * 141e9 * 0.9  # h200, reserved_fraction 0.1
    non_expert = s.weight_bytes - s.routed_expert_bytes
    tp = build_cost_model(_cfg("deepseek-v3", False)).hbm_kv_bytes
    ep = build_cost_model(_cfg("deepseek-v3", True)).hbm_kv_bytes
    # TP: the latent is replicated on all 8 GPUs, so one copy's room is an eighth of what the weights leave
    assert tp == pytest.approx((hbm - s.weight_bytes) / 8, rel=1e-12)
    # EP: 8 x (HBM per GPU x 0.9 - non-expert weights - routed / 8), nothing replicated
    assert ep == pytest.approx(8 * (141e9 * 0.9 - non_expert - s.routed_expert_bytes / 8), rel=1e-12)
    assert ep > 5 * tp


def test_gqa_kv_room_under_ep_pays_the_replicated_non_expert_weights():
    s = MODELS["qwen3-235b-a22b"]  # 4 KV heads: TP 8 holds each twice
    hbm = 8 * 80 * 2**30 * 0.9
    tp = build_cost_model(_cfg("qwen3-235b-a22b", False, gpu="h100-80gb")).hbm_kv_bytes
    ep = build_cost_model(_cfg("qwen3-235b-a22b", True, gpu="h100-80gb")).hbm_kv_bytes
    assert tp == pytest.approx((hbm - s.weight_bytes) * 4 / 8, rel=1e-12)
    assert ep == pytest.approx(hbm - 8 * s.expert_parallel_weight_bytes(8), rel=1e-12)


def test_all_to_all_sends_each_tokens_top_k_hidden_states_off_gpu():
    # 16 tokens x top-2 x 3/4 off-GPU x 64 x 2 bytes (bf16)
    assert alltoall_bytes_per_gpu(TINY, 16, 4) == 3072
    a2a = LinkAllToAll(100.0, 10e-6)
    assert a2a(3072, 4) == pytest.approx(10e-6 + 3072 / 100e9)
    assert a2a(3072, 1) == 0.0
    # a batched prefill of 64 tokens spread over 4 GPUs: 16 each, two all-to-alls in each (MoE) layer
    assert _ep(alltoall=a2a).comm_layer_s(64) == pytest.approx(2 * (10e-6 + 3072 / 100e9))


def test_all_to_alls_are_charged_on_the_moe_layers_only():
    s = MODELS["deepseek-v3"]  # 3 dense layers of 61
    c = ExpertParallelCost(s, 8, 989e12, 4800.0, 0.55, 0.75, 25.0, 25.0, 6.0, 3.0,
                           alltoall=LinkAllToAll(450.0, 0.0))
    one = 8 * 8 * 7 / 8 * 7168 * 2 / 450e9  # 8 tokens a GPU, top-8, 7/8 off-GPU, bf16
    assert c.alltoall_layer_s(8) == pytest.approx(58 / 61 * 2 * one)


def test_busiest_gpu_routed_pairs_by_hand():
    # 4 tokens x top-2 = 8 pairs over 4 GPUs: mean 2, std sqrt(8 x 1/4 x 3/4) = 1.2247, sqrt(2 ln 4) = 1.6651
    assert busiest_gpu_pairs(4, 2, 4) == pytest.approx(2 + 1.6651092 * 1.2247449, rel=1e-6)
    # one token, one expert, 2 GPUs: 0.5 + 1.1774 x 0.5 > 1 pair: capped at every pair
    assert busiest_gpu_pairs(1, 1, 2) == 1.0
    assert busiest_gpu_pairs(100, 8, 1) == 800


def test_decode_step_reads_the_full_non_expert_weights_on_every_gpu():
    c = _ep()
    # one sequence over 100 tokens on 4 GPUs at 1 GB/s each: its GPU reads, per layer, the non-expert
    # weights (12,800 params x 2 bytes = 25,600), its experts touched by the busiest GPU's routed pairs
    # (busiest_gpu_pairs(1, 2, 4) = 0.5 + 1.6651 x sqrt(0.375) = 1.5197 pairs over its 2 experts:
    # 2 (1 - 0.5^1.5197) = 1.3022 experts of 6,144 x 2 bytes) and the sequence's KV (2 x 2 heads x 16 x 2
    # bytes = 128 a token, nothing replicated); then the LM head whole (100 x 64 x 2 bytes)
    pairs = 0.5 + math.sqrt(2 * math.log(4) * 2 * 0.25 * 0.75)
    touched = 2 * (1 - 0.5 ** pairs)
    per_layer = 25_600 + 12_288 * touched + 128 * 100
    assert c.decode_step_s(1, 100) == pytest.approx((2 * per_layer + 12_800) / 1e9, rel=1e-12)
    # TP reads a quarter of every weight it touches on each GPU, the KV heads twice (2 KV heads on 4 GPUs)
    tp = RooflineCost(TINY, 4, 1e18, 1.0, 1.0, 1.0, 25.0, 25.0, 6.0, 3.0)
    tp_layer = 25_600 + 12_288 * 8 * (1 - 0.75) + 2 * 128 * 100
    assert tp.decode_step_s(1, 100) == pytest.approx((2 * tp_layer + 12_800) / 4e9, rel=1e-12)


def test_a_lone_request_runs_its_attention_on_one_gpu():
    a2a = LinkAllToAll(100.0, 5e-6)
    c = _ep(alltoall=a2a)
    # a step of one chunk is one request's prefill layer (all-to-alls of its 512 tokens from its one GPU)
    assert c.mixed_layer_s([(512, 300)], 0, 0.0) == pytest.approx(c.prefill_layer_s(512, 300), rel=1e-12)
    # 8 decodes of 50 tokens each on 4 GPUs: 2 a GPU, a quarter of the attention and KV each
    assert c.decode_step_s(8, 400) - c.decode_step_s(8, 0) == pytest.approx(2 * 128 * 400 / 4 / 1e9, rel=1e-12)
    # 2 decodes on 4 GPUs: 1 on the busiest, half the KV
    assert c.decode_step_s(2, 400) - c.decode_step_s(2, 0) == pytest.approx(2 * 128 * 400 / 2 / 1e9, rel=1e-12)


@pytest.mark.parametrize("model", ["qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b"])
@pytest.mark.parametrize("eff", ["measured", "constant"])
def test_decode_span_sums_the_steps_under_ep(model, eff):
    cfg = _cfg(model, True, **{"gpu.allreduce": "ring", "gpu.efficiency": eff})
    c = build_cost_model(cfg)
    assert isinstance(c, ExpertParallelCost)
    # (1, 525_600): across DeepSeek-V3's compute/memory crossing under the constant roofline (~525,700)
    for batch, ctx, k in ((1, 100, 300), (8, 8 * 90, 200), (64, 64 * 2000, 50), (1, 525_600, 300)):
        total, n = c.decode_span(batch, ctx, k)
        assert n == k
        assert total == pytest.approx(sum(c.decode_step_s(batch, ctx + batch * j) for j in range(k)), rel=1e-9)


def test_iteration_s_matches_iteration_under_ep():
    c = build_cost_model(_cfg("deepseek-v3", True, **{"gpu.allreduce": "ring"}))
    args = ([(256, 1000), (64, 0)], 12, 12 * 800, 1e-4)
    assert c.iteration_s(*args) == pytest.approx(c.iteration(*args).total_s, rel=1e-12)


@pytest.mark.parametrize("sets, needle", [
    ({"gpu.count": 1}, "needs gpu.count >= 2"),
    ({"model": "llama3.1-70b"}, "needs a MoE model"),
    ({"gpu.count": 3}, "to divide the 128 experts"),
    ({"hardware_profile": "configs/hardware/h100.yaml"}, "hardware_profile"),
])
def test_config_refuses_expert_parallel_it_cannot_price(sets, needle):
    over = {"model": "qwen3-235b-a22b", "gpu.name": "h100-80gb", "gpu.count": 8, "gpu.expert_parallel": True, **sets}
    with pytest.raises(KvsimError) as e:
        load_config("configs/default.yaml", over)
    msg = str(e.value)
    assert "\n" not in msg and "gpu.expert_parallel" in msg and needle in msg


def test_expert_parallel_off_keys_a_config_as_before():
    from sim.config import config_to_dict
    assert "expert_parallel" not in config_to_dict(_cfg("qwen3-235b-a22b", False))["gpu"]
    assert config_to_dict(_cfg("qwen3-235b-a22b", True))["gpu"]["expert_parallel"] is True


def test_kvsim_run_with_expert_parallel_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "moe.yaml"
    cfg.write_text("name: moe\nmodel: qwen3-30b-a3b\ngpu:\n  name: h100-80gb\n  count: 4\n  allreduce: ring\n"
                   "workload:\n  synthetic:\n    n_sessions: 4\n")
    assert main(["run", str(cfg), "--set", "gpu.expert_parallel=true"]) == 0
    out = capsys.readouterr().out
    assert "results: results/moe-" in out


def test_measured_efficiency_path_prices_each_gpus_kernels_by_hand():
    from sim.efficiency import RooflineEfficiency
    # every share of the peaks 1, no fixed or other-kernel terms: each kernel is its bytes at 1 GB/s
    flat = RooflineEfficiency(tokens=(1, 4096), gemm_flops=(1.0, 1.0), gemm_bw=(1.0, 1.0), attention_flops=1.0,
                              kv_bw=1.0, act_passes=0.0, layer_fixed_s=0.0)
    c = _ep(efficiency=flat)
    pairs = 0.5 + math.sqrt(2 * math.log(4) * 2 * 0.25 * 0.75)
    touched = 2 * (1 - 0.5 ** pairs)
    # one sequence over 100 tokens, per layer: the non-expert GEMMs read 25,600 bytes of weights plus one
    # token's activations at one GPU's width (2 bytes x (4 x 64 hidden + 2 x 64 q + 2 x 32 kv + 3 x 64 MLP
    # active width) = 1,280), the routed GEMMs its touched experts, attention 128 bytes a context token;
    # then the LM head whole
    per_layer = (25_600 + 1_280) + 12_288 * touched + 128 * 100
    assert c.decode_step_s(1, 100) == pytest.approx((2 * per_layer + 12_800) / 1e9, rel=1e-12)
