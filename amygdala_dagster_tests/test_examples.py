"""Contract 2 example selection, the snapshot table and the examples directory."""

from __future__ import annotations

import json
import logging
import random
from decimal import Decimal
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amygdala_dagster.examples.catalog import cooccurrence, emotion_catalog, qualifying_emotions
from amygdala_dagster.examples.directory import examples_hash, read_examples_dir, run_extraction, write_examples_dir
from amygdala_dagster.examples.selection import (
    Example,
    ExampleSet,
    ExamplesFormatError,
    SelectionParams,
    mention_count,
    select_examples,
    split_for_key,
)
from amygdala_dagster.graph.nodes import MemoryNode
from amygdala_dagster.graph.snapshot import (
    SnapshotError,
    build_snapshot,
    read_snapshot,
    snapshot_hash,
    write_snapshot,
)

FILLER = " and the long afternoon went on quietly by the window"  # 53 chars: clears min_content_chars


def node(key: str, body: str, tags: str = "", node_type: str = "journal") -> MemoryNode:
    return MemoryNode(key, node_type, body + (f"\n{tags}" if tags else ""))


def keys(examples: list[Example]) -> list[str]:
    return [e.key for e in examples]


def select(nodes: list[MemoryNode], emotion: str, **params) -> ExampleSet:
    return select_examples(build_snapshot(nodes), emotion, SelectionParams(**params))


def random_graph(rng: random.Random, n: int, prefix: str = "k", emotions=("joy", "calm", "awe")) -> list[MemoryNode]:
    out = []
    for i in range(n):
        tags = " ".join(f"{e}:{rng.randint(0, 10)}" for e in rng.sample(emotions, rng.randint(1, len(emotions))))
        body = f"{prefix} entry {i} {rng.random():.12f}{FILLER}"
        out.append(node(f"{prefix}{i:05d}", body, tags, rng.choice(["journal", "digest", "pattern"])))
    return out


# --------------------------------------------------------------------------- snapshot


def test_snapshot_table_and_hash(tmp_path: Path) -> None:
    nodes = [
        MemoryNode("b", "digest", "Body B.\nwarmth:9 joy:3 joy:high", "2024-01-01", "2024-01-02"),
        MemoryNode("a", "journal", "Body A, untagged."),
    ]
    df = build_snapshot(nodes)
    assert df["key"].to_list() == ["a", "b"]
    row = df.row(1, named=True)
    assert row["body"] == "Body B."
    assert row["scores"] == [{"emotion": "joy", "score": 3.0}, {"emotion": "warmth", "score": 9.0}]
    assert row["n_malformed"] == 1
    assert row["created_at"] == "2024-01-01"
    assert df.schema["n_malformed"] == pl.Int64
    # order-independent, content-sensitive
    assert snapshot_hash(build_snapshot(nodes[::-1])) == snapshot_hash(df)
    changed = [nodes[0], MemoryNode("a", "journal", "Body A, edited.")]
    assert snapshot_hash(build_snapshot(changed)) != snapshot_hash(df)
    retyped = [nodes[0], MemoryNode("a", "digest", "Body A, untagged.")]
    assert snapshot_hash(build_snapshot(retyped)) != snapshot_hash(df)
    path = tmp_path / "snap" / "snapshot.parquet"
    write_snapshot(df, path)
    assert read_snapshot(path).equals(df)
    assert [p.name for p in path.parent.iterdir()] == ["snapshot.parquet"]  # no temp files left
    with pytest.raises(SnapshotError, match="duplicate node key 'a'"):
        build_snapshot([nodes[1], nodes[1]])
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(SnapshotError, match="bad.parquet"):
        read_snapshot(tmp_path / "bad.parquet")
    assert build_snapshot([]).height == 0


# --------------------------------------------------------------------------- rules


def test_positive_threshold_boundary() -> None:
    nodes = [
        node("a", "exactly at threshold" + FILLER, "joy:8"),
        node("b", "just below the threshold" + FILLER, "joy:7.9"),
        node("c", "well above the threshold" + FILLER, "joy:10"),
    ]
    s = select(nodes, "joy")
    assert keys(s.positives) == ["a", "c"]
    assert [e.score for e in s.positives] == [8.0, 10.0]
    assert keys(select(nodes, "joy", min_positive_score=7.9).positives) == ["a", "b", "c"]


