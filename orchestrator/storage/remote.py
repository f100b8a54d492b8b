"""Run directories on object storage (`--run-dir s3://bucket/runs/x`): a local working copy, written through.

Every process works in a local working copy of the run (`working_copy(uri)`, under `$WEIGHTGEN_CACHE`,
default `~/.cache/weightgen`) with the same code as a local run, and each file completed there is put
to the URI under the same relative key: `atomic_path` and `atomic_dir` call `published` once the file
is in place, and `sync_up` puts whatever else a stage wrote (figures, logs) when the stage ends. An
object store PUT (multipart or not) is atomic, so a reader sees a whole object or none; files are put in
the order the run writes them, so the markers that say "done" (the store's manifest, plan.json,
timings) reach the store after what they describe.

The object store is the run; the working copy is a cache. When an invocation starts, `sync_down`
makes the working copy equal to the URI (missing or changed objects fetched, local files the URI lacks
removed: a crash may have left a file here that never reached the store, and it must not count as
done). Ray workers and farm actors get the mirror with the run (`RunDir.to_dict`, `snapshot`) and
fetch only what is missing on their node.

A file is in sync when the object has its size and its local modification time was set to the
object's (`os.utime` after every put and get); no other record is kept.

Endpoint and credentials come from the usual environment variables (AWS_ENDPOINT_URL or
AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION for
S3; GOOGLE_APPLICATION_CREDENTIALS for GCS), read by pyarrow's filesystems.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from models.errors import UserError

CACHE_ENV = "WEIGHTGEN_CACHE"
LOCAL_ONLY = {"lock.json"}  # the run lock's holder record: about this machine's processes only
STORE_ONLY = "ray_train"  # Ray Train reads and writes its checkpoints on the store itself: never copied here
CHUNK = 8 * 2**20


class RemoteError(UserError):
    """The object store cannot be used (no such bucket, credentials refused, unreachable); the message says how to fix it."""


def is_uri(location) -> bool:
    """Whether a --run-dir names an object store (`s3://...`, `gs://...`) rather than a local folder."""
    scheme = urlparse(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


def working_copy(uri: str) -> Path:
    """The local folder that mirrors `uri`: <cache>/runs/<scheme>/<bucket>/<path>, so runs beside each other
    on the store are beside each other here too (and share the MLflow database beside them)."""
    u = urlparse(uri)
    cache = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "weightgen").expanduser()
    return (cache / "runs" / u.scheme / u.netloc / u.path.strip("/")).resolve()


def _synced(rel: str) -> bool:
    """Whether a file (path relative to the run) is kept the same here and on the store: temporary files
    and folders (dot names), locks and the lock record are local only, Ray Train's checkpoints store only."""
    parts = rel.split("/")
    return (not any(p.startswith(".") for p in parts) and parts[-1] not in LOCAL_ONLY and not rel.endswith(".lock")
            and STORE_ONLY not in parts)


class Remote:
    """One run's prefix on an object store: put, get and list files by their path relative to the run."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self._fs = None

    def _open(self):
        from pyarrow import fs as pafs

        if self._fs is None:
            try:
                self._fs, self.base = pafs.FileSystem.from_uri(self.uri)
            except Exception as e:  # noqa: BLE001 - an unknown scheme, a malformed URI, no credentials provider
                raise RemoteError(f"--run-dir {self.uri}: cannot open it ({e})") from None
        return self._fs

    @property
    def fs(self):
        return self._open()

    def key(self, rel: str) -> str:
        self._open()
        return f"{self.base}/{rel}" if rel else self.base

    def __reduce__(self):  # ship the URI, not a live client: each process opens its own
        return (Remote, (self.uri,))

    # -- checks ---------------------------------------------------------------------------------------
    def preflight(self) -> None:
        """Fail with one clear line, before anything is written, when the bucket is missing, the
        credentials are refused or the endpoint is unreachable; then prove that objects can be written."""
        from pyarrow import fs as pafs

        bucket = self.key("").split("/")[0]
        hint = ("set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a server other than AWS, "
                "e.g. MinIO)")
        try:
            info = self.fs.get_file_info(bucket)
            if info.type == pafs.FileType.NotFound:
                raise RemoteError(f"--run-dir {self.uri}: bucket {bucket!r} does not exist at {self.endpoint()}; "
                                  "create it first or check the name and AWS_ENDPOINT_URL")
            probe = self.key(f".write-test-{os.getpid()}")
            with self.fs.open_output_stream(probe) as out:
                out.write(b"ok")
            self.fs.delete_file(probe)
        except RemoteError:
            raise
        except OSError as e:
            msg = str(e)
            if any(s in msg for s in ("ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                      "Forbidden", "403")):
                raise RemoteError(f"--run-dir {self.uri}: {self.endpoint()} refused the credentials ({_first_line(msg)}); "
                                  f"{hint}") from None
            raise RemoteError(f"--run-dir {self.uri}: cannot use the object store at {self.endpoint()} "
                              f"({_first_line(msg)}); check AWS_ENDPOINT_URL, that the server is reachable, and the credentials") from None

    def endpoint(self) -> str:
        """Where the store is reached, for messages."""
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return ep if ep and self.uri.startswith("s3") else f"{urlparse(self.uri).scheme}://"

    # -- objects --------------------------------------------------------------------------------------
    def listing(self, under: str = "") -> dict[str, tuple[int, int]]:
        """{relative path: (size, modification time in whole seconds)} of every object under the run (or its folder `under`)."""
        from pyarrow import fs as pafs

        sel = pafs.FileSelector(self.key(under), recursive=True, allow_not_found=True)
        n = len(self.key("")) + 1
        return {i.path[n:]: (i.size, _seconds(i.mtime)) for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File}

    def stat(self, rel: str) -> tuple[int, int] | None:
        from pyarrow import fs as pafs

        i = self.fs.get_file_info(self.key(rel))
        return (i.size, _seconds(i.mtime)) if i.type == pafs.FileType.File else None

    def put(self, local: Path, rel: str) -> None:
        """Upload one file whole (one atomic PUT) and mark the local copy in sync."""
        with open(local, "rb") as src, self.fs.open_output_stream(self.key(rel)) as out:
            shutil.copyfileobj(src, out, CHUNK)
        size, mtime = self.stat(rel)
        os.utime(local, (mtime, mtime))

    def get(self, rel: str, local: Path) -> None:
        """Download one object atomically (temporary file beside it, then rename) and mark it in sync."""
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{local.name}.", suffix=".tmp", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as out, self.fs.open_input_stream(self.key(rel)) as src:
                shutil.copyfileobj(src, out, CHUNK)
            mtime = self.stat(rel)[1]
            os.utime(tmp, (mtime, mtime))
            os.chmod(tmp, 0o644)
            os.replace(tmp, local)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    def delete(self, rel: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self.key(rel))


def _seconds(mtime) -> int:
    return int(mtime.timestamp()) if mtime is not None else 0


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else "no detail"


def _in_sync(local: Path, remote: tuple[int, int]) -> bool:
    st = local.stat()
    return st.st_size == remote[0] and int(st.st_mtime) == remote[1]


def _markers_last(rels: list[str]) -> list[str]:
    """Data before the small JSON/YAML files that describe it (manifests, info, plans, timings)."""
    return sorted(rels, key=lambda r: (r.endswith((".json", ".yaml")), r))


# -- the mirrors of this process ------------------------------------------------------------------------
_MIRRORS: dict[Path, Remote] = {}


def register(root: Path, uri: str) -> Remote:
    """Mirror the local folder `root` to `uri` in this process: files published under it are put there."""
    root = Path(root).resolve()
    if root not in _MIRRORS or _MIRRORS[root].uri != uri.rstrip("/"):
        _MIRRORS[root] = Remote(uri)
    return _MIRRORS[root]


def snapshot() -> dict[str, str]:
    """This process's mirrors, JSON-plain, for `install` in a Ray actor."""
    return {str(root): r.uri for root, r in _MIRRORS.items()}


