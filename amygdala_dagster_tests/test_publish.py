"""Publication of the Contract 3 pair: releases, the `current` switch, pointers on object storage,
crashes at every step, unwritable outputs, modes, pruning, and the readers that go through them."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fsspec
import pytest

from amygdala_dagster.commands import cli
from amygdala_dagster.files.atomic import sha256_file
from amygdala_dagster.readout.manifest import ReadoutFileError, load_readout, write_readout
from amygdala_dagster.readout.publish import publish_pair, republish_manifest
from amygdala_dagster.readout.releases import POINTER_FILE, PublishError, current_pair
from amygdala_dagster_tests.test_manifest import FIELDS, make_readout

REPO = Path(__file__).resolve().parent.parent


def pair_bytes(tmp_path: Path, seed: int) -> tuple[bytes, bytes, str]:
    """The two files' bytes and the vectors SHA-256 of a readout (published once in a scratch directory)."""
    scratch = tmp_path / f"scratch-{seed}"
    write_readout(scratch / "vectors.safetensors", scratch / "manifest.json", make_readout(seed=seed), **FIELDS)
    v, m = (scratch / "vectors.safetensors").read_bytes(), (scratch / "manifest.json").read_bytes()
    return v, m, json.loads(m)["vectors_sha256"]


def test_release_layout_links_and_modes(tmp_path):
    out = tmp_path / "out"
    old_umask = os.umask(0o077)  # a private umask must not make the published pair private
    try:
        manifest = write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(), **FIELDS)
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in out.iterdir()) == ["current", "manifest.json", "releases", "vectors.safetensors"]
    (release,) = (out / "releases").iterdir()
    assert os.readlink(out / "current") == f"releases/{release.name}"
    assert os.readlink(out / "vectors.safetensors") == "current/vectors.safetensors"
    assert os.readlink(out / "manifest.json") == "current/manifest.json"
    assert release.name.endswith(manifest["vectors_sha256"][:12])
    for f in release.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # every directory on the way to the files too (another uid must be able to traverse them)
    for d in (release, out / "releases", out):
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d
    assert manifest["vectors_file"] == "vectors.safetensors"
    # the three ways a reader may name the pair give the same release
    for vectors in (out / "vectors.safetensors", out / "current" / "vectors.safetensors", out):
        r = load_readout(vectors)
        assert r.sha256 == manifest["vectors_sha256"] and r.vectors_path.parent == release
    assert current_pair(out) == (f"releases/{release.name}/vectors.safetensors",
                                 f"releases/{release.name}/manifest.json")


def test_only_the_last_releases_are_kept(tmp_path):
    out = tmp_path / "out"
    shas = []
    for seed in range(6):
        shas.append(write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(seed=seed),
                                  keep_releases=3, **FIELDS)["vectors_sha256"])
    names = sorted(p.name for p in (out / "releases").iterdir())
    assert [n.rsplit("-", 1)[1] for n in names] == [s[:12] for s in shas[-3:]]
    assert load_readout(out / "vectors.safetensors").sha256 == shas[-1]


def test_a_plain_pair_of_the_older_layout_is_adopted(tmp_path):
    out = tmp_path / "out"
    old_v, old_m, old_sha = pair_bytes(tmp_path, seed=1)
    out.mkdir()
    (out / "vectors.safetensors").write_bytes(old_v)
    (out / "manifest.json").write_bytes(old_m)
    new = write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(seed=2), **FIELDS)
    names = sorted(p.name for p in (out / "releases").iterdir())
    assert len(names) == 2 and names[0].endswith("-adopted") and names[1].endswith(new["vectors_sha256"][:12])
    assert (out / "releases" / names[0] / "vectors.safetensors").read_bytes() == old_v
    assert (out / "vectors.safetensors").is_symlink() and load_readout(out).sha256 == new["vectors_sha256"] != old_sha


def test_manifest_in_another_directory_follows_the_same_switch(tmp_path):
    v, m = tmp_path / "a" / "amygdala_vectors.safetensors", tmp_path / "b" / "readout.json"
    first = write_readout(v, m, make_readout(seed=1), **FIELDS)
    second = write_readout(v, m, make_readout(seed=2), **FIELDS)
    assert first["vectors_sha256"] != second["vectors_sha256"]
    assert os.path.realpath(m).startswith(str(tmp_path / "a" / "releases"))
    assert load_readout(v, m).sha256 == second["vectors_sha256"] == sha256_file(v)