def test_tag_at_low_score_is_a_mention() -> None:
    nodes = [
        node("a", "a low tag only" + FILLER, "joy:1 calm:5"),
        node("b", "unrelated entirely" + FILLER, "calm:5"),
    ]
    assert keys(select(nodes, "joy").negatives) == ["b"]
    s = select(nodes, "joy", max_negative_mentions=1)
    assert keys(s.negatives) == ["a", "b"]
    assert [e.score for e in s.negatives] == [1.0, None]


def test_whole_word_mentions_in_the_body() -> None:
    nodes = [
        node("a", "I felt JOY at the sight of it" + FILLER, "calm:5"),
        node("b", "an enjoyable, joyful, killjoy day" + FILLER, "calm:5"),
        node("c", "joy-filled morning" + FILLER, "calm:5"),
        node("d", "joy_count went up" + FILLER, "calm:5"),
    ]
    assert keys(select(nodes, "joy").negatives) == ["b", "d"]
    assert mention_count("Joy, joy! and joy.", {}, "joy") == 3
    assert mention_count("Joy, joy!", {"joy": 0.0}, "joy") == 3
    assert mention_count("enjoy the joyride", {"calm": 9.0}, "joy") == 0


def test_mentions_of_hyphenated_underscored_and_non_ascii_names() -> None:
    assert mention_count("a bout of self-doubt again", {}, "self-doubt") == 1
    assert mention_count("Self doubt, self_doubt", {}, "self-doubt") == 2
    assert mention_count("self-doubting", {}, "self-doubt") == 0
    assert mention_count("quiet pride", {}, "quiet_pride") == 1
    assert mention_count("Ärger und ärger", {}, "ärger") == 2
    assert mention_count("Verärgerung", {}, "ärger") == 0
    assert mention_count("静けさ、静けさ", {}, "静けさ") == 2


def test_negatives_need_at_least_one_valid_tag() -> None:
    nodes = [
        node("a", "untagged node body" + FILLER),
        node("b", "only malformed tags" + FILLER, "calm:high"),
        node("c", "a validly tagged node" + FILLER, "calm:0"),
    ]
    assert keys(select(nodes, "joy").negatives) == ["c"]


def test_min_content_chars_counts_the_body_without_tags() -> None:
    nodes = [
        node("a", "x" * 40, "joy:9"),
        node("b", "y" * 39, "joy:9 calm:9 awe:9 warmth:9"),
        node("c", "z" * 39, "calm:2"),
        node("d", "w" * 40, "calm:2"),
    ]
    s = select(nodes, "joy")
    assert keys(s.positives) == ["a"] and keys(s.negatives) == ["d"]
    assert keys(select(nodes, "joy", min_content_chars=39).negatives) == ["c", "d"]


def test_identical_bodies_count_once() -> None:
    body = "the same text, seen twice" + FILLER
    nodes = [
        node("p2", body, "joy:9"),
        node("p1", "  " + body + "  \n", "joy:8"),
        node("n1", body, "calm:3"),  # same body as a positive: never a negative
        node("n3", "another text" + FILLER, "calm:3"),
        node("n2", "another text" + FILLER, "awe:3"),
    ]
    s = select(nodes, "joy")
    assert keys(s.positives) == ["n1"]  # the smallest key stands for the body, with the copies' merged tags
    assert s.positives[0].text == body.strip() and s.positives[0].score == 9.0
    assert keys(s.negatives) == ["n2"]


