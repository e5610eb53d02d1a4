"""Contract 3 file pair: layout, manifest fields, SHA-256, atomic replacement, refusals, inspect."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from amygdala_dagster.commands import cli
from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.readout.manifest import ReadoutFileError, build_manifest, load_readout, write_readout
from amygdala_dagster.readout.vectors import TrainedReadout

H = 12
LAYERS = [1, 4]

REQUIRED_FIELDS = {
    "format_version", "concepts", "layers", "hidden_size", "model", "model_revision", "dtype", "pooling",
    "activation_site", "vectors_file", "vectors_sha256", "created_at", "training",
}


def make_readout(concepts=("anger", "calm", "joy"), seed=0, layers=LAYERS, h=H) -> TrainedReadout:
    rng = np.random.default_rng(seed)
    vectors = {}
    for layer in layers:
        m = rng.normal(size=(len(concepts), h))
        vectors[layer] = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    return TrainedReadout(
        concepts=list(concepts),
        layers=list(layers),
        vectors=vectors,
        raw_norms={c: [1.5 + i, 2.5 + i] for i, c in enumerate(concepts)},
        counts={c: {"train_positives": 10 + i, "train_negatives": 20, "holdout_positives": 3,
                    "holdout_negatives": 4} for i, c in enumerate(concepts)},
        calibration={c: {layer: {"split": "holdout", "pos_mean": 1.0, "pos_std": 0.5, "n_pos": 3,
                                 "neg_mean": -0.25, "neg_std": 0.4, "n_neg": 4} for layer in layers}
                     for c in concepts},
    )


FIELDS = dict(model="org/model", model_revision="abc123", dtype="bfloat16", pooling="mean",
              layer_path="model.layers", fingerprint={"model": "org/model", "layers": LAYERS},
              training={"estimator": "mean_difference", "texts": 42})


def write_pair(directory: Path, readout: TrainedReadout, **kw) -> tuple[Path, Path, dict]:
    v, m = directory / "vectors.safetensors", directory / "manifest.json"
    manifest = write_readout(v, m, readout, **{**FIELDS, **kw})
    return v, m, manifest


def test_vectors_file_layout(tmp_path):
    ro = make_readout()
    v, m, _ = write_pair(tmp_path, ro)
    with safe_open(str(v), framework="pt") as f:
        assert sorted(f.keys()) == ["layer_1.vectors", "layer_4.vectors"]
        for layer in LAYERS:
            t = f.get_tensor(f"layer_{layer}.vectors")
            assert t.dtype == torch.float32 and tuple(t.shape) == (3, H) and t.is_contiguous()
            np.testing.assert_array_equal(t.numpy(), ro.vectors[layer])  # rows in concept order
            np.testing.assert_allclose(torch.linalg.vector_norm(t, dim=1).numpy(), 1.0, atol=1e-6)


def test_manifest_fields(tmp_path):
    ro = make_readout()
    v, m, returned = write_pair(tmp_path, ro)
    manifest = json.loads(m.read_text())
    assert manifest == returned
    assert set(manifest) >= REQUIRED_FIELDS
    assert manifest["format_version"] == 3
    assert manifest["concepts"] == ["anger", "calm", "joy"] and manifest["layers"] == LAYERS
    assert manifest["hidden_size"] == H
    assert manifest["activation_site"] == "residual_stream_after_layer"
    assert manifest["model"] == "org/model" and manifest["model_revision"] == "abc123"
    assert manifest["dtype"] == "bfloat16" and manifest["pooling"] == "mean"
    assert manifest["vectors_file"] == "vectors.safetensors"
    assert manifest["vectors_sha256"] == sha256_file(v)
    assert manifest["vectors_dtype"] == "float32"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", manifest["created_at"])
    assert manifest["training"]["texts"] == 42
    calm = manifest["per_concept"]["calm"]
    assert calm["training"]["train_positives"] == 11
    assert set(calm["layers"]) == {"1", "4"}
    assert calm["layers"]["4"]["raw_norm"] == 3.5
    assert calm["layers"]["1"]["calibration"]["neg_std"] == 0.4


def test_build_manifest_is_plain_json():
    ro = make_readout()
    man = build_manifest(ro, vectors_file="v.safetensors", vectors_sha256="0" * 64, calibration=None, **FIELDS)
    json.dumps(man, allow_nan=False)
    assert man["per_concept"]["joy"]["layers"]["1"]["calibration"]["n_neg"] == 4


def test_load_readout_round_trip_and_deterministic_bytes(tmp_path):
    ro = make_readout()
    v, m, _ = write_pair(tmp_path / "a", ro)
    v2, _, _ = write_pair(tmp_path / "b", ro)
    assert v.read_bytes() == v2.read_bytes()  # same vectors, same SHA-256
    r = load_readout(v)  # manifest.json next to it by default
    assert r.concepts == ro.concepts and r.layers == LAYERS and r.sha256 == sha256_file(v)
    np.testing.assert_array_equal(r.vectors[4], ro.vectors[4])
    # read through the published release: `current` resolved once for both files
    assert r.manifest_path == m.resolve() and r.manifest_path.parent.parent.name == "releases" and r.dtype == "float32"


def test_half_precision_vectors_when_asked(tmp_path):
    v, m, man = write_pair(tmp_path, make_readout(), vectors_dtype="float16")
    with safe_open(str(v), framework="pt") as f:
        assert f.get_tensor("layer_1.vectors").dtype == torch.float16
    assert man["vectors_dtype"] == "float16"
    assert load_readout(v, m).dtype == "float16"


def test_refuses_mismatched_pair(tmp_path):
    va, ma, _ = write_pair(tmp_path / "a", make_readout(seed=1))
    vb, mb, _ = write_pair(tmp_path / "b", make_readout(seed=2))
    with pytest.raises(ReadoutFileError, match=r"mismatched pair: .*SHA-256"):
        load_readout(va, mb)
    with pytest.raises(ReadoutFileError, match="no such manifest"):
        load_readout(va, tmp_path / "nothing.json")


def _rewrite(v: Path, m: Path, tensors: dict, edit_manifest=None) -> None:
    """Replace the vectors file by ``tensors`` and fix the manifest's SHA so only the content is wrong."""
    save_file(tensors, str(v))
    man = json.loads(m.read_text())
    man["vectors_sha256"] = sha256_file(v)
    man.update(concepts=["anger", "calm", "joy"], format_version=1)  # undo earlier edits
    if edit_manifest:
        edit_manifest(man)
    m.write_text(json.dumps(man))


