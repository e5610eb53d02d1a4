"""GPU benchmark of the activation engine on a random-weight decoder of the Qwen3.5-27B size class.

Nothing is downloaded: the model is built from a transformers config on the
GPU with random weights (bf16) and a synthetic word-level tokenizer is built
locally, so the engine's whole path (tokenise, length-sort, batch under a
text count and a padded-token budget, forward with hooks, pool, early stop)
runs as it does on the real checkpoint. Texts are random word sequences whose
token lengths are lognormal around ~200 tokens, capped at 512.

It reports, per (batch size, max batch tokens) setting, the engine's tokens/s
and its model FLOPs utilisation,

    MFU = 2 * (parameters of the blocks actually run) * tokens / seconds / peak bf16 FLOP/s

(the blocks after the deepest target layer are not run; embeddings cost no
FLOPs; attention's own FLOPs are not counted, so MFU is slightly understated),
against both the nominal H100/H200 SXM dense bf16 peak (989 TFLOP/s) and the
peak of a large bf16 matmul measured here; and the budget that maximises it.

Imports only torch, transformers, tokenizers and the project's engine modules
(amygdala_dagster.models / layers / activations). Total < 5 minutes.

    python benchmarks/gpu.py                       # on the lent GPU; JSON to $OUT/gpu_bench.json
    python benchmarks/gpu.py --tiny                # a CPU smoke test with a tiny config
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from _common import format_table, machine_info  # noqa: E402

NOMINAL_PEAK = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12}

# The Qwen3.5-27B text decoder's shape (hybrid: 3 linear-attention blocks per full-attention block).
QWEN3_5_27B = dict(
    vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
    num_attention_heads=24, num_key_value_heads=4, head_dim=256,
    linear_num_value_heads=48, linear_num_key_heads=16, linear_key_head_dim=128, linear_value_head_dim=128,
    linear_conv_kernel_dim=4, max_position_embeddings=32768,
)
# Fallback: a plain full-attention decoder of the same width, depth and MLP (Qwen3 layout).
QWEN3_SAME_SIZE = dict(
    vocab_size=248320, hidden_size=5120, intermediate_size=17408, num_hidden_layers=64,
    num_attention_heads=24, num_key_value_heads=4, head_dim=256, max_position_embeddings=32768,
)
TINY = dict(
    vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, linear_num_value_heads=4, linear_num_key_heads=2,
    linear_key_head_dim=32, linear_value_head_dim=32, linear_conv_kernel_dim=4, max_position_embeddings=2048,
)


def default_target_layers(num_layers: int) -> list[int]:
    """The train command's default (60/70/80 % of depth); repeated here so this script imports only
    the engine modules."""
    return sorted({min(num_layers - 1, max(0, round(f * num_layers) - 1)) for f in (0.6, 0.7, 0.8)})


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------- model and tokenizer
def build_tokenizer(vocab_words: int):
    """A word-level tokenizer over ``w0 .. w{n-1}`` plus <pad>, <s>, </s>, <unk>; prepends <s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for i in range(vocab_words):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=1 << 20)


def synthetic_texts(n: int, vocab_words: int, median_tokens: float, sigma: float, cap: int, seed: int) -> list[str]:
    """``n`` texts of random words; word counts lognormal(median, sigma), clipped to [8, cap + 64]
    (the engine truncates at ``cap`` tokens, as it would real text)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.exp(math.log(median_tokens) + sigma * torch.randn(n, generator=g)).round().clamp(8, cap + 64)
    texts = []
    for length in lengths.long().tolist():
        ids = torch.randint(0, vocab_words, (length,), generator=g).tolist()
        texts.append(" ".join(f"w{i}" for i in ids))
    return texts


def build_model(kind: str, shape: dict[str, Any], dtype: torch.dtype, device: str):
    import transformers

    if kind == "qwen3_5":
        cfg_cls = getattr(transformers, "Qwen3_5TextConfig", None)
        if cfg_cls is None:
            raise RuntimeError(f"transformers {transformers.__version__} has no Qwen3_5TextConfig")
        config = cfg_cls(**shape)
    elif kind == "qwen3":
        config = transformers.Qwen3Config(**{k: v for k, v in shape.items() if not k.startswith("linear_")})
    else:
        raise ValueError(kind)
    config.use_cache = False
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            # Built straight on the device: the random init (normal_) runs there, in seconds.
            model = transformers.AutoModel.from_config(config, dtype=dtype)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    model.requires_grad_(False)
    return model, config


def wrap(model, config, tokenizer, kind: str, device: str):
    from amygdala_dagster.models import LoadedModel

    param = next(model.parameters())
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=f"random-{kind}-{config.num_hidden_layers}L-{config.hidden_size}",
        revision=None, weights_hash=None, dtype=str(param.dtype).removeprefix("torch."), device=str(param.device),
        num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size), is_encoder=False,
        text_config=config,
    )


def block_params(loaded, deepest: int) -> tuple[int, int]:
    """(parameters in blocks 0..deepest, all parameters)."""
    from amygdala_dagster.layers import resolve_layers

    blocks = resolve_layers(loaded.model, loaded.num_layers).modules
    run = sum(p.numel() for b in blocks[: deepest + 1] for p in b.parameters())
    total = sum(p.numel() for p in loaded.model.parameters())
    return run, total


def measured_peak(device: str, dtype: torch.dtype, seconds: float = 3.0) -> float:
    """FLOP/s of a large square matmul in ``dtype`` on ``device``."""
    n = 8192 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    iters, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ b
        iters += 10
        sync()
    dt = time.perf_counter() - t0
    del a, b
    return 2 * n**3 * iters / dt


# ---------------------------------------------------------------------------- engine runs
def run_config(loaded, layers, texts, batch_size: int, max_batch_tokens: int, max_tokens: int) -> dict[str, Any]:
    from amygdala_dagster.activations import ActivationEngine

    engine = ActivationEngine(loaded, layers, pooling="mean", max_tokens=max_tokens, batch_size=batch_size,
                              max_batch_tokens=max_batch_tokens)
    on_cuda = loaded.device.startswith("cuda")
    # Warm-up on the longest texts (allocator, kernels) outside the timing.
    warm = sorted(texts, key=len, reverse=True)[: max(1, min(batch_size, 4))]
    for _ in engine.forward(warm):
        pass
    engine.stats = type(engine.stats)(device=loaded.device)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n = 0
    for idx, _pooled in engine.forward(texts):
        n += len(idx)
    if on_cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    st = engine.stats
    return {"batch_size": batch_size, "max_batch_tokens": max_batch_tokens, "texts": n, "tokens": st.tokens,
            "batches": st.batches, "seconds": dt, "tokens_per_s": st.tokens / dt, "oom_retries": st.oom_retries,
            "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 1024**3) if on_cuda else None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--arch", choices=("auto", "qwen3_5", "qwen3"), default="auto",
                   help="auto: Qwen3.5 unless missing or its torch-only linear attention is too slow")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    p.add_argument("--texts", type=int, default=None, help="texts per setting (default 384; --tiny 24)")
    p.add_argument("--median-tokens", type=float, default=200.0, help="(--tiny: 48)")
    p.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of the text lengths")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--layers", default=None,
                   help="target layers (default: the train command's 60/70/80%% of depth)")
    p.add_argument("--budget-s", type=float, default=270.0, help="stop starting settings after this many s")
    p.add_argument("--min-qwen35-tokens-per-s", type=float, default=1500.0,
                   help="auto: fall back to the Qwen3 layout when the Qwen3.5 probe is slower than this")
    p.add_argument("--json", type=Path, default=None, help="JSON output (default $OUT/gpu_bench.json if $OUT)")
    args = p.parse_args(argv)
    t_start = time.perf_counter()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = dict(TINY) if args.tiny else dict(QWEN3_5_27B)
    n_texts = args.texts or (24 if args.tiny else 384)
    if args.tiny and args.median_tokens == 200.0:
        args.median_tokens = 48.0
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    info = machine_info()
    log("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    try:
        import fla  # noqa: F401

        have_fla = True
    except Exception:  # noqa: BLE001
        have_fla = False
    log(f"flash-linear-attention kernels installed: {have_fla}")

    vocab_words = min(shape["vocab_size"] - 8, 50000)
    tokenizer = build_tokenizer(vocab_words)
    texts = synthetic_texts(n_texts, vocab_words, args.median_tokens, args.sigma, args.max_tokens, seed=1)
    probe_texts = texts[: max(8, n_texts // 12)]

    from amygdala_dagster.layers import parse_layers

    report: dict[str, Any] = {"machine": info, "fla": have_fla, "args": {k: str(v) for k, v in vars(args).items()}}
    candidates = ["qwen3_5", "qwen3"] if args.arch == "auto" else [args.arch]
    loaded = config = None
    for kind in candidates:
        t0 = time.perf_counter()
        try:
            model, config = build_model(kind, shape if kind == "qwen3_5" else {**shape}, dtype, device)
        except Exception as exc:  # noqa: BLE001 - missing class, OOM...
            log(f"{kind}: cannot build ({type(exc).__name__}: {exc}); trying the next layout")
            report.setdefault("skipped_arch", {})[kind] = f"{type(exc).__name__}: {exc}"
            gc.collect()
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            continue
        loaded = wrap(model, config, tokenizer, kind, device)
        layers = parse_layers(args.layers, loaded.num_layers) if args.layers else \
            default_target_layers(loaded.num_layers)
        run_p, total_p = block_params(loaded, max(layers))
        log(f"{kind}: built in {time.perf_counter() - t0:.1f}s: {total_p / 1e9:.2f}B parameters "
            f"({total_p:,}), {loaded.num_layers} layers, hidden {loaded.hidden_size}, {loaded.dtype} on "
            f"{loaded.device}; target layers {layers} -> {max(layers) + 1} blocks run, "
            f"{run_p / 1e9:.2f}B parameters in them")
        if args.arch == "auto" and kind == "qwen3_5" and len(candidates) > 1:
            probe = run_config(loaded, layers, probe_texts, 8, 16384, args.max_tokens)
            log(f"qwen3_5 probe: {probe['tokens_per_s']:,.0f} tokens/s on {probe['texts']} texts")
            report["qwen3_5_probe"] = probe
            if probe["tokens_per_s"] < args.min_qwen35_tokens_per_s and not args.tiny:
                log(f"qwen3_5: torch-only linear attention too slow here (< {args.min_qwen35_tokens_per_s:,.0f} "
                    "tokens/s); falling back to the Qwen3 full-attention layout of the same size")
                report.setdefault("skipped_arch", {})["qwen3_5"] = "too slow without flash-linear-attention"
                del model, loaded
                loaded = None
                gc.collect()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
                continue
        report.update(arch=kind, params=total_p, params_in_blocks_run=run_p, layers=layers,
                      num_layers=loaded.num_layers, hidden_size=loaded.hidden_size, dtype=loaded.dtype)
        break
    if loaded is None:
        log("no model could be built")
        return 1

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    nominal = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
    matmul_peak = measured_peak(device, dtype, seconds=2.0 if device.startswith("cuda") else 0.5)
    log(f"device {name}: nominal dense bf16 peak {nominal / 1e12 if nominal else float('nan'):.0f} TFLOP/s, "
        f"measured {'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul peak {matmul_peak / 1e12:.1f} TFLOP/s")
    report.update(device_name=name, nominal_peak=nominal, measured_matmul_peak=matmul_peak)

    lengths = [len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_tokens)["input_ids"]]
    lengths.sort()
    log(f"{len(texts)} texts, {sum(lengths):,} tokens: median {lengths[len(lengths) // 2]}, "
        f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")

    settings = [(4, 16384), (8, 16384), (16, 16384), (32, 16384), (1024, 8192), (1024, 16384), (1024, 32768),
                (1024, 65536)]
    rows, results = [], []
    for bs, mbt in settings:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"budget of {args.budget_s:.0f}s reached; skipping batch size {bs}, max batch tokens {mbt}")
            results.append({"batch_size": bs, "max_batch_tokens": mbt, "skipped": "time budget"})
            continue
        try:
            r = run_config(loaded, layers, texts, bs, mbt, args.max_tokens)
        except torch.OutOfMemoryError as exc:
            log(f"batch size {bs}, max batch tokens {mbt}: out of memory ({exc})")
            results.append({"batch_size": bs, "max_batch_tokens": mbt, "skipped": "out of memory"})
            torch.cuda.empty_cache()
            continue
        flops = 2 * run_p * r["tokens"] / r["seconds"]
        r["model_tflops"] = flops / 1e12
        r["mfu_nominal"] = flops / nominal if nominal else None
        r["mfu_measured_peak"] = flops / matmul_peak
        results.append(r)
        log(f"batch size {bs:>4}, max batch tokens {mbt:>6}: {r['tokens_per_s']:>10,.0f} tokens/s, "
            f"{r['model_tflops']:.1f} TFLOP/s, MFU {100 * (r['mfu_nominal'] or 0):.1f}% nominal / "
            f"{100 * r['mfu_measured_peak']:.1f}% of measured peak, {r['batches']} batches, "
            f"peak mem {r['peak_gpu_gib'] or 0:.1f} GiB, OOM retries {r['oom_retries']}")
        rows.append([bs, mbt, r["texts"], r["tokens"], r["batches"], r["seconds"], r["tokens_per_s"],
                     r["model_tflops"], None if r["mfu_nominal"] is None else f"{100 * r['mfu_nominal']:.1f}%",
                     f"{100 * r['mfu_measured_peak']:.1f}%", r["peak_gpu_gib"]])
    done = [r for r in results if "skipped" not in r]
    best = max(done, key=lambda r: r["tokens_per_s"]) if done else None
    print()
    print(f"## engine on {report['arch']} ({report['params'] / 1e9:.2f}B params, random weights, {loaded.dtype}) "
          f"on {name}; layers {layers} ({max(layers) + 1}/{loaded.num_layers} blocks run)\n")
    print(format_table(["batch size", "max batch tokens", "texts", "tokens", "batches", "wall s", "tokens/s",
                        "model TFLOP/s", "MFU (989 TF nominal)", "MFU (measured matmul peak)", "peak GPU GiB"],
                       rows))
    if best:
        print(f"\nbest: batch size {best['batch_size']}, max batch tokens {best['max_batch_tokens']}: "
              f"{best['tokens_per_s']:,.0f} tokens/s")
    report.update(results=results, best=best, total_seconds=time.perf_counter() - t_start)
    out = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        log(f"wrote {out}")
    log(f"total {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