def test_copies_of_a_body_merge_their_tags() -> None:
    """Issue 9: 'gratitude:6' on one copy, untagged for gratitude on the other, was a gratitude negative."""
    body = "Thank you for staying late to help me move the boxes" + FILLER
    nodes = [
        node("a-copy", body, "gratitude:6"),
        node("b-copy", body, "calm:4", node_type="digest"),
        node("other", "A different text about the weather today" + FILLER, "calm:5"),
    ]
    s = select(nodes, "gratitude")
    assert keys(s.negatives) == ["other"] and s.positives == []  # a tag on any copy is a mention
    # The merged body carries every copy's tags, maximum score per emotion; the smallest key stands for it.
    calm = select(nodes, "calm", min_positive_score=4)
    assert keys(calm.positives) == ["a-copy", "other"]
    assert calm.positives[0].score == 4.0 and calm.positives[0].node_type == "journal"
    allowed = select(nodes, "gratitude", max_negative_mentions=1)
    assert keys(allowed.negatives) == ["a-copy", "other"] and allowed.negatives[0].score == 6.0
    # The smallest key wins even when only a later copy carries the tag.
    swapped = [node("a-copy", body, "calm:2"), node("b-copy", body, "gratitude:9")]
    assert keys(select(swapped, "gratitude").positives) == ["a-copy"]
    # The catalog counts the body once.
    cat = emotion_catalog(build_snapshot(nodes + [node("c-copy", body, "gratitude:9")]), min_positives=1)
    row = cat.filter(pl.col("emotion") == "gratitude").row(0, named=True)
    assert row["n_tagged"] == 1 and row["n_positive"] == 1 and row["mean_score"] == 9.0


def test_positive_cap_keeps_all_below_and_exactly_cap_above() -> None:
    rng = random.Random(1)
    nodes = [node(f"p{i:03d}", f"positive {i}" + FILLER, "joy:9") for i in range(30)]
    nodes += [node(f"n{i:03d}", f"negative {i}" + FILLER, "calm:4") for i in range(40)]
    rng.shuffle(nodes)
    full = select(nodes, "joy", max_examples_per_emotion=40)
    assert len(full.positives) == 30 and len(full.negatives) == 40
    capped = select(nodes, "joy", max_examples_per_emotion=12)
    assert len(capped.positives) == 12 and len(capped.negatives) == 12
    assert capped.n_eligible_positive == 30 and capped.n_eligible_negative == 40
    assert set(keys(capped.positives)) < set(keys(full.positives))
    assert keys(capped.positives) == sorted(keys(capped.positives))
    # the choice is by hash rank, not by key order
    assert keys(capped.positives) != keys(full.positives)[:12]


def test_kept_negatives_follow_the_positives_node_type_mix() -> None:
    nodes = [node(f"p{i:03d}", f"pos {i}" + FILLER, "joy:9", "journal" if i % 4 else "digest") for i in range(40)]
    for t in ("journal", "digest", "pattern"):
        nodes += [node(f"n-{t}-{i:03d}", f"neg {t} {i}" + FILLER, "calm:4", t) for i in range(30)]
    s = select(nodes, "joy", max_examples_per_emotion=20)
    pos_mix = s.node_type_mix("positive")
    assert sum(pos_mix.values()) == 20
    # quotas proportional to the kept positives' mix: exact when it divides evenly
    assert s.node_type_mix("negative") == pos_mix


def test_node_type_mix_shortfall_is_filled_from_other_types() -> None:
    nodes = [node(f"p{i:03d}", f"pos {i}" + FILLER, "joy:9", "digest") for i in range(30)]
    nodes += [node(f"nd{i}", f"neg digest {i}" + FILLER, "calm:4", "digest") for i in range(3)]
    nodes += [node(f"nj{i:03d}", f"neg journal {i}" + FILLER, "calm:4", "journal") for i in range(30)]
    s = select(nodes, "joy", max_examples_per_emotion=10)
    assert s.node_type_mix("negative") == {"digest": 3, "journal": 7}


