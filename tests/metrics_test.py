"""Metrics: analytic model FLOPs, peak FLOP/s lookup and CPU measurement, MFU, JSONL/TensorBoard
writer with resume truncation, console progress, loss plot."""

import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.deepseek_v3
from dsjax.model.config import ModelConfig
from dsjax.model.transformer import count_params
from dsjax.testing import tiny_config
from dsjax.train import metrics
from dsjax.train.metrics import (
    MetricWriter,
    Progress,
    flops_breakdown,
    format_duration,
    forward_flops_per_token,
    mfu,
    peak_flops_per_device,
    plot_loss,
    train_flops_per_token,
)


def _matmul_flops(breakdown):
    """The main model's weight matmuls: everything but the attention core and the MTP modules."""
    return sum(v for k, v in breakdown.items() if k not in ("attention_core", "mtp"))


def _norm_params(cfg):
    """RMSNorm weights of the main model: 2 block norms + q_a norm + kv norm per layer, final."""
    per_layer = 2 * cfg.hidden_size + cfg.q_lora_rank + cfg.kv_lora_rank
    return cfg.num_hidden_layers * per_layer + cfg.hidden_size


# ---------------------------------------------------------------------------------- FLOPs


def test_flops_hand_worked_tiny_config():
    # D=32 H=4 d_q=16 C=16 d_n=8 d_r=8 d_v=8 F=48 F_moe=16 E=8 k=2 shared=1 V=64,
    # 3 layers (1 dense + 2 MoE), 1 MTP depth (MoE); sequence T=8.
    cfg = tiny_config()
    b = flops_breakdown(cfg, 8)
    # Projections: q_a 32*16=512, q_b 16*(4*16)=1024, kv_a 32*(16+8)=768, kv_b 16*(4*16)=1024,
    # o (4*8)*32=1024 -> 4352 weights, 8704 FLOPs per layer, x3 layers.
    assert b["attention_proj"] == 3 * 8704 == 26112
    # Core: 2*H*(16+8)=192 FLOPs per key, causal average context (8+1)/2=4.5 -> 864, x3.
    assert b["attention_core"] == 3 * 864 == 2592
    # Dense SwiGLU: 3*32*48=4608 weights -> 9216 FLOPs, one layer.
    assert b["dense_mlp"] == 9216
    # MoE: router 32*8=256 + (1 shared + 2 routed) * 3*32*16 = 4608 -> 4864 -> 9728, x2 layers.
    assert b["moe"] == 2 * 9728 == 19456
    # Head: 2*32*64 (the embedding lookup is free).
    assert b["head"] == 4096
    # MTP depth 1 over T-1=7 positions: eh_proj 2*64*32=4096 + proj 8704 + core 192*(7+1)/2=768
    # + MoE 9728 + head 4096 = 27392 per position, x 7/8 positions.
    assert b["mtp"] == 27392 * 7 / 8 == 23968
    assert forward_flops_per_token(cfg, 8) == 85440
    assert train_flops_per_token(cfg, 8) == 3 * 85440


def test_flops_without_q_lora_and_without_mtp():
    cfg = tiny_config(q_lora_rank=0, num_mtp_layers=0)
    b = flops_breakdown(cfg, 8)
    # q: 32*(4*16)=2048 replaces q_a+q_b: 2048+768+1024+1024=4864 weights -> 9728 FLOPs per layer.
    assert b["attention_proj"] == 3 * 9728
    assert b["mtp"] == 0
    assert forward_flops_per_token(cfg, 8) == 3 * 9728 + 2592 + 9216 + 19456 + 4096


@pytest.mark.parametrize(
    "overrides",
    [{}, {"q_lora_rank": 0}, {"n_routed_experts": 0}, {"tie_word_embeddings": True}],
    ids=["moe", "no_q_lora", "dense", "tied"],
)
def test_matmul_flops_are_twice_the_activated_weights(overrides):
    cfg = tiny_config(**overrides)
    counts = count_params(cfg)
    b = flops_breakdown(cfg, 16)
    # Exact: the activated count also holds the norm weights (no matmul) and nothing else.
    assert _matmul_flops(b) == 2 * (counts["activated"] - _norm_params(cfg))
    if cfg.n_routed_experts == 0:
        # Dense MTP: every MTP weight is activated; its norms are enorm, hnorm, head_norm + block's.
        block_norms = 2 * cfg.hidden_size + cfg.q_lora_rank + cfg.kv_lora_rank
        mtp_norms = 3 * cfg.hidden_size + block_norms
        mtp_core = 2 * 4 * (16 + 8) * (15 + 1) / 2
        mtp_head = 2 * cfg.hidden_size * cfg.vocab_size
        expected = 2 * (counts["mtp"] - mtp_norms) + mtp_core + mtp_head
        assert b["mtp"] == pytest.approx(expected * 15 / 16, rel=1e-12)


