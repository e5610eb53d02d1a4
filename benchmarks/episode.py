"""The episode rule on labelled conversations the calibration never saw: conversation-level false alarms, hits, AUROC.

CPU, the bundled MiniLM and sample graph (16 emotions). The labelled
conversations are the 60 bundled snippets plus ``benchmarks/data/
labelled_conversations.jsonl`` (105 more, written for this measurement; 24
without any emotion), split in two halves by a hash of their id. Each half
sets the calibration (``amygdala run --calibration-texts HALF.jsonl``; the
records keep their labels, so each emotion's rule is set on the conversations
without it) and the other half is evaluated (``--eval-conversations``); then
the reverse. A third run calibrates on the graph (each emotion's held-out
negatives, the default) and evaluates all 165 conversations.

Everything goes through the real command line and the Dagster run; the numbers
are read from each run's ``report/evaluation.json``: per emotion the rule's
conversation-level false-alarm rate, hit rate and score AUROC, the token
threshold's firing rate on conversations without the emotion and the
text-level AUROC, averaged over emotions and over both directions of the split.

``--code DIR`` runs another checkout's code (e.g. the commit before the episode
rule, to compare the token and text numbers): ``git archive <commit> | tar -x -C DIR``.

It also compares candidate statistics on the split (EWM with several
half-lives, a windowed mean, the cumulative mean after a burn-in), each
calibrated and evaluated exactly as the shipped rule (conformal threshold on
the peaks of the calibration half's episodes without the emotion), from the
per-token activations the split runs kept; ``far_x4`` is the false-alarm rate on
long episodes (4 conversations without the emotion read one after another)
under the threshold set on single conversations.

    python benchmarks/episode.py [--out DIR] [--code DIR] [--json benchmarks/results-episode-cpu.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BUNDLED = ROOT / "amygdala_dagster" / "data" / "conversation_snippets.jsonl"
EXTRA = ROOT / "benchmarks" / "data" / "labelled_conversations.jsonl"
RATE = 0.05
#: (name, kind, parameter, min_tokens): kind "ewm" (half-life in tokens, None: cumulative mean) or "window".
CANDIDATES = [("ewm h=8", "ewm", 8.0, 32), ("ewm h=32", "ewm", 32.0, 32), ("ewm h=64", "ewm", 64.0, 32),
              ("ewm h=128 (shipped)", "ewm", 128.0, 32), ("ewm h=128, min 16", "ewm", 128.0, 16),
              ("window 16", "window", 16, 32), ("window 64", "window", 64, 32),
              ("cumulative, min 16", "ewm", None, 16), ("cumulative, min 32", "ewm", None, 32)]


def records() -> list[dict]:
    out = []
    for path in (BUNDLED, EXTRA):
        out += [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def half_of(rid: str) -> int:
    return int(hashlib.sha256(f"episode-split\0{rid}".encode()).hexdigest(), 16) % 2


def write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs), encoding="utf-8")
    return path


def run(out: Path, cache: Path, home: Path, code: Path | None, *flags: str) -> dict:
    """One `amygdala run`; returns its evaluation.json."""
    env = dict(os.environ, DAGSTER_HOME=str(home))
    env["PYTHONPATH"] = str(code or ROOT)
    cmd = [sys.executable, "-m", "amygdala_dagster.commands.cli", "run", "--output-dir", str(out), "--cache-dir",
           str(cache), "--calibration-tokens", "40000", *flags]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(code or ROOT))
    if proc.returncode != 0 or not (out / "report" / "evaluation.json").is_file():
        sys.exit(f"benchmark: {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    print(f"  run {out.name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return json.loads((out / "report" / "evaluation.json").read_text())


def _mean(values: list) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(vals)) if vals else None


def summary(evaluations: list[dict]) -> dict:
    """Means over emotions (and over the given runs) of what the issue's targets name."""
    rows = [v for ev in evaluations for v in ev["conversations"]["per_emotion"].values()]
    ep = [v.get("episode") or {} for v in rows]
    return {
        "episode_false_alarm_rate": _mean([e.get("false_alarm_rate") for e in ep]),
        "episode_hit_rate": _mean([e.get("hit_rate") for e in ep]),
        "episode_auroc": _mean([e.get("auroc") for e in ep]),
        "token_fire_rate_without": _mean([v["fire_rate_without"] for v in rows]),
        "token_auroc": _mean([v["token_auroc"] for v in rows]),
        "text_auroc": _mean([v["text_auroc"] for v in rows]),
        "n_conversations": [ev["conversations"]["n_conversations"] for ev in evaluations],
    }