def test_largest_remainder_quotas() -> None:
    # 4 positives (below the cap), 2 journal : 1 digest : 1 pattern; cap 10 on 60 negatives
    # -> quotas 5 / 2.5 / 2.5 -> 5 / 3 / 2 (equal remainders: the type name decides)
    types = ["journal", "journal", "digest", "pattern"]
    nodes = [node(f"p{i:03d}", f"pos {i}" + FILLER, "joy:9", t) for i, t in enumerate(types)]
    for t in ("journal", "digest", "pattern"):
        nodes += [node(f"n-{t}-{i:03d}", f"neg {t} {i}" + FILLER, "calm:4", t) for i in range(20)]
    s = select(nodes, "joy", max_examples_per_emotion=10)
    assert len(s.positives) == 4
    assert s.node_type_mix("negative") == {"digest": 3, "journal": 5, "pattern": 2}
    # 3 journal : 1 digest -> 7.5 / 2.5: equal remainders again, so digest (by name) gets the extra one
    nodes.append(node("p999", "one more journal" + FILLER, "joy:9", "journal"))
    nodes = [n for n in nodes if n.key != "p003"]
    s = select(nodes, "joy", max_examples_per_emotion=10)
    assert s.node_type_mix("positive") == {"digest": 1, "journal": 3}
    assert s.node_type_mix("negative") == {"digest": 3, "journal": 7}
    # 1 digest : 2 journal -> 3.33 / 6.67 -> 3 / 7 (the larger remainder gets the extra one)
    nodes = [n for n in nodes if n.key != "p000"]
    s = select(nodes, "joy", max_examples_per_emotion=10)
    assert s.node_type_mix("positive") == {"digest": 1, "journal": 2}
    assert s.node_type_mix("negative") == {"digest": 3, "journal": 7}


def test_split_depends_on_the_key_alone() -> None:
    nodes = [node(f"k{i:03d}", f"text {i}" + FILLER, "joy:9 calm:9 awe:2") for i in range(60)]
    nodes += [node(f"m{i:03d}", f"other {i}" + FILLER, "warmth:5") for i in range(60)]
    snap = build_snapshot(nodes)
    params = SelectionParams(holdout_fraction=0.3)
    joy, calm, awe = (select_examples(snap, e, params) for e in ("joy", "calm", "awe"))
    joy_split = {e.key: e.split for e in joy.positives + joy.negatives}
    for s in (calm, awe):
        for e in s.positives + s.negatives:
            assert e.split == split_for_key(e.key, 0.3)
            if e.key in joy_split:
                assert joy_split[e.key] == e.split
    assert {e.split for e in joy.positives} == {"train", "holdout"}


def test_holdout_fraction_is_roughly_respected() -> None:
    for fraction in (0.2, 0.5):
        n = sum(split_for_key(f"node-{i}", fraction) == "holdout" for i in range(1000))
        assert abs(n - 1000 * fraction) < 60, (fraction, n)
    assert all(split_for_key(f"node-{i}", 0.0) == "train" for i in range(200))
    # a larger fraction only moves nodes from train to holdout
    assert all(split_for_key(f"n{i}", 0.3) == "holdout" for i in range(500) if split_for_key(f"n{i}", 0.2) == "holdout")


def test_params_validation_names_the_parameter() -> None:
    for kwargs, name in [
        ({"min_positive_score": 11}, "min_positive_score"),
        ({"max_negative_mentions": -1}, "max_negative_mentions"),
        ({"min_content_chars": -5}, "min_content_chars"),
        ({"max_examples_per_emotion": 0}, "max_examples_per_emotion"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"holdout_fraction": float("nan")}, "holdout_fraction"),
        ({"max_negative_mentions": True}, "max_negative_mentions"),
    ]:
        with pytest.raises(ValueError, match=name):
            SelectionParams(**kwargs)
    p = SelectionParams(min_positive_score=7.5)
    assert SelectionParams.from_dict(p.to_dict()) == p


