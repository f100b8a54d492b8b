"""MLflow writes that could not be sent, kept on disk in order and replayed exactly once.

`<run_dir>/mlflow_pending/records.jsonl` holds one JSON record per write: `start`, `params`,
`metrics`, `artifact`, `end`, and `bind` (a local run reference already created on the server).
A run created while the server was down is named by a local reference (`local-<hex>`) until replay
creates it, tagged `weightgen.ref` so that a replay cut short never creates it twice. Artifacts are
copied under `artifacts/` when buffered, so a file changed later is logged as it was.
"""
from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from orchestrator.storage.atomic import write_text

RECORDS = "records.jsonl"
REJECTED = "rejected.jsonl"  # records the server refused for a reason other than being down (kept, never dropped)
REF_TAG = "weightgen.ref"


def new_ref() -> str:
    """A local reference for a run created while the server is unreachable."""
    return f"local-{uuid.uuid4().hex}"


def now_ms() -> int:
    return int(time.time() * 1000)


class PendingLog:
    """The append-only buffer under one run directory."""

    def __init__(self, folder: Path):
        """Buffer in `folder` (a run's `RunDir.mlflow_pending`)."""
        self.root = Path(folder)
        self.path = self.root / RECORDS

    def __len__(self) -> int:
        return len(self.records())

    def records(self) -> list[dict]:
        """The buffered records, in order; unreadable lines are skipped (`replay` sets them aside)."""
        return self._read()[0]

    def _read(self) -> tuple[list[dict], list[str]]:
        """(records, unreadable lines): a line cut short by a crash mid-append, or damaged by hand."""
        if not self.path.exists():
            return [], []
        good, bad = [], []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict) and isinstance(rec.get("op"), str):
                good.append(rec)
            elif line.strip():
                bad.append(line)
        return good, bad

    def append(self, record: dict) -> None:
        """Add one record; flushed to the file at once, so a killed driver loses nothing already buffered."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
            f.flush()

    def keep_file(self, path: Path, name: str | None = None) -> str:
        """Copy an artifact into the buffer; returns its path relative to the buffer folder."""
        rel = Path("artifacts") / uuid.uuid4().hex[:12] / (name or Path(path).name)
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, self.root / rel)
        return str(rel)

    def write_dict(self, obj: dict, name: str) -> str:
        """Save a dict as a JSON artifact file in the buffer; returns its relative path."""
        rel = Path("artifacts") / uuid.uuid4().hex[:12] / name
        (self.root / rel).parent.mkdir(parents=True, exist_ok=True)
        (self.root / rel).write_text(json.dumps(obj, indent=2, default=str))
        return str(rel)

    def replay(self, send, is_outage, log) -> tuple[int, int]:
        """Send records in order with `send(record, ids) -> created run id | None`; returns (sent, left).

        Stops at the first outage (the rest stay, in order); a record refused for another reason
        goes to rejected.jsonl with the error. Progress is saved after every record.
        """
        records, bad = self._read()
        if bad:  # one damaged line must not block every later run in this directory
            log(f"{len(bad)} unreadable line(s) in {self.path} set aside in {self.root / REJECTED}")
            with open(self.root / REJECTED, "a") as f:
                f.writelines(json.dumps({"line": line[:2000], "error": "not a JSON record"}) + "\n" for line in bad)
            if not records:
                self._rewrite({}, [])
        if not records:
            return 0, 0
        ids: dict[str, str] = {}  # local ref -> server run id
        sent = 0
        rest = records
        try:
            for k, rec in enumerate(records):
                rest = records[k:]
                if rec["op"] == "bind":
                    ids[rec["ref"]] = rec["run_id"]
                    continue
                try:
                    created = send(rec, ids)
                except Exception as e:  # noqa: BLE001 - sorted below: outage stops, anything else is set aside
                    if is_outage(e):
                        return sent, len([r for r in rest if r["op"] != "bind"])
                    log(f"MLflow refused a buffered {rec['op']} record ({e}); kept in {self.root / REJECTED}")
                    with open(self.root / REJECTED, "a") as f:
                        f.write(json.dumps({**rec, "error": str(e)[:2000]}, default=str) + "\n")
                    created = None
                if created:
                    ids[rec["ref"]] = created
                sent += 1
            rest = []
            return sent, 0
        finally:
            self._rewrite(ids, [r for r in rest if r["op"] != "bind"])

    def _rewrite(self, ids: dict[str, str], rest: list[dict]) -> None:
        if not rest:
            self.path.unlink(missing_ok=True)
            kept = {r.get("file") for r in self.records_rejected()}
            if not kept and (self.root / "artifacts").exists():
                shutil.rmtree(self.root / "artifacts")
            return
        binds = [{"op": "bind", "ref": r, "run_id": i} for r, i in ids.items()]
        write_text(self.path, "".join(json.dumps(r, default=str) + "\n" for r in binds + rest))

    def records_rejected(self) -> list[dict]:
        p = self.root / REJECTED
        return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []
