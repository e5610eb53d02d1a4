"""GPU benchmark of the activation engine on a random-weight decoder of the Qwen3.5-27B size class.

Nothing is downloaded: the model is built from a transformers config on the
GPU with random weights (bf16) and a synthetic word-level tokenizer is built
locally, so the engine's whole path (tokenise, length-sort, batch under a
text count and a padded-token budget, forward with hooks, pool, early stop)
runs as it does on the real checkpoint. Texts are random word sequences whose
token lengths are lognormal around ~200 tokens, capped at 512.

Both layouts of that size run in the same session, one after the other: the
Qwen3.5 hybrid (gated-delta-rule linear attention in 3 of 4 blocks; the
engine reports whether its fast path -- flash-linear-attention -- is bound,
see ``amygdala_dagster.engine.fast_path.linear_attention_fast_path``) and a Qwen3
full-attention decoder of the same width, depth and MLP, as the reference.
Without the fast path the Qwen3.5 layout only gets a short probe (its
reference PyTorch path ran 976 tokens/s on an H200). With two GPUs or more,
the best layout also runs as 2 shards, one process per GPU (texts split by
content hash, as ``amygdala_dagster.engine.shards`` does), against 1 GPU.

It reports, per (batch size, max batch tokens) setting, the engine's tokens/s
and its model FLOPs utilisation,

    MFU = 2 * (parameters of the blocks actually run) * tokens / seconds / peak bf16 FLOP/s

(the blocks after the deepest target layer are not run; embeddings cost no
FLOPs; attention's own FLOPs are not counted, so MFU is slightly understated),
against both the nominal H100/H200 SXM dense bf16 peak (989 TFLOP/s) and the
peak of a large bf16 matmul measured here; and the budget that maximises it.

Imports only torch, transformers, tokenizers and the project's engine modules
(amygdala_dagster.engine.models / layers / activations / cache / shards). About 5-8
minutes on an H100/H200 (``--budget-s`` caps the sweep).

    pip install -e ".[gpu]"                        # flash-linear-attention (+ causal-conv1d where it builds)
    python benchmarks/gpu.py                       # on the lent GPU(s); JSON to $OUT/gpu_bench.json
    python benchmarks/gpu.py --tiny                # a CPU smoke test with a tiny config
    python benchmarks/gpu.py --tiny --shard-devices cpu,cpu   # ... including the 2-process shard path
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
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
    from amygdala_dagster.engine.models import LoadedModel

    param = next(model.parameters())
    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=f"random-{kind}-{config.num_hidden_layers}L-{config.hidden_size}",
        revision=None, weights_hash=None, dtype=str(param.dtype).removeprefix("torch."), device=str(param.device),
        num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size), is_encoder=False,
        text_config=config,
    )


def block_params(loaded, deepest: int) -> tuple[int, int]:
    """(parameters in blocks 0..deepest, all parameters)."""
    from amygdala_dagster.engine.layers import resolve_layers

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
def run_config(loaded, layers, texts, batch_size: int | None, max_batch_tokens: int, max_tokens: int,
               barrier: tuple[Path, Path] | None = None) -> dict[str, Any]:
    """One setting: warm-up outside the timing, then every text through the engine.

    ``barrier`` = (ready file, go file): after the warm-up, write the first and wait for the second, so
    shard processes time the same interval.
    """
    from amygdala_dagster.engine.activations import ActivationEngine

    engine = ActivationEngine(loaded, layers, pooling="mean", max_tokens=max_tokens, batch_size=batch_size,
                              max_batch_tokens=max_batch_tokens)
    on_cuda = loaded.device.startswith("cuda")
    # Warm-up on the longest texts (allocator, kernels) outside the timing.
    warm = sorted(texts, key=len, reverse=True)[: max(1, min(batch_size or 8, 4))]
    for _ in engine.forward(warm):
        pass
    engine.stats = type(engine.stats)(device=loaded.device)
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    if barrier is not None:
        ready, go = barrier
        ready.write_text("ready")
        deadline = time.monotonic() + 900
        while not go.exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no go signal from the parent within 900 s")
            time.sleep(0.01)
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
            "peak_gpu_gib": (torch.cuda.max_memory_allocated() / 1024**3) if on_cuda else None,
            "fast_path": engine.fast_path.fast_path, "kernels_found": engine.fast_path.kernels_found}


def free(*objs: Any) -> None:
    del objs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def mfu_fields(r: dict[str, Any], run_p: int, nominal: float | None, matmul_peak: float) -> None:
    flops = 2 * run_p * r["tokens"] / r["seconds"]
    r["model_tflops"] = flops / 1e12
    r["mfu_nominal"] = flops / nominal if nominal else None
    r["mfu_measured_peak"] = flops / matmul_peak


def fmt_bs(bs: int | None) -> str:
    return "token budget" if bs is None else str(bs)


def measure_layout(kind: str, shape: dict[str, Any], args, dtype, device: str, texts: list[str], tokenizer,
                   settings, t_start: float, nominal, matmul_peak, report: dict) -> dict[str, Any] | None:
    """Build ``kind`` on the device, sweep ``settings`` (a probe only when its fast path is missing), free it."""
    from amygdala_dagster.engine.fast_path import linear_attention_fast_path
    from amygdala_dagster.engine.layers import parse_layers

    t0 = time.perf_counter()
    try:
        torch.manual_seed(0)
        model, config = build_model(kind, shape, dtype, device)
    except Exception as exc:  # noqa: BLE001 - missing class, OOM...
        log(f"{kind}: cannot build ({type(exc).__name__}: {exc})")
        report.setdefault("skipped_arch", {})[kind] = f"{type(exc).__name__}: {exc}"
        free()
        return None
    loaded = wrap(model, config, tokenizer, kind, device)
    layers = parse_layers(args.layers, loaded.num_layers) if args.layers else default_target_layers(loaded.num_layers)
    run_p, total_p = block_params(loaded, max(layers))
    fast = linear_attention_fast_path(loaded.model)
    log(f"{kind}: built in {time.perf_counter() - t0:.1f}s: {total_p / 1e9:.2f}B parameters, {loaded.num_layers} "
        f"layers, hidden {loaded.hidden_size}, {loaded.dtype} on {loaded.device}; target layers {layers} -> "
        f"{max(layers) + 1} blocks run ({run_p / 1e9:.2f}B parameters); fast_path {fast.fast_path} "
        f"(found {fast.kernels_found or '-'}, missing {fast.kernels_missing or '-'})")
    out: dict[str, Any] = {"arch": kind, "params": total_p, "params_in_blocks_run": run_p, "layers": layers,
                           "num_layers": loaded.num_layers, "hidden_size": loaded.hidden_size,
                           "dtype": loaded.dtype, "fast_path": fast.as_dict(), "results": []}
    todo = list(settings)
    if fast.fast_path == "no" and not args.tiny and not args.force_reference_path:
        probe_texts = texts[: max(8, len(texts) // 12)]
        r = run_config(loaded, layers, probe_texts, None, 8192, args.max_tokens)
        mfu_fields(r, run_p, nominal, matmul_peak)
        r["probe"] = True
        log(f"{kind}: reference path (no flash-linear-attention): probe {r['tokens_per_s']:,.0f} tokens/s on "
            f"{r['texts']} texts; the sweep is skipped (install the gpu extra to measure the fast path)")
        out["results"].append(r)
        todo = []
    for bs, mbt in todo:
        if time.perf_counter() - t_start > args.budget_s:
            log(f"budget of {args.budget_s:.0f}s reached; skipping {kind} batch size {fmt_bs(bs)}, tokens {mbt}")
            out["results"].append({"batch_size": bs, "max_batch_tokens": mbt, "skipped": "time budget"})
            continue
        try:
            r = run_config(loaded, layers, texts, bs, mbt, args.max_tokens)
        except torch.OutOfMemoryError as exc:
            log(f"{kind} batch size {fmt_bs(bs)}, max batch tokens {mbt}: out of memory ({exc})")
            out["results"].append({"batch_size": bs, "max_batch_tokens": mbt, "skipped": "out of memory"})
            free()
            continue
        mfu_fields(r, run_p, nominal, matmul_peak)
        out["results"].append(r)
        log(f"{kind} batch size {fmt_bs(bs):>12}, max batch tokens {mbt:>6}: {r['tokens_per_s']:>10,.0f} tokens/s, "
            f"{r['model_tflops']:.1f} TFLOP/s, MFU {100 * (r['mfu_nominal'] or 0):.1f}% nominal / "
            f"{100 * r['mfu_measured_peak']:.1f}% of measured peak, {r['batches']} batches, "
            f"peak mem {r['peak_gpu_gib'] or 0:.1f} GiB")
    done = [r for r in out["results"] if "skipped" not in r and not r.get("probe")]
    out["best"] = max(done, key=lambda r: r["tokens_per_s"]) if done else None
    del loaded
    free(model)
    return out


def shard_worker(args) -> int:
    """One process of the multi-GPU run: build the layout on its device, forward its shard's texts."""
    from amygdala_dagster.engine.cache import text_sha256
    from amygdala_dagster.engine.shards import shard_of

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = dict(TINY) if args.tiny else dict(QWEN3_5_27B)
    vocab_words = min(shape["vocab_size"] - 8, 50000)
    tokenizer = build_tokenizer(vocab_words)
    texts = synthetic_texts(args.texts, vocab_words, args.median_tokens, args.sigma, args.max_tokens, seed=1)
    mine = [t for t in texts if shard_of(text_sha256(t), args.shards) == args.shard_worker]
    torch.manual_seed(0)
    model, config = build_model(args.arch, shape, dtype, device)
    loaded = wrap(model, config, tokenizer, args.arch, device)
    layers = default_target_layers(loaded.num_layers) if not args.layers else [int(x) for x in args.layers.split(",")]
    bs = None if args.batch_size is None else int(args.batch_size)
    r = run_config(loaded, layers, mine, bs, args.max_batch_tokens, args.max_tokens,
                   barrier=(Path(args.sync_dir) / f"ready-{args.shard_worker}", Path(args.sync_dir) / "go"))
    r["shard"] = args.shard_worker
    r["device"] = loaded.device
    Path(args.json).write_text(json.dumps(r), encoding="utf-8")
    return 0


def run_shards(args, kind: str, devices: list[str], bs: int | None, mbt: int, single: dict[str, Any] | None,
               run_p: int, nominal, matmul_peak) -> dict[str, Any]:
    """N processes, one device each, started together; timed from a common go signal."""
    n = len(devices)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-shards-"))
    procs = []
    for i, dev in enumerate(devices):
        env = dict(os.environ)
        cmd = [sys.executable, os.path.abspath(__file__), "--shard-worker", str(i), "--shards", str(n), "--arch", kind,
               "--texts", str(args.texts), "--median-tokens", str(args.median_tokens), "--sigma", str(args.sigma),
               "--max-tokens", str(args.max_tokens), "--max-batch-tokens", str(mbt), "--sync-dir", str(tmp),
               "--json", str(tmp / f"result-{i}.json")]
        if bs is not None:
            cmd += ["--batch-size", str(bs)]
        if args.layers:
            cmd += ["--layers", args.layers]
        if args.tiny:
            cmd.append("--tiny")
        if dev.startswith("cuda"):
            env["CUDA_VISIBLE_DEVICES"] = dev.split(":", 1)[1] if ":" in dev else "0"
            cmd += ["--device", "cuda"]
        else:
            cmd += ["--device", dev]
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // n))
        procs.append(subprocess.Popen(cmd, env=env))
    deadline = time.monotonic() + 900
    while not all((tmp / f"ready-{i}").exists() for i in range(n)):
        if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise RuntimeError("a shard process failed before it was ready")
        time.sleep(0.05)
    (tmp / "go").write_text("go")
    t0 = time.perf_counter()
    codes = [p.wait(timeout=900) for p in procs]
    wall = time.perf_counter() - t0
    if any(codes):
        raise RuntimeError(f"shard processes exited with {codes}")
    parts = [json.loads((tmp / f"result-{i}.json").read_text()) for i in range(n)]
    tokens = sum(p["tokens"] for p in parts)
    slowest = max(p["seconds"] for p in parts)
    out = {"arch": kind, "devices": devices, "batch_size": bs, "max_batch_tokens": mbt, "tokens": tokens,
           "seconds": slowest, "wall_incl_exit_s": wall, "tokens_per_s": tokens / slowest, "per_shard": parts}
    out["model_tflops_total"] = 2 * run_p * tokens / slowest / 1e12
    out["mfu_nominal_per_gpu"] = (2 * run_p * tokens / slowest / n / nominal) if nominal else None
    if single:
        out["speedup_vs_1"] = out["tokens_per_s"] / single["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    p.add_argument("--arch", choices=("both", "qwen3_5", "qwen3"), default="both",
                   help="both (default): Qwen3.5 hybrid and the same-size Qwen3 full-attention layout")
    p.add_argument("--device", default=None, help="default cuda if available else cpu")
    p.add_argument("--texts", type=int, default=None, help="texts per setting (default 384; --tiny 24)")
    p.add_argument("--median-tokens", type=float, default=200.0, help="(--tiny: 48)")
    p.add_argument("--sigma", type=float, default=0.6, help="lognormal sigma of the text lengths")
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--layers", default=None,
                   help="target layers (default: the train command's 60/70/80%% of depth)")
    p.add_argument("--budget-s", type=float, default=360.0, help="stop starting settings after this many s")
    p.add_argument("--force-reference-path", action="store_true",
                   help="sweep the Qwen3.5 layout even without its fast path (slow)")
    p.add_argument("--shard-devices", default=None,
                   help="devices of the shard run, e.g. cuda:0,cuda:1 (default: every GPU when there are 2+; "
                        "'none' to skip; cpu,cpu for a dry run)")
    p.add_argument("--json", type=Path, default=None, help="JSON output (default $OUT/gpu_bench.json if $OUT)")
    # internal: one shard process
    p.add_argument("--shard-worker", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--shards", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--sync-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--max-batch-tokens", type=int, default=8192, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny and args.median_tokens == 200.0:
        args.median_tokens = 48.0
    args.texts = args.texts or (24 if args.tiny else 384)
    if args.shard_worker is not None:
        return shard_worker(args)
    t_start = time.perf_counter()

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    shape = dict(TINY) if args.tiny else dict(QWEN3_5_27B)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    info = machine_info()
    log("machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))

    vocab_words = min(shape["vocab_size"] - 8, 50000)
    tokenizer = build_tokenizer(vocab_words)
    texts = synthetic_texts(args.texts, vocab_words, args.median_tokens, args.sigma, args.max_tokens, seed=1)
    lengths = sorted(len(x) for x in tokenizer(texts, truncation=True, max_length=args.max_tokens)["input_ids"])
    log(f"{len(texts)} texts, {sum(lengths):,} tokens: median {lengths[len(lengths) // 2]}, "
        f"p90 {lengths[int(0.9 * len(lengths))]}, max {lengths[-1]}")

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
    nominal = next((v for k, v in NOMINAL_PEAK.items() if k in name), None)
    matmul_peak = measured_peak(device, dtype, seconds=2.0 if device.startswith("cuda") else 0.5)
    log(f"device {name}: nominal dense bf16 peak {nominal / 1e12 if nominal else float('nan'):.0f} TFLOP/s, "
        f"measured {'bf16' if dtype == torch.bfloat16 else 'fp32'} matmul peak {matmul_peak / 1e12:.1f} TFLOP/s")
    report: dict[str, Any] = {"machine": info, "args": {k: str(v) for k, v in vars(args).items()},
                              "device_name": name, "nominal_peak": nominal, "measured_matmul_peak": matmul_peak,
                              "layouts": {}}

    # (batch size, max batch tokens): the seed's batch size 4, a larger one, and the engine's default
    # (no batch size: the token budget alone) at the two best budgets of the earlier H200 sweep.
    settings = [(4, 16384), (16, 16384), (None, 8192), (None, 16384)]
    kinds = ["qwen3_5", "qwen3"] if args.arch == "both" else [args.arch]
    for kind in kinds:
        res = measure_layout(kind, shape, args, dtype, device, texts, tokenizer, settings, t_start, nominal,
                             matmul_peak, report)
        if res is not None:
            report["layouts"][kind] = res

    rows = []
    for kind, res in report["layouts"].items():
        for r in res["results"]:
            if "skipped" in r:
                continue
            rows.append([kind, res["fast_path"]["fast_path"],
                         fmt_bs(r["batch_size"]) + (" (probe)" if r.get("probe") else ""),
                         r["max_batch_tokens"], r["tokens"], r["seconds"], r["tokens_per_s"], r["model_tflops"],
                         None if r["mfu_nominal"] is None else f"{100 * r['mfu_nominal']:.1f}%",
                         f"{100 * r['mfu_measured_peak']:.1f}%", r["peak_gpu_gib"]])
    print()
    print(f"## engine on {name}: random-weight {args.texts}-text sweep per layout\n")
    print(format_table(["layout", "fast path", "batch size", "max batch tokens", "tokens", "wall s", "tokens/s",
                        "model TFLOP/s", "MFU (nominal)", "MFU (measured matmul peak)", "peak GPU GiB"], rows))
    best = {k: (v.get("best") or next((r for r in v["results"] if r.get("probe")), None))
            for k, v in report["layouts"].items()}
    if best.get("qwen3_5") and best.get("qwen3"):
        ratio = best["qwen3_5"]["tokens_per_s"] / best["qwen3"]["tokens_per_s"]
        report["qwen3_5_vs_full_attention"] = ratio
        print(f"\nQwen3.5 layout (fast path {report['layouts']['qwen3_5']['fast_path']['fast_path']}) at "
              f"{best['qwen3_5']['tokens_per_s']:,.0f} tokens/s = {ratio:.2f}x the full-attention layout "
              f"({best['qwen3']['tokens_per_s']:,.0f} tokens/s); MFU (nominal) "
              f"{100 * (best['qwen3_5'].get('mfu_nominal') or 0):.1f}% vs "
              f"{100 * (best['qwen3'].get('mfu_nominal') or 0):.1f}%")

    if args.shard_devices != "none":
        devices = (args.shard_devices.split(",") if args.shard_devices
                   else [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.device_count() >= 2
                   else [])
        if len(devices) >= 2:
            devices = devices[:2]
            fast_q35 = report["layouts"].get("qwen3_5", {}).get("fast_path", {}).get("fast_path") == "yes"
            kind = "qwen3_5" if (fast_q35 or args.tiny) and "qwen3_5" in report["layouts"] else "qwen3"
            single = next((r for r in report["layouts"].get(kind, {}).get("results", [])
                           if r.get("batch_size") is None and r.get("max_batch_tokens") == 8192
                           and "skipped" not in r), None)
            run_p = report["layouts"].get(kind, {}).get("params_in_blocks_run", 0)
            log(f"2 shards of {kind} on {devices}")
            sh = run_shards(args, kind, devices, None, 8192, single, run_p, nominal, matmul_peak)
            report["shards"] = sh
            print(f"\n2 shards on {devices}: {sh['tokens_per_s']:,.0f} tokens/s"
                  + (f" = {sh['speedup_vs_1']:.2f}x one device ({single['tokens_per_s']:,.0f})" if single else ""))
        else:
            log("fewer than 2 GPUs: the 2-shard run is skipped")
            report["shards"] = {"skipped": "fewer than 2 GPUs"}

    report["total_seconds"] = time.perf_counter() - t_start
    out = args.json or (Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else None)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        log(f"wrote {out}")
    log(f"total {report['total_seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