# --------------------------------------------------------------------------- stability


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10**6), n=st.integers(5, 120), k=st.integers(1, 8), cap=st.integers(3, 40))
def test_adding_nodes_changes_at_most_as_many_choices(seed: int, n: int, k: int, cap: int) -> None:
    rng = random.Random(seed)
    old = random_graph(rng, n)
    params = SelectionParams(max_examples_per_emotion=cap, min_positive_score=6)
    before = select_examples(build_snapshot(old), "joy", params)

    # new positives (with new keys and bodies): only the positive choice may move, by <= k
    new_pos = [node(f"z{i:03d}", f"new positive {i} {seed}" + FILLER, "joy:9 calm:1", rng.choice(["journal", "digest"]))
               for i in range(k)]
    after = select_examples(build_snapshot(old + new_pos), "joy", params)
    old_kept, new_kept = set(keys(before.positives)), set(keys(after.positives))
    assert len(new_kept - old_kept) <= k
    if before.n_eligible_positive + k <= cap:  # below the cap nothing earlier is dropped
        assert old_kept <= new_kept

    # new negatives leave the positives (hence the type quotas) alone: negatives move by <= k
    new_neg = [node(f"y{i:03d}", f"new negative {i} {seed}" + FILLER, "calm:3", rng.choice(["journal", "pattern"]))
               for i in range(k)]
    after = select_examples(build_snapshot(old + new_neg), "joy", params)
    assert keys(after.positives) == keys(before.positives)
    old_kept, new_kept = set(keys(before.negatives)), set(keys(after.negatives))
    assert len(new_kept - old_kept) <= k
    assert len(old_kept - new_kept) <= k
    if before.n_eligible_negative + k <= cap:
        assert old_kept <= new_kept


def test_determinism_byte_identical_directories(tmp_path: Path) -> None:
    rng = random.Random(7)
    nodes = random_graph(rng, 200, emotions=("joy", "calm", "awe", "self-doubt", "été"))
    params = SelectionParams(max_examples_per_emotion=25)
    shuffled = list(nodes)
    random.Random(8).shuffle(shuffled)
    run_extraction(nodes, tmp_path / "a", params, min_positives=1)
    run_extraction(shuffled, tmp_path / "b", params, min_positives=1)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert files_a == files_b and len(files_a) == 1 + 2 * 5
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


# --------------------------------------------------------------------------- catalog


def test_catalog_qualification_cap_and_curated(caplog: pytest.LogCaptureFixture) -> None:
    nodes = []
    for emotion, n_pos in (("joy", 12), ("calm", 11), ("awe", 10), ("fear", 3)):
        nodes += [node(f"{emotion}{i:02d}", f"{emotion} text number {i}" + FILLER, f"{emotion}:9")
                  for i in range(n_pos)]
    nodes += [node(f"lo{i}", f"low scored text {i}" + FILLER, "hope:2") for i in range(20)]
    snap = build_snapshot(nodes)
    cat = emotion_catalog(snap, SelectionParams(), min_positives=10, max_emotions=200)
    assert cat["emotion"].to_list() == ["joy", "calm", "awe", "fear", "hope"]  # most positives first
    assert cat["rank"].to_list() == [1, 2, 3, 4, 5]
    assert qualifying_emotions(cat) == ["joy", "calm", "awe"]
    hope = cat.row(4, named=True)
    assert hope["n_tagged"] == 20 and hope["n_positive"] == 0 and hope["mean_score"] == 2.0
    assert cat.row(0, named=True)["n_negative"] == 11 + 10 + 3 + 20

    assert qualifying_emotions(emotion_catalog(snap, min_positives=10, max_emotions=2)) == ["joy", "calm"]
    with caplog.at_level(logging.WARNING):
        cat = emotion_catalog(snap, min_positives=10, max_emotions=3, curated=["Fear", "wonder"])
    assert qualifying_emotions(cat) == ["joy", "fear", "wonder"]
    wonder = cat.filter(pl.col("emotion") == "wonder").row(0, named=True)
    assert wonder["n_tagged"] == 0 and wonder["n_positive"] == 0 and wonder["mean_score"] is None
    assert wonder["curated"] and wonder["qualifies"]
    assert "wonder" in caplog.text and "fear" not in caplog.text.split("graph:")[-1]
    with pytest.raises(ValueError, match="invalid emotion name"):
        emotion_catalog(snap, curated=["../etc"])