def install(mirrors: dict[str, str]) -> None:
    for root, uri in mirrors.items():
        register(Path(root), uri)


def mirror_of(path: Path) -> tuple[Remote, str] | None:
    """(the mirror, the path relative to its root) for a path inside a mirrored folder, else None."""
    path = Path(path).absolute()
    for root, r in _MIRRORS.items():
        if path.is_relative_to(root):
            return r, path.relative_to(root).as_posix()
    return None


def published(path: Path) -> None:
    """A file was completed at `path`: put it to the store when its folder is mirrored."""
    m = mirror_of(path)
    if m is not None and _synced(m[1]):
        m[0].put(Path(path), m[1])


def published_dir(path: Path) -> None:
    """A folder was replaced whole at `path`: put its files (markers last) and drop the objects it no longer has."""
    m = mirror_of(path)
    if m is None:
        return
    remote, prefix = m
    files = {f.relative_to(path).as_posix(): f for f in Path(path).rglob("*")
             if f.is_file() and _synced(f"{prefix}/{f.relative_to(path).as_posix()}")}
    for rel in _markers_last(list(files)):
        remote.put(files[rel], f"{prefix}/{rel}")
    stale = [r for r in remote.listing(prefix) if r[len(prefix) + 1:] not in files]
    for rel in stale:
        remote.delete(rel)


def fetch(path: Path) -> Path:
    """`path`, fetched from the store first when it is missing here (a file another node wrote)."""
    path = Path(path)
    m = mirror_of(path)
    if m is not None and not path.exists() and m[0].stat(m[1]) is not None:
        m[0].get(m[1], path)
    return path


def exists(path: Path) -> bool:
    """Whether the file is here or, for a mirrored folder, on the store."""
    m = mirror_of(path)
    return Path(path).exists() or (m is not None and m[0].stat(m[1]) is not None)


def sync_down(root: Path, prune: bool = True) -> int:
    """Make the working copy at `root` match its store: fetch missing or changed objects and, with `prune`,
    remove local files the store lacks. Returns the number of files fetched."""
    root = Path(root).resolve()
    remote = _MIRRORS[root]
    objects = {r: m for r, m in remote.listing().items() if _synced(r)}
    fetched = 0
    for rel, meta in objects.items():
        local = root / rel
        if not local.exists() or (prune and not _in_sync(local, meta)):
            remote.get(rel, local)
            fetched += 1
    if prune and root.exists():
        for f in root.rglob("*"):
            rel = f.relative_to(root).as_posix()
            if f.is_file() and _synced(rel) and rel not in objects:
                f.unlink()
    return fetched


_FETCHED: set[Path] = set()


def fetch_missing(root: Path) -> None:
    """Once per process: fetch what the store has and this node lacks (a Ray worker on another node)."""
    root = Path(root).resolve()
    if root in _MIRRORS and root not in _FETCHED:
        sync_down(root, prune=False)
        _FETCHED.add(root)


def sync_up(root: Path) -> int:
    """Put every local file of the run that the store lacks or holds an older copy of (markers last).
    Returns the number of files put."""
    root = Path(root).resolve()
    remote = _MIRRORS[root]
    objects = remote.listing()
    todo = [r for f in root.rglob("*") if f.is_file() and _synced(r := f.relative_to(root).as_posix())]
    todo = [r for r in todo if r not in objects or not _in_sync(root / r, objects[r])]
    for rel in _markers_last(todo):
        remote.put(root / rel, rel)
    return len(todo)