def test_refuses_invalid_pairs_saying_what_is_wrong(tmp_path):
    ro = make_readout()
    v, m, _ = write_pair(tmp_path, ro)
    good = {f"layer_{layer}.vectors": torch.from_numpy(ro.vectors[layer]) for layer in LAYERS}

    _rewrite(v, m, {"layer_1.vectors": good["layer_1.vectors"]})
    with pytest.raises(ReadoutFileError, match=r"missing \['layer_4.vectors'\]"):
        load_readout(v, m)

    _rewrite(v, m, {**good, "layer_9.vectors": good["layer_1.vectors"].clone()})
    with pytest.raises(ReadoutFileError, match=r"unexpected \['layer_9.vectors'\]"):
        load_readout(v, m)

    _rewrite(v, m, dict(good), lambda man: man.update(concepts=["anger", "calm"]))
    with pytest.raises(ReadoutFileError, match=r"layer_1.vectors has shape \[3, 12\], expected \[2, 12\]"):
        load_readout(v, m)

    scaled = good["layer_4.vectors"].clone()
    scaled[2] *= 2
    _rewrite(v, m, {**good, "layer_4.vectors": scaled})
    with pytest.raises(ReadoutFileError, match=r"layer 4: row 2 \('joy'\) has L2 norm 2"):
        load_readout(v, m)

    nan = good["layer_1.vectors"].clone()
    nan[0, 3] = float("nan")
    _rewrite(v, m, {**good, "layer_1.vectors": nan})
    with pytest.raises(ReadoutFileError, match=r"non-finite values in the rows of \['anger'\]"):
        load_readout(v, m)

    _rewrite(v, m, dict(good), lambda man: man.update(format_version=4))
    with pytest.raises(ReadoutFileError, match="format_version 4"):
        load_readout(v, m)

    v.write_bytes(b"not a safetensors file")
    _rewrite_sha_only(v, m)
    with pytest.raises(ReadoutFileError, match="not a readable safetensors file"):
        load_readout(v, m)


