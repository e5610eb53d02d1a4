"""`amygdala run` at the seed's scale: ~1,500 nodes, 200 qualifying emotions, the bundled MiniLM.

Generates a synthetic memory graph (deterministic seed) into a temporary
directory, runs ``amygdala run`` on it in a subprocess with a dedicated
``DAGSTER_HOME``, activation cache and output directory, then reads the step
times from the Dagster run's events and prints, per asset step, the seconds
and the ratio to the forward pass (``activation_stats``' ``forward_seconds``).

Goal (issue 10, section 3): everything outside the forward pass takes at most
as long as the forward pass, and ``evaluation_report`` at most 15 s.

Graph shape: node types and text come from the bundled sample graph (its
sentences recombined, so texts are journal-like prose of the same length);
200 emotion names in 20 clusters of 10 that co-occur (a node draws 2-4 tags
mostly from one cluster, the way warmth/gratitude/love co-occur in real
graphs), each cluster bound to one of the sample's emotions whose sentences
it borrows, so the vectors have something to find. Every emotion gets at
least ``--min-high`` tags at score >= 8, so all 200 qualify.

    python benchmarks/scale_200.py                 # ~4 minutes on 2 cores
    python benchmarks/scale_200.py --nodes 300 --emotions 40   # smoke run
    python benchmarks/scale_200.py --keep DIR      # keep the graph, output, DAGSTER_HOME
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import format_table  # noqa: E402

SAMPLE = REPO / "amygdala_dagster" / "data" / "sample_graph.jsonl"

_STEMS = """
warmth gratitude love tenderness affection fondness compassion empathy kindness devotion
joy delight elation glee cheer bliss amusement mirth euphoria exhilaration
calm serenity peace contentment ease relief comfort stillness equanimity repose
curiosity wonder interest fascination intrigue inquisitiveness awe amazement astonishment marvel
determination resolve grit perseverance tenacity focus drive ambition persistence commitment
sadness grief sorrow melancholy gloom despair heartache mourning regret wistfulness
anxiety worry unease dread nervousness apprehension panic fear tension restlessness
frustration irritation annoyance anger resentment exasperation impatience indignation rage bitterness
tiredness fatigue weariness exhaustion lethargy drowsiness burnout depletion sluggishness heaviness
loneliness isolation longing yearning homesickness abandonment alienation emptiness detachment nostalgia
pride confidence triumph dignity selfrespect accomplishment satisfaction fulfilment competence assurance
embarrassment shame guilt awkwardness humiliation remorse selfconsciousness sheepishness bashfulness chagrin
clarity insight understanding lucidity recognition realisation certainty comprehension epiphany discernment
hope optimism anticipation eagerness excitement enthusiasm expectancy zeal vigour inspiration
trust safety belonging acceptance openness security intimacy connection reassurance solidarity
envy jealousy rivalry covetousness spite suspicion distrust contempt disdain scorn
boredom apathy indifference ennui listlessness numbness dullness monotony flatness disinterest
surprise shock disbelief bewilderment confusion perplexity puzzlement disorientation doubt uncertainty
playfulness silliness whimsy mischief humour lightness spontaneity giddiness zest fun
reverence humility admiration respect gratefulness veneration modesty appreciation esteem honour
""".split()


def emotion_names(n: int) -> list[str]:
    if n > len(_STEMS):
        raise SystemExit(f"--emotions {n}: at most {len(_STEMS)}")
    return _STEMS[:n]


def _body(content: str) -> str:
    lines = content.rstrip().splitlines()
    while lines and re.fullmatch(r"(\s*\S+:\S+\s*)+", lines[-1]):
        lines.pop()
    return "\n".join(lines).strip()


def generate_graph(path: Path, *, n_nodes: int, n_emotions: int, min_high: int, seed: int) -> dict[str, Any]:
    """Write the synthetic graph as JSONL; returns its shape (tag counts, clusters)."""
    rng = random.Random(seed)
    sample = [json.loads(layer) for layer in SAMPLE.read_text(encoding="utf-8").splitlines() if layer.strip()]
    by_emotion: dict[str, list[str]] = defaultdict(list)
    all_sentences: list[str] = []
    for node in sample:
        body = _body(node["content"])
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", body) if len(s.strip()) > 20]
        all_sentences += sentences
        tags = re.findall(r"(\w+):(\d+)", node["content"].rstrip().splitlines()[-1])
        for name, score in tags:
            if int(score) >= 7:
                by_emotion[name] += sentences
    sample_emotions = sorted(e for e in by_emotion if len(by_emotion[e]) >= 10)
    types = [n["node_type"] for n in sample]
    names = emotion_names(n_emotions)
    clusters = [names[i:i + 10] for i in range(0, len(names), 10)]
    cue = {ci: sample_emotions[ci % len(sample_emotions)] for ci in range(len(clusters))}
    cluster_of = {e: ci for ci, c in enumerate(clusters) for e in c}
    tags: list[dict[str, int]] = [{} for _ in range(n_nodes)]
    home = [rng.randrange(len(clusters)) for _ in range(n_nodes)]
    # Guarantee: every emotion gets min_high high-score tags, on nodes of its own cluster when possible.
    members = defaultdict(list)
    for i, c in enumerate(home):
        members[c].append(i)
    for e in names:
        pool = members[cluster_of[e]] or list(range(n_nodes))
        for i in rng.sample(pool, min(min_high, len(pool))):
            tags[i][e] = rng.randint(8, 10)
    # Then the ordinary tagging: 1-3 more tags per node from its cluster, sometimes one from elsewhere.
    for i in range(n_nodes):
        c = clusters[home[i]]
        weights = [1.0 / (k + 1) for k in range(len(c))]  # a few emotions of a cluster are common
        for e in rng.choices(c, weights=weights, k=rng.randint(1, 3)):
            tags[i].setdefault(e, rng.randint(3, 10))
        if rng.random() < 0.3:
            e = rng.choice(names)
            tags[i].setdefault(e, rng.randint(2, 9))
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n_nodes):
            cue_sentences = by_emotion[cue[home[i]]]
            body = rng.sample(cue_sentences, 2) + rng.sample(all_sentences, rng.randint(3, 6))
            rng.shuffle(body)
            text = " ".join(body)
            tag_line = " ".join(f"{e}:{s}" for e, s in tags[i].items())
            fh.write(json.dumps({
                "key": f"synthetic/{i:05d}", "node_type": rng.choice(types),
                "content": f"{text}\n\n{tag_line}",
                "created_at": "2026-01-01T00:00:00Z", "updated_at": "2026-01-01T00:00:00Z",
            }) + "\n")
    high = Counter(e for t in tags for e, s in t.items() if s >= 8)
    return {"nodes": n_nodes, "emotions": len(names), "clusters": len(clusters),
            "tags": sum(len(t) for t in tags), "min_high": min(high[e] for e in names),
            "max_high": max(high[e] for e in names)}


def step_times(dagster_home: Path) -> tuple[dict[str, float], dict[str, Any]]:
    """Seconds per step (STEP_START -> STEP_SUCCESS/FAILURE) over every run in the instance, and
    the activation_stats materialisation metadata (for ``forward_seconds``)."""
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    import dagster as dg

    starts: dict[str, float] = {}
    out: dict[str, float] = {}
    act_meta: dict[str, Any] = {}
    with dg.DagsterInstance.get() as instance:
        for run in instance.get_runs():
            for rec in instance.all_logs(run.run_id):
                ev = rec.dagster_event
                if ev is None or ev.step_key is None:
                    continue
                if ev.event_type == dg.DagsterEventType.STEP_START:
                    starts[ev.step_key] = rec.timestamp
                elif ev.event_type in (dg.DagsterEventType.STEP_SUCCESS, dg.DagsterEventType.STEP_FAILURE):
                    out[ev.step_key] = (
                        out.get(ev.step_key, 0.0) + rec.timestamp - starts.pop(ev.step_key, rec.timestamp))
                elif ev.event_type == dg.DagsterEventType.ASSET_MATERIALIZATION:
                    mat = ev.event_specific_data.materialization
                    if mat.asset_key.path[-1] == "activation_stats":
                        act_meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return out, act_meta


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=1500)
    ap.add_argument("--emotions", type=int, default=200)
    ap.add_argument("--min-high", type=int, default=14,
                    help="high-score tags every emotion gets (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="work in this directory and keep it")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the run (default: %(default)s)")
    args = ap.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="amygdala-scale-"))
    if args.keep and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    try:
        graph = work / "graph.jsonl"
        shape = generate_graph(graph, n_nodes=args.nodes, n_emotions=args.emotions, min_high=args.min_high,
                               seed=args.seed)
        print(f"graph: {shape}", flush=True)
        home = work / "dagster_home"
        home.mkdir()
        (home / "dagster.yaml").write_text("")
        env = {**os.environ, "DAGSTER_HOME": str(home), "OMP_NUM_THREADS": str(args.threads),
               "AMYGDALA_CACHE_DIR": str(work / "cache"), "PYTHONPATH": str(REPO)}
        env.pop("AMYGDALA_EMOTIONS", None)
        cmd = [sys.executable, "-m", "amygdala_dagster.commands.cli", "run", "--memory-file", str(graph),
               "--output-dir", str(work / "out"), "--cache-dir", str(work / "cache")]
        load_before = os.getloadavg()[0]
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
        load_after = os.getloadavg()[0]
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-5000:], sep="\n", file=sys.stderr)
            print(f"amygdala run failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        steps, act = step_times(home)
        forward = float(act.get("forward_seconds") or 0.0)
        report_dir = work / "out" / "report"
        sizes = {p.name: p.stat().st_size for p in report_dir.glob("*") if p.is_file()}
        rows = []
        for step, sec in sorted(steps.items(), key=lambda kv: -kv[1]):
            rows.append([step, round(sec, 1), f"{sec / forward:.2f}x" if forward else "-"])
        outside = sum(steps.values()) - forward
        rows.append(["forward pass (in activation_stats)", round(forward, 1), "1.00x"])
        rows.append(["all steps minus the forward pass", round(outside, 1),
                     f"{outside / forward:.2f}x" if forward else "-"])
        rows.append(["wall (amygdala run, process)", round(wall, 1), f"{wall / forward:.2f}x" if forward else "-"])
        print(format_table(["step", "seconds", "/ forward"], rows))
        print("report files: " + ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sorted(sizes.items())))
        qualified = len(json.loads((work / "out" / "manifest.json").read_text())["concepts"])
        print(f"emotions trained: {qualified}; CPU time of the run {cpu:.0f} s over {wall:.0f} s wall; "
              f"1-min load average {load_before:.1f} before, {load_after:.1f} after (2 cores: above 2 means the "
              "run shared the machine and every step is slower by about that factor)")
        if args.json:
            args.json.write_text(json.dumps({"graph": shape, "steps": steps, "forward_seconds": forward,
                                             "outside_forward": outside, "wall": wall, "cpu_seconds": cpu,
                                             "loadavg": [load_before, load_after], "report_bytes": sizes,
                                             "emotions_trained": qualified}, indent=2))
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
