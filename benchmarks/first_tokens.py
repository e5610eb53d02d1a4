"""How outsized are the first positions' residual activations? (chooses token calibration's skip_first_tokens)

For each model, over the bundled conversation snippets: the residual stream
after each hooked layer (the runtime's activation), per position, as
``median L2 norm at position p / median L2 norm at positions >= 8`` and the
same ratio for the spread (std) of projections on 64 random unit directions.
Special tokens are marked. Real MiniLM weights; the decoders are tiny
random-weight models built from configs (attention sinks are learned, so
they cannot show them; they check that nothing here depends on one
architecture).

    python benchmarks/first_tokens.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from amygdala_dagster.data import conversation_snippets_path  # noqa: E402
from amygdala_dagster.engine.inputs import read_inputs  # noqa: E402
from amygdala_dagster.engine.models import load_model  # noqa: E402
from amygdala_dagster.readout.runtime import ReadoutRuntime


def measure(source: str, layers: list[int], texts: list, positions: int = 4) -> list[dict]:
    loaded = load_model(source, device="cpu")
    rt = ReadoutRuntime(loaded.model, loaded.tokenizer, None, layers=layers)
    enc = [rt.encode(t) for t in texts]
    rng = np.random.default_rng(0)
    dirs = rng.normal(size=(loaded.hidden_size, 64))
    dirs /= np.linalg.norm(dirs, axis=0, keepdims=True)
    per = {i: h for i, h in rt.hidden_states(enc)}
    rows = []
    for li, layer in enumerate(layers):
        norms = {p: [] for p in range(positions)}
        projs = {p: [] for p in range(positions)}
        rest_n, rest_p = [], []
        for i, e in enumerate(enc):
            h = per[i][:, li].astype(np.float64)
            n = np.linalg.norm(h, axis=1)
            pr = h @ dirs
            for p in range(min(positions, len(n))):
                norms[p].append(n[p])
                projs[p].append(pr[p])
            body = [t for t in range(8, len(n)) if not e.special[t]]
            rest_n += list(n[body])
            rest_p.append(pr[body])
        rest_std = np.concatenate(rest_p).std(axis=0).mean()
        row = {"model": source if len(source) < 20 else Path(source).name, "layer": layer,
               "special_at": [p for p in range(positions) if enc[0].special[p]]}
        for p in range(positions):
            row[f"norm{p}"] = np.median(norms[p]) / np.median(rest_n)
            row[f"spread{p}"] = np.asarray(projs[p]).std(axis=0).mean() / rest_std
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.set_num_threads(1)
    texts = [r.item for r in read_inputs(conversation_snippets_path())]
    from amygdala_dagster_tests.tiny_models import build_tiny_model

    models = [("minilm", [0, 3, 4, 5])] + [(build_tiny_model(a), [0, 1, 2, 3]) for a in ("qwen3", "llama", "gpt2")]
    print("| model | layer | special positions | norm p0 | norm p1 | norm p2 | norm p3 | "
          "spread p0 | spread p1 | spread p2 |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for source, layers in models:
        for r in measure(source, layers, texts):
            print(f"| {r['model']} | {r['layer']} | {r['special_at']} | {r['norm0']:.2f} | {r['norm1']:.2f} | "
                  f"{r['norm2']:.2f} | {r['norm3']:.2f} | {r['spread0']:.2f} | {r['spread1']:.2f} | "
                  f"{r['spread2']:.2f} |")


if __name__ == "__main__":
    main()