def test_emotions_of_core_and_pattern_nodes_are_candidates_and_take_the_slots_first() -> None:
    nodes = []
    for e, n in (("joy", 20), ("calm", 18), ("fear", 16), ("wonder", 12), ("hope", 11)):
        nodes += [node(f"{e}{i:02d}", f"{e} journal entry number {i}." + FILLER, f"{e}:9") for i in range(n)]
    nodes.append(node("core1", "At my core I meet people's questions with Wonder, whatever they ask." + FILLER,
                      "clarity:4", node_type="core"))
    nodes.append(node("pat1", "A pattern: on late nights the sessions turn to lists." + FILLER, "hope:6",
                      node_type="Pattern"))
    nodes.append(node("pat2", "Another pattern: tired evenings, short replies." + FILLER, "ennui:9",
                      node_type="pattern"))
    snap = build_snapshot(nodes)
    cat = emotion_catalog(snap, min_positives=10, max_emotions=3)
    row = {r["emotion"]: r for r in cat.to_dicts()}
    assert row["wonder"]["source"] == "both" and row["wonder"]["n_core"] == 1  # named in a core body
    assert row["hope"]["source"] == "both" and row["hope"]["n_core"] == 1  # carried (tagged) by a pattern node
    assert row["ennui"]["source"] == "core/pattern" and row["ennui"]["n_positive"] == 1  # tagged only there
    assert row["clarity"]["source"] == "core/pattern"
    assert row["joy"]["source"] == "tags" and row["joy"]["n_core"] == 0
    # ranked 4th and 5th by tags, wonder and hope qualify before the most-tagged others; then joy fills the
    # last slot; ennui and clarity lack positives (the same min_positives rule for every source)
    assert (row["wonder"]["rank"], row["hope"]["rank"]) == (4, 5)
    assert qualifying_emotions(cat) == ["joy", "wonder", "hope"]
    # without core node types it is the most-tagged ones, as before
    plain = emotion_catalog(snap, min_positives=10, max_emotions=3, core_node_types=[])
    assert qualifying_emotions(plain) == ["joy", "calm", "fear"]
    assert set(plain["source"].to_list()) == {"tags"}
    # curated names come first and say so; other node types can be named
    cur = emotion_catalog(snap, min_positives=10, max_emotions=3, curated=["fear"], core_node_types=["journal"])
    assert cur.filter(pl.col("emotion") == "fear")["source"].to_list() == ["curated"]
    assert qualifying_emotions(cur)[:1] == ["joy"] and "fear" in qualifying_emotions(cur)
    with pytest.raises(ValueError, match="core_node_types"):
        emotion_catalog(snap, core_node_types="core")


def test_cooccurrence() -> None:
    nodes = []
    for i in range(20):
        a = i % 10
        nodes.append(node(f"k{i:02d}", f"text {i}" + FILLER, f"joy:{a} warmth:{a} fear:{10 - a} calm:5"))
    emotions, corr = cooccurrence(build_snapshot(nodes), ["joy", "warmth", "fear", "calm"])
    assert emotions == ["joy", "warmth", "fear", "calm"]
    assert corr.shape == (4, 4)
    assert np.allclose(corr[0, 1], 1.0) and np.allclose(corr[0, 2], -1.0)
    assert corr[0, 3] == 0.0 and corr[3, 3] == 1.0  # constant scores: no correlation
    assert np.allclose(corr, corr.T)


# --------------------------------------------------------------------------- files


def _sets() -> tuple[SelectionParams, list[ExampleSet], pl.DataFrame]:
    nodes = random_graph(random.Random(3), 60, emotions=("joy", "calm"))
    snap = build_snapshot(nodes)
    params = SelectionParams(max_examples_per_emotion=15, min_positive_score=6)
    return params, [select_examples(snap, e, params) for e in ("joy", "calm")], snap


def test_examples_dir_round_trip(tmp_path: Path) -> None:
    params, sets, snap = _sets()
    out = tmp_path / "examples"
    index = write_examples_dir(out, sets, params, snapshot_hash(snap), extra={"source": "test"})
    assert sorted(p.name for p in out.iterdir()) == ["calm", "index.json", "joy"]
    assert index["parameters"] == params.to_dict() and index["source"] == "test"
    assert index["snapshot_hash"] == snapshot_hash(snap)
    joy = index["emotions"]["joy"]
    assert joy["positives"] == len(sets[0].positives)
    assert joy["train_positives"] + joy["holdout_positives"] == joy["positives"]
    assert joy["node_types"]["negative"] == sets[0].node_type_mix("negative")
    assert joy["examples_sha256"] == examples_hash(sets[0])
    line = json.loads((out / "joy" / "positive.jsonl").read_text().splitlines()[0])
    assert sorted(line) == ["key", "node_type", "score", "split", "text"]
    read_index, read_sets = read_examples_dir(out)
    assert read_index == index
    assert list(read_sets) == ["joy", "calm"]
    assert read_sets["joy"] == sets[0] and read_sets["calm"] == sets[1]
    assert examples_hash(read_sets["calm"]) == examples_hash(sets[1])
    assert examples_hash(sets[0]) != examples_hash(sets[1])


