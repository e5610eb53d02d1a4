"""The activation engine against independent Hugging Face forward passes, on every tiny architecture."""

from __future__ import annotations

import functools

import pytest
import torch

from amygdala_dagster.engine.activations import (
    DEFAULT_MAX_BATCH_TOKENS,
    ActivationEngine,
    ActivationOutOfMemoryError,
    EngineStats,
    batch_size_advice,
    padded_length,
    tokenizer_hash,
)
from amygdala_dagster.engine.cache import ActivationCache
from amygdala_dagster.engine.layers import resolve_layers
from amygdala_dagster.engine.models import LoadedModel, load_model
from amygdala_dagster_tests.tiny_models import ARCHS, NUM_LAYERS, build_tiny_model

ATOL = 1e-5
RTOL = 1e-4

TEXTS = [
    "warmth",
    "The old journal entry spoke of warmth and quiet clarity after a long week of work.",
    "I felt curious about the pattern that kept returning in the evening digests, the way small "
    "frustrations gathered into tiredness and then dissolved when a friend called. Memory is a river: "
    "it bends around the stones of what we cared about most. Today the rain was soft.",
    "She laughed at the joke, then apologised.",
    "Numbers one two three",
]


@functools.cache
def _loaded(arch: str, dtype: str = "fp32") -> LoadedModel:
    return load_model(build_tiny_model(arch), dtype=dtype, device="cpu")


def _pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """Independent pooling of an unpadded [T, H] sequence."""
    hidden = hidden.float()
    return hidden.mean(dim=0) if pooling == "mean" else hidden[-1]


def _reference(loaded: LoadedModel, text: str, layers: list[int], pooling: str) -> torch.Tensor:
    """One text alone, full forward, HF hidden_states[idx + 1] pooled -> [L, H]."""
    enc = loaded.tokenizer(text, return_tensors="pt", truncation=True, max_length=512)
    with torch.inference_mode():
        out = loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                           output_hidden_states=True)
    return torch.stack([_pool(out.hidden_states[i + 1][0], pooling) for i in layers])


def _full_pass_hooked(loaded: LoadedModel, text: str, layers: list[int], pooling: str) -> torch.Tensor:
    """One text alone, full forward (no early stop), our own hooks on the blocks -> [L, H]."""
    blocks = resolve_layers(loaded.model, loaded.num_layers).modules
    seen: dict[int, torch.Tensor] = {}
    handles = [
        blocks[i].register_forward_hook(
            lambda m, a, o, i=i: seen.__setitem__(i, (o[0] if isinstance(o, tuple) else o)[0]))
        for i in layers
    ]
    try:
        enc = loaded.tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            loaded.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return torch.stack([_pool(seen[i], pooling) for i in layers])


def _run(engine: ActivationEngine, texts, **kw) -> torch.Tensor:
    """Collect the engine's batches back into text order -> [N, L, H]."""
    rows: dict[int, torch.Tensor] = {}
    for idxs, pooled in engine.forward(texts, **kw):
        assert pooled.dtype == torch.float32 and pooled.device.type == "cpu"
        assert pooled.shape == (len(idxs), len(engine.layers), engine.loaded.hidden_size)
        for r, i in enumerate(idxs):
            assert i not in rows
            rows[i] = pooled[r]
    assert sorted(rows) == list(range(len(texts)))
    return torch.stack([rows[i] for i in range(len(texts))])