def per_emotion(evaluations: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for e in evaluations[0]["conversations"]["per_emotion"]:
        vals = [ev["conversations"]["per_emotion"][e] for ev in evaluations]
        ep = [v.get("episode") or {} for v in vals]
        out[e] = {"n_with": sum(v["n_with"] for v in vals), "n_without": sum(v["n_without"] for v in vals),
                  "false_alarms": sum(x.get("n_fired_without", 0) for x in ep),
                  "hits": sum(x.get("n_fired_with", 0) for x in ep),
                  "episode_auroc": _mean([x.get("auroc") for x in ep]),
                  "text_auroc": _mean([v["text_auroc"] for v in vals])}
    return out


# ----------------------------------------------------------------------------- candidate statistics
def _window(x: np.ndarray, w: int) -> np.ndarray:
    from amygdala_dagster.evaluation.trace import moving_average

    return moving_average(x, w)


def _stat(x: np.ndarray, kind: str, p: float | None) -> np.ndarray:
    from amygdala_dagster.readout.episode import statistic

    return statistic(x, p) if kind == "ewm" else _window(x, int(p))


def _peak_end(x: np.ndarray, kind: str, p: float | None, m: int) -> tuple[float | None, float]:
    s = _stat(x, kind, p)
    return (float(s[m - 1:].max()) if len(s) >= m else None), (float(s[-1]) if len(s) else math.nan)


def projections(out: Path) -> tuple[dict, list[str]]:
    """``{emotion: (layer, {conversation id: (labels, scored projections)})}`` from a split run's kept
    per-token activations: the calibration half and the evaluated half."""
    from amygdala_dagster.evaluation.conversations import sample_scores
    from amygdala_dagster.readout.manifest import load_readout
    from amygdala_dagster.workflow.samples import StoredSamples

    readout = load_readout(out)
    ev = json.loads((out / "report" / "evaluation.json").read_text())
    samples = StoredSamples.from_json((out / "tokens" / "samples.json").read_text())
    data: dict = {}
    for which, sample in (("cal", samples.calibration), ("eval", samples.conversations)):
        for s, entry in zip(sample_scores(sample, samples.tokens, readout, samples.layers), sample.entries):
            for ci, e in enumerate(readout.concepts):
                layer = ev["conversations"]["per_emotion"][e]["layer"]
                data.setdefault(e, {"cal": [], "eval": []})[which].append(
                    (set(entry.emotions or ()), s.raw[layer][s.scored, ci].astype(np.float64)))
    return data, list(readout.concepts)


def candidates(split_outs: list[Path]) -> list[dict]:
    from amygdala_dagster.readout.episode import conformal_threshold
    from amygdala_dagster.readout.metrics import auroc

    loaded = [projections(o) for o in split_outs]
    rows = []
    for name, kind, p, m in CANDIDATES:
        far, hit, auc, far4 = [], [], [], []
        for data, concepts in loaded:
            for e in concepts:
                cal = [x for lab, x in data[e]["cal"] if e not in lab]
                peaks = [pk for pk, _ in (_peak_end(x, kind, p, m) for x in cal) if pk is not None]
                thr = conformal_threshold(peaks, RATE)[0]
                ev = data[e]["eval"]
                has = np.array([e in lab for lab, _ in ev])
                pe = [_peak_end(x, kind, p, m) for _, x in ev]
                fired = np.array([pk is not None and pk >= thr for pk, _ in pe])
                end = np.array([en for _, en in pe])
                far.append(fired[~has].mean())
                hit.append(fired[has].mean())
                ok = np.isfinite(end)
                auc.append(auroc(end[has & ok], end[~has & ok]))
                negs = [x for lab, x in ev if e not in lab]
                long = [_peak_end(np.concatenate(negs[i:i + 4]), kind, p, m)[0] for i in range(0, len(negs) - 3, 4)]
                far4.append(np.mean([pk is not None and pk >= thr for pk in long]))
        rows.append({"statistic": name, "false_alarm_rate": _mean(far), "hit_rate": _mean(hit), "auroc": _mean(auc),
                     "false_alarm_rate_x4": _mean(far4)})
    return rows


# ----------------------------------------------------------------------------- main
def _f(x: float | None, d: int = 3) -> str:
    return "–" if x is None else f"{x:.{d}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where the runs go (default: a temporary directory)")
    parser.add_argument("--code", type=Path, default=None, help="run this checkout's code instead of this one's")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    base = args.out or Path(tempfile.mkdtemp(prefix="amygdala-episode-"))
    base.mkdir(parents=True, exist_ok=True)
    cache, home = base / "cache", base / "dagster_home"
    home.mkdir(exist_ok=True)
    recs = records()
    halves = [[r for r in recs if half_of(r["id"]) == h] for h in (0, 1)]
    files = [write(base / f"half{h}.jsonl", halves[h]) for h in (0, 1)]
    print(f"{len(recs)} labelled conversations: halves of {len(halves[0])} and {len(halves[1])}", file=sys.stderr)
    split_outs = [base / "split-cal0-eval1", base / "split-cal1-eval0"]
    split = [run(split_outs[0], cache, home, args.code, "--calibration-texts", str(files[0]),
                 "--eval-conversations", str(files[1])),
             run(split_outs[1], cache, home, args.code, "--calibration-texts", str(files[1]),
                 "--eval-conversations", str(files[0]))]
    graph = run(base / "graph-eval-all", cache, home, args.code,
                "--eval-conversations", str(write(base / "all.jsonl", recs)))
    result = {"conversations": len(recs), "halves": [len(h) for h in halves], "target_rate": RATE,
              "code": str(args.code or ROOT),
              "split": summary(split), "graph_default": summary([graph]), "per_emotion_split": per_emotion(split)}
    print(f"\n## Episode rule on held-out labelled conversations ({len(recs)}: halves of {len(halves[0])} / "
          f"{len(halves[1])}; 16 emotions; means over emotions)\n")
    print("| calibration -> evaluation | episode false alarms | episode hits | episode AUROC | "
          "token fire rate without | token AUROC | text AUROC |\n|---|---:|---:|---:|---:|---:|---:|")
    for label, s in (("split: one half's conversations -> the other half (both ways)", result["split"]),
                     ("graph default: held-out negatives -> all conversations", result["graph_default"])):
        print(f"| {label} | {_f(s['episode_false_alarm_rate'])} | {_f(s['episode_hit_rate'])} | "
              f"{_f(s['episode_auroc'])} | {_f(s['token_fire_rate_without'])} | {_f(s['token_auroc'])} | "
              f"{_f(s['text_auroc'])} |")
    print("\n| emotion | with | without | false alarms | hits | episode AUROC | text AUROC |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for e, v in result["per_emotion_split"].items():
        print(f"| {e} | {v['n_with']} | {v['n_without']} | {v['false_alarms']} | {v['hits']} | "
              f"{_f(v['episode_auroc'], 2)} | {_f(v['text_auroc'], 2)} |")
    if split[0]["conversations"]["per_emotion"][next(iter(split[0]["conversations"]["per_emotion"]))].get("episode"):
        result["candidates"] = candidates(split_outs)
        print("\n## Candidate statistics on the split (conformal threshold at 5 % on the calibration half)\n")
        print("| statistic | false alarms | hits | AUROC of the end value | false alarms, 4x longer episodes |"
              "\n|---|---:|---:|---:|---:|")
        for r in result["candidates"]:
            print(f"| {r['statistic']} | {_f(r['false_alarm_rate'])} | {_f(r['hit_rate'])} | {_f(r['auroc'])} | "
                  f"{_f(r['false_alarm_rate_x4'])} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nresults: {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