def _rewrite_sha_only(v: Path, m: Path) -> None:
    man = json.loads(m.read_text())
    man["vectors_sha256"] = sha256_file(v)
    man["format_version"] = 1
    m.write_text(json.dumps(man))


def test_refuses_to_write_invalid_vectors(tmp_path):
    ro = make_readout()
    ro.vectors[4] = ro.vectors[4] * 3
    with pytest.raises(ReadoutFileError, match=r"layer 4: row 0 \('anger'\) has L2 norm 3"):
        write_pair(tmp_path, ro)
    assert not list(tmp_path.iterdir())


def test_old_pair_stays_intact_when_writing_fails(tmp_path):
    v, m, _ = write_pair(tmp_path, make_readout(seed=1))
    before = (v.read_bytes(), m.read_bytes())

    # the manifest cannot be serialised: fails after the vectors bytes are built
    with pytest.raises(TypeError):
        write_pair(tmp_path, make_readout(seed=2), training={"oops": object()})
    assert (v.read_bytes(), m.read_bytes()) == before

    # a non-finite vector: refused before anything is written
    bad = make_readout(seed=3)
    bad.vectors[1][0, 0] = np.inf
    with pytest.raises(ReadoutFileError):
        write_pair(tmp_path, bad)
    assert (v.read_bytes(), m.read_bytes()) == before

    # the manifest's directory cannot be created (a file is in the way): vectors untouched too
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(OSError):
        write_readout(v, blocker / "manifest.json", make_readout(seed=4), **FIELDS)
    assert (v.read_bytes(), m.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "blocker", "current", "manifest.json", "releases", "vectors.safetensors"]
    assert len(list((tmp_path / "releases").iterdir())) == 1  # no staging leftover
    load_readout(v, m)

    # a successful write replaces both, consistently
    write_pair(tmp_path, make_readout(seed=5))
    assert load_readout(v, m).sha256 == sha256_file(v)
    assert v.read_bytes() != before[0]


def test_inspect_command(tmp_path, capsys):
    v, m, _ = write_pair(tmp_path, make_readout())
    assert cli.main(["inspect", str(v)]) == 0
    out = capsys.readouterr().out
    assert "anger, calm, joy" in out and "layer_4.vectors: [3x12]" in out
    assert f"{sha256_file(v)} (ok" in out
    assert "norms 1.000000..1.000000" in out

    other, om, _ = write_pair(tmp_path / "other", make_readout(seed=9))
    assert cli.main(["inspect", str(v), "--manifest", str(om)]) == 1
    captured = capsys.readouterr()
    assert "mismatch" in captured.out and "mismatched pair" in captured.err

    many = [f"c{i:02d}" for i in range(12)]
    vm, mm, _ = write_pair(tmp_path / "many", make_readout(concepts=many))
    assert cli.main(["inspect", str(vm), "--top", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["concepts"] == many
    assert all(len(layer["top_pairs"]) == 3 for layer in report["layers"])


def test_inspect_into_a_closed_pipe_prints_no_traceback(tmp_path):
    # `amygdala inspect DIR | head`: the reader is gone before the report is written
    import subprocess
    import sys

    v, _m, _ = write_pair(tmp_path, make_readout(concepts=[f"c{i:03d}" for i in range(200)]))
    proc = subprocess.Popen([sys.executable, "-m", "amygdala_dagster.commands.cli", "inspect", str(v)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    _out, err = proc.communicate(timeout=120)
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()


def test_inspect_lists_at_most_40_concept_names(tmp_path, capsys):
    v, _m, _ = write_pair(tmp_path, make_readout(concepts=[f"c{i:03d}" for i in range(200)]))
    assert cli.main(["inspect", str(v)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("concepts:"))
    assert line.startswith("concepts: 200: c000, ") and "c039, ... 160 more (--json lists all)" in line
    assert "c040" not in line


def test_inspect_of_a_missing_path_says_only_that(tmp_path, capsys):
    assert cli.main(["inspect", str(tmp_path / "nowhere")]) == 1
    captured = capsys.readouterr()
    assert "release:" not in captured.out and "concepts: 0" not in captured.out
    assert "no such vectors file" in captured.err