def test_flops_deepseek_v3():
    cfg = ModelConfig(**configs.deepseek_v3.get_config().model)
    b = flops_breakdown(cfg, 4096)
    # Worked by hand. Projections per layer: q_a 7168*1536 = 11,010,048; q_b 1536*128*192 =
    # 37,748,736; kv_a 7168*576 = 4,128,768; kv_b 512*128*256 = 16,777,216; o 16384*7168 =
    # 117,440,512; sum 187,105,280 -> 374,210,560 FLOPs, x61 layers.
    assert b["attention_proj"] == 61 * 374_210_560 == 22_826_844_160
    # Core: 2*128*(192+128) = 81,920 FLOPs per key x (4096+1)/2 = 2048.5 keys, x61.
    assert b["attention_core"] == 61 * 167_813_120 == 10_236_600_320
    # Dense: 3*7168*18432 = 396,361,728 -> 792,723,456 FLOPs, x3 layers.
    assert b["dense_mlp"] == 3 * 792_723_456
    # MoE: router 7168*256 = 1,835,008 + 9 experts * 3*7168*2048 (44,040,192) = 398,196,736
    # -> 796,393,472 FLOPs, x58 layers.
    assert b["moe"] == 58 * 796_393_472 == 46_190_821_376
    assert b["head"] == 2 * 7168 * 129280 == 1_853_358_080
    # MTP: eh_proj 2*14336*7168 = 205,520,896 + proj 374,210,560 + core 81,920*2048 = 167,772,160
    # + MoE 796,393,472 + head 1,853,358,080 = 3,397,255,168, x 4095/4096.
    assert b["mtp"] == 3_397_255_168 - 3_397_255_168 // 4096 == 3_396_425_760
    forward = 86_882_220_064  # the six lines above
    assert forward_flops_per_token(cfg, 4096) == forward
    train = train_flops_per_token(cfg, 4096)
    assert train == 3 * forward == 260_646_660_192
    # ~6 x 37B activated (222 GFLOPs) + ~31 GFLOPs of attention core + ~10 GFLOPs of MTP.
    assert 6 * 37e9 < train < 6 * 37e9 * 1.2
    # The weight matmuls are 2 x the activated parameters (37B, embedding excluded), to < 2 %
    # (in fact they differ only by the 1,006,592 norm weights).
    activated = count_params(cfg)["activated"]
    assert _matmul_flops(b) == pytest.approx(2 * activated, rel=0.02)
    assert _matmul_flops(b) == 2 * (activated - _norm_params(cfg))
    assert _norm_params(cfg) == 1_006_592


def test_flops_rejects_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len"):
        flops_breakdown(tiny_config(), 0)


def test_attention_core_grows_linearly_with_context():
    cfg = tiny_config(num_mtp_layers=0)
    short, long = flops_breakdown(cfg, 7), flops_breakdown(cfg, 15)
    assert long["attention_core"] == 2 * short["attention_core"]  # context 4 -> 8
    assert long["moe"] == short["moe"]


# ---------------------------------------------------------------------------------- peak / MFU


def test_mfu_arithmetic():
    # 1000 tok/s x 6 GFLOP/token = 6 TFLOP/s over 8 devices of 1 TFLOP/s each.
    assert mfu(1000.0, 6e9, 1e12, 8) == pytest.approx(0.75)
    assert mfu(1000.0, 6e9, 1e12) == pytest.approx(6.0)
    assert mfu(1000.0, 6e9, None, 8) is None


class FakeDevice:
    def __init__(self, device_kind, platform="gpu"):
        self.device_kind = device_kind
        self.platform = platform


