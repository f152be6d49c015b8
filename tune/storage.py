"""Where an experiment's records go: `--storage` as a folder or a URI, plus one local folder.

Tune's runs, the trial tables of a sweep and its ledgers live under `root`: a folder, or a URI
such as `s3://BUCKET/P?endpoint_override=127.0.0.1:PORT&scheme=http` that every node reaches,
written through pyarrow's filesystem for that URI (one PUT per file: a reader sees the whole
file or none). What cannot live in a bucket lives under `local`, a folder on this machine:
the experiment lock, the space reserve, the zoo cache and the default MLflow sqlite file.
For a folder storage the two are the same folder.
"""
from __future__ import annotations

import posixpath
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from dsdm.errors import DsdmError
from dsdm.io import atomic_write_bytes


def check_local(folder: Path) -> Path:
    """A folder this process can create and write in (resolved)."""
    folder = Path(folder).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise DsdmError(f"storage path '{folder}' is not writable ({exc.strerror}); pass --storage DIR you can write") from None
    return folder


@dataclass(frozen=True)
class Storage:
    root: str  # an absolute folder, or a URI (no trailing slash)
    local: Path

    @classmethod
    def open(cls, storage: str | Path, local_dir: str | Path = "runs") -> "Storage":
        """Check `storage` before anything is written: a folder must be writable, a URI reachable."""
        text = str(storage)
        if "://" not in text:
            folder = check_local(Path(text))
            return cls(str(folder), folder)
        cls(_strip(text), Path(local_dir)).probe()  # first: an unreachable storage leaves nothing behind
        return cls(_strip(text), check_local(Path(local_dir)))

    def local_only(self) -> "Storage":
        """The local folder as a storage of its own (records that stay on this machine)."""
        return Storage(str(self.local), self.local)

    @property
    def remote(self) -> bool:
        return "://" in self.root

    def uri(self, *parts: str) -> str:
        """`root` joined with `parts`, a URI's query (endpoint, scheme) kept at its end."""
        if not self.remote:
            return str(Path(self.root, *parts))
        base, sep, query = self.root.partition("?")
        return posixpath.join(base, *parts) + sep + query

    @cached_property
    def _fs(self):
        from pyarrow import fs

        if not self.remote:
            return fs.LocalFileSystem(), self.root
        return fs.FileSystem.from_uri(self.root)

    def _path(self, *parts: str) -> str:
        return posixpath.join(self._fs[1], *parts)

    def _probe_fs(self):
        """The filesystem with few retries for the probe: pyarrow's from_uri retries a dead S3
        endpoint for ~12 s; three attempts answer in ~2 s."""
        from urllib.parse import parse_qsl, urlsplit

        from pyarrow import fs

        parts = urlsplit(self.root)
        options = dict(parse_qsl(parts.query))
        if parts.scheme != "s3" or set(options) - {"endpoint_override", "scheme", "region"}:
            return self._fs[0]
        return fs.S3FileSystem(**options, retry_strategy=fs.AwsStandardS3RetryStrategy(max_attempts=3))

    def probe(self) -> None:
        """Write and delete a small file under `root`; one line if the storage cannot be reached."""
        filesystem = self._probe_fs()
        probe = self._path(".write-test")
        try:
            filesystem.create_dir(self._path(), recursive=True)
            with filesystem.open_output_stream(probe) as fh:
                fh.write(b"ok")
            filesystem.delete_file(probe)
        except Exception as exc:  # pyarrow raises OSError, ArrowException or ValueError by backend
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise DsdmError(f"storage '{self.root}' is not reachable or not writable ({reason}); check the URI, "
                            "its endpoint and credentials, or pass --storage DIR") from None

    def exists(self, *parts: str) -> bool:
        from pyarrow import fs

        filesystem, _ = self._fs
        return filesystem.get_file_info(self._path(*parts)).type != fs.FileType.NotFound

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Replace the file at `parts` whole (atomic rename on a folder, one PUT on an object store)."""
        if not self.remote:
            return str(atomic_write_bytes(Path(self.root, *parts), data))
        filesystem, _ = self._fs
        filesystem.create_dir(self._path(*parts[:-1]), recursive=True)
        with filesystem.open_output_stream(self._path(*parts)) as fh:
            fh.write(data)
        return self.uri(*parts)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def read_bytes(self, *parts: str) -> bytes:
        filesystem, _ = self._fs
        with filesystem.open_input_stream(self._path(*parts)) as fh:
            return fh.read()

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def files(self, *parts: str) -> list[str]:
        """Names of the files directly in the folder `parts` ([] if there is none)."""
        from pyarrow import fs

        filesystem, _ = self._fs
        try:
            infos = filesystem.get_file_info(fs.FileSelector(self._path(*parts)))
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(i.path) for i in infos if i.type == fs.FileType.File)

    def find(self, name: str, *parts: str) -> list[str]:
        """Paths (relative to `parts`) of the files called `name` one folder below `parts`."""
        from pyarrow import fs

        filesystem, _ = self._fs
        base = self._path(*parts)
        try:
            infos = filesystem.get_file_info(fs.FileSelector(base, recursive=True))
        except FileNotFoundError:
            return []
        return sorted(posixpath.relpath(i.path, base) for i in infos
                      if i.type == fs.FileType.File and posixpath.basename(i.path) == name
                      and posixpath.relpath(i.path, base).count("/") == 1)


def _strip(uri: str) -> str:
    base, sep, query = uri.partition("?")
    return base.rstrip("/") + sep + query