def test_failure_mid_write_leaves_the_previous_directory_intact(tmp_path: Path) -> None:
    params, sets, snap = _sets()
    out = tmp_path / "examples"
    write_examples_dir(out, sets, params, "h1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    bad = ExampleSet("awe", [Example("x", "some text", "journal", Decimal("9"), "train")], [])  # not JSON-serialisable
    with pytest.raises(TypeError):
        write_examples_dir(out, [sets[1], bad], params, "h2")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["examples"]  # no temporary directory left behind


def test_refuses_to_replace_a_directory_that_is_not_an_examples_dir(tmp_path: Path) -> None:
    params, sets, snap = _sets()
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(ExamplesFormatError, match="refusing to replace"):
        write_examples_dir(precious, sets, params, "h")
    assert (precious / "notes.txt").read_text() == "keep me"
    for name in ("../up", ".hidden", "a/b", "", "x" * 300, "Joy"):
        with pytest.raises(ExamplesFormatError, match="invalid emotion name|not in normal form"):
            write_examples_dir(tmp_path / "x", [ExampleSet(name, [], [])], params, "h")


def test_read_errors_name_the_file_line_and_key(tmp_path: Path) -> None:
    params, sets, snap = _sets()
    out = tmp_path / "examples"
    write_examples_dir(out, sets, params, "h")
    pos = out / "joy" / "positive.jsonl"
    good = pos.read_text()
    first = json.loads(good.splitlines()[0])

    pos.write_text(good + "{not json\n")
    with pytest.raises(ExamplesFormatError, match=rf"positive.jsonl:{len(good.splitlines()) + 1}: not valid JSON"):
        read_examples_dir(out)
    pos.write_text(json.dumps({**first, "text": "  \n "}) + "\n" + good)
    with pytest.raises(ExamplesFormatError, match=rf"positive.jsonl:1: example '{first['key']}' has an empty"):
        read_examples_dir(out)
    pos.write_text(json.dumps({**first, "split": "test"}) + "\n")
    with pytest.raises(ExamplesFormatError, match="'split' must be"):
        read_examples_dir(out)
    pos.write_text("\n".join(good.splitlines()[1:]) + "\n")
    with pytest.raises(ExamplesFormatError, match="index.json says"):
        read_examples_dir(out)
    pos.unlink()
    with pytest.raises(ExamplesFormatError, match="positive.jsonl: missing"):
        read_examples_dir(out)
    index = json.loads((out / "index.json").read_text())
    index["emotions"]["../joy"] = index["emotions"].pop("joy")
    index["emotion_order"] = ["../joy", "calm"]
    (out / "index.json").write_text(json.dumps(index))
    with pytest.raises(ExamplesFormatError, match="invalid emotion name '../joy'"):
        read_examples_dir(out)


def test_directory_without_index_is_read_from_its_subdirectories(tmp_path: Path) -> None:
    d = tmp_path / "legacy" / "joy"
    d.mkdir(parents=True)
    line = {"key": "a", "text": "hello", "node_type": "journal", "score": 9, "split": "train", "extra": 1}
    (d / "positive.jsonl").write_text(json.dumps(line) + "\n\n")
    (d / "negative.jsonl").write_text("")
    index, sets = read_examples_dir(tmp_path / "legacy")
    assert index == {}
    assert sets["joy"].positives == [Example("a", "hello", "journal", 9.0, "train")]
    assert len(sets["joy"].problems()) == 1 and "emotion 'joy': no negative examples" in sets["joy"].problems()[0]
