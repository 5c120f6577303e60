"""Distributed reads and writes of CSV, Parquet and JSON datasets, from wherever the data is.

``read_parquet_dist(paths, env)`` (and ``read_csv_dist``, ``read_json_dist``) read a dataset
collectively: rank 0 lists it once (files, globs, directories — recursively, Hive
``key=value`` directories adding their partition columns), the Parquet footers are read by all
ranks in turn, and every rank reads a contiguous share of the dataset's *bytes*: Parquet row
groups (by compressed size) or whole CSV/JSON files, cut at even shares of the total.  All
files must have the same columns; their types are unified (int64 with double gives double) or
the read fails on every rank naming the files that disagree.

``write_parquet_dist(df, dir_path, env)`` (and CSV, JSON) write one file per rank
(``part-00000.parquet``; with ``partition_cols`` one per rank and partition, under Hive
``key=value/`` directories) with a commit protocol: rank 0 checks the directory (``mode="error"``:
it must be absent or empty; ``"overwrite"``: its contents are deleted) and leaves a ``_PENDING``
marker; every rank writes and makes its file durable (fsync on a local/EFS path; a completed
PUT on S3); after everyone reported success rank 0 writes ``_SUCCESS`` (a JSON manifest of the
files) and removes ``_PENDING``.  If any rank fails, rank 0 deletes what was written and every
rank raises.  Readers of a directory holding ``_PENDING`` without ``_SUCCESS`` (a write in
progress or one that died) refuse it with ``IncompleteDatasetError``; a directory with
``_SUCCESS`` is read as its manifest lists; any other directory (no markers: data written by
other tools) is read as found, unless ``require_success=True``.

Paths: a local or EFS path (or ``file://``), ``s3://bucket/prefix`` (pyarrow's S3 client; an
``?endpoint_url=...&region=...`` query or ``storage_options={"endpoint_url": ...,
"region": ..., "key": ..., "secret": ...}`` as for the store's S3 URLs), or any URL fsspec knows
(``gs://``, ``az://``, ``memory://``, ... with ``pip install cylon-store[fsspec]`` plus the
filesystem's own package); ``filesystem=`` takes a pyarrow or fsspec filesystem.
"""

from __future__ import annotations

import fnmatch
import json
import os
import pickle
import posixpath
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union
from urllib.parse import parse_qsl, quote, unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from .errors import AlreadyExistsError, ConfigError, NotFoundError, PreconditionError, SchemaMismatchError
from .kernel.frame import DataFrame, LocalCommunicator, comm_of

__all__ = ["read_csv_dist", "read_parquet_dist", "read_json_dist", "write_csv_dist",
           "write_parquet_dist", "write_json_dist", "read_csv", "read_parquet", "read_json",
           "assign_by_bytes", "resolve_filesystem", "IncompleteDatasetError", "SUCCESS", "PENDING",
           "WRITE_MODES"]

SUCCESS = "_SUCCESS"
PENDING = "_PENDING"
WRITE_MODES = ("error", "errorifexists", "overwrite")
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
_EXT = {"parquet": (".parquet", ".parq", ".pq"), "csv": (".csv", ".csv.gz", ".csv.bz2", ".tsv"),
        "json": (".json", ".jsonl", ".ndjson", ".json.gz")}
_WRITE_EXT = {"parquet": "parquet", "csv": "csv", "json": "json"}

Paths = Union[str, Sequence[str], dict]


class IncompleteDatasetError(PreconditionError):
    """The directory holds an uncommitted write (``_PENDING`` without ``_SUCCESS``), or no
    ``_SUCCESS`` when ``require_success=True``."""


# -- filesystems ---------------------------------------------------------------------------------

