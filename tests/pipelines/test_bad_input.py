"""Bad input, for real: each case is one clear line naming the problem and its fix, a non-zero exit,
and every file that existed before is byte for byte the same afterwards.

Cases tested elsewhere (not repeated here): unknown --set field and bad encoder/suite values
(test_cli), task-file field errors one by one (test_suites), NaN/inf weights refused at write
(test_store), corrupt manifest (test_store), a store trained with another config (test_farm), a bad
init_from file (test_farm), unknown zero-shot method without a run (test_zero_shot).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from orchestrator.storage.store import MANIFEST, StoreError, WeightStore, file_sha256, weights_checksum
from orchestrator.storage.atomic import write_json
from tests.conftest import run_cli

MLFLOW_FILES = ("mlflow_pending",)  # a failed invocation is still logged, as FAILED (to the store beside the run)
RECORDS = ("config.yaml", "command.txt", ".lock", "lock.json")  # and recorded: every invocation that passed its config checks writes these first (under the run lock)


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under root, MLflow's and the invocation records aside."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.relative_to(root).parts[0] not in MLFLOW_FILES + RECORDS
    }


def fake_shard(n: int, p: int = 64, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """n final experts' metadata rows and random weights [n, p] (the store does not care about the layout)."""
    rng = np.random.default_rng(seed)
    meta = pd.DataFrame([dict(
        task_id=f"t{seed}-{i}", description=f"task {i}", split="meta_train", seed=0, step=10, final=True,
        layout_id="adapter-test", support_acc=1.0, support_loss=0.1, query_acc=0.9, query_loss=0.2, config_hash="cfg",
    ) for i in range(n)])
    return meta, rng.standard_normal((n, p)).astype(np.float32)


@pytest.fixture(scope="module")
def existing_run(smoke_run_dir, tmp_path_factory) -> Path:
    """A run directory as a user has it: features, the encoder cache and a weight store with two shards."""
    run = tmp_path_factory.mktemp("existing") / "run"
    shutil.copytree(smoke_run_dir / "features", run / "features")
    shutil.copytree(smoke_run_dir / "cache", run / "cache")
    store = WeightStore(run / "store" / "weights")
    for k in range(2):
        store.write_shard(f"shard-0000{k}-abcdef0{k}", *fake_shard(3, seed=k), {})
    return run


@pytest.fixture(scope="module")
def image(smoke_run_dir) -> str:
    """A real image path from the suite, for task files that need one."""
    return pq.read_table(smoke_run_dir / "features" / "images.parquet", columns=["path"]).column("path")[0].as_py()


def task_line(id_: str, image: str | None, **extra) -> str:
    task = {"id": id_, "description": "is it red?", "answers": ["yes", "no"],
            "examples": [{"image": image, "answer": "yes"}] if image else [], **extra}
    return json.dumps(task)


def task_files(tmp: Path, image: str) -> dict[str, Path]:
    good = task_line("a", image)
    bodies = {
        "missing_field": good + "\n" + json.dumps({"id": "b", "answers": ["yes", "no"], "examples": []}) + "\n",
        "missing_image": task_line("a", str(tmp / "nowhere" / "cat.png")) + "\n",
        "duplicate_id": good + "\n" + task_line("b", image) + "\n" + good + "\n",
        "empty": "\n",
    }
    bomb = tmp / "bomb.png"
    bomb.write_bytes(png_header(40_000, 40_000))
    (tmp / "a-folder.png").mkdir(exist_ok=True)
    bodies.update({
        "image_is_a_folder": task_line("a", str(tmp / "a-folder.png")) + "\n",
        "decompression_bomb": task_line("a", str(bomb)) + "\n",
        "deep_nesting": task_line("a", image)[:-1] + ', "paraphrases": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
    })
    out = {}
    for name, body in bodies.items():
        out[name] = tmp / f"{name}.jsonl"
        out[name].write_text(body)
    out["not_utf8"] = tmp / "not_utf8.jsonl"
    out["not_utf8"].write_bytes(good.encode() + b"\n" + task_line("b", image).replace("red", "r\xe9d").encode("latin-1") + b"\n")
    return out


def png_header(width: int, height: int) -> bytes:
    """A small valid PNG whose header claims width x height pixels (what a decompression bomb looks like)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


# (name, argv after the module, words the message must contain); {run}, {tasks:<name>} are filled in per case
CASES = [
    ("malformed value", ["pipelines.features", "--run-dir", "{run}", "--set", "support_fraction=2"],
     ["support_fraction=2", "out of range", "<= 0.95"]),
    ("malformed number", ["pipelines.experts", "--run-dir", "{run}", "--set", "steps=ten"], ["steps='ten'", "int"]),
    ("malformed --set", ["pipelines.experts", "--run-dir", "{run}", "--set", "steps"], ["--set 'steps'", "field=value"]),
    ("value out of range", ["pipelines.full", "--run-dir", "{run}", "--set", "experts.lr=-1"], ["experts.lr=-1", ">= 1e-07"]),
    ("unknown preset", ["pipelines.full", "--run-dir", "{run}", "--preset", "huge"], ["unknown preset 'huge'", "smoke, default"]),
    ("unknown method", ["pipelines.zero_shot", "--tasks", "{tasks:missing_field}", "--from", "{run}", "--method", "telepathy"],
     ["invalid choice: 'telepathy'", "hnet_hyperldm"]),
    ("task file: missing field", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:missing_field}"],
     ["line 2, field 'description': missing", "Fix:"]),
    ("task file: missing image", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:missing_image}"],
     ["cat.png", "Fix:"]),
    ("task file: duplicate id", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:duplicate_id}"],
     ["duplicate task id 'a' (lines 1 and 3)", "Fix:"]),
    ("empty suite (task file)", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:empty}"], ["no tasks in"]),
    ("empty suite (procedural)", ["pipelines.features", "--run-dir", "{run}", "--set", "suite=procedural", "--set", "n_tasks=0"],
     ["n_tasks=0", "out of range", ">= 1"]),
    ("task file: not UTF-8", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:not_utf8}"],
     ["line 2: not UTF-8", "byte 0xe9", "save the task file as UTF-8"]),
    ("task file: nested too deeply", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:deep_nesting}"],
     ["line 1: JSON nested too deeply"]),
    ("task file: image path is a folder", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:image_is_a_folder}"],
     ["a-folder.png is a directory, not a file"]),
    ("image header claims 40,000 x 40,000 pixels", ["pipelines.features", "--run-dir", "{run}", "--tasks", "{tasks:decompression_bomb}"],
     ["bomb.png", "1600000000 pixels", "refusing to decode it"]),
    ("negative seed", ["pipelines.features", "--run-dir", "{run}", "--seed", "-5"], ["features.seed=-5", ">= 0"]),
    ("garbage device", ["pipelines.features", "--run-dir", "{run}", "--set", "device=garbage"], ["device='garbage'", "cuda"]),
    ("NaN learning rate", ["pipelines.experts", "--run-dir", "{run}", "--set", "lr=nan"], ["experts.lr=nan", "finite number"]),
    ("NaN meta-test share", ["pipelines.full", "--run-dir", "{run}", "--set", "features.meta_test_fraction=nan"],
     ["features.meta_test_fraction=nan", "finite number"]),
    ("inf validation share", ["pipelines.generators", "--run-dir", "{run}", "--set", "val_fraction=inf"],
     ["generators.val_fraction=inf", "finite number"]),
    ("NaN guidance scale", ["pipelines.zero_shot", "--tasks", "{tasks:missing_field}", "--from", "{run}", "--guidance", "nan"],
     ["guidance_scale=nan", "finite number"]),
    ("export_tasks under an unwritable path", ["pipelines.features", "--run-dir", "{run}", "--set", "export_tasks=/proc/weightgen/t.jsonl"],
     ["export_tasks: cannot write to /proc/weightgen", "writable folder"]),
    ("cache_dir under an unwritable path", ["pipelines.features", "--run-dir", "{run}", "--set", "cache_dir=/proc/weightgen"],
     ["cache_dir: cannot write to /proc/weightgen", "writable folder"]),
]


@pytest.mark.parametrize("name, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_cli_input_is_one_line_and_changes_nothing(existing_run, image, tmp_path, name, argv, words):
    files = task_files(tmp_path, image)
    argv = [a.format(run=existing_run) if a == "{run}" else str(files[a[7:-1]]) if a.startswith("{tasks:") else a
            for a in argv]
    before = snapshot(existing_run)
    r = run_cli(*argv, "--no-progress")
    assert r.returncode == 2, (name, r.returncode, r.stderr[-3000:])
    for w in words:
        assert w in r.stderr, (name, w, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert snapshot(existing_run) == before, f"{name}: files of the existing run changed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_ray_address_fails_fast(existing_run):
    before = snapshot(existing_run)
    address = f"127.0.0.1:{free_port()}"
    t0 = time.perf_counter()
    r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", str(existing_run), "--no-progress",
                env={"RAY_ADDRESS": address}, timeout=120)
    took = time.perf_counter() - t0
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"no Ray cluster answers at '{address}'" in r.stderr and "unset RAY_ADDRESS" in r.stderr
    assert "Traceback" not in r.stderr
    assert took < 60, f"took {took:.0f}s: an unreachable cluster must fail in seconds, not hang (ray.init waits minutes)"
    assert snapshot(existing_run) == before


@pytest.mark.parametrize("where", ["/proc/weightgen-run", "{file}/run"])
def test_unwritable_run_dir(tmp_path, where):
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    run_dir = where.format(file=blocker)
    r = run_cli("pipelines.experts", "--preset", "smoke", "--run-dir", run_dir, "--no-progress")
    assert r.returncode == 2, r.stderr[-3000:]
    assert f"run directory {run_dir} is not writable" in r.stderr and "pass --run-dir" in r.stderr
    assert "Traceback" not in r.stderr and blocker.read_text() == "keep me"


def test_truncated_features_parquet_is_rebuilt_identically(existing_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run)
    tasks = run / "features" / "tasks.parquet"
    want = {p: (run / "features" / p).read_bytes() for p in ("images.parquet", "texts.parquet", "tasks.parquet")}
    tasks.write_bytes(want["tasks.parquet"][: len(want["tasks.parquet"]) // 2])
    r = run_cli("pipelines.features", "--preset", "smoke", "--run-dir", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unreadable" in r.stderr and "rebuilding" in r.stderr
    from orchestrator.storage.suite_features import SuiteFeatures

    got, ref = SuiteFeatures.load(run / "features"), SuiteFeatures.load(existing_run / "features")
    assert list(got.tasks["id"]) == list(ref.tasks["id"])
    assert np.array_equal(got.image_feats, ref.image_feats) and np.array_equal(got.text_feats, ref.text_feats)
    assert snapshot(run / "store") == snapshot(existing_run / "store"), "the weight store is untouched"


def test_store_with_nan_weights_or_a_truncated_shard_is_refused_by_name(tmp_path):
    store = WeightStore(tmp_path / "weights")
    ids = [f"shard-0000{k}-abcdef0{k}" for k in range(3)]
    for k, sid in enumerate(ids):
        store.write_shard(sid, *fake_shard(3, seed=k), {})
    # NaN in a shard whose checksums and manifest were made to match (e.g. written by another tool)
    nan_sid, cut_sid, good_sid = ids
    meta, w = fake_shard(3, seed=0)
    w[1, 7], w[2, 0] = np.nan, np.inf
    path = store.root / f"{nan_sid}.parquet"
    table = pq.read_table(path)
    from orchestrator.storage.arrow_vectors import to_column
    import pyarrow as pa

    table = table.set_column(table.schema.get_field_index("w"), "w", to_column(w))
    table = table.set_column(table.schema.get_field_index("checksum"), "checksum",
                             pa.array([weights_checksum(r) for r in w]))
    pq.write_table(table, path)
    man = store.manifest()
    man["shards"][nan_sid]["file_sha256"] = file_sha256(path)
    write_json(store.root / MANIFEST, man)
    assert "NaN/inf" in store.verify_shard(nan_sid)
    with pytest.raises(StoreError, match=rf"shard {nan_sid}.parquet: contains NaN/inf.*rerun `python -m pipelines.experts`"):
        store.read()
    # a truncated shard (a crash of some other writer, a partial copy)
    cut = store.root / f"{cut_sid}.parquet"
    cut.write_bytes(cut.read_bytes()[:200])
    assert "does not match its manifest sha256" in store.verify_shard(cut_sid)
    before = snapshot(store.root)
    with pytest.raises(StoreError, match=rf"{cut_sid}.parquet is missing or does not match.*rerun `python -m pipelines.experts`"):
        store.read(task_ids=["t2-0"])
    with pytest.raises(StoreError, match=rf"{cut_sid}.parquet is unreadable.*rerun `python -m pipelines.experts`"):
        store.read_meta()
    assert store.verify_shard(good_sid) is None
    assert snapshot(store.root) == before, "reading a broken store changes nothing"


def test_garbage_features_info_is_rebuilt_not_a_traceback(existing_run, tmp_path):
    """A damaged features/info.json makes the features stage rebuild the folder (derived data), once."""
    run = tmp_path / "run"
    shutil.copytree(existing_run / "features", run / "features")
    shutil.copytree(existing_run / "cache", run / "cache")
    (run / "features" / "info.json").write_text("{garbage")
    r = run_cli("pipelines.features", "--preset", "smoke", "--run-dir", str(run), "--no-progress")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert json.loads((run / "features" / "info.json").read_text())["n_tasks"] == 24
    assert not [p for p in run.iterdir() if p.name.startswith(".features.")], "a staging folder was left behind"


@pytest.mark.parametrize("case", ["garbage mlflow.db", "read-only mlflow.db", "unknown tracking URI scheme"])
def test_unusable_mlflow_store_is_one_line_before_any_work(existing_run, tmp_path, case):
    run = tmp_path / "run"
    shutil.copytree(existing_run, run, ignore=shutil.ignore_patterns(*MLFLOW_FILES))
    env, db = {}, run.parent / "mlflow.db"  # the store every run directory beside this one shares
    if case == "garbage mlflow.db":
        db.write_text("not a database")
    elif case == "read-only mlflow.db":
        import sqlite3

        con = sqlite3.connect(db)
        con.execute("CREATE TABLE t (a)")  # a real database: an MLflow store from an earlier run
        con.commit()
        con.close()
        if subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode != 0:
            pytest.skip("chattr +i is not available here (root ignores file modes)")
    else:
        env["MLFLOW_TRACKING_URI"] = "garbage://x"
    before = snapshot(run)
    try:
        r = run_cli("pipelines.features", "--preset", "smoke", "--run-dir", str(run), "--no-progress", env=env)
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = {"garbage mlflow.db": "file is not a database", "read-only mlflow.db": "readonly database",
            "unknown tracking URI scheme": "names no MLflow store"}[case]
    assert said in r.stderr and len(r.stderr.strip().splitlines()) <= 3, r.stderr[-3000:]
    assert snapshot(run) == before
