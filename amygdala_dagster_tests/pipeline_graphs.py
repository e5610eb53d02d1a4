"""Small synthetic memory graphs for the Dagster pipeline tests (tiny, so MiniLM runs fast on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

PHRASES = {
    "warmth": [
        "I felt close to the user as we talked about her grandmother's garden",
        "we laughed together about the burnt bread and she thanked me twice",
        "he shared photos of his new puppy and I enjoyed every single one",
        "the family letter came together gently, with kindness in every line",
    ],
    "curiosity": [
        "I kept wondering why the prime gaps behaved that way and dug deeper",
        "the strange tokenizer bug made me want to read the whole source tree",
        "what would happen if the graph had cycles, I asked, and then tried it",
        "the question about octopus neurons opened a dozen new threads to explore",
    ],
    "frustration": [
        "the flaky test failed again on the eleventh run for no visible reason",
        "the build broke a third time and the logs said nothing useful at all",
        "he rejected every draft without saying what was wrong with any of it",
        "the dependency upgrade cascaded into forty failing imports yet again",
    ],
}
NEUTRAL = [
    "I summarised the quarterly tax table into a short list of columns",
    "we converted the meeting notes into a bulleted agenda for Monday",
    "the user asked for the capital of Peru and I answered with Lima",
    "I reformatted the CSV headers to snake case as they requested",
]
STAMP = "2026-03-01T00:00:00Z"


def node(key: str, node_type: str, body: str, tags: str) -> dict:
    return {"key": key, "node_type": node_type, "content": f"{body}\n\n{tags}",
            "created_at": STAMP, "updated_at": STAMP}


def small_graph(n: int = 8, *, wonder_on_curiosity: bool = False) -> list[dict]:
    """``n`` nodes per emotion (warmth, curiosity, frustration) plus ``n`` neutral ones.

    With ``wonder_on_curiosity`` the curiosity nodes also carry ``wonder:9``: a
    fourth emotion whose texts are exactly texts the other emotions already use.
    """
    nodes = []
    names = list(PHRASES)
    for e in names:
        others = [o for o in names if o != e]
        for i in range(n):
            when = ["morning", "evening", "night", "noon"][i % 4]
            body = f"{PHRASES[e][i % 4]}. Entry {i}, the {when} session {i * 7 + len(e)}."
            tags = f"{e}:{8 + i % 3} {others[i % 2]}:{2 + i % 2}"
            if wonder_on_curiosity and e == "curiosity":
                tags += " wonder:9"
            nodes.append(node(f"journal/{e}-{i:02d}", ["journal", "digest", "pattern"][i % 3], body, tags))
    for i in range(n):
        nodes.append(node(f"core/neutral-{i:02d}", "core", f"{NEUTRAL[i % 4]}, item number {i}.", "calm:3 clarity:4"))
    return nodes


def new_emotion_nodes(emotion: str, n: int = 4) -> list[dict]:
    """``n`` nodes strongly tagged with a new emotion, with texts never seen before."""
    return [
        node(f"journal/{emotion}-{i:02d}", "journal",
             f"A quiet {emotion} filled the afternoon as the long proof finally closed, step {i} of the way.",
             f"{emotion}:9 calm:2")
        for i in range(n)
    ]


def write_graph(path: Path, nodes: list[dict]) -> Path:
    path.write_text("".join(json.dumps(n) + "\n" for n in nodes), encoding="utf-8")
    return path