class _ShapeRecorder:
    """A torch-level pre-hook on the model recording the input_ids shape of every pass."""

    def __init__(self, model: torch.nn.Module):
        self.shapes: list[tuple[int, int]] = []
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.shapes.append(tuple(ids.shape))

    def close(self):
        self.handle.remove()


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_hidden_states_of_a_full_forward(arch, pooling):
    loaded = _loaded(arch)
    layers = [2, 0, 1]  # every non-final layer, deliberately out of order
    engine = ActivationEngine(loaded, layers, pooling=pooling, batch_size=8)
    rec = _ShapeRecorder(loaded.model)
    try:
        got = _run(engine, TEXTS)
    finally:
        rec.close()
    # batches of one padded length each; short texts share a padded batch
    assert sum(b for b, _ in rec.shapes) == len(TEXTS) and any(b > 1 for b, _ in rec.shapes)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(got[i], _reference(loaded, text, layers, pooling), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_final_layer_equals_a_hook_on_a_full_forward(arch):
    loaded = _loaded(arch)
    last = NUM_LAYERS - 1
    for pooling in ("mean", "last"):
        engine = ActivationEngine(loaded, [last, 1], pooling=pooling)
        got = _run(engine, TEXTS[:3])
        for i, text in enumerate(TEXTS[:3]):
            torch.testing.assert_close(got[i], _full_pass_hooked(loaded, text, [last, 1], pooling),
                                       atol=ATOL, rtol=RTOL)


def test_final_layer_is_pre_norm_unlike_hf_last_hidden_state():
    # Why the final layer is compared against a hook: HF applies the final norm to hidden_states[-1].
    loaded = _loaded("llama")
    engine = ActivationEngine(loaded, [NUM_LAYERS - 1])
    got = _run(engine, TEXTS[1:2])[0, 0]
    enc = loaded.tokenizer(TEXTS[1], return_tensors="pt")
    with torch.inference_mode():
        normed = loaded.model(**enc, output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert not torch.allclose(got, normed, atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_5_vl", "llama", "gpt2", "gpt_neox", "bert"])
def test_pass_stops_after_the_deepest_target_layer(arch):
    loaded = _loaded(arch)
    blocks = resolve_layers(loaded.model, loaded.num_layers).modules
    norm = next(m for name, m in loaded.model.named_modules()
                if name in ("norm", "ln_f", "final_layer_norm", "language_model.norm"))  \
        if arch != "bert" else None
    calls: list[str] = []
    watched = [(f"block{i}", blocks[i]) for i in range(NUM_LAYERS)]
    if norm is not None:
        watched.append(("final_norm", norm))
    handles = [m.register_forward_hook(lambda *a, n=n: calls.append(n)) for n, m in watched]
    try:
        # The watchers fire on a plain forward, so silence below is the early stop, not a dead hook.
        enc = loaded.tokenizer("hello there", return_tensors="pt")
        with torch.inference_mode():
            loaded.model(**enc)
        assert calls.count("block3") == 1 and ("final_norm" in calls) == (norm is not None)

        calls.clear()
        engine = ActivationEngine(loaded, [1, 0])
        early = _run(engine, TEXTS[:2])
        assert "block1" in calls
        assert "block2" not in calls and "block3" not in calls and "final_norm" not in calls
    finally:
        for h in handles:
            h.remove()
    for i, text in enumerate(TEXTS[:2]):
        torch.testing.assert_close(early[i], _full_pass_hooked(loaded, text, [1, 0], "mean"), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("pooling", ["mean", "last"])
@pytest.mark.parametrize("arch", ["qwen3_5", "gpt2"])
def test_batch_invariance_with_very_different_lengths(arch, pooling):
    loaded = _loaded(arch)
    long_text = " ".join([TEXTS[2]] * 6)
    texts = ["hi", long_text, "the cat", TEXTS[1], long_text[:300], "rain"]
    layers = [0, 1, 2, 3]
    alone = torch.cat([_run(ActivationEngine(loaded, layers, pooling=pooling, batch_size=1), [t]) for t in texts])
    engine = ActivationEngine(loaded, layers, pooling=pooling, batch_size=8, max_batch_tokens=1 << 20)
    rec = _ShapeRecorder(loaded.model)
    try:
        batched = _run(engine, texts)
    finally:
        rec.close()
    lengths = [len(loaded.tokenizer(t)["input_ids"]) for t in texts]
    assert sorted(rec.shapes) == sorted(
        (sum(padded_length(n, 512) == p for n in lengths), p) for p in {padded_length(n, 512) for n in lengths})
    assert any(b > 1 for b, _ in rec.shapes) and any(t > max(lengths[:1] + lengths[2:4]) for _, t in rec.shapes)
    # a text's padded length depends on it alone, so batching does not change a single bit
    assert torch.equal(batched, alone)


def test_padded_length_is_a_function_of_the_text_alone():
    for n in range(1, 2049):
        p = padded_length(n, 4096)
        assert n <= p <= n + max(7, n // 8)
        assert padded_length(n, 512) == min(p, max(n, 512))
    assert padded_length(300, 300) == 300 and padded_length(509, 512) == 512


def test_truncation_is_counted_and_applied():
    loaded = _loaded("llama")
    engine = ActivationEngine(loaded, [1], max_tokens=16)
    rec = _ShapeRecorder(loaded.model)
    try:
        got = _run(engine, [TEXTS[2], "warmth", TEXTS[1]])
    finally:
        rec.close()
    assert engine.stats.truncated == 2
    assert max(t for _, t in rec.shapes) == 16
    ids = loaded.tokenizer(TEXTS[2])["input_ids"][:16]
    with torch.inference_mode():
        ref = loaded.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[2][0].mean(0)
    torch.testing.assert_close(got[0, 0], ref, atol=ATOL, rtol=RTOL)


_LONG_TEXTS = {
    "prose": (TEXTS[2] + " ") * 400,
    "no_spaces": "warmthclarity" * 3000,
    "whitespace_runs": ("word" + " " * 200) * 300,
    "punctuation": "!?.,;:" * 5000,
    "mixed_scripts": "Gefühl ощущение 感情 emoción 🙂 " * 800,
    "dense_then_sparse": "a " * 20 + "x" * 60000,
}


class _LengthRecorder:
    """Wraps a tokenizer and records the longest text it was asked to encode."""

    def __init__(self, tokenizer):
        self._tok, self.longest = tokenizer, 0

    def __call__(self, texts, *args, **kwargs):
        batch = [texts] if isinstance(texts, str) else texts
        self.longest = max([self.longest, *(len(t) for t in batch)])
        return self._tok(texts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.mark.parametrize("model", ["minilm", "llama", "gpt2"])
def test_long_text_is_tokenised_from_a_prefix_with_the_same_ids(model):
    """Issue 9: a 5 MB node was tokenised whole (1.7 GB, 20x the forward time) to count truncation."""
    loaded = load_model("minilm", device="cpu") if model == "minilm" else _loaded(model)
    engine = ActivationEngine(loaded, [1], max_tokens=64)
    texts = [*_LONG_TEXTS.values(), "short text", TEXTS[1]]
    recorder = _LengthRecorder(engine.tokenizer)
    engine.tokenizer = recorder
    try:
        ids, truncated = engine.tokenize(texts)
    finally:
        engine.tokenizer = recorder._tok
    for text, got in zip(texts, ids):
        assert got == list(loaded.tokenizer(text, truncation=True, max_length=64)["input_ids"]), text[:40]
    # WordPiece: a 100+ char word is one [UNK]
    expected = sum(len(loaded.tokenizer(t)["input_ids"]) > 64 for t in texts)
    assert sum(truncated) == expected >= 4
    assert recorder.longest < len(_LONG_TEXTS["prose"])  # a text dense in tokens is never read whole

    # a tokenizer that truncates on the left keeps the end of the text: so does the prefix cut
    engine.tokenizer.truncation_side = "left"
    try:
        ids, _ = engine.tokenize(texts)
        for text, got in zip(texts, ids):
            want = loaded.tokenizer(text, truncation=True, max_length=64)["input_ids"]
            assert got == list(want), text[:40]
    finally:
        engine.tokenizer.truncation_side = "right"

    huge = "The evening was calm. " * 250_000  # 5.5 MB
    recorder = _LengthRecorder(engine.tokenizer)
    engine.tokenizer = recorder
    try:
        ids, truncated = engine.tokenize([huge])
    finally:
        engine.tokenizer = recorder._tok
    assert truncated == [True] and len(ids[0]) == 64
    assert recorder.longest <= 64 * 16 * 4


def test_token_budget_and_longest_first_batches():
    loaded = _loaded("qwen3")
    texts = TEXTS * 3 + [" ".join([TEXTS[2]] * 3)]
    lengths = [len(loaded.tokenizer(t)["input_ids"]) for t in texts]
    budget = 120
    assert max(lengths) > budget  # one text alone exceeds the budget and must still run
    engine = ActivationEngine(loaded, [1], batch_size=4, max_batch_tokens=budget)
    rec = _ShapeRecorder(loaded.model)
    batches = []
    try:
        for idxs, _pooled in engine.forward(texts):
            batches.append(idxs)
    finally:
        rec.close()
    assert rec.shapes[0] == (1, padded_length(max(lengths), engine.max_tokens))
    for (b, t), idxs in zip(rec.shapes, batches):
        assert b <= 4
        assert b == 1 or b * t <= budget
        assert t == padded_length(max(lengths[i] for i in idxs), engine.max_tokens)
        assert {padded_length(lengths[i], engine.max_tokens) for i in idxs} == {t}
    padded = [t for _, t in rec.shapes]
    assert padded == sorted(padded, reverse=True)
    assert sorted(i for idxs in batches for i in idxs) == list(range(len(texts)))
    assert engine.stats.batches == len(batches) and engine.stats.texts == len(texts)
    assert engine.stats.tokens == sum(lengths)


def test_progress_reports_texts_and_tokens():
    loaded = _loaded("gpt2")
    engine = ActivationEngine(loaded, [0], batch_size=2)
    seen: list[tuple[int, int]] = []
    _run(engine, TEXTS, progress=lambda n, t: seen.append((n, t)))
    total_tokens = sum(len(loaded.tokenizer(t)["input_ids"]) for t in TEXTS)
    assert seen[-1] == (len(TEXTS), total_tokens)
    done = [n for n, _ in seen]
    assert done == sorted(done) and len(done) == engine.stats.batches and all(
        b - a <= 2 for a, b in zip([0, *done], done))
    assert seen == sorted(seen)


def test_empty_text_is_rejected_naming_its_key_before_any_work():
    loaded = _loaded("gpt2")
    engine = ActivationEngine(loaded, [0])
    with pytest.raises(ValueError, match="'node-b'"):
        engine.forward(["fine", " \n\t "], keys=["node-a", "node-b"])
    with pytest.raises(ValueError, match="#1"):
        engine.forward(["fine", ""])
    assert engine.stats.batches == 0
    assert list(engine.forward([])) == []


class _FakeOOM:
    """Torch-level fault: raises torch.OutOfMemoryError when a batch holds more than `limit` texts."""

    def __init__(self, model: torch.nn.Module, limit: int):
        self.limit = limit
        self.raised = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        if kwargs["input_ids"].shape[0] > self.limit:
            self.raised += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    def close(self):
        self.handle.remove()


def test_out_of_memory_halves_the_batch_and_gives_the_same_result(caplog):
    loaded = _loaded("qwen3_5")
    reference = _run(ActivationEngine(loaded, [1, 3], batch_size=8), TEXTS)
    engine = ActivationEngine(loaded, [1, 3], batch_size=8)
    fault = _FakeOOM(loaded.model, limit=1)  # the two shortest texts share a padded length
    rec = _ShapeRecorder(loaded.model)
    try:
        with caplog.at_level("WARNING"):
            got = _run(engine, TEXTS)
    finally:
        fault.close()
        rec.close()
    assert torch.equal(got, reference)
    assert engine.stats.oom_retries == fault.raised > 0
    assert engine.stats.texts == len(TEXTS)
    assert "out of memory" in caplog.text
    assert [b for b, _ in rec.shapes if b == 1]  # it went on with smaller batches


def test_out_of_memory_with_a_single_text_is_reraised_clearly():
    loaded = _loaded("gpt2")
    engine = ActivationEngine(loaded, [0], batch_size=4)
    fault = _FakeOOM(loaded.model, limit=0)
    try:
        with pytest.raises(ActivationOutOfMemoryError, match="single text") as err:
            _run(engine, [TEXTS[1]] * 4)  # one padded length: a batch of 4
    finally:
        fault.close()
    assert isinstance(err.value, torch.OutOfMemoryError)
    assert engine.stats.oom_retries == 2  # 4 -> 2 -> 1, then give up


def test_bf16_model_gives_float32_output_close_to_fp32():
    fp32 = _run(ActivationEngine(_loaded("qwen3"), [1]), TEXTS[:2])
    bf16_loaded = _loaded("qwen3", "bf16")
    engine = ActivationEngine(bf16_loaded, [1])
    bf16 = _run(engine, TEXTS[:2])
    assert bf16.dtype == torch.float32
    assert engine.fingerprint["dtype"] == "bfloat16"
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def test_fingerprint_keys_and_sensitivity(tmp_path):
    loaded = _loaded("qwen3_5")
    base = ActivationEngine(loaded, [1, 2])
    assert set(base.fingerprint) >= {"model", "revision", "weights_hash", "dtype", "layers", "pooling",
                                     "max_tokens", "tokenizer_hash", "layer_path"}
    assert base.fingerprint["layers"] == [1, 2]
    assert base.fingerprint_id == ActivationCache(tmp_path, base.fingerprint).fingerprint_id  # one id: the cache's
    again = ActivationEngine(load_model(build_tiny_model("qwen3_5"), device="cpu"), [1, 2])
    assert again.fingerprint_id == base.fingerprint_id  # stable across loads
    others = [
        ActivationEngine(loaded, [1, 3]),
        ActivationEngine(loaded, [1, 2], pooling="last"),
        ActivationEngine(loaded, [1, 2], max_tokens=64),
        ActivationEngine(_loaded("qwen3"), [1, 2]),
    ]
    ids = {e.fingerprint_id for e in others}
    assert len(ids) == len(others) and base.fingerprint_id not in ids
    # Batch sizes are not part of what is computed, so they do not change the fingerprint.
    assert ActivationEngine(loaded, [1, 2], batch_size=1, max_batch_tokens=7).fingerprint_id == base.fingerprint_id


def test_tokenizer_hash_ignores_call_state():
    loaded = load_model(build_tiny_model("llama"), device="cpu")
    before = tokenizer_hash(loaded.tokenizer)
    loaded.tokenizer(["a b c d e f"], truncation=True, max_length=3, padding="max_length")
    assert tokenizer_hash(loaded.tokenizer) == before
    assert tokenizer_hash(_loaded("qwen3").tokenizer) == before  # same tokenizer files
    assert tokenizer_hash(_loaded("bert").tokenizer) != before


def test_stats_fields():
    engine = ActivationEngine(_loaded("bert"), [0])
    _run(engine, [TEXTS[1], TEXTS[1].upper()])  # one padded length: one batch
    st = engine.stats
    assert isinstance(st, EngineStats)
    assert (st.texts, st.batches, st.device, st.oom_retries) == (2, 1, "cpu", 0)
    assert st.seconds > 0 and st.peak_memory_bytes > 0
    assert set(st.as_dict()) >= {"texts", "tokens", "truncated", "batches", "seconds", "oom_retries",
                                 "peak_memory_bytes", "device", "load_seconds", "batch_size", "max_batch_tokens"}
    assert (st.batch_size, st.max_batch_tokens) == (None, DEFAULT_MAX_BATCH_TOKENS)
    assert st.load_seconds == 0.0  # built on a loaded model: nothing loaded inside forward


def test_gpt2_tokenizer_without_pad_token_gets_eos():
    loaded = load_model(build_tiny_model("gpt2"), device="cpu")
    assert loaded.tokenizer.pad_token is None
    ActivationEngine(loaded, [0])
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token
    assert loaded.tokenizer.padding_side == "right"


def test_real_minilm_layer5_mean_matches_hidden_states(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model("minilm", device="cpu")
    texts = ["I felt warm and grateful after talking with an old friend.",
             "The server crashed again and I am frustrated."]
    engine = ActivationEngine(loaded, [5, 2], pooling="mean")
    got = _run(engine, texts)
    for i, text in enumerate(texts):
        enc = loaded.tokenizer(text, return_tensors="pt")
        with torch.inference_mode():
            hs = loaded.model(**enc, output_hidden_states=True).hidden_states
        torch.testing.assert_close(got[i, 0], hs[6][0].mean(0), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(got[i, 1], hs[3][0].mean(0), atol=ATOL, rtol=RTOL)


def test_without_a_batch_size_batches_are_bounded_by_the_token_budget_alone():
    loaded = _loaded("llama")
    texts = [f"{w} number {i}" for i, w in enumerate(["rain", "sun", "wind"] * 20)]
    engine = ActivationEngine(loaded, [1], max_batch_tokens=256)
    assert engine.batch_size is None and engine.stats.batch_size is None
    rec = _ShapeRecorder(loaded.model)
    try:
        got = _run(engine, texts)
    finally:
        rec.close()
    assert all(b * t <= 256 for b, t in rec.shapes) and max(b for b, _ in rec.shapes) > 8
    assert torch.equal(got, _run(ActivationEngine(loaded, [1], batch_size=3), texts))
    # a given batch size keeps its meaning, with the seed's padded-token cap
    given = ActivationEngine(loaded, [1], batch_size=4)
    assert (given.batch_size, given.max_batch_tokens) == (4, 16384)


def test_batch_size_advice_names_the_measured_alternative():
    advice = batch_size_advice(4, [208] * 99 + [512], 8192)
    assert advice and "batch size 4" in advice and "39 texts" in advice and "5.4k" in advice and "11.9k" in advice
    assert batch_size_advice(16, [208] * 10, 8192) is None  # within 4x of what the budget allows
    assert batch_size_advice(4, [2048] * 10, 8192) is None  # long texts: the budget allows only 4
    assert batch_size_advice(4, [], 8192) is None


def test_a_small_batch_size_on_an_accelerator_is_pointed_out_once(monkeypatch, caplog):
    loaded = _loaded("gpt2")
    texts = ["rain and wind"] * 40
    cpu = ActivationEngine(loaded, [0], batch_size=2)
    with caplog.at_level("WARNING", logger="amygdala_dagster.engine.activations"):
        _run(cpu, texts)
    assert "far below" not in caplog.text  # on a CPU the batch size hardly matters
    engine = ActivationEngine(loaded, [0], batch_size=2)
    monkeypatch.setattr(engine, "_accelerated", lambda: True)
    with caplog.at_level("WARNING", logger="amygdala_dagster.engine.activations"):
        _run(engine, texts)
        _run(engine, texts)
    assert caplog.text.count("far below") == 1