@pytest.mark.parametrize(
    "kind,dtype,expected",
    [
        ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12),
        ("NVIDIA H100 80GB HBM3", "float32", 494.7e12),
        ("NVIDIA H100 PCIe", "bfloat16", 756e12),
        ("NVIDIA H200", jnp.bfloat16, 989e12),
        ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
        ("NVIDIA A100-SXM4-40GB", np.float32, 156e12),
        ("NVIDIA L4", "bfloat16", 121e12),
        ("NVIDIA L40S", "bfloat16", 362e12),
        ("TPU v4", "bfloat16", 275e12),
        ("TPU v5 lite", "bfloat16", 197e12),
        ("TPU v5", "bfloat16", 459e12),
        ("TPU v5p", "float32", 459e12),
        ("TPU v6 lite", "bfloat16", 918e12),
    ],
)
def test_peak_flops_table(kind, dtype, expected):
    platform = "tpu" if kind.startswith("TPU") else "gpu"
    value, source = peak_flops_per_device(FakeDevice(kind, platform), dtype)
    assert value == expected
    assert kind in source


def test_peak_flops_unknown_device():
    value, source = peak_flops_per_device(FakeDevice("NVIDIA GeForce GTX 1080"))
    assert value is None
    assert "unknown" in source


def test_peak_flops_bad_dtype():
    with pytest.raises(ValueError, match="dtype"):
        peak_flops_per_device(FakeDevice("TPU v4", "tpu"), "int8")


def test_cpu_peak_is_measured_and_cached():
    first = metrics.measure_cpu_peak_flops("float32", size=256, repeats=2)
    assert first > 1e8  # any CPU does > 0.1 GFLOP/s on a 256 matmul
    assert metrics.measure_cpu_peak_flops("float32", size=256, repeats=2) == first
    value, source = peak_flops_per_device(FakeDevice("cpu", "cpu"), "float32")
    assert value > 1e8 and "measured" in source
    real, _ = peak_flops_per_device(jax.devices("cpu")[0], "float32")
    assert real == value  # same measurement, cached


# ---------------------------------------------------------------------------------- writer


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _tb_scalars(path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of a TensorBoard event file (TFRecord framing: u64 length,
    u32 crc, the Event proto, u32 crc)."""
    from tensorboardX.proto import event_pb2

    data, out, i = path.read_bytes(), {}, 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "little")
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_metric_writer_jsonl_tensorboard_and_resume(tmp_path):
    with MetricWriter(tmp_path) as w:
        for step in range(1, 6):
            w.write(step, {"loss": np.float32(5.0 - step), "lr": jnp.asarray(1e-3), "n": 3})
        w.write(6, {"loss": float("nan")})
    records = _read(tmp_path / "metrics.jsonl")  # strict JSON: json.loads would accept NaN
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0] == {"step": 1, "loss": 4.0, "lr": pytest.approx(1e-3), "n": 3.0}
    assert records[-1]["loss"] is None and "NaN" not in (tmp_path / "metrics.jsonl").read_text()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents*"))
    assert len(events) == 1
    scalars = _tb_scalars(events[0])
    assert scalars["loss"][:5] == [(s, 5.0 - s) for s in range(1, 6)]
    assert [s for s, _ in scalars["n"]] == [1, 2, 3, 4, 5] and {v for _, v in scalars["n"]} == {3}

    # A run killed mid-line, then resumed from the checkpoint at step 3.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')
    with MetricWriter(tmp_path, resume_step=3) as w:
        assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [1, 2, 3]
        w.write(4, {"loss": 0.5})
        # Flushed per line: visible before close.
        assert [r["step"] for r in _read(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
    assert _read(tmp_path / "metrics.jsonl")[-1] == {"step": 4, "loss": 0.5}


def test_metric_writer_non_chief_writes_nothing(tmp_path):
    w = MetricWriter(tmp_path / "run", is_chief=False, resume_step=0)
    w.write(1, {"loss": 1.0})
    w.close()
    assert not (tmp_path / "run").exists()


def test_metric_writer_without_tensorboard(tmp_path):
    w = MetricWriter(tmp_path, use_tensorboard=False)
    w.write(0, {"loss": 2.0})
    w.close()
    assert not (tmp_path / "tensorboard").exists()
    assert _read(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 2.0}]
    with pytest.raises(RuntimeError, match="close"):
        w.write(1, {"loss": 1.0})


# ---------------------------------------------------------------------------------- progress


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_format_duration():
    assert format_duration(0) == "0s"
    assert format_duration(42.4) == "42s"
    assert format_duration(252) == "4m12s"
    assert format_duration(3900) == "1h05m"
    assert format_duration(2 * 86400 + 3 * 3600 + 59) == "2d03h"
    assert format_duration(float("inf")) == "?"
    assert format_duration(-1) == "?"


def test_progress_plain_lines_with_ema_eta():
    out, clock = io.StringIO(), FakeClock()
    p = Progress(100, start_step=0, stream=out, clock=clock)
    clock.t = 10.0  # 10 steps in 10 s: 1 s/step
    p.update(10, {"loss": 3.21449, "tokens_per_sec": 8123.0, "mfu": 0.1234})
    clock.t = 30.0  # 10 steps in 20 s: EMA 0.3 * 2 + 0.7 * 1 = 1.3 s/step, 80 left -> 104 s
    p.update(20, {"loss": 3.0, "tokens_per_sec": 1.5e6})
    p.close()
    lines = out.getvalue().splitlines()
    assert lines == [
        "step 10/100 [##------------------] loss 3.214 | 8.1k tok/s | MFU 12.3% | ETA 1m30s",
        "step 20/100 [####----------------] loss 3.000 | 1.5M tok/s | ETA 1m44s",
    ]
    assert "\r" not in out.getvalue()


def test_progress_tty_redraws_one_line():
    class TTY(io.StringIO):
        def isatty(self):
            return True

    out, clock = TTY(), FakeClock()
    p = Progress(4, start_step=2, stream=out, clock=clock)
    clock.t = 5.0
    p.update(3, {"loss": 10.0, "eval_loss": 9.5})
    p.update(4, {})
    assert "\n" not in out.getvalue() and out.getvalue().count("\r") == 2
    p.close()
    text = out.getvalue()
    assert text.endswith("\n")
    assert "step 3/4 [###############-----] loss 10.000 | eval 9.500 | ETA 5s" in text
    assert "step 4/4 [####################] ETA 0s" in text


# ---------------------------------------------------------------------------------- plot


@pytest.mark.parametrize("case", ["train_and_eval", "single_point", "empty"])
def test_plot_loss(tmp_path, case):
    path = tmp_path / "metrics.jsonl"
    records = {
        "train_and_eval": [{"step": s, "loss": 5.0 / s} for s in range(1, 30)]
        + [{"step": 10, "eval_loss": 0.6, "eval_bpb": 0.3}, {"step": 20, "eval_loss": 0.4}],
        "single_point": [{"step": 1, "loss": 4.0}],
        "empty": [],
    }[case]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = plot_loss(path, tmp_path / "plots" / "loss.png")
    data = out.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000


def test_loss_curves_compare_main_cross_entropy_like_with_like():
    """The plotted training curve is the main CE (what eval_loss measures), not the optimised
    total; MTP CE is its own series; smoothing is debiased (a constant stays constant)."""
    records = [{"step": 0, "eval_loss": 7.5}] + [
        {"step": s, "loss": 6.0 + 0.3 * 7.0, "main_ce": 6.0, "mtp_ce": 7.0, "balance": 1.0}
        for s in range(1, 21)
    ]
    records[-1]["eval_loss"] = 6.1
    curves = metrics.loss_curves(records)
    assert "train_total" not in curves
    assert curves["train"] == [(s, 6.0) for s in range(1, 21)]
    assert [s for s, _ in curves["train_smoothed"]] == list(range(1, 21))
    assert [v for _, v in curves["train_smoothed"]] == pytest.approx([6.0] * 20)
    assert curves["mtp"] == [(s, 7.0) for s in range(1, 21)]
    assert curves["eval"] == [(0, 7.5), (20, 6.1)]
    assert metrics.smooth([1.0, 0.0], 0.5) == pytest.approx([1.0, 1 / 3])  # (0.5*0.5)/(1-0.25)
    old = metrics.loss_curves([{"step": 1, "loss": 4.0}, {"step": 1, "mtp_ce": 0.0}])
    assert old["train_total"] == [(1, 4.0)] and "mtp" not in old  # logs without main_ce / MTP


# ------------------------------------------------------------- bits per byte, sample line checks


@pytest.fixture(scope="module")
def byte_level_tokenizer():
    from dsjax.text.tokenizer import train_bpe

    texts = ["def héllo(wörld):\n    return 'naïve' + \"日本語\"\n", "x = '🎉\\t' # ok\n"]
    return train_bpe(texts * 4, 300)


def test_token_byte_lengths_sum_to_the_utf8_bytes_of_the_text(byte_level_tokenizer):
    """Hand check: Σ bytes per target token = len(text.encode()) for text with 2-, 3- and 4-byte
    characters split across pieces (a piece decoded alone is U+FFFD), specials count 0."""
    tok = byte_level_tokenizer
    table = metrics.token_byte_lengths(tok, size=tok.vocab_size + 5)
    assert len(table) == tok.vocab_size + 5 and table[-5:] == [0] * 5
    assert [table[i] for i in (tok.pad_id, tok.bos_id, tok.eos_id)] == [0, 0, 0]
    text = "def naïve():\n    s = '日本語 🎉 wörld'\n"
    ids = tok.encode(text)
    assert any(tok.decode([i]) == "\ufffd" for i in ids)  # the case decode-alone gets wrong
    assert sum(table[i] for i in [tok.bos_id, *ids, tok.eos_id]) == len(text.encode("utf-8"))
    assert sum(table[i] for i in tok.encode("abc")) == 3
    with pytest.raises(ValueError, match="smaller than the tokenizer's vocab_size"):
        metrics.token_byte_lengths(tok, size=10)


def test_bits_per_byte_hand_worked():
    # 12 tokens at 2 nats each over 16 bytes: 24 / ln 2 / 16 bits per byte.
    assert metrics.bits_per_byte(24.0, 16) == pytest.approx(24 / np.log(2) / 16, rel=1e-12)
    assert metrics.bits_per_byte(8 * np.log(2), 8) == pytest.approx(1.0)
    assert metrics.bits_per_byte(1.0, 0) is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("def f(x):\n    return x + 1\n", (2, 2)),
        ("  else:\n  except ValueError as e:\n  finally:\n  elif y:\n", (4, 4)),
        ("@decorator(1)\nclass A(B):\n  # a comment (\n\n   \nx = 1  # ok\n", (3, 3)),
        ("def Returning.\nimporting an can be be the\n_enter__(self):\nx = (\n", (0, 4)),
        ("for i in range(3):\n    print(i\n    y = [1, 2,\n", (1, 3)),
        ("", (0, 0)),
    ],
)
def test_python_line_check(text, expected):
    assert metrics.python_line_check(text) == expected


@pytest.mark.parametrize(
    "kind, bandwidth, fp8",
    [
        ("NVIDIA H100 80GB HBM3", 3.35e12, 1979e12),
        ("NVIDIA H100 PCIe", 2.0e12, 1513e12),
        ("NVIDIA H200", 4.8e12, 1979e12),
        ("NVIDIA A100-SXM4-80GB", 2.039e12, None),
        ("NVIDIA A100-SXM4-40GB", 1.555e12, None),
        ("TPU v5 lite", 819e9, None),
        ("TPU v5", 2765e9, None),
        ("TPU v6 lite", 1640e9, None),
    ],
)
def test_device_memory_table(kind, bandwidth, fp8):
    platform = "tpu" if kind.startswith("TPU") else "gpu"
    value, source = metrics.memory_bandwidth_per_device(FakeDevice(kind, platform))
    assert value == bandwidth and kind in source
    assert metrics.peak_fp8_flops_per_device(FakeDevice(kind, platform))[0] == fp8


def test_device_memory_unknown_and_cpu():
    assert metrics.memory_bandwidth_per_device(FakeDevice("NVIDIA GeForce GTX 1080"))[0] is None
    value, source = metrics.memory_bandwidth_per_device(FakeDevice("cpu", "cpu"), mib=16)
    assert value > 1e8 and "measured" in source  # any CPU streams > 0.1 GB/s
    assert metrics.peak_fp8_flops_per_device(FakeDevice("cpu", "cpu"))[0] is None