@pytest.mark.parametrize("case", ["output is a file", "current is a directory", "file too large"])
def test_unwritable_output_is_one_line_and_keeps_the_old_pair(tmp_path, case):
    out = tmp_path / "out"
    old = write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(seed=1), **FIELDS)
    new_v, new_m, _ = pair_bytes(tmp_path, seed=2)
    target = out
    if case == "output is a file":
        target = tmp_path / "a-file"
        target.write_text("")
        expect = rf"cannot publish the readout pair in {target}: (File exists|Not a directory)"
    elif case == "current is a directory":
        target = tmp_path / "out2"
        (target / "current").mkdir(parents=True)
        expect = rf"cannot publish the readout pair in {target / 'current'}: is not the release link"
    if case == "file too large":  # what a full disk looks like to the writer: the write fails part-way
        script = textwrap.dedent(f"""
            import resource, signal, sys
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
            from amygdala_dagster.readout.publish import PublishError, publish_pair
            try:
                publish_pair({str(out / 'vectors.safetensors')!r}, {str(out / 'manifest.json')!r},
                             open({str(tmp_path / 'scratch-2' / 'vectors.safetensors')!r}, 'rb').read(), b'{{}}')
            except PublishError as exc:
                print(exc)
                sys.exit(3)
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
        assert proc.returncode == 3, proc.stderr
        message = proc.stdout.strip()
        assert "\n" not in message and message.startswith(f"cannot publish the readout pair in {out / 'releases'}")
        assert "File too large" in message
    else:
        with pytest.raises(PublishError, match=expect) as info:
            publish_pair(target / "vectors.safetensors", target / "manifest.json", new_v, new_m)
        assert "\n" not in str(info.value)
    assert load_readout(out).sha256 == old["vectors_sha256"]
    assert [p.name for p in (out / "releases").iterdir() if p.name.startswith(".")] == []  # no staging left


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory; covered by the cases above")
def test_read_only_output_directory(tmp_path):
    out = tmp_path / "out"
    old = write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(seed=1), **FIELDS)
    os.chmod(out / "releases", 0o555)
    try:
        with pytest.raises(PublishError, match="Permission denied"):
            write_readout(out / "vectors.safetensors", out / "manifest.json", make_readout(seed=2), **FIELDS)
    finally:
        os.chmod(out / "releases", 0o755)
    assert load_readout(out).sha256 == old["vectors_sha256"]


def test_reader_never_sees_a_mismatched_pair_while_releases_switch(tmp_path):
    out = tmp_path / "out"
    pairs = [pair_bytes(tmp_path, seed) for seed in (1, 2)]
    publish_pair(out / "vectors.safetensors", out / "manifest.json", pairs[0][0], pairs[0][1], keep=3)
    assert_readers_see_whole_pairs(out / "vectors.safetensors", out / "vectors.safetensors",
                                   out / "manifest.json", pairs, rounds=40)


def assert_readers_see_whole_pairs(read_from, vectors, manifest, pairs, rounds: int) -> None:
    """Publish ``pairs`` alternately ``rounds`` times while a thread keeps loading ``read_from``: every
    load succeeds (no mismatched or half-written pair) and returns one of the published vectors."""
    errors: list[str] = []
    seen: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            try:
                seen.add(load_readout(read_from).sha256)
            except ReadoutFileError as exc:
                errors.append(str(exc))
            except Exception as exc:  # anything else ends the thread silently unless recorded
                errors.append(f"{type(exc).__name__}: {exc}")
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(rounds):
            v, m, _ = pairs[i % 2]
            publish_pair(vectors, manifest, v, m, keep=3)
    finally:
        stop.set()
        t.join(timeout=120)
    assert errors == [] and seen and seen <= {p[2] for p in pairs}


KILL_CHILD = textwrap.dedent("""
    import os, shutil, signal, sys
    from amygdala_dagster.readout.publish import publish_pair
    target, out, vfile, mfile = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    vdata, mdata = open(vfile, "rb").read(), open(mfile, "rb").read()
    calls = 0

    def killing(fn):
        def wrapper(*args, **kwargs):
            global calls
            calls += 1
            if calls == target:
                os.kill(os.getpid(), signal.SIGKILL)
            return fn(*args, **kwargs)
        return wrapper

    # every call that changes the filesystem (or makes a change durable) is a point to die at
    for name in ("open", "write", "fsync", "mkdir", "rename", "replace", "symlink", "unlink", "rmdir", "chmod",
                 "fchmod"):
        setattr(os, name, killing(getattr(os, name)))
    shutil.rmtree = killing(shutil.rmtree)
    publish_pair(os.path.join(out, "vectors.safetensors"), os.path.join(out, "manifest.json"), vdata, mdata, keep=2)
    print(calls)
""")


@pytest.mark.slow
@pytest.mark.parametrize("start", ["released", "plain files"])
def test_killed_at_every_step_of_a_publication_a_reader_sees_one_whole_pair(tmp_path, start):
    out = tmp_path / "out"
    old_v, old_m, old_sha = pair_bytes(tmp_path, seed=1)
    new_v, new_m, new_sha = pair_bytes(tmp_path, seed=2)
    final_v, final_m, final_sha = pair_bytes(tmp_path, seed=3)
    vfile, mfile = tmp_path / "new.safetensors", tmp_path / "new.json"
    vfile.write_bytes(new_v)
    mfile.write_bytes(new_m)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed_at = []
    for target in range(1, 200):
        if out.exists():
            subprocess.run(["rm", "-rf", str(out)], check=True)
        if start == "released":
            publish_pair(out / "vectors.safetensors", out / "manifest.json", old_v, old_m)
        else:
            out.mkdir()
            (out / "vectors.safetensors").write_bytes(old_v)
            (out / "manifest.json").write_bytes(old_m)
        proc = subprocess.run([sys.executable, "-c", KILL_CHILD, str(target), str(out), str(vfile), str(mfile)],
                              capture_output=True, text=True, env=env, timeout=120)
        for vectors in (out / "vectors.safetensors", out):
            assert load_readout(vectors).sha256 in {old_sha, new_sha}, (target, proc.stderr)
        if (out / "current").exists():
            assert load_readout(out / "current" / "vectors.safetensors").sha256 in {old_sha, new_sha}
        if proc.returncode == 0:
            assert load_readout(out).sha256 == new_sha
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        killed_at.append(target)
        # the next publication succeeds and cleans up what the killed one left behind
        publish_pair(out / "vectors.safetensors", out / "manifest.json", final_v, final_m)
        assert load_readout(out).sha256 == final_sha
        leftovers = [p.name for d in (out, out / "releases") for p in d.iterdir() if p.name.startswith(".")]
        assert leftovers == [], (target, leftovers)
        for f in (out / "current").iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644
    else:
        pytest.fail("the publication never completed")
    assert len(killed_at) >= 10  # every step of the publication was a kill point


# ----------------------------------------------------------------------------- object storage (fsspec memory://)


@pytest.fixture
def bucket():
    fs = fsspec.filesystem("memory")
    root = f"memory://amygdala-test-{os.getpid()}-{threading.get_ident()}"
    yield root
    fs.rm(root.removeprefix("memory://"), recursive=True)


def test_object_store_publication_pointer_and_readers(bucket, capsys):
    fs = fsspec.filesystem("memory")
    base = bucket.removeprefix("memory://")
    fs.pipe(f"{base}/vectors.safetensors", b"stale pair of the older layout")
    shas = [write_readout(f"{bucket}/vectors.safetensors", f"{bucket}/manifest.json", make_readout(seed=s),
                          keep_releases=2, **FIELDS)["vectors_sha256"] for s in range(3)]
    pointer = json.loads(fs.cat(f"{base}/{POINTER_FILE}"))
    assert pointer["vectors_sha256"] == shas[-1] and pointer["vectors"].startswith(f"releases/{pointer['release']}/")
    assert not fs.exists(f"{base}/vectors.safetensors")  # nothing stale looks current
    assert len(fs.ls(f"{base}/releases")) == 2
    assert current_pair(bucket) == (pointer["vectors"], pointer["manifest"])
    for where in (bucket, f"{bucket}/vectors.safetensors", f"{bucket}/{POINTER_FILE}"):
        r = load_readout(where)
        assert r.sha256 == shas[-1] and str(r.vectors_path) == f"{bucket}/{pointer['vectors']}"
    assert cli.main(["inspect", bucket]) == 0
    out = capsys.readouterr().out
    assert f"release:  {bucket}/{POINTER_FILE} -> release {pointer['release']}" in out and "(ok against" in out

    # an altered object is refused by its checksum in the pointer
    fs.pipe(f"{base}/{pointer['manifest']}", fs.cat(f"{base}/{pointer['manifest']}") + b" ")
    with pytest.raises(ReadoutFileError, match="manifest.json has SHA-256 .* the pointer expects"):
        load_readout(bucket)


def test_republished_manifest_keeps_the_vectors(tmp_path, bucket):
    for base in (tmp_path / "out", bucket):
        first = write_readout(f"{base}/vectors.safetensors", f"{base}/manifest.json", make_readout(), **FIELDS)
        changed = dict(first, note="calibration added")
        republish_manifest(f"{base}/vectors.safetensors", None, json.dumps(changed).encode())
        r = load_readout(f"{base}")
        assert r.sha256 == first["vectors_sha256"] and r.manifest["note"] == "calibration added"


def test_seed_script_reports_an_unwritable_output_before_any_forward_pass(tmp_path, capsys):
    from amygdala_dagster.commands.train_steering_vectors import main
    from amygdala_dagster_tests.test_train_cli import mood_sets, write_training_dir

    data = write_training_dir(tmp_path / "data", mood_sets(n_pos=3, n_neutral=3))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    code = main(["--training-data-dir", str(data), "--output", str(blocker / "v.safetensors"),
                 "--cache-dir", str(tmp_path / "cache"), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1].startswith(f"error: cannot write --output {blocker}")
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").rglob("shard-*"))
