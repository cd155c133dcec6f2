"""The engine's model (weight_sync/model.py) equals transformers' LlamaForCausalLM: the same
random weights (no download), fp32, logits of every position within 1e-4, at engine TP 1 (this
process) and TP 2 (2 gloo ranks, as vLLM holds the shards: fused qkv_proj and gate_up_proj), for
a config with its own rope_theta and rms_norm_eps, and one with Llama 3's rope_scaling whose
single KV head is replicated on both TP ranks. The config is read from HF's LlamaConfig.

Also a program: torchrun --nproc-per-node 2 tests/test_model_vs_transformers.py CONFIG"""

import os
import sys

import pytest
import torch
import transformers

from weight_sync.model import forward, hf_config, shape_from_hf
from weight_sync.vllm_layout import hf_to_vllm

from conftest import run_ranks, text

CONFIGS = {  # HF LlamaConfig arguments
    "plain": dict(  # 2 KV heads: one per rank at TP 2
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
    ),
    "llama3": dict(  # Llama 3's rope scaling; 1 KV head: replicated at TP 2
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        max_position_embeddings=2048,
        rope_scaling={  # wavelengths on both sides of 256/4..256 and between: all three cases
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
}
TOKENS = [3, 250, 17, 42, 101, 7, 7, 199, 64, 5, 128, 255, 0, 90, 33, 12]
TOLERANCE = 1e-4


def hf_model(name):
    """transformers' model of CONFIGS[name], weights drawn from a fixed seed (large enough that
    the logits are O(1), so 1e-4 means something), and the course's shape read from its config."""
    config = transformers.LlamaConfig(**CONFIGS[name], tie_word_embeddings=False)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).float().eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            p.copy_(1 + 0.1 * noise if pname.endswith("norm.weight") else 0.15 * noise)
    return model, shape_from_hf(config)


def both_logits(name, tp_rank=0, tp_size=1, tp_group=None):
    model, shape = hf_model(name)
    hf = {k: v.detach() for k, v in model.state_dict().items()}
    with torch.no_grad():
        theirs = model(torch.tensor([TOKENS])).logits[0]
    mine = forward(
        hf_to_vllm(hf, shape, tp_rank, tp_size),
        shape,
        TOKENS,
        tp_rank,
        tp_size,
        tp_group,
        every_position=True,
    )
    return mine, theirs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tp1_logits_equal_transformers(name):
    mine, theirs = both_logits(name)
    assert theirs.abs().max() > 0.5  # logits large enough for the tolerance to mean something
    assert (mine - theirs).abs().max() < TOLERANCE, (mine - theirs).abs().max()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_tp2_logits_equal_transformers(name):
    result = run_ranks(__file__, 2, [name], timeout=240)
    out = text(result)
    assert result.returncode == 0, out
    assert out.count("equal within") == 2, out


def test_config_is_read_not_hard_coded():
    shape = shape_from_hf(transformers.LlamaConfig(**CONFIGS["llama3"]))
    assert (shape.rope_theta, shape.rms_norm_eps, shape.kv_heads) == (500000.0, 1e-5, 1)
    assert shape.rope_scaling["original_max_position_embeddings"] == 256
    assert shape_from_hf(CONFIGS["plain"]).rope_theta == 10000.0  # a config.json dict
    assert shape_from_hf(hf_config(shape)) == shape  # and back
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        shape_from_hf({**CONFIGS["plain"], "tie_word_embeddings": True})


if __name__ == "__main__":  # one rank of engine TP 2
    import torch.distributed as dist

    from weight_sync.groups import make_group, seconds, torchrun_store

    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    store = dist.PrefixStore("tp/", torchrun_store(seconds(60)))
    group = make_group(store, rank, size, "gloo", "cpu", seconds(60), "tp")
    mine, theirs = both_logits(sys.argv[1], rank, size, group)
    gap = (mine - theirs).abs().max().item()
    sys.stdout.write(f"[rank {rank}] logits {'equal within' if gap < TOLERANCE else 'DIFFER:'}")
    sys.stdout.write(f" {TOLERANCE:g}: largest gap {gap:.2e}\n")
    group.close()
    sys.exit(0 if gap < TOLERANCE else 1)