def _s3_filesystem(query: dict, storage_options: dict) -> pafs.FileSystem:
    opts = {**query, **storage_options}
    kwargs: dict[str, Any] = {}
    endpoint = (opts.pop("endpoint_url", None) or opts.pop("endpoint_override", None)
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    client_kwargs = opts.pop("client_kwargs", None) or {}
    endpoint = endpoint or client_kwargs.get("endpoint_url")
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parts.netloc
        kwargs["scheme"] = parts.scheme or "https"
    region = opts.pop("region", None) or opts.pop("region_name", None) or client_kwargs.get("region_name")
    if region:
        kwargs["region"] = region
    key = opts.pop("key", None) or opts.pop("aws_access_key_id", None) or opts.pop("access_key", None)
    secret = (opts.pop("secret", None) or opts.pop("aws_secret_access_key", None)
              or opts.pop("secret_key", None))
    token = opts.pop("token", None) or opts.pop("aws_session_token", None) or opts.pop("session_token", None)
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if token:
            kwargs["session_token"] = token
    if str(opts.pop("anon", "")).lower() in ("1", "true"):
        kwargs["anonymous"] = True
    opts.pop("profile", None)
    if opts:
        raise ConfigError(f"unknown S3 option(s) {sorted(opts)}; known: endpoint_url, region, key, "
                          f"secret, token, anon")
    return pafs.S3FileSystem(**kwargs)


def resolve_filesystem(url: str, storage_options: Optional[dict] = None,
                       filesystem: Any = None) -> tuple[pafs.FileSystem, str]:
    """(pyarrow FileSystem, path inside it) for a local path, ``file://``, ``s3://`` or any
    fsspec URL; ``filesystem`` (pyarrow or fsspec) takes the path as is."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"a path must be a non-empty string, got {url!r}")
    storage_options = dict(storage_options or {})
    if filesystem is not None:
        if isinstance(filesystem, pafs.FileSystem):
            return filesystem, url.split("://", 1)[-1]
        return pafs.PyFileSystem(pafs.FSSpecHandler(filesystem)), filesystem._strip_protocol(url)
    if "://" not in url:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(url))
    scheme = url.split("://", 1)[0].lower()
    if scheme == "file":
        return pafs.LocalFileSystem(), os.path.abspath(urlsplit(url).path or "/")
    if scheme in ("s3", "s3a"):
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        path = (parts.netloc + parts.path).rstrip("/")
        if not parts.netloc:
            raise ConfigError(f"an S3 URL names a bucket: s3://bucket/prefix, got {url!r}")
        return _s3_filesystem(query, storage_options), path
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ConfigError(f"reading {scheme}:// needs fsspec: pip install 'cylon-store[fsspec]' "
                          f"(and the {scheme} filesystem's package)") from exc
    try:
        fs = fsspec.filesystem(scheme, **storage_options)
    except (ImportError, ValueError) as exc:
        raise ConfigError(f"no filesystem for {scheme}:// ({exc})") from exc
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), fs._strip_protocol(url)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


# -- small collectives ---------------------------------------------------------------------------

def _pack(obj) -> pa.Table:
    return pa.table({"b": pa.array([pickle.dumps(obj)], pa.binary())})


def _unpack(t: pa.Table):
    return pickle.loads(t.column("b")[0].as_py())


def _bcast(comm, obj_fn: Callable[[], Any]):
    """Rank 0 computes ``obj_fn()`` (or the exception it raised); every rank gets it and
    raises the same exception alike."""
    if comm.rank == 0:
        try:
            result: Any = ("ok", obj_fn())
        except Exception as exc:  # handed to every rank
            result = ("err", exc)
        try:
            packed = _pack(result)
        except Exception:  # an exception that does not pickle
            packed = _pack(("err", ConfigError(f"{type(result[1]).__name__}: {result[1]}")))
    else:
        packed = None
    status, value = _unpack(comm.bcast(packed, root=0))
    if status == "err":
        raise value
    return value


def _allgather(comm, obj) -> list:
    return [_unpack(t) for t in comm.allgather(_pack(obj))]


def _gather_or_raise(comm, error: Optional[str], found) -> list:
    """Every rank's ``found``; the first rank's ``error`` raised on every rank instead."""
    gathered = _allgather(comm, (error, found))
    errors = [e for e, _ in gathered if e]
    if errors:
        raise ConfigError(errors[0])
    return [f for _, f in gathered]


def _env_comm(env):
    comm = comm_of(env)
    return comm if comm is not None else LocalCommunicator()


# -- listing -------------------------------------------------------------------------------------

@dataclass
class _File:
    path: str
    size: int
    partitions: dict = field(default_factory=dict)   # hive key -> raw string value


_GLOB = re.compile(r"[*?\[]")


def _hidden(rel: str) -> bool:
    return any(p.startswith(("_", ".")) for p in rel.split("/") if p)


def _hive(rel_dir: str) -> dict:
    out = {}
    for part in rel_dir.split("/"):
        if "=" in part:
            k, v = part.split("=", 1)
            out[unquote(k)] = unquote(v)
    return out


def _list_dir(fs, base: str, fmt: str, require_success: bool, url: str) -> list[_File]:
    entries = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    names = {posixpath.relpath(e.path, base): e for e in entries}
    if SUCCESS in names:
        try:
            with fs.open_input_stream(posixpath.join(base, SUCCESS)) as f:
                manifest = json.loads(f.read().decode() or "{}")
        except ValueError:
            manifest = {}
        listed = manifest.get("files")
        if listed is not None:
            missing = [r for r in listed if r not in names]
            if missing:
                raise IncompleteDatasetError(f"{url}: _SUCCESS lists {len(missing)} file(s) that "
                                             f"are missing, e.g. {missing[0]!r}")
            return [_File(names[r].path, names[r].size or 0, _hive(posixpath.dirname(r)))
                    for r in sorted(listed)]
    elif PENDING in names:
        raise IncompleteDatasetError(f"{url}: holds an uncommitted write ({PENDING} without "
                                     f"{SUCCESS}): a writer is still running or died; rewrite it "
                                     f"with mode='overwrite'")
    elif require_success:
        raise IncompleteDatasetError(f"{url}: no {SUCCESS} marker (require_success=True)")
    files = [(rel, e) for rel, e in names.items()
             if e.type == pafs.FileType.File and not _hidden(rel)]
    typed = [(rel, e) for rel, e in files if rel.lower().endswith(_EXT[fmt])]
    chosen = typed or files
    return [_File(e.path, e.size or 0, _hive(posixpath.dirname(rel))) for rel, e in sorted(chosen)]


def _glob(fs, pattern: str, url: str) -> list[_File]:
    parts = pattern.split("/")
    fixed = []
    for p in parts:
        if _GLOB.search(p):
            break
        fixed.append(p)
    base = "/".join(fixed) or "/"
    info = fs.get_file_info(base)
    if info.type != pafs.FileType.Directory:
        return []
    out = []
    for e in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
        if e.type == pafs.FileType.File and fnmatch.fnmatchcase(e.path, pattern) \
                and not _hidden(posixpath.relpath(e.path, base)):
            out.append(_File(e.path, e.size or 0, _hive(posixpath.dirname(posixpath.relpath(e.path, base)))))
    return sorted(out, key=lambda f: f.path)


def _resolve_all(paths, storage_options, filesystem) -> tuple[pafs.FileSystem, list[tuple[str, str]]]:
    """One filesystem for all ``paths`` and each (url, path inside it).  Every rank resolves
    its own (credentials never travel between ranks)."""
    items = [paths] if isinstance(paths, str) else list(paths)
    if not items:
        raise ConfigError("no paths given")
    if not all(isinstance(u, str) for u in items):
        raise ConfigError("paths must be a str, a list of str, or a dict {rank: str or [str]}")
    fs_out, out = None, []
    for url in items:
        fs, path = resolve_filesystem(url, storage_options, filesystem)
        if fs_out is not None and (type(fs) is not type(fs_out) or fs.type_name != fs_out.type_name):
            raise ConfigError(f"all paths of one read must be on one filesystem: {items[0]!r} and {url!r}")
        fs_out = fs_out or fs
        out.append((url, path))
    assert fs_out is not None
    return fs_out, out


def _expand(fs, urls: list[tuple[str, str]], fmt: str, require_success: bool) -> list[_File]:
    """The files of paths, globs and directories, in order, each once."""
    files: list[_File] = []
    for url, path in urls:
        if _GLOB.search(path):
            found = _glob(fs, path, url)
            if not found:
                raise NotFoundError(f"no file matches {url!r}")
            files += found
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise NotFoundError(f"no such file or directory: {url!r}")
        if info.type == pafs.FileType.Directory:
            found = _list_dir(fs, path.rstrip("/"), fmt, require_success, url)
            if not found:
                raise NotFoundError(f"{url!r} is a directory without {fmt} files")
            files += found
        else:
            files.append(_File(path, info.size or 0))
    seen, unique_files = set(), []
    for f in files:
        if f.path not in seen:
            seen.add(f.path)
            unique_files.append(f)
    return unique_files


def _plan(comm, paths, fmt, storage_options, filesystem, require_success):
    """(fs, all files, this rank's files or None): rank 0 lists, every rank gets the list."""
    if isinstance(paths, dict):
        if not all(isinstance(k, int) and isinstance(v, (str, list)) for k, v in paths.items()):
            raise ConfigError("paths must be a str, a list of str, or a dict {rank: str or [str]}")
        resolved = {r: _resolve_all(p, storage_options, filesystem) for r, p in paths.items()}
        fs = next(iter(resolved.values()))[0] if resolved else pafs.LocalFileSystem()
        per_rank = _bcast(comm, lambda: {r: _expand(f, u, fmt, require_success)
                                         for r, (f, u) in resolved.items()})
        files = [f for r in sorted(per_rank) for f in per_rank[r]]
        if not files:
            raise NotFoundError("the dataset has no files to read")
        return fs, files, per_rank.get(comm.rank, [])
    fs, urls = _resolve_all(paths, storage_options, filesystem)
    return fs, _bcast(comm, lambda: _expand(fs, urls, fmt, require_success)), None


def assign_by_bytes(sizes: Sequence[int], world_size: int) -> list[tuple[int, int]]:
    """Cut items (in order) into ``world_size`` contiguous runs of about equal total size:
    item i goes to the rank whose even share of the total holds the item's midpoint.  Returns
    (start, end) item indices per rank; every rank's bytes are within one item of total/P."""
    n, P = len(sizes), int(world_size)
    if n == 0:
        return [(0, 0)] * P
    s = np.asarray(sizes, dtype=np.float64)
    if s.sum() <= 0:
        s = np.ones(n)
    mid = np.cumsum(s) - s / 2
    owner = np.minimum((mid * P / s.sum()).astype(np.int64), P - 1)
    bounds = np.searchsorted(owner, np.arange(P + 1), side="left")
    return [(int(bounds[r]), int(bounds[r + 1])) for r in range(P)]


# -- schemas -------------------------------------------------------------------------------------

def _unify(schemas: list[tuple[str, pa.Schema]]) -> pa.Schema:
    """One schema for all files: same column names (any order), types promoted, else a
    SchemaMismatchError naming two files that disagree."""
    ref_path, ref = schemas[0]
    for path, s in schemas[1:]:
        if set(s.names) != set(ref.names):
            extra, missing = sorted(set(s.names) - set(ref.names)), sorted(set(ref.names) - set(s.names))
            raise SchemaMismatchError(
                f"files have different columns: {path!r} has {s.names}, {ref_path!r} has "
                f"{ref.names} (extra {extra}, missing {missing})")
    try:
        unified = pa.unify_schemas([ref] + [pa.schema([s.field(n) for n in ref.names])
                                            for _, s in schemas[1:]], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        for path, s in schemas[1:]:
            for f in ref:
                try:
                    pa.unify_schemas([pa.schema([f]), pa.schema([s.field(f.name)])],
                                     promote_options="permissive")
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    raise SchemaMismatchError(
                        f"files have incompatible types for column {f.name!r}: {f.type} in "
                        f"{ref_path!r}, {s.field(f.name).type} in {path!r}") from None
        raise
    return unified.remove_metadata()


def _partition_types(files: list[_File], names: list[str]) -> dict:
    types = {}
    for k in names:
        vals = [f.partitions.get(k) for f in files]
        present = [v for v in vals if v is not None and v != HIVE_NULL]
        t: pa.DataType = pa.string()
        for cand in (pa.int64(), pa.float64()):
            try:
                pa.array(present, pa.string()).cast(cand)
                t = cand
                break
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                continue
        types[k] = t
    return types


def _partition_names(files: list[_File]) -> list[str]:
    names: list[str] = []
    for f in files:
        for k in f.partitions:
            if k not in names:
                names.append(k)
    return names


def _add_partitions(table: pa.Table, f: _File, names: list[str], types: dict) -> pa.Table:
    for k in names:
        if k in table.column_names:
            continue
        raw = f.partitions.get(k)
        value = None if raw is None or raw == HIVE_NULL else pa.scalar(raw).cast(types[k])
        table = table.append_column(k, pa.array([value] * table.num_rows, types[k])
                                    if value is None else pa.repeat(value, table.num_rows))
    return table


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    table = table.select(schema.names)
    if not table.schema.equals(schema):
        table = table.cast(schema)
    return table


# -- readers -------------------------------------------------------------------------------------

def _csv_reader(use_threads: bool = True, names=None, sep: str = ",", block_size: int = 1 << 20,
                skiprows: int = 0, ignore_emptylines: bool = True, na_values=None,
                column_names=None, **unknown):
    import pyarrow.csv as pacsv
    if unknown:
        raise ConfigError(f"read_csv: unknown option(s) {sorted(unknown)}; known: use_threads, names, "
                          f"sep, block_size, skiprows, ignore_emptylines, na_values, column_names")
    ro = pacsv.ReadOptions(use_threads=use_threads, block_size=block_size, skip_rows=skiprows,
                           column_names=column_names)
    po = pacsv.ParseOptions(delimiter=sep, ignore_empty_lines=ignore_emptylines)
    co_kwargs: dict[str, Any] = {}
    if names is not None:
        co_kwargs["include_columns"] = list(names)
    if na_values is not None:
        co_kwargs["null_values"] = list(na_values)
    co = pacsv.ConvertOptions(**co_kwargs)

    def read(fs, path):
        with fs.open_input_stream(path) as src:
            return pacsv.read_csv(src, read_options=ro, parse_options=po, convert_options=co)
    return read


def _json_reader(lines: bool = True, **unknown):
    import pyarrow.json as pajson
    if unknown or not lines:
        raise ConfigError("read_json: reads newline-delimited JSON (one object per line); no "
                          f"other option is supported, got {sorted(unknown) or 'lines=False'}")

    def read(fs, path):
        with fs.open_input_stream(path) as src:
            return pajson.read_json(src)
    return read


def _read_files_dist(fmt, paths, env, storage_options, filesystem, require_success, columns,
                     reader) -> DataFrame:
    """CSV/JSON: whole files are the unit, balanced by bytes."""
    comm = _env_comm(env)
    fs, files, mine = _plan(comm, paths, fmt, storage_options, filesystem, require_success)
    if mine is None:
        start, end = assign_by_bytes([f.size for f in files], comm.world_size)[comm.rank]
        mine = files[start:end]
    pnames = _partition_names(files)
    ptypes = _partition_types(files, pnames)
    tables, report = [], []
    error = None
    for f in mine:
        try:
            t = _add_partitions(reader(fs, f.path), f, pnames, ptypes)
            tables.append(t)
            report.append((f.path, t.schema.remove_metadata()))
        except Exception as exc:  # reported to every rank below
            error = f"{type(exc).__name__} reading {f.path!r}: {exc}"
            break
    all_schemas = [s for rep in _gather_or_raise(comm, error, report) for s in rep]
    if not all_schemas:
        raise NotFoundError("the dataset has no files to read")
    schema = _unify(all_schemas)
    out = pa.concat_tables([_conform(t, schema) for t in tables]) if tables else schema.empty_table()
    if columns is not None:
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise ConfigError(f"columns {missing} are not in the dataset; it has {schema.names}")
        out = out.select(list(columns))
    return DataFrame(out)


def read_csv_dist(paths: Paths, env=None, *, storage_options: Optional[dict] = None, filesystem=None,
                  require_success: bool = False, columns=None, **kwargs) -> DataFrame:
    """Every rank reads its share (by bytes) of the CSV files under ``paths`` (a path, glob,
    directory, URL, a list of them, or pycylon's ``{rank: paths}``); ``kwargs`` as ``read_csv``."""
    reader = _csv_reader(**kwargs)
    return _read_files_dist("csv", paths, env, storage_options, filesystem, require_success,
                            columns, reader)


def read_json_dist(paths: Paths, env=None, *, storage_options: Optional[dict] = None, filesystem=None,
                   require_success: bool = False, columns=None, **kwargs) -> DataFrame:
    """As ``read_csv_dist`` for newline-delimited JSON files."""
    reader = _json_reader(**kwargs)
    return _read_files_dist("json", paths, env, storage_options, filesystem, require_success,
                            columns, reader)


def read_parquet_dist(paths: Paths, env=None, *, columns=None, storage_options: Optional[dict] = None,
                      filesystem=None, require_success: bool = False, use_threads: bool = False,
                      **kwargs) -> DataFrame:
    """Every rank reads a contiguous run of the dataset's row groups, cut by compressed bytes.
    pycylon's ParquetFile options (metadata, memory_map, buffer_size, ...) are accepted and
    ignored, except ``columns`` and ``use_threads``."""
    import pyarrow.parquet as pq
    ignored = {"metadata", "common_metadata", "read_dictionary", "memory_map", "buffer_size",
               "pre_buffer", "coerce_int96_timestamp_unit", "use_pandas_metadata"}
    unknown = set(kwargs) - ignored
    if unknown:
        raise ConfigError(f"read_parquet_dist: unknown option(s) {sorted(unknown)}")
    comm = _env_comm(env)
    fs, files, mine_files = _plan(comm, paths, "parquet", storage_options, filesystem, require_success)
    P, me = comm.world_size, comm.rank
    index = {f.path: i for i, f in enumerate(files)}

    # Footers: rank r reads those of files r, r+P, ...; everyone gets all of them.
    footers, error = [], None
    for i in range(me, len(files), P):
        try:
            with fs.open_input_file(files[i].path) as src:
                md = pq.ParquetFile(src).metadata
            rgs = [(rg, md.row_group(rg).num_rows,
                    sum(md.row_group(rg).column(c).total_compressed_size
                        for c in range(md.row_group(rg).num_columns)))
                   for rg in range(md.num_row_groups)]
            footers.append((i, md.schema.to_arrow_schema().remove_metadata(), rgs))
        except Exception as exc:  # reported to every rank below
            error = f"{files[i].path!r} is not a readable Parquet file: {type(exc).__name__}: {exc}"
            break
    meta = sorted((x for fl in _gather_or_raise(comm, error, footers) for x in fl),
                  key=lambda x: x[0])
    if not meta:
        raise NotFoundError("the dataset has no files to read")
    pnames = _partition_names(files)
    ptypes = _partition_types(files, pnames)
    file_schema = _unify([(files[i].path, s) for i, s, _ in meta])
    full = file_schema
    for k in pnames:
        if k not in full.names:
            full = full.append(pa.field(k, ptypes[k]))
    if columns is not None:
        missing = [c for c in columns if c not in full.names]
        if missing:
            raise ConfigError(f"columns {missing} are not in the dataset; it has {full.names}")
        full = pa.schema([full.field(c) for c in columns])

    items = [(i, rg, nbytes) for i, _, rgs in meta for rg, _, nbytes in rgs]
    if mine_files is None:
        start, end = assign_by_bytes([b for _, _, b in items], P)[me]
        mine = items[start:end]
    else:
        wanted = {index[f.path] for f in mine_files}
        mine = [it for it in items if it[0] in wanted]
    by_file: dict[int, list[int]] = {}
    for i, rg, _ in mine:
        by_file.setdefault(i, []).append(rg)
    tables = []
    for i, rgs_of in by_file.items():
        f = files[i]
        with fs.open_input_file(f.path) as src:
            pf = pq.ParquetFile(src)
            want = None if columns is None else [c for c in columns if c in pf.schema_arrow.names]
            t = pf.read_row_groups(rgs_of, columns=want, use_threads=use_threads)
        t = _add_partitions(t.replace_schema_metadata(None), f, pnames, ptypes)
        tables.append(_conform(t, full))
    out = pa.concat_tables(tables) if tables else full.empty_table()
    return DataFrame(out)


def _local_read(fmt: str, path, env, slice_rows: bool, reader_kwargs: dict, **options) -> DataFrame:
    """pycylon's read_csv: every rank reads the whole input; ``slice=True`` keeps this rank's
    even block of its rows."""
    local = LocalCommunicator()
    if fmt == "parquet":
        df = read_parquet_dist(path, local, **options, **reader_kwargs)
    elif fmt == "csv":
        df = read_csv_dist(path, local, **options, **reader_kwargs)
    else:
        df = read_json_dist(path, local, **options, **reader_kwargs)
    comm = comm_of(env)
    if slice_rows and comm is not None and comm.world_size > 1:
        n, P, r = len(df), comm.world_size, comm.rank
        lo, hi = r * n // P, (r + 1) * n // P
        return DataFrame(df.to_arrow().slice(lo, hi - lo))
    return df


def read_csv(filepath, use_threads: bool = True, names=None, sep: str = ",",
             block_size: int = 1 << 20, skiprows: int = 0, ignore_emptylines: bool = True,
             na_values=None, slice: bool = False, env=None, **options) -> DataFrame:
    """pycylon's ``read_csv``: the whole file on every rank; ``slice=True`` with ``env``: this
    rank's even block of rows (for a share of many files use ``read_csv_dist``)."""
    kw = dict(use_threads=use_threads, names=names, sep=sep, block_size=block_size,
              skiprows=skiprows, ignore_emptylines=ignore_emptylines, na_values=na_values)
    return _local_read("csv", filepath, env, slice, kw, **options)


def read_parquet(path, columns=None, slice: bool = False, env=None, **options) -> DataFrame:
    """The whole dataset on every rank (``slice=True`` with ``env``: this rank's block)."""
    return _local_read("parquet", path, env, slice, {"columns": columns}, **options)


def read_json(path, slice: bool = False, env=None, **options) -> DataFrame:
    """Newline-delimited JSON, as ``read_parquet``."""
    return _local_read("json", path, env, slice, {}, **options)


# -- writers -------------------------------------------------------------------------------------

def _hive_value(v) -> str:
    if v is None:
        return HIVE_NULL
    if isinstance(v, bool):
        return str(v).lower()
    return quote(str(v), safe="")


def _write_one(fs, path: str, table: pa.Table, fmt: str, kwargs: dict) -> int:
    """Write ``table`` to ``path`` durably; returns the bytes written."""
    def encode(sink):
        if fmt == "parquet":
            import pyarrow.parquet as pq
            pq.write_table(table, sink, **kwargs)
        elif fmt == "csv":
            import pyarrow.csv as pacsv
            pacsv.write_csv(table, sink, **({"write_options": pacsv.WriteOptions(**kwargs)} if kwargs else {}))
        else:
            for batch in table.to_batches(max_chunksize=4096):
                lines = "".join(json.dumps(row, default=str, ensure_ascii=False) + "\n"
                                for row in batch.to_pylist())
                sink.write(lines.encode())
    parent = posixpath.dirname(path)
    if _is_local(fs):
        os.makedirs(parent, exist_ok=True)
        with open(path, "wb") as f:
            encode(f)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(parent)
        return os.path.getsize(path)
    fs.create_dir(parent, recursive=True)
    with fs.open_output_stream(path) as out:   # S3: the object exists (durably) once closed
        encode(out)
    return fs.get_file_info(path).size or 0


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _put_text(fs, path: str, text: str) -> None:
    if _is_local(fs):
        with open(path, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(posixpath.dirname(path))
    else:
        with fs.open_output_stream(path) as out:
            out.write(text.encode())


def _check_write_args(table: pa.Table, fmt: str, mode: str, partition_cols, name_function) -> list[str]:
    if mode not in WRITE_MODES:
        raise ConfigError(f"mode must be one of {list(WRITE_MODES)}, got {mode!r}")
    if name_function is not None and not callable(name_function):
        raise ConfigError("name_function must be a function rank -> file name")
    cols = [partition_cols] if isinstance(partition_cols, str) else list(partition_cols or [])
    for c in cols:
        if c not in table.column_names:
            raise ConfigError(f"partition column {c!r} is not a column; columns are {table.column_names}")
        t = table.schema.field(c).type
        if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)
                or pa.types.is_boolean(t) or pa.types.is_date(t) or pa.types.is_dictionary(t)):
            raise ConfigError(f"partition column {c!r} has type {t}; partition by integers, "
                              f"strings, booleans or dates")
    if len(set(cols)) != len(cols):
        raise ConfigError(f"partition_cols names a column twice: {cols}")
    if cols and len(cols) == table.num_columns:
        raise ConfigError("partition_cols names every column: no data would be left in the files")
    return cols


def _write_dist(fmt: str, df, dir_path: str, env, name_function, mode: str, partition_cols,
                storage_options, filesystem, kwargs) -> Union[str, list[str]]:
    comm = _env_comm(env)
    table = df.to_arrow() if isinstance(df, DataFrame) else df
    if not isinstance(table, pa.Table):
        raise ConfigError(f"write: expected a DataFrame or a pyarrow Table, got {type(df).__name__}")
    # 1. arguments and schemas, checked alike on every rank before anything is written
    problem = None
    cols: list[str] = []
    try:
        cols = _check_write_args(table, fmt, mode, partition_cols, name_function)
        fs, base = resolve_filesystem(dir_path, storage_options, filesystem)
        base = base.rstrip("/")
        name = (name_function(comm.rank) if name_function is not None
                else f"part-{comm.rank:05d}.{_WRITE_EXT[fmt]}")
        if not isinstance(name, str) or not name or name.startswith(("_", ".")) or "/" in name:
            raise ConfigError(f"name_function({comm.rank}) gave {name!r}: a file name, not starting "
                              f"with '_' or '.'")
    except Exception as exc:  # shared below so that every rank raises
        problem = exc
    gathered = _allgather(comm, (repr(problem) if problem else None, table.schema.remove_metadata(),
                                 None if problem else name))
    if problem is not None:
        raise problem
    bad = [(r, e) for r, (e, _, _) in enumerate(gathered) if e]
    if bad:
        raise ConfigError(f"write: rank {bad[0][0]} rejected the arguments: {bad[0][1]}")
    schemas = [s for _, s, _ in gathered]
    odd = [r for r, s in enumerate(schemas) if not s.equals(schemas[0])]
    if odd:
        raise SchemaMismatchError(f"write: ranks hold frames of different schemas: rank 0 "
                                  f"{schemas[0]}, rank {odd[0]} {schemas[odd[0]]}; nothing was written")
    names = [n for _, _, n in gathered]
    if len(set(names)) != len(names):
        raise ConfigError(f"write: name_function gives ranks the same file name: {names}")

    # 2. rank 0 prepares the directory and marks the write as pending
    def prepare():
        info = fs.get_file_info(base)
        if info.type == pafs.FileType.File:
            raise AlreadyExistsError(f"{dir_path!r} is a file, not a directory")
        if info.type == pafs.FileType.Directory:
            present = fs.get_file_info(pafs.FileSelector(base, recursive=False))
            if present:
                if mode in ("error", "errorifexists"):
                    raise AlreadyExistsError(f"{dir_path!r} exists and is not empty (mode={mode!r}); "
                                             f"pass mode='overwrite' to replace it")
                fs.delete_dir_contents(base)
        fs.create_dir(base, recursive=True)
        _put_text(fs, posixpath.join(base, PENDING), json.dumps({"world_size": comm.world_size,
                                                                 "started": time.time()}))
        return True
    _bcast(comm, prepare)

    # 3. every rank writes its file(s) durably
    written: list[tuple[str, int, int]] = []   # (relative path, rows, bytes)
    error = None
    try:
        if cols:
            data_cols = [c for c in table.column_names if c not in cols]
            keys = table.select(cols)
            if table.num_rows:
                groups = keys.group_by(cols, use_threads=False).aggregate([])
                for g in groups.to_pylist():
                    mask = None
                    for c in cols:
                        m = (table.column(c).is_null() if g[c] is None else
                             _equal(table.column(c), g[c]))
                        mask = m if mask is None else _and(mask, m)
                    part = table.filter(mask).select(data_cols)
                    rel = "/".join(f"{quote(c, safe='')}={_hive_value(g[c])}" for c in cols) + "/" + name
                    nbytes = _write_one(fs, posixpath.join(base, rel), part, fmt, kwargs)
                    written.append((rel, part.num_rows, nbytes))
        else:
            nbytes = _write_one(fs, posixpath.join(base, name), table, fmt, kwargs)
            written.append((name, table.num_rows, nbytes))
    except Exception as exc:  # shared below
        error = f"rank {comm.rank}: {type(exc).__name__}: {exc}"
    reports = _allgather(comm, (error, written))

    # 4. rank 0 commits (or cleans up after a failed rank)
    def commit():
        failed = [e for e, _ in reports if e]
        if failed:
            try:
                fs.delete_dir_contents(base, missing_dir_ok=True)
            finally:
                raise ConfigError(f"write to {dir_path!r} failed, nothing was kept: {failed[0]}")
        files = [w for _, ws in reports for w in ws]
        manifest = {"format": fmt, "world_size": comm.world_size, "partition_cols": cols,
                    "files": sorted(f for f, _, _ in files), "rows": sum(n for _, n, _ in files),
                    "bytes": sum(b for _, _, b in files), "committed": time.time()}
        _put_text(fs, posixpath.join(base, SUCCESS), json.dumps(manifest, indent=1))
        fs.delete_file(posixpath.join(base, PENDING))
        return True
    _bcast(comm, commit)
    out = [posixpath.join(base, rel) for rel, _, _ in written]
    if not cols:
        return out[0]
    return out


def _equal(col, value):
    import pyarrow.compute as pc
    return pc.fill_null(pc.equal(col, pa.scalar(value, col.type.value_type
                                                if pa.types.is_dictionary(col.type) else col.type)),
                        False)


def _and(a, b):
    import pyarrow.compute as pc
    return pc.and_(a, b)


def write_parquet_dist(df, dir_path: str, env=None, name_function: Optional[Callable[[int], str]] = None,
                       write_metadata_file: bool = False, *, mode: str = "error", partition_cols=None,
                       storage_options: Optional[dict] = None, filesystem=None, **kwargs):
    """Write one Parquet file per rank under ``dir_path`` and commit with ``_SUCCESS``; returns
    this rank's file (a list of files with ``partition_cols``).  ``kwargs`` go to
    ``pyarrow.parquet.write_table`` (compression, row_group_size, ...)."""
    if write_metadata_file:
        raise ConfigError("write_metadata_file=True is not supported: _SUCCESS lists the files "
                          "and readers take the footers from the files")
    return _write_dist("parquet", df, dir_path, env, name_function, mode, partition_cols,
                       storage_options, filesystem, kwargs)


def write_csv_dist(df, dir_path: str, env=None, name_function: Optional[Callable[[int], str]] = None,
                   *, mode: str = "error", partition_cols=None, storage_options: Optional[dict] = None,
                   filesystem=None, **kwargs):
    """As ``write_parquet_dist``, CSV files; ``kwargs`` are ``pyarrow.csv.WriteOptions``."""
    return _write_dist("csv", df, dir_path, env, name_function, mode, partition_cols,
                       storage_options, filesystem, kwargs)


def write_json_dist(df, dir_path: str, env=None, name_function: Optional[Callable[[int], str]] = None,
                    *, mode: str = "error", partition_cols=None, storage_options: Optional[dict] = None,
                    filesystem=None, **kwargs):
    """As ``write_parquet_dist``, newline-delimited JSON files (no options)."""
    if kwargs:
        raise ConfigError(f"write_json_dist: unknown option(s) {sorted(kwargs)}")
    return _write_dist("json", df, dir_path, env, name_function, mode, partition_cols,
                       storage_options, filesystem, kwargs)
