"""``cylon-store lambda build`` and ``cylon-store lambda deploy``: the artifact that runs ranks on
AWS Lambda, and the function that runs it.

**build** (``build()``) makes a function .zip for the Lambda Python managed runtime from binary
wheels only, for ``x86_64`` or ``arm64``, whatever machine it runs on:

| step | what it guarantees |
|---|---|
| project wheel | this project from its source tree (the folder with pyproject.toml above the imported ``cylon_store``, or ``source=``), built in a copy so the tree is never written to; from a plain ``pip install`` (no source tree) the installed distribution's own files are repacked into a wheel |
| dependencies | ``pip install --target --only-binary=:all: --implementation cp --python-version X.Y --platform ...``: the platform tags are those the runtime's C library accepts (Python 3.10/3.11 run on Amazon Linux 2, glibc 2.26; 3.12+ on Amazon Linux 2023, glibc 2.34), so no wheel is picked that fails to load there |
| runtime-provided | boto3, botocore, s3transfer, jmespath, urllib3, python-dateutil and six are part of the Lambda Python runtime and are left out (``include_boto3=True`` keeps them); removal follows each one's ``RECORD`` |
| trimmed | no bytecode, tests, C/Cython sources, headers, static libraries, type stubs, console scripts, build tools (numpy.distutils, f2py); pyarrow loses its test module, duplicate copies of its own libraries and the Python bindings nothing here uses (Substrait, ORC, HDFS), numpy its C test modules; a library on the list stays if anything left links it; every ``RECORD`` is rewritten to list exactly what remains (no file is modified, so every hash in it stays true) |
| still loads | a static check of every shared object: built for the target machine, and every library it needs is in the tree or in the manylinux base set that Lambda provides (catches a trim that would break loading, on any build machine); when the target is this machine's arch and Python, ``verify()`` also runs it |
| limits | 250 MB unzipped (function and layers together) is checked before anything is written; over it, the error names the largest packages; zips over 50 MB are flagged for upload through S3 |
| output | written to temporary names and renamed only when every artifact is complete: never a half-written zip; zip entries sorted, with fixed timestamps and modes (same input, same bytes) |

**deploy** (``deploy()``) creates or updates the function through boto3 (its credential, region
and endpoint chain: ``AWS_ENDPOINT_URL_LAMBDA``, ``AWS_ENDPOINT_URL_S3``), waits with boto3's
waiters for it to be Active with its last update Successful (every wait bounded), and turns off
Lambda's retries of asynchronous invocations. AWS errors become one ``DeployError`` line that
names the operation; credentials are never printed.

Sizes are in MB of 2**20 bytes, the unit of Lambda's quotas (GetAccountSettings reports the
250 MB unzipped quota as 262,144,000 bytes). boto3 is imported only when deploy runs, so every
``--help`` works with the base install.

Known limits of cross-building: pip evaluates environment markers of dependencies against the
Python that runs the build, not the target; build with the target's Python version when a
dependency has markers on ``python_version``/``platform_machine`` (none of this project's do).
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from ..argtypes import int_range, seconds
from ..errors import ConfigError, StoreError

__all__ = [
    "build", "deploy", "verify", "check_limits", "render_dockerfile", "pip_install_command",
    "platform_tags", "read_build_record", "BuildResult", "BuildError", "LambdaLimitError",
    "DeployError", "add_build_arguments", "add_deploy_arguments", "main_build", "main_deploy",
    "HANDLER", "UNZIPPED_LIMIT", "ZIPPED_DIRECT_LIMIT", "IMAGE_LIMIT",
]

# -- Lambda's limits -------------------------------------------------------------------------
# Source for each, unless said otherwise: AWS Lambda quotas,
# https://docs.aws.amazon.com/lambda/latest/dg/gettingstarted-limits.html

MB = 2 ** 20
#: "Deployment package (.zip file archive) size: 250 MB (unzipped)": the function's files and
#: all its layers' files together, as extracted (GetAccountSettings: CodeSizeUnzipped).
UNZIPPED_LIMIT = 250 * MB
#: "50 MB (zipped, when uploaded through the Lambda API or SDKs)": a larger .zip must be
#: uploaded to Amazon S3 and named by S3Bucket/S3Key (GetAccountSettings: CodeSizeZipped).
ZIPPED_DIRECT_LIMIT = 50 * MB
#: "Container image code package size: 10 GB (maximum uncompressed image size, including all
#: layers)": where a function goes once it outgrows the .zip.
IMAGE_LIMIT = 10 * 2 ** 30
#: "Function memory allocation: 128 MB to 10,240 MB, in 1-MB increments."
MEMORY_MIN, MEMORY_MAX = 128, 10240
#: "Function timeout: 900 seconds (15 minutes)."
TIMEOUT_MAX = 900
#: "Environment variables: 4 KB, for all environment variables associated with the function, in
#: aggregate."
ENV_LIMIT = 4096
#: PutFunctionEventInvokeConfig (Lambda API reference): MaximumEventAgeInSeconds 60 to 21600.
EVENT_AGE_MIN, EVENT_AGE_MAX = 60, 21600

# -- this project's choices ------------------------------------------------------------------

#: The function's handler: ``cylon_store/serverless/__init__.py`` defines ``handler(event, context)``.
HANDLER = "cylon_store.serverless.handler"
DEFAULT_PYTHON = "3.11"
DEFAULT_ARCH = "x86_64"
ARCHES = ("x86_64", "arm64")
DEFAULT_EXTRAS = ("s3", "dynamodb", "redis")
DEFAULT_OUT = "dist-lambda"
DEFAULT_FUNCTION = "cylon-store"
#: "At 1,769 MB, a function has the equivalent of one vCPU (one vCPU-second of credits per
#: second)" (Lambda developer guide, "Configuring Lambda function memory"): the smallest size that
#: gets a whole core, which the Arrow kernels and (de)compression use.
DEFAULT_MEMORY_MB = 1769
#: Ranks run as long as the job does: Lambda's maximum.
DEFAULT_TIMEOUT_S = TIMEOUT_MAX
#: How long Lambda keeps a queued asynchronous invocation (throttled, or waiting for capacity)
#: before discarding it. Longer than the driver's wait for a rank to start (120 s by default),
#: so a rank queued under throttling still starts while the driver waits for it; far shorter than
#: Lambda's default of 6 hours, so invocations of a job the driver has given up on do not linger
#: (they would find the job gone and exit, but each is still a billed invocation).
DEFAULT_MAX_EVENT_AGE = 600
#: Upper bound on each wait for the function to become Active / finish an update.
DEFAULT_WAIT_S = 300.0
_WAITER_DELAY_S = 2

#: Lambda Python runtimes and the glibc of the Amazon Linux they run on: python3.10 and 3.11 run on
#: Amazon Linux 2 (glibc 2.26), python3.12 and later on Amazon Linux 2023 (glibc 2.34) (Lambda
#: developer guide, "Building Lambda functions with Python", supported runtimes). A manylinux_2_X
#: wheel needs glibc >= 2.X: a manylinux_2_28 wheel (every pyarrow since 21) fails to load on
#: python3.11 with "GLIBC_2.28 not found".
RUNTIME_GLIBC = {"3.10": 26, "3.11": 26, "3.12": 34, "3.13": 34, "3.14": 34}
RUNTIME_OS = {26: "Amazon Linux 2", 34: "Amazon Linux 2023"}
#: Wheel platform machine and ELF e_machine (System V ABI: EM_X86_64 = 62, EM_AARCH64 = 183).
_MACHINE = {"x86_64": ("x86_64", 62), "arm64": ("aarch64", 183)}
#: The Docker platform of each Lambda architecture.
_DOCKER_PLATFORM = {"x86_64": "linux/amd64", "arm64": "linux/arm64"}

#: Distributions the Lambda Python runtime already provides ("Runtime-included SDK versions":
#: the SDK for Python, boto3 and botocore, with their dependencies).
RUNTIME_PROVIDED = ("boto3", "botocore", "s3transfer", "jmespath", "urllib3", "python-dateutil", "six")
#: Extras that belong in a function. ``lambda`` (awslambdaric) is built into the runtime and the
#: base image; the others cannot work in a Lambda sandbox or are tools, not runtime code.
FUNCTION_EXTRAS = ("s3", "dynamodb", "redis")
_EXTRA_REFUSED = {
    "lambda": "awslambdaric is built into the Lambda runtime and base image",
    "mpi": "Lambda sandboxes accept no inbound connections, which MPI needs",
    "ucx": "Lambda sandboxes accept no inbound connections (nor GPUs), which UCX needs",
    "test": "test tools do not belong in the function",
    "bench": "benchmark peers and servers do not belong in the function",
    "all": "it includes mpi, ucx, lambda, test and bench",
}

#: Libraries a manylinux wheel may take from the system rather than carry (PEP 599's
#: manylinux2014 policy), plus the dynamic loaders and zlib; Amazon Linux 2 and 2023 have them all.
SYSTEM_LIBRARIES = frozenset({
    "libgcc_s.so.1", "libstdc++.so.6", "libm.so.6", "libdl.so.2", "librt.so.1", "libc.so.6",
    "libnsl.so.1", "libutil.so.1", "libpthread.so.0", "libresolv.so.2", "libX11.so.6",
    "libXext.so.6", "libXrender.so.1", "libICE.so.6", "libSM.so.6", "libGL.so.1",
    "libgobject-2.0.so.0", "libgthread-2.0.so.0", "libglib-2.0.so.0", "libz.so.1",
    "ld-linux-x86-64.so.2", "ld-linux-aarch64.so.1",
})

# What the function never needs. Decided by what the project uses: pyarrow core, compute, IPC
# (with lz4/zstd), Acero (Table.join/group_by), Parquet (and dataset, which pyarrow.parquet reads
# through), CSV and JSON readers, Flight, and pyarrow.fs (S3/GCS/Azure reads of Parquet/CSV/JSON
# stay possible). Substrait's *library* stays: libarrow_python and lib.so link it (DT_NEEDED).
#: File suffixes dropped everywhere: bytecode (Lambda's /var/task is read-only, so nothing is
#: cached there anyway), C/C++/Cython sources and headers, static libraries, type stubs.
_DROP_SUFFIXES = (".pyc", ".pyo", ".pyx", ".pxd", ".pxi", ".h", ".hh", ".hpp", ".c", ".cc",
                  ".cpp", ".a", ".pyi")
#: Folder names dropped wherever they occur in a dependency (never in this project's package).
_DROP_DIRS = ("__pycache__", "tests")
#: Paths (globs, relative to the tree's root) dropped as a whole, with why.
_DROP_PATHS = (
    ("bin", "console scripts pip wrote for the build machine's Python"),
    ("*.dist-info/direct_url.json", "where pip found a wheel on the build machine (a temporary "
                                    "path: the zip would differ from build to build)"),
    ("pyarrow/include", "C++ headers, for building extensions"),
    ("pyarrow/includes", "Cython declarations"),
    ("pyarrow/src", "C++ sources of libarrow_python"),
    ("*/conftest.py", "pytest configuration"),
    ("pyarrow/_pyarrow_cpp_tests.*", "pyarrow's C++ test module"),
    ("pyarrow/_substrait.*", "Substrait bindings (its library stays: libarrow_python links it)"),
    ("pyarrow/substrait.py", "Substrait bindings"),
    ("pyarrow/_orc.*", "ORC bindings"),
    ("pyarrow/orc.py", "ORC bindings"),
    ("pyarrow/_dataset_orc.*", "ORC dataset bindings (pyarrow.dataset imports them optionally)"),
    ("pyarrow/_hdfs.*", "HDFS bindings: need a JVM and libhdfs, which Lambda has not"),
    ("pyarrow/cuda.py", "CUDA bindings: pip's pyarrow has no CUDA"),
    # Wheels cannot hold symlinks, so libfoo.so and libfoo.so.N.M.P are copies of the library that
    # everything loads by its SONAME, libfoo.so.N; they exist to link new extensions against.
    ("pyarrow/libarrow*.so", "link-time copy of a library loaded by its SONAME"),
    ("pyarrow/libarrow*.so.*.*.*", "copy of a library loaded by its SONAME"),
    ("pyarrow/libparquet*.so", "link-time copy of a library loaded by its SONAME"),
    ("pyarrow/libparquet*.so.*.*.*", "copy of a library loaded by its SONAME"),
    ("numpy/_core/include", "C headers, for building extensions"),
    ("numpy/_core/lib", "static npymath and pkg-config files, for building extensions"),
    ("numpy/_pyinstaller", "PyInstaller hooks"),
    ("numpy/distutils", "numpy's build tooling (shipped for Python < 3.12)"),
    ("numpy/f2py", "the Fortran wrapper generator, a build tool"),
    ("numpy/_core/_simd.*", "numpy's SIMD test module (imported by its tests only)"),
    ("numpy/_core/_*_tests.*", "numpy's C test modules (imported by its tests only)"),
)
#: dist-info files that describe an installation, not a distribution (left out of a repacked wheel).
_INSTALL_ONLY = ("RECORD", "INSTALLER", "REQUESTED", "direct_url.json", "WHEEL")
#: Folders never copied from a source tree into the private copy the project wheel is built from.
_SOURCE_IGNORE = (".git", ".hg", ".svn", "build", "dist", "dist-*", "*.egg-info", "__pycache__",
                  ".venv", "venv", ".tox", ".nox", ".pytest_cache", ".hypothesis", ".mypy_cache",
                  ".ruff_cache", "node_modules", "*.zip", "*.whl")

#: Bounded waits for the subprocesses build runs.
PIP_WHEEL_TIMEOUT_S = 600
PIP_INSTALL_TIMEOUT_S = 1800
VERIFY_TIMEOUT_S = 300
#: zlib level for the zips: 6 is within a few percent of 9's size at a fraction of its time.
ZIP_LEVEL = 6
#: Zip entry timestamp (the zip format's epoch): the same tree gives the same bytes, so the same
#: CodeSha256 on Lambda.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)
#: Marks the zip comment that records how a zip was built (read by deploy).
_RECORD_KEY = "cylon-store-lambda"


class BuildError(StoreError):
    """A build step failed (pip, the static check, ``verify``); nothing was written."""


class LambdaLimitError(ConfigError):
    """The tree exceeds a Lambda limit; ``largest`` lists (package, bytes), largest first."""

    def __init__(self, message: str = "", *, unzipped: int = 0, largest: Sequence = (), **kw):
        self.unzipped = unzipped
        self.largest = list(largest)
        super().__init__(message, **kw)


class DeployError(StoreError):
    """AWS refused or did not finish a deploy step; the message names the step."""


def _mb(n: float) -> str:
    return f"{n / MB:,.1f} MB"


# == build ===================================================================================

@dataclass
class BuildResult:
    """What ``build`` wrote and measured. Sizes in bytes; ``packages`` are (name, bytes) for every
    distribution in the function, largest first."""

    zip_path: Path
    arch: str
    python: str
    zipped_bytes: int
    unzipped_bytes: int
    files: int
    packages: list = field(default_factory=list)
    layer_path: Optional[Path] = None
    layer_zipped_bytes: int = 0
    dockerfile_path: Optional[Path] = None
    wheel_path: Optional[Path] = None
    platforms: tuple = ()
    excluded: tuple = ()
    trimmed_bytes: int = 0
    verified: bool = False
    verify_note: str = ""
    seconds: float = 0.0

    @property
    def runtime(self) -> str:
        return f"python{self.python}"

    @property
    def largest(self) -> list:
        """The five largest packages, (name, bytes)."""
        return self.packages[:5]

    def deploy_command(self, function: str = DEFAULT_FUNCTION) -> str:
        cmd = (f"cylon-store lambda deploy --function {function} "
               f"--role arn:aws:iam::<account-id>:role/<role-name> --zip {_shell_path(self.zip_path)} "
               f"--arch {self.arch}")
        if self.zipped_bytes > ZIPPED_DIRECT_LIMIT:
            cmd += " --code-bucket <bucket-in-the-function's-region>"
        return cmd


def _shell_path(path: Path) -> str:
    try:
        text = os.path.relpath(path)
        if text.startswith(".." + os.sep + ".."):
            text = str(path)
    except ValueError:  # another drive
        text = str(path)
    return text if re.fullmatch(r"[\w./+-]+", text) else "'" + text.replace("'", "'\\''") + "'"


def platform_tags(arch: str = DEFAULT_ARCH, python: str = DEFAULT_PYTHON) -> list[str]:
    """The wheel platform tags the Lambda runtime ``python`` on ``arch`` can load: manylinux2014
    (glibc 2.17) up to the glibc of the runtime's Amazon Linux."""
    _check_arch(arch)
    glibc = _runtime_glibc(python)
    machine = _MACHINE[arch][0]
    return [f"manylinux2014_{machine}"] + [f"manylinux_2_{m}_{machine}" for m in range(17, glibc + 1)]


def pip_install_command(target: os.PathLike | str, requirements: Sequence[str], *,
                        arch: str = DEFAULT_ARCH, python: str = DEFAULT_PYTHON) -> list[str]:
    """The pip command that installs ``requirements`` into ``target`` for the Lambda runtime
    ``python`` on ``arch``: binary wheels only, for that platform, whatever this machine is."""
    cmd = [sys.executable, "-m", "pip", "install", "--target", str(target),
           "--only-binary=:all:", "--implementation", "cp", "--python-version", python]
    for tag in platform_tags(arch, python):
        cmd += ["--platform", tag]
    # No bytecode (read-only /var/task caches nothing, and it is for this machine's Python), no
    # prompts, no noise; pip's cache stays on, so a rebuild downloads nothing.
    cmd += ["--no-compile", "--no-warn-script-location", "--disable-pip-version-check",
            "--no-input", "--progress-bar", "off", "--quiet"]
    return cmd + list(requirements)


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise ConfigError(f"unknown Lambda architecture {arch!r}: choose x86_64 or arm64")


def _runtime_glibc(python: str) -> int:
    try:
        return RUNTIME_GLIBC[python]
    except KeyError:
        raise ConfigError(f"no Lambda Python runtime {python!r}: choose one of "
                          f"{', '.join(RUNTIME_GLIBC)}") from None


def parse_extras(extras: Iterable[str] | str) -> tuple[str, ...]:
    """Validated extras for the function, in the order given, without duplicates."""
    if isinstance(extras, str):
        extras = [e for e in extras.split(",")]
    out: list[str] = []
    for extra in (e.strip().lower() for e in extras):
        if not extra:
            continue
        if extra in _EXTRA_REFUSED:
            raise ConfigError(f"extra {extra!r} does not belong in a Lambda function: "
                              f"{_EXTRA_REFUSED[extra]}")
        if extra not in FUNCTION_EXTRAS:
            raise ConfigError(f"unknown extra {extra!r}: choose from {', '.join(FUNCTION_EXTRAS)}")
        if extra not in out:
            out.append(extra)
    return tuple(out)


def build(out_dir: os.PathLike | str = DEFAULT_OUT, *, arch: str = DEFAULT_ARCH,
          python: str = DEFAULT_PYTHON, extras: Iterable[str] | str = DEFAULT_EXTRAS,
          layer: bool = False, docker: bool = False, include_boto3: bool = False,
          source: os.PathLike | str | None = None, run_verify: Optional[bool] = None,
          log: Optional[Callable[[str], None]] = None) -> BuildResult:
    """Build the function zip (and with ``layer`` the layer zip, with ``docker`` a Dockerfile and
    the project wheel it installs) into ``out_dir``; see the module docstring for what it holds.

    ``run_verify``: None runs ``verify`` when the target is this machine's architecture and
    Python version (a cross build cannot be run here); True insists (BuildError if impossible);
    False skips it. Raises LambdaLimitError when the tree is over 250 MB unzipped, BuildError when
    a step fails; in both cases nothing is written.
    """
    say = log or (lambda _msg: None)
    t0 = time.monotonic()
    _check_arch(arch)
    glibc = _runtime_glibc(python)
    extras = parse_extras(extras)
    out_dir = Path(out_dir).absolute()
    native, why_not = _native(arch, python)
    if run_verify and not native:
        raise BuildError(f"cannot verify here: {why_not}")
    with tempfile.TemporaryDirectory(prefix="cylon-store-lambda-") as tmp_dir:
        tmp = Path(tmp_dir)
        wheel = _project_wheel(source, tmp / "wheel", out_dir, say)
        site = tmp / "site"
        spec = f"{wheel}[{','.join(extras)}]" if extras else str(wheel)
        say(f"installing {wheel.name}{'[' + ','.join(extras) + ']' if extras else ''} and its "
            f"dependencies for python{python} {arch} ({RUNTIME_OS[glibc]}, glibc 2.{glibc}) with pip")
        _install_dependencies(site, spec, arch=arch, python=python)
        excluded: tuple = ()
        if not include_boto3:
            excluded = _remove_distributions(site, RUNTIME_PROVIDED)
        before = _tree_bytes(site)
        _trim(site)
        _rewrite_records(site)
        trimmed = before - _tree_bytes(site)
        say("checking every shared library's machine and dependencies")
        check_elf(site, arch)
        try:
            unzipped, packages = check_limits(site)
        except LambdaLimitError as exc:
            raise LambdaLimitError(f"{exc.message} Nothing was written.", unzipped=exc.unzipped,
                                   largest=exc.largest) from None
        files = _files(site)  # what goes into the zip: fixed before anything runs from the tree
        verified, note = False, why_not
        if native and run_verify is not False:
            say("verifying the tree on its own (python -I -S, sys.path = the tree)")
            note = verify(site)
            verified = True
            if _files(site) != files:
                raise BuildError(f"verify changed the tree at {site}")
        elif run_verify is False:
            note = "skipped (--no-verify)"
        record = {_RECORD_KEY: 1, "python": python, "arch": arch, "extras": list(extras),
                  "include_boto3": include_boto3, "version": _dist_version(site)}
        name = f"cylon-store-lambda-py{python.replace('.', '')}-{arch}"
        targets = {out_dir / f"{name}.zip": ""}
        if layer:
            targets[out_dir / f"cylon-store-lambda-layer-py{python.replace('.', '')}-{arch}.zip"] = "python/"
        dockerfile: Optional[Path] = None
        wheel_out: Optional[Path] = None
        finals = list(targets)
        if docker:
            wheel_out = out_dir / wheel.name
            dockerfile = out_dir / f"cylon-store-lambda-py{python.replace('.', '')}.Dockerfile"
            finals += [wheel_out, dockerfile]
        staged = [(_temp_name(final), final) for final in finals]
        say(f"writing {', '.join(p.name for p in finals)} to {out_dir}")
        created = not out_dir.exists()
        out_dir.mkdir(parents=True, exist_ok=True)
        done = False
        try:
            comment = json.dumps(record, sort_keys=True)
            with ThreadPoolExecutor(len(targets)) as pool:  # zlib releases the GIL: one core each
                futures = [pool.submit(_write_zip, site, files, _temp_name(path), prefix, comment)
                           for path, prefix in targets.items()]
                for future in futures:
                    future.result()
            if wheel_out is not None and dockerfile is not None:  # docker
                shutil.copyfile(wheel, _temp_name(wheel_out))
                _temp_name(dockerfile).write_text(render_dockerfile(
                    python=python, extras=extras, wheel=wheel.name, dockerfile=dockerfile))
            sizes = {final: temp.stat().st_size for temp, final in staged}
            for temp, final in staged:  # every artifact is complete: now make them visible
                os.replace(temp, final)
            done = True
        finally:
            for temp, _ in staged:  # after a failure: no temporary file stays behind
                temp.unlink(missing_ok=True)
            if not done and created and not any(out_dir.iterdir()):
                out_dir.rmdir()
        zip_path = next(iter(targets))
        layer_path = list(targets)[1] if layer else None
        return BuildResult(
            zip_path=zip_path, arch=arch, python=python, zipped_bytes=sizes[zip_path],
            unzipped_bytes=unzipped, files=len(files), packages=packages, layer_path=layer_path,
            layer_zipped_bytes=sizes.get(layer_path, 0) if layer_path else 0,
            dockerfile_path=dockerfile, wheel_path=wheel_out, platforms=tuple(platform_tags(arch, python)),
            excluded=excluded, trimmed_bytes=trimmed, verified=verified, verify_note=note,
            seconds=time.monotonic() - t0)


def _install_dependencies(site: Path, spec: str, *, arch: str, python: str) -> None:
    _run(pip_install_command(site, [spec], arch=arch, python=python),
         what="pip could not install the function's dependencies for the Lambda platform",
         timeout=PIP_INSTALL_TIMEOUT_S)


def _native(arch: str, python: str) -> tuple[bool, str]:
    machine = platform.machine().lower()
    here = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(machine, machine)
    if not sys.platform.startswith("linux"):
        return False, f"not run: this is {sys.platform}, Lambda is Linux (checked statically only)"
    if here != arch:
        return False, (f"not run: an {arch} build on an {here} machine (checked statically: every "
                       f"shared library is {arch} and finds what it links)")
    ours = f"{sys.version_info.major}.{sys.version_info.minor}"
    if ours != python:
        return False, f"not run: the build targets Python {python} and this is Python {ours}"
    return True, ""


def _temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def _run(cmd: list[str], *, what: str, timeout: float, cwd: Optional[Path] = None) -> str:
    """Run a build step; on failure a BuildError with pip's own error lines."""
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BuildError(f"{what}: no result after {timeout:.0f} s") from None
    except OSError as exc:
        raise BuildError(f"{what}: {exc}") from None
    if proc.returncode != 0:
        text = (proc.stderr or "") + (proc.stdout or "")
        if "No module named pip" in text:
            raise BuildError(f"{what}: this Python ({sys.executable}) has no pip; install it "
                             f"(python -m ensurepip) or build from an environment that has it")
        lines = [ln for ln in text.strip().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-12:]
        raise BuildError(f"{what} (exit {proc.returncode}):\n  " + "\n  ".join(errors[-12:]))
    return proc.stdout


# -- the project's own wheel -----------------------------------------------------------------

def project_source(source: os.PathLike | str | None = None):
    """Where the project comes from: ("tree", path) for a source tree (``source``, else the folder
    with pyproject.toml above the imported ``cylon_store``), or ("installed", distribution) for an
    installed distribution without a tree. BuildError when neither is found."""
    if source is not None:
        root = Path(source).expanduser().absolute()
        if not _is_project_root(root):
            raise BuildError(f"--source {root}: not a cylon-store source tree (no pyproject.toml "
                             f"naming the project cylon-store)")
        return "tree", root
    import cylon_store
    root = Path(cylon_store.__file__).resolve().parent.parent
    if _is_project_root(root):
        return "tree", root
    dist = installed_distribution()
    if dist is None:
        raise BuildError(f"cylon_store is imported from {Path(cylon_store.__file__).parent}, which "
                         f"is neither in a source tree (pyproject.toml) nor an installed wheel's "
                         f"package: pass --source PATH")
    return "installed", dist


def installed_distribution():
    """The installed (wheel, .dist-info) distribution whose package is the imported cylon_store,
    or None. A setuptools ``*.egg-info`` left in a source tree is not one."""
    from importlib import metadata

    import cylon_store
    imported = Path(cylon_store.__file__).resolve()
    for dist in metadata.distributions(name="cylon-store"):
        files = [str(f) for f in dist.files or ()]
        if not any(f.endswith(".dist-info/METADATA") for f in files):
            continue
        init = Path(dist.locate_file("cylon_store/__init__.py"))
        if "cylon_store/__init__.py" in files and init.exists() and init.resolve() == imported:
            return dist
    return None


def _is_project_root(root: Path) -> bool:
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file():
        return False
    text = pyproject.read_text(encoding="utf-8", errors="replace")
    if sys.version_info >= (3, 11):
        import tomllib
        try:
            return tomllib.loads(text).get("project", {}).get("name", "").lower() == "cylon-store"
        except ValueError:
            return False
    else:  # Python 3.10 has no tomllib
        return re.search(r'(?m)^name\s*=\s*["\']cylon-store["\']', text) is not None


def _project_wheel(source, wheel_dir: Path, out_dir: Path, say) -> Path:
    wheel_dir.mkdir(parents=True)
    kind, where = project_source(source)
    if kind == "installed":
        say(f"repacking the installed cylon-store {where.version} into a wheel (no source tree)")
        return wheel_from_installed(where, wheel_dir)
    say(f"building the cylon-store wheel from {where}")
    # A private copy: the source tree is never written to (setuptools leaves build/ and
    # *.egg-info behind), and builds running side by side do not meet in it.
    copy = wheel_dir.parent / "source"
    ignore = shutil.ignore_patterns(*_SOURCE_IGNORE)

    def skip(folder, names):
        skipped = set(ignore(folder, names))
        skipped.update(n for n in names if Path(folder, n).absolute() == out_dir)
        return skipped

    shutil.copytree(where, copy, symlinks=True, ignore=skip)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(wheel_dir),
          "--disable-pip-version-check", "--no-input", "--progress-bar", "off", "--quiet", str(copy)],
         what=f"pip could not build the cylon-store wheel from {where}", timeout=PIP_WHEEL_TIMEOUT_S)
    wheels = sorted(wheel_dir.glob("cylon_store-*.whl"))
    if len(wheels) != 1:
        raise BuildError(f"building the cylon-store wheel from {where} gave {len(wheels)} wheels")
    return wheels[0]


def wheel_from_installed(dist, wheel_dir: Path) -> Path:
    """A py3-none-any wheel of an installed (non-editable) cylon-store, from its RECORD'ed files:
    the package and its metadata, without bytecode, scripts or install-only records."""
    name = "cylon_store"
    files = []
    info_dir = None
    for rel in dist.files or ():
        parts = Path(str(rel)).parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or rel.suffix in (".pyc", ".pyo"):
            continue
        if parts[0].endswith(".dist-info"):
            info_dir = parts[0]
            if len(parts) == 2 and parts[1] in _INSTALL_ONLY:
                continue
        elif parts[0] != name:
            continue  # e.g. an editable install's .pth file: nothing of the package itself
        if rel.suffix in (".so", ".pyd", ".dylib"):
            raise BuildError(f"the installed cylon-store holds a binary file ({rel}); a pure-Python "
                             f"wheel cannot be repacked from it: pass --source PATH")
        files.append((str(Path(*parts).as_posix()), Path(dist.locate_file(rel))))
    if info_dir is None or not any(arc.startswith(name + "/") for arc, _ in files):
        raise BuildError("this cylon-store distribution is not an installed wheel with its own "
                         "package files (an editable install, or an *.egg-info): pass --source PATH")
    version = dist.version
    wheel = wheel_dir / f"{name}-{version}-py3-none-any.whl"
    wheel_meta = ("Wheel-Version: 1.0\nGenerator: cylon-store lambda build (repacked from the "
                  "installed distribution)\nRoot-Is-Purelib: true\nTag: py3-none-any\n").encode()
    rows = []
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        entries = [(arc, path.read_bytes()) for arc, path in sorted(files)]
        entries.append((f"{info_dir}/WHEEL", wheel_meta))
        for arc, data in entries:
            zf.writestr(zipfile.ZipInfo(arc, _ZIP_DATE), data, zipfile.ZIP_DEFLATED)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            rows.append((arc, f"sha256={digest}", str(len(data))))
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerows(rows + [(f"{info_dir}/RECORD", "", "")])
        zf.writestr(zipfile.ZipInfo(f"{info_dir}/RECORD", _ZIP_DATE), buf.getvalue(), zipfile.ZIP_DEFLATED)
    return wheel


def _dist_version(site: Path) -> str:
    for info in site.glob("cylon_store-*.dist-info"):
        return info.name[len("cylon_store-"):-len(".dist-info")]
    return ""


# -- the tree: removal, trimming, records ----------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _dist_infos(site: Path) -> dict[str, Path]:
    """Normalized distribution name -> its .dist-info folder."""
    out = {}
    for info in site.glob("*.dist-info"):
        out[_norm(info.name[:-len(".dist-info")].rsplit("-", 1)[0])] = info
    return out


def _record_paths(site: Path, info: Path) -> list[Path]:
    record = info / "RECORD"
    if not record.is_file():
        return []
    paths = []
    with record.open(newline="", encoding="utf-8") as fh:
        for row in csv.reader(fh):
            if row:
                paths.append(Path(os.path.normpath(site / row[0])))
    return paths


def _remove_distributions(site: Path, names: Iterable[str]) -> tuple:
    """Delete the named distributions by their RECORD; returns the names that were present."""
    infos = _dist_infos(site)
    removed = []
    for name in names:
        info = infos.get(_norm(name))
        if info is None:
            continue
        for path in _record_paths(site, info):
            if path.is_relative_to(site) and path.is_file():
                path.unlink()
        shutil.rmtree(info, ignore_errors=True)
        removed.append(name)
    _prune_empty(site)
    return tuple(removed)


def _trim(site: Path) -> None:
    own = {"cylon_store"} | {p.name for p in site.glob("cylon_store-*.dist-info")}
    doomed = {path for pattern, _why in _DROP_PATHS for path in site.glob(pattern)}
    # A library on the list stays if anything that stays links it (DT_NEEDED): a newer pyarrow
    # that loads one of these names keeps working, and check_elf has the last word anyway.
    needed = set()
    for path in _files(site):
        if path not in doomed and not any(d in path.parents for d in doomed):
            info = _elf_info(path)
            if info:
                needed.update(info[1])
    for path in sorted(doomed):
        if path.name not in needed:
            _delete(path)
    for dirpath, dirnames, filenames in os.walk(site, topdown=True):
        top = Path(dirpath).relative_to(site).parts[:1]
        ours = bool(top) and top[0] in own
        for d in list(dirnames):
            if d == "__pycache__" or (d in _DROP_DIRS and not ours):
                shutil.rmtree(Path(dirpath, d))
                dirnames.remove(d)
        for f in filenames:
            if f.endswith(_DROP_SUFFIXES):
                Path(dirpath, f).unlink()
    _prune_empty(site)


def _delete(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _prune_empty(site: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(site, topdown=False):
        if dirpath != str(site) and not os.listdir(dirpath):
            os.rmdir(dirpath)


def _rewrite_records(site: Path) -> None:
    """Keep every RECORD true to the tree: rows of removed files go (importlib.metadata's
    ``files()`` and ``pip show -f`` then list what is really there)."""
    for info in site.glob("*.dist-info"):
        record = info / "RECORD"
        if not record.is_file():
            continue
        with record.open(newline="", encoding="utf-8") as fh:
            rows = [row for row in csv.reader(fh) if row]
        kept = [row for row in rows
                if row[0].endswith(".dist-info/RECORD") or (site / row[0]).is_file()]
        if len(kept) != len(rows):
            buf = io.StringIO()
            csv.writer(buf, lineterminator="\n").writerows(kept)
            record.write_text(buf.getvalue(), encoding="utf-8")


def _files(site: Path) -> list[Path]:
    return sorted((p for p in site.rglob("*") if p.is_file()), key=lambda p: p.relative_to(site).as_posix())


def _tree_bytes(site: Path) -> int:
    return sum(p.stat().st_size for p in site.rglob("*") if p.is_file())


# -- static check of the shared objects ------------------------------------------------------

def _elf_info(path: Path) -> Optional[tuple[int, list[str]]]:
    """(e_machine, DT_NEEDED names) of a 64-bit little-endian ELF file, None if not one."""
    with open(path, "rb") as fh:
        head = fh.read(64)
        if len(head) < 64 or head[:4] != b"\x7fELF":
            return None
        if head[4] != 2 or head[5] != 1:  # ELFCLASS64, ELFDATA2LSB: all Lambda targets
            return None
        machine = struct.unpack_from("<H", head, 0x12)[0]
        shoff = struct.unpack_from("<Q", head, 0x28)[0]
        shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
        if not shoff or shentsize < 64:
            return machine, []
        fh.seek(shoff)
        first = fh.read(shentsize)
        if shnum == 0:  # more than 0xff00 sections: the count is in section 0's sh_size
            shnum = struct.unpack_from("<Q", first, 0x20)[0]
        fh.seek(shoff)
        table = fh.read(shentsize * shnum)
        # Section header: name, type (u32); flags, addr, offset, size (u64); link, info (u32); ...
        sections = [struct.unpack_from("<IIQQQQII", table, i * shentsize) for i in range(shnum)]
        needed: list[str] = []
        for _name, kind, _flags, _addr, offset, size, link, _info in sections:
            if kind != 6 or link >= len(sections):  # SHT_DYNAMIC; its sh_link is the string table
                continue
            fh.seek(offset)
            dynamic = fh.read(size)
            fh.seek(sections[link][4])
            strings = fh.read(sections[link][5])
            for pos in range(0, len(dynamic) - 15, 16):
                tag, value = struct.unpack_from("<qQ", dynamic, pos)
                if tag == 0:  # DT_NULL
                    break
                if tag == 1:  # DT_NEEDED
                    needed.append(strings[value:strings.index(b"\0", value)].decode())
        return machine, needed


def check_elf(site: os.PathLike | str, arch: str) -> int:
    """Every ELF file in the tree is for ``arch``, and every library it links (DT_NEEDED) is in
    the tree or in ``SYSTEM_LIBRARIES``. Returns how many ELF files were checked; BuildError
    names the broken ones."""
    site = Path(site)
    want = _MACHINE[arch][1]
    files = _files(site)
    present = {p.name for p in files}
    wrong, missing, count = [], [], 0
    for path in files:
        info = _elf_info(path)
        if info is None:
            continue
        count += 1
        machine, needed = info
        rel = path.relative_to(site).as_posix()
        if machine != want:
            wrong.append(rel)
        lacking = [n for n in needed if n not in present and n not in SYSTEM_LIBRARIES]
        if lacking:
            missing.append(f"{rel} needs {', '.join(lacking)}")
    if wrong:
        raise BuildError(f"{len(wrong)} shared object(s) are not built for {arch}: "
                         f"{', '.join(wrong[:5])}")
    if missing:
        raise BuildError("the trimmed tree would not load; missing libraries: " + "; ".join(missing[:5]))
    return count


# -- limits ----------------------------------------------------------------------------------

def package_sizes(site: os.PathLike | str) -> list[tuple[str, int]]:
    """(package, bytes) for the tree, largest first: each distribution ("pyarrow 20.0.0") counts
    the files its RECORD lists (auditwheel's ``*.libs`` folders included); files no RECORD lists
    count under their top-level folder or file name."""
    site = Path(site)
    owner: dict[Path, str] = {}
    for info in sorted(site.glob("*.dist-info")):
        label = " ".join(info.name[:-len(".dist-info")].rsplit("-", 1))
        owner[info.resolve()] = label
        for path in _record_paths(site, info):
            owner.setdefault(path.resolve(), label)
    sizes: dict[str, int] = {}
    for path in _files(site):
        size = path.stat().st_size
        found = owner.get(path.resolve())
        if found is None:
            parent = path.parent.resolve()
            found = owner.get(parent) if parent != site.resolve() and parent in owner else None
        if found is None:
            found = path.relative_to(site).parts[0]
        sizes[found] = sizes.get(found, 0) + size
    return sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))


def check_limits(site: os.PathLike | str, *, limit: int = UNZIPPED_LIMIT) -> tuple[int, list]:
    """(unzipped bytes, packages largest first) of the tree that would go into the zip, or
    LambdaLimitError when it is over Lambda's unzipped limit, naming the largest packages."""
    packages = package_sizes(site)
    total = sum(size for _, size in packages)
    if total > limit:
        top = ", ".join(f"{name} {_mb(size)}" for name, size in packages[:5])
        raise LambdaLimitError(
            f"the function would be {_mb(total)} unzipped, over Lambda's {_mb(limit)} limit for a "
            f".zip (function and layers together) by {_mb(total - limit)}; largest packages: {top}. "
            f"Drop an extra, or deploy a container image instead (--docker: up to "
            f"{IMAGE_LIMIT // 2**30} GB).", unzipped=total, largest=packages[:5])
    return total, packages


# -- zips ------------------------------------------------------------------------------------

def _write_zip(site: Path, files: list[Path], dest: Path, prefix: str, comment: str) -> Path:
    """Write ``files`` (under ``prefix`` in the archive) to ``dest``: sorted entries, fixed
    timestamps, modes 0644/0755 (Lambda runs the code as a user that owns none of it)."""
    try:
        with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED, compresslevel=ZIP_LEVEL) as zf:
            for path in files:
                info = zipfile.ZipInfo(prefix + path.relative_to(site).as_posix(), _ZIP_DATE)
                mode = 0o755 if path.stat().st_mode & 0o111 else 0o644
                info.external_attr = (0o100000 | mode) << 16
                info.create_system = 3  # Unix, so the mode bits are honoured
                zf.writestr(info, path.read_bytes(), zipfile.ZIP_DEFLATED, ZIP_LEVEL)
            zf.comment = comment.encode()
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return dest


def read_build_record(zip_path: os.PathLike | str) -> Optional[dict]:
    """How ``build`` made this zip ({"python", "arch", "extras", "version", ...}), from the zip's
    comment; None for a zip that ``build`` did not make."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            record = json.loads(zf.comment.decode() or "null")
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) and record.get(_RECORD_KEY) else None


# -- verify ----------------------------------------------------------------------------------

# Runs in ``python -I -S`` with sys.path = the tree and the standard library only. It imports
# everything from the tree and exercises what the function does; any failure exits non-zero.
_VERIFY_SCRIPT = r'''
import json, os, sys
root = os.path.realpath(sys.argv[1])
stdlib = [os.path.realpath(p) for p in sys.path if p]
leaks = [p for p in stdlib if "site-packages" in p or "dist-packages" in p]
assert not leaks, f"not isolated: {leaks} on sys.path"
sys.path.insert(0, root)

import io
import numpy as np
import pyarrow as pa
import pyarrow.acero as acero
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.flight as flight
import pyarrow.ipc as ipc
import pyarrow.json as pjson
import pyarrow.parquet as pq
import cylon_store as cs
import cylon_store.kernel as K
import cylon_store.serverless
import cylon_store.serverless.rank  # what the entry cylon_store.serverless.handler runs
assert callable(cylon_store.serverless.handler), "the Lambda entry is not a function"

t = pa.table({"k": np.arange(1000) % 17, "v": np.arange(1000, dtype=np.float64)})
with cs.open_store("memory://verify") as store:
    store.put("a/t", t)
    assert store.get("a/t").equals(t), "memory:// put/get changed the table"

def rank(comm):
    r = comm.rank
    left = pa.table({"k": np.arange(r, 100, 2), "g": np.arange(r, 100, 2) % 7,
                     "a": np.arange(r, 100, 2, dtype=np.int64)})
    right = pa.table({"k": np.arange(r * 50, r * 50 + 50, 5), "b": np.ones(10)})
    joined = K.join(comm, left, right, on="k")
    grouped = K.groupby(comm, left, "g", [("a", "sum")])
    ordered = K.sort(comm, left, "a")
    a = ordered["a"].to_numpy()
    return {"join": joined.num_rows, "groups": grouped.num_rows,
            "sum": int(pc.sum(grouped["a_sum"]).as_py() or 0), "sorted": ordered.num_rows,
            "min": int(a.min()) if len(a) else None, "max": int(a.max()) if len(a) else None,
            "ascending": bool((np.diff(a) >= 0).all())}

out = cs.launch(rank, 2, store="memory://", launcher="threads", timeout=120)
assert sum(o["join"] for o in out) == 20, out
assert sum(o["groups"] for o in out) == 7 and sum(o["sum"] for o in out) == 4950, out
assert sum(o["sorted"] for o in out) == 100 and all(o["ascending"] for o in out), out
assert out[0]["max"] is None or out[1]["min"] is None or out[0]["max"] <= out[1]["min"], out

sink = pa.BufferOutputStream()
with ipc.new_stream(sink, t.schema, options=ipc.IpcWriteOptions(compression="zstd")) as w:
    w.write_table(t)
assert ipc.open_stream(sink.getvalue()).read_all().equals(t)
assert pa.Codec.is_available("lz4") and pa.Codec.is_available("zstd")
buf = pa.BufferOutputStream()
pq.write_table(t, buf, compression="zstd")
assert pq.read_table(buf.getvalue()).equals(t)
assert pcsv.read_csv(io.BytesIO(b"a,b\n1,x\n2,y\n")).num_rows == 2
assert pjson.read_json(io.BytesIO(b'{"a": 1}\n{"a": 2}\n')).num_rows == 2
decl = acero.Declaration.from_sequence([
    acero.Declaration("table_source", acero.TableSourceNodeOptions(t)),
    acero.Declaration("filter", acero.FilterNodeOptions(pc.field("k") == 3))])
assert decl.to_table().num_rows == len([i for i in range(1000) if i % 17 == 3])
assert t.group_by("k").aggregate([("v", "sum")]).num_rows == 17

class Server(flight.FlightServerBase):
    def do_get(self, context, ticket):
        return flight.RecordBatchStream(t)

with Server("grpc://127.0.0.1:0") as server:
    client = flight.connect(f"grpc://127.0.0.1:{server.port}")
    got = client.do_get(flight.Ticket(b"t"), flight.FlightCallOptions(timeout=30)).read_all()
    assert got.equals(t)
    client.close()

outside = sorted({m.__name__.split(".")[0] for m in list(sys.modules.values())
                  if getattr(m, "__file__", None)
                  and not any(os.path.realpath(m.__file__).startswith(p + os.sep)
                              for p in [root] + stdlib)})
assert not outside, f"imported from outside the tree: {outside}"
print(json.dumps({"pyarrow": pa.__version__, "numpy": np.__version__, "cylon_store": cs.__version__,
                  "modules": len(sys.modules)}))
'''


def verify(build_dir: os.PathLike | str, *, timeout: float = VERIFY_TIMEOUT_S) -> str:
    """Prove a built tree runs on its own: in ``python -I -S`` (no site-packages, no user site,
    no PYTHON* variables) with only ``build_dir`` and the standard library on sys.path, import
    cylon_store (and its handler module), put/get a table through memory://, run the kernel's
    join, groupby and sort on 2 ranks (``cs.launch(..., launcher="threads")``), and use IPC with
    zstd, Parquet, CSV, JSON, Acero and a Flight round trip on loopback; no module may load from
    outside the tree. Returns a one-line summary; BuildError with the failure otherwise.
    Needs a tree built for this machine's architecture and Python version."""
    root = Path(build_dir).absolute()
    # Only what a Lambda sandbox would not have is removed: this machine's cylon-store settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith("CYLON_STORE_")}
    env["NO_PROXY"] = env["no_proxy"] = ",".join(
        filter(None, [env.get("NO_PROXY", env.get("no_proxy", "")), "127.0.0.1", "localhost"]))
    try:
        # -B: the tree is what gets zipped, and gets no __pycache__ from being checked.
        proc = subprocess.run([sys.executable, "-I", "-S", "-B", "-c", _VERIFY_SCRIPT, str(root)],
                              capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=tempfile.gettempdir(), stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BuildError(f"verify: the tree at {root} did not finish its checks in {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-8:]
        raise BuildError(f"verify: the tree at {root} does not work on its own:\n  " + "\n  ".join(tail))
    facts = json.loads(proc.stdout.strip().splitlines()[-1])
    return (f"ran on its own (python -I -S): cylon-store {facts['cylon_store']}, pyarrow "
            f"{facts['pyarrow']}, numpy {facts['numpy']}; memory:// put/get, join/groupby/sort on "
            f"2 ranks, IPC zstd, Parquet, CSV, JSON, Acero, Flight")


# -- Dockerfile ------------------------------------------------------------------------------

_DOCKERFILE = """\
# cylon-store ranks on AWS Lambda as a container image, for functions that outgrow the .zip
# (250 MB unzipped with layers; an image may hold 10 GB, so nothing is trimmed here). The base
# image brings the Lambda runtime interface client and boto3.
#
# Rendered from the template in cylon_store/serverless/deploy.py (render_dockerfile): the copy in
# docker/lambda.Dockerfile installs the repository's source tree (build it from the repository's
# root); `cylon-store lambda build --docker` writes one next to the zip that installs the wheel
# it built.
#
#   docker build --platform linux/amd64 -f {dockerfile} -t cylon-store-lambda {context}
#   (--platform linux/arm64 for arm64), push it to an Amazon ECR repository, then
#   cylon-store lambda deploy --function NAME --role ROLE_ARN --arch x86_64 \\
#       --image-uri ACCOUNT.dkr.ecr.REGION.amazonaws.com/cylon-store-lambda:latest
FROM public.ecr.aws/lambda/python:{python}

COPY {copy_from} /tmp/cylon-store/{copy_to}
RUN pip install --no-cache-dir --target "${{LAMBDA_TASK_ROOT}}" "/tmp/cylon-store/{copy_to}[{extras}]" \\
 && rm -rf /tmp/cylon-store

CMD ["{handler}"]
"""


def render_dockerfile(*, python: str = DEFAULT_PYTHON, extras: Iterable[str] | str = DEFAULT_EXTRAS,
                      wheel: Optional[str] = None, dockerfile: os.PathLike | str | None = None) -> str:
    """The Dockerfile of the container-image function. With ``wheel`` (a file name in the build
    context) it installs that wheel, else the source tree that is the build context (the
    canonical docker/lambda.Dockerfile, built from the repository's root)."""
    _runtime_glibc(python)
    extras = ",".join(parse_extras(extras))
    if wheel:
        name = os.path.basename(wheel)
        where = Path(dockerfile) if dockerfile else Path(DEFAULT_OUT) / "Dockerfile"
        return _DOCKERFILE.format(python=python, extras=extras, handler=HANDLER,
                                  copy_from=name, copy_to=name,
                                  dockerfile=_shell_path(where), context=_shell_path(where.parent))
    return _DOCKERFILE.format(python=python, extras=extras, handler=HANDLER,
                              copy_from=".", copy_to="src",
                              dockerfile="docker/lambda.Dockerfile", context=".")


# == deploy ==================================================================================

_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}|arn:aws[a-z-]*:lambda:[a-z0-9-]+:\d{12}:function:[A-Za-z0-9_-]{1,64}")
_ROLE_ARN = re.compile(r"arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}")
_ENV_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
#: Keys the Lambda runtime sets and a function may not (Lambda developer guide, "Defined runtime
#: environment variables": reserved environment variables).
RESERVED_ENV = frozenset({
    "_HANDLER", "_X_AMZN_TRACE_ID", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_EXECUTION_ENV",
    "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "AWS_LAMBDA_FUNCTION_VERSION",
    "AWS_LAMBDA_INITIALIZATION_TYPE", "AWS_LAMBDA_LOG_GROUP_NAME", "AWS_LAMBDA_LOG_STREAM_NAME",
    "AWS_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_LAMBDA_RUNTIME_API", "LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR",
})


def _boto3():
    try:
        import boto3
        import botocore  # noqa: F401
    except ImportError:
        raise ConfigError("cylon-store lambda deploy needs boto3: pip install 'cylon-store[lambda]'") from None
    return boto3


def _aws_text(exc: BaseException) -> str:
    """One line for an AWS/botocore error: its code and message (never credentials: botocore's
    messages carry none)."""
    resp = getattr(exc, "response", None)
    if isinstance(resp, dict) and resp.get("Error"):
        err = resp["Error"]
        code = err.get("Code") or resp.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
        text = f"{code}: {err.get('Message') or exc}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    # An endpoint URL with user:password@ in it would show in connection errors: never print it.
    return re.sub(r"://[^/\s@]+@", "://***@", " ".join(text.split()))


def _is_aws_error(exc: BaseException) -> bool:
    mod = type(exc).__module__ or ""
    return mod.startswith(("botocore", "boto3", "s3transfer"))


def validate_env(env: Optional[dict]) -> Optional[dict]:
    if env is None:
        return None
    out = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_KEY.fullmatch(key):
            raise ConfigError(f"environment variable name {key!r}: letters, digits and _ only, "
                              f"starting with a letter")
        if key in RESERVED_ENV:
            raise ConfigError(f"environment variable {key} is reserved: the Lambda runtime sets it")
        out[key] = str(value)
    size = sum(len(k.encode()) + len(v.encode()) for k, v in out.items())
    if size > ENV_LIMIT:
        raise ConfigError(f"environment variables take {size:,} bytes, over Lambda's "
                          f"{ENV_LIMIT:,}-byte limit")
    return out


def deploy(function: str, *, role: str, zip_path: os.PathLike | str | None = None,
           image_uri: Optional[str] = None, memory_mb: int = DEFAULT_MEMORY_MB,
           timeout_s: int = DEFAULT_TIMEOUT_S, arch: Optional[str] = DEFAULT_ARCH,
           code_bucket: Optional[str] = None, env: Optional[dict] = None, client=None,
           python: Optional[str] = None, max_event_age: int = DEFAULT_MAX_EVENT_AGE,
           s3_client=None, region: Optional[str] = None, wait_s: float = DEFAULT_WAIT_S,
           log: Optional[Callable[[str], None]] = None) -> dict:
    """Create the function ``function`` or update it, wait until it is Active with its last update
    Successful, and set its asynchronous-invocation config (no retries, events older than
    ``max_event_age`` seconds dropped). Returns the function's configuration.

    Code: ``zip_path`` (uploaded directly up to 50 MB; larger ones go through S3 and need
    ``code_bucket``, a bucket in the function's region) or ``image_uri`` (an Amazon ECR image).
    ``arch`` and ``python`` default to what the zip was built for (its build record), else
    x86_64 and 3.11; an explicit ``arch`` that contradicts the zip is an error. ``env``: the
    function's environment variables, replacing the current ones (None leaves them as they are
    on an update). ``client``/``s3_client``: boto3 clients to use, else made from boto3's chain
    (``region`` overrides its region). Raises ConfigError for bad arguments (before any AWS call)
    and DeployError when AWS refuses a step or a wait runs out.
    """
    say = log or (lambda _msg: None)
    if not isinstance(function, str) or not _FUNCTION_NAME.fullmatch(function):
        raise ConfigError(f"function name {function!r}: 1 to 64 letters, digits, - and _ (or a function ARN)")
    if not isinstance(role, str) or not _ROLE_ARN.fullmatch(role):
        raise ConfigError(f"role {role!r} is not an IAM role ARN (arn:aws:iam::<account-id>:role/<name>)")
    if (zip_path is None) == (image_uri is None):
        raise ConfigError("deploy needs exactly one of zip_path (--zip) and image_uri (--image-uri)")
    if not MEMORY_MIN <= int(memory_mb) <= MEMORY_MAX:
        raise ConfigError(f"memory must be {MEMORY_MIN} to {MEMORY_MAX} MB, got {memory_mb}")
    if not 1 <= int(timeout_s) <= TIMEOUT_MAX:
        raise ConfigError(f"timeout must be 1 to {TIMEOUT_MAX} s, got {timeout_s}")
    if not EVENT_AGE_MIN <= int(max_event_age) <= EVENT_AGE_MAX:
        raise ConfigError(f"maximum event age must be {EVENT_AGE_MIN} to {EVENT_AGE_MAX} s, got {max_event_age}")
    env = validate_env(env)
    code: dict
    zip_bytes = b""
    if zip_path is not None:
        zip_path = Path(zip_path)
        if not zip_path.is_file() or not zipfile.is_zipfile(zip_path):
            raise ConfigError(f"{zip_path}: not a zip file")
        record = read_build_record(zip_path) or {}
        built = record.get("arch")
        if arch is None:
            arch = built or DEFAULT_ARCH
        elif built and built != arch:
            raise ConfigError(f"{zip_path.name} was built for {built}, not {arch}: deploy it with "
                              f"--arch {built}, or build for {arch} (cylon-store lambda build --arch {arch})")
        python = python or record.get("python") or DEFAULT_PYTHON
        _runtime_glibc(python)
        with zipfile.ZipFile(zip_path) as zf:
            unzipped = sum(i.file_size for i in zf.infolist())
        if unzipped > UNZIPPED_LIMIT:
            raise ConfigError(f"{zip_path.name} is {_mb(unzipped)} unzipped, over Lambda's "
                              f"{_mb(UNZIPPED_LIMIT)} limit: deploy a container image (--image-uri)")
        size = zip_path.stat().st_size
        if size > ZIPPED_DIRECT_LIMIT and not code_bucket:
            raise ConfigError(f"{zip_path.name} is {_mb(size)}, over the {_mb(ZIPPED_DIRECT_LIMIT)} "
                              f"Lambda accepts in a direct upload: pass --code-bucket BUCKET (an S3 "
                              f"bucket in the function's region) to upload it through Amazon S3")
        if size <= ZIPPED_DIRECT_LIMIT and not code_bucket:
            zip_bytes = zip_path.read_bytes()
            code = {"ZipFile": zip_bytes}
        else:
            code = {}  # filled in after the upload below
        package_type = "Zip"
    else:
        arch = arch or DEFAULT_ARCH
        if not re.fullmatch(r"\d{12}\.dkr\.ecr\.[a-z0-9-]+\.amazonaws\.com(\.cn)?/[\w./-]+(:[\w.-]+|@sha256:[0-9a-f]{64})",
                            image_uri or ""):
            raise ConfigError(f"image URI {image_uri!r}: Lambda runs images from Amazon ECR "
                              f"(ACCOUNT.dkr.ecr.REGION.amazonaws.com/REPOSITORY:TAG or @sha256:DIGEST)")
        code = {"ImageUri": image_uri}
        package_type = "Image"
    _check_arch(arch)

    boto3 = _boto3()
    from botocore.config import Config
    from botocore.exceptions import WaiterError
    if client is None or (code_bucket and s3_client is None):
        session = boto3.session.Session(region_name=region)
        cfg = Config(connect_timeout=10, read_timeout=300, retries={"mode": "standard", "max_attempts": 5})
        try:
            if client is None:
                client = session.client("lambda", config=cfg)
            if code_bucket and s3_client is None:
                s3_client = session.client("s3", region_name=client.meta.region_name, config=cfg)
        except Exception as exc:
            if _is_aws_error(exc):
                raise DeployError(f"creating the AWS clients: {_aws_text(exc)} (pass --region or "
                                  f"set AWS_REGION)") from None
            raise
    where = f"region {client.meta.region_name}"

    def aws(what: str, call, *args, **kw):
        try:
            return call(*args, **kw)
        except Exception as exc:
            if not _is_aws_error(exc):
                raise
            hint = ""
            if "cannot be assumed" in str(exc):
                hint = (" (the role must exist and trust lambda.amazonaws.com; a role created "
                        "moments ago can take a few seconds to become usable)")
            raise DeployError(f"{what} ({where}): {_aws_text(exc)}{hint}") from None

    def wait(waiter: str, what: str) -> None:
        attempts = max(1, math.ceil(wait_s / _WAITER_DELAY_S))
        try:
            client.get_waiter(waiter).wait(FunctionName=function, WaiterConfig={
                "Delay": _WAITER_DELAY_S, "MaxAttempts": attempts})
        except WaiterError as exc:
            state = {}
            try:
                state = client.get_function_configuration(FunctionName=function)
            except Exception:
                pass
            detail = ", ".join(f"{k} {state[k]}" for k in ("State", "StateReason", "LastUpdateStatus",
                                                           "LastUpdateStatusReason") if state.get(k))
            raise DeployError(f"Lambda function {function!r} {what} ({where}): "
                              f"{detail or _aws_text(exc)}") from None
        except Exception as exc:
            if not _is_aws_error(exc):
                raise
            raise DeployError(f"waiting for Lambda function {function!r} ({where}): {_aws_text(exc)}") from None

    if package_type == "Zip" and code_bucket:
        assert zip_path is not None  # a zip package
        code = _upload(s3_client, code_bucket, zip_path, function, say, where)

    existing = None
    try:
        existing = client.get_function(FunctionName=function)["Configuration"]
    except Exception as exc:
        if not _is_aws_error(exc):
            raise
        if (getattr(exc, "response", None) or {}).get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise DeployError(f"reading Lambda function {function!r} ({where}): {_aws_text(exc)}") from None

    from .. import __version__
    settings = {"Role": role, "MemorySize": int(memory_mb), "Timeout": int(timeout_s),
                "Description": f"cylon-store {__version__} ranks: cs.launch(..., launcher='lambda')"}
    if package_type == "Zip":
        settings.update(Runtime=f"python{python}", Handler=HANDLER)
    if env is not None:
        settings["Environment"] = {"Variables": env}

    if existing is None:
        say(f"creating Lambda function {function} ({package_type.lower()}, {arch}, {where})")
        aws(f"creating Lambda function {function!r}", client.create_function, FunctionName=function,
            PackageType=package_type, Code=code, Architectures=[arch], Publish=False, **settings)
        wait("function_active_v2", f"did not become Active within {wait_s:.0f} s")
    else:
        if existing.get("PackageType", "Zip") != package_type:
            have = "a container image" if existing.get("PackageType") == "Image" else "a .zip"
            raise ConfigError(f"Lambda function {function!r} runs {have}; a function cannot switch "
                              f"between .zip and image: deploy {have} (--zip or --image-uri) or "
                              f"use another --function name")
        say(f"updating Lambda function {function} ({package_type.lower()}, {arch}, {where})")
        if existing.get("LastUpdateStatus") == "InProgress":
            wait("function_updated_v2", f"is still finishing an earlier update after {wait_s:.0f} s")
        aws(f"updating the code of Lambda function {function!r}", client.update_function_code,
            FunctionName=function, Architectures=[arch], Publish=False, **code)
        wait("function_updated_v2", f"did not finish its code update within {wait_s:.0f} s")
        aws(f"updating the configuration of Lambda function {function!r}",
            client.update_function_configuration, FunctionName=function, **settings)
        wait("function_updated_v2", f"did not finish its configuration update within {wait_s:.0f} s")
    # A rank that fails is reported by the driver, which stops the job; a retry by Lambda would
    # only start the rank again, which the handler fences off (its slot is claimed), so it would
    # cost an invocation and nothing else.
    aws(f"setting the invoke config of Lambda function {function!r}",
        client.put_function_event_invoke_config, FunctionName=function, MaximumRetryAttempts=0,
        MaximumEventAgeInSeconds=int(max_event_age))
    return aws(f"reading Lambda function {function!r}", client.get_function_configuration,
               FunctionName=function)


def _upload(s3, bucket: str, zip_path: Path, function: str, say, where: str) -> dict:
    """Upload the zip to s3://bucket/cylon-store/lambda/FUNCTION/NAME-SHA.zip (content-addressed:
    the same zip is the same key); returns the Code argument."""
    digest = hashlib.sha256()
    with zip_path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    key = f"cylon-store/lambda/{function}/{zip_path.stem}-{digest.hexdigest()[:16]}.zip"
    try:
        s3.head_bucket(Bucket=bucket)
    except Exception as exc:
        if not _is_aws_error(exc):
            raise
        status = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "")
        if status in ("404", "NoSuchBucket", "NotFound"):
            raise DeployError(f"code bucket {bucket!r} does not exist ({where}): create it in the "
                              f"function's region, or pass another --code-bucket") from None
        if status in ("403", "AccessDenied"):
            raise DeployError(f"code bucket {bucket!r}: access denied to these credentials") from None
        if status in ("301", "PermanentRedirect"):
            raise DeployError(f"code bucket {bucket!r} is in another region than the function "
                              f"({where}): Lambda reads code from a bucket in its own region") from None
        raise DeployError(f"code bucket {bucket!r} ({where}): {_aws_text(exc)}") from None
    say(f"uploading {zip_path.name} ({_mb(zip_path.stat().st_size)}) to s3://{bucket}/{key}")
    try:
        s3.upload_file(str(zip_path), bucket, key)
    except Exception as exc:
        if not _is_aws_error(exc):
            raise
        raise DeployError(f"uploading {zip_path.name} to s3://{bucket}/{key}: {_aws_text(exc)}") from None
    return {"S3Bucket": bucket, "S3Key": key}


# == command line ============================================================================

def _extras_arg(text: str) -> tuple:
    try:
        return parse_extras(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        validate_env({key: value})
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return key, value


def _zip_arg(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not zipfile.is_zipfile(path):
        raise argparse.ArgumentTypeError(f"not a zip file: {text}")
    return path


def _regex_arg(pattern: re.Pattern, what: str):
    def parse(text: str) -> str:
        if not pattern.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return text
    return parse


_BUILD_EPILOG = f"""\
what goes in:
  this project's wheel (from the source tree the running cylon_store lives in, or --source;
  from an installed distribution, its own files repacked) with --extras and all dependencies,
  as binary wheels for the Lambda platform (pip --platform/--python-version: any build machine).
  Python 3.10/3.11 run on Amazon Linux 2 (glibc 2.26), so their wheels are manylinux2014 up
  to manylinux_2_26 (pyarrow 20 is the newest with such wheels); 3.12+ run on Amazon Linux
  2023 (glibc 2.34) and get newer ones.

left out:
  {', '.join(RUNTIME_PROVIDED[:5])},
  {', '.join(RUNTIME_PROVIDED[5:])}: the Lambda Python runtime already has them
  (--include-boto3 bundles them); bytecode, tests, sources, headers, static libraries, type
  stubs, build tools, pyarrow's Substrait/ORC/HDFS bindings and duplicate library copies.

limits (AWS Lambda quotas):
  {UNZIPPED_LIMIT // MB} MB unzipped (function + layers): over it nothing is written and the
  largest packages are named; zips over {ZIPPED_DIRECT_LIMIT // MB} MB deploy through S3
  (deploy --code-bucket); a container image (--docker) may hold {IMAGE_LIMIT // 2**30} GB.

check:
  when the target is this machine's arch and Python, the tree is run on its own (python -I -S)
  before anything is written; cross builds are checked statically (ELF machine and libraries).
"""

_DEPLOY_EPILOG = f"""\
retries:
  Lambda retries a failed asynchronous invocation twice by default; deploy sets
  MaximumRetryAttempts=0. The driver fences duplicate deliveries of a rank anyway (a second
  start finds its slot claimed and exits) and reports a failed rank itself, stopping the job,
  so a retry of a failed or killed rank would only cost another invocation (up to --timeout
  seconds of billed time). Queued invocations older than --max-event-age are dropped.

credentials, region and endpoints come from boto3's own chain (AWS_PROFILE, AWS_REGION,
AWS_ENDPOINT_URL_LAMBDA, AWS_ENDPOINT_URL_S3, ...). Needs boto3: pip install 'cylon-store[lambda]'.

then run:
  cs.launch(fn, n, store="s3://BUCKET/PREFIX", launcher="lambda", function=NAME)
"""


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``cylon-store lambda build``."""
    p.description = ("Build the AWS Lambda deployment zip of cylon-store for the Python managed\n"
                     "runtime (handler cylon_store.serverless.handler): binary wheels for the\n"
                     "Lambda platform, trimmed, checked against Lambda's limits.")
    p.epilog = _BUILD_EPILOG
    p.add_argument("--arch", choices=ARCHES, default=DEFAULT_ARCH,
                   help=f"Lambda architecture (default {DEFAULT_ARCH})")
    p.add_argument("--python", choices=tuple(RUNTIME_GLIBC), default=DEFAULT_PYTHON,
                   help=f"Lambda Python runtime version (default {DEFAULT_PYTHON})")
    p.add_argument("--extras", type=_extras_arg, default=DEFAULT_EXTRAS, metavar="LIST",
                   help=f"comma-separated extras to include, from {','.join(FUNCTION_EXTRAS)}; '' for "
                        f"none (default {','.join(DEFAULT_EXTRAS)})")
    p.add_argument("--include-boto3", action="store_true",
                   help=f"bundle {', '.join(RUNTIME_PROVIDED)} too (default: left out, the Lambda "
                        f"Python runtime has them)")
    p.add_argument("--layer", action="store_true",
                   help="also build the layer variant (the same content under python/)")
    p.add_argument("--docker", action="store_true",
                   help="also write a Dockerfile (on public.ecr.aws/lambda/python) and the project "
                        "wheel it installs, for a container-image function (up to 10 GB)")
    p.add_argument("--source", metavar="PATH", default=None,
                   help="the cylon-store source tree to build (default: the one the running "
                        "cylon_store comes from; else the installed distribution's files)")
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                   help=f"output folder (default ./{DEFAULT_OUT})")
    p.add_argument("--no-verify", action="store_true",
                   help="do not run the built tree (otherwise run when arch and Python match this machine)")
    p.set_defaults(fn=main_build)


def add_deploy_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``cylon-store lambda deploy``."""
    p.description = ("Create the Lambda function (or update its code and configuration) through\n"
                     "boto3, wait until it is Active with its update Successful, and turn off\n"
                     "Lambda's retries of asynchronous invocations.")
    p.epilog = _DEPLOY_EPILOG
    p.add_argument("--function", required=True, type=_regex_arg(_FUNCTION_NAME, "a Lambda function name"),
                   metavar="NAME", help="function name (1-64 letters, digits, - and _)")
    p.add_argument("--role", required=True, type=_regex_arg(_ROLE_ARN, "an IAM role ARN"), metavar="ARN",
                   help="execution role ARN (arn:aws:iam::ACCOUNT:role/NAME); it needs access to "
                        "the store (S3/DynamoDB/...) and CloudWatch Logs")
    code = p.add_mutually_exclusive_group(required=True)
    code.add_argument("--zip", type=_zip_arg, metavar="PATH",
                      help="the function zip from `cylon-store lambda build`")
    code.add_argument("--image-uri", metavar="URI",
                      help="an Amazon ECR image built from the Dockerfile (build --docker)")
    p.add_argument("--memory", type=int_range(MEMORY_MIN, MEMORY_MAX, "MB"), default=DEFAULT_MEMORY_MB,
                   metavar="MB", help=f"memory, {MEMORY_MIN} to {MEMORY_MAX} MB (default "
                                      f"{DEFAULT_MEMORY_MB}: one full vCPU)")
    p.add_argument("--timeout", type=int_range(1, TIMEOUT_MAX, "seconds"), default=DEFAULT_TIMEOUT_S,
                   metavar="S", help=f"function timeout, 1 to {TIMEOUT_MAX} s (default {DEFAULT_TIMEOUT_S})")
    p.add_argument("--arch", choices=ARCHES, default=None,
                   help="architecture (default: what the zip was built for, else x86_64)")
    p.add_argument("--python", choices=tuple(RUNTIME_GLIBC), default=None,
                   help="Python runtime of a zip function (default: what the zip was built for, else 3.11)")
    p.add_argument("--code-bucket", metavar="BUCKET",
                   help=f"upload the zip through this S3 bucket (same region); needed above "
                        f"{ZIPPED_DIRECT_LIMIT // MB} MB zipped")
    p.add_argument("--env", type=_env_pair, nargs="+", action="extend", metavar="K=V",
                   help="environment variables of the function (replace the current ones; "
                        "without --env an update leaves them as they are)")
    p.add_argument("--region", help="AWS region (default: boto3's chain, e.g. AWS_REGION)")
    p.add_argument("--max-event-age", type=int_range(EVENT_AGE_MIN, EVENT_AGE_MAX, "seconds"),
                   default=DEFAULT_MAX_EVENT_AGE, metavar="S",
                   help=f"drop queued asynchronous invocations older than this, {EVENT_AGE_MIN} to "
                        f"{EVENT_AGE_MAX} s (default {DEFAULT_MAX_EVENT_AGE})")
    p.add_argument("--wait", type=seconds(), default=DEFAULT_WAIT_S, metavar="S",
                   help=f"longest wait for the function to become Active/updated (default {DEFAULT_WAIT_S:.0f})")
    p.set_defaults(fn=main_deploy)


def _error(exc: BaseException) -> int:
    print(f"cylon-store: error: {exc}", file=sys.stderr)
    return 1


def main_build(args) -> int:
    """``cylon-store lambda build``: build, print the summary; errors as ``cylon-store: error:``."""
    def log(msg: str) -> None:
        print(f"... {msg}", file=sys.stderr, flush=True)

    try:
        result = build(args.out, arch=args.arch, python=args.python, extras=args.extras,
                       layer=args.layer, docker=args.docker, include_boto3=args.include_boto3,
                       source=args.source, run_verify=False if args.no_verify else None, log=log)
    except StoreError as exc:
        return _error(exc)
    print(format_summary(result))
    return 0


def format_summary(r: BuildResult) -> str:
    glibc = RUNTIME_GLIBC[r.python]
    lines = [f"cylon-store lambda build: {r.runtime} {r.arch} ({RUNTIME_OS[glibc]}, wheels up to "
             f"manylinux_2_{glibc}), {r.seconds:.0f} s",
             f"  function zip  {_shell_path(r.zip_path)}: {_mb(r.zipped_bytes)} zipped, "
             f"{_mb(r.unzipped_bytes)} unzipped of Lambda's {_mb(UNZIPPED_LIMIT)} (function + layers), "
             f"{r.files:,} files; handler {HANDLER}"]
    if r.layer_path:
        lines.append(f"  layer zip     {_shell_path(r.layer_path)}: {_mb(r.layer_zipped_bytes)} zipped "
                     f"(the same files under python/; use it instead of, not with, the function zip's content)")
    if r.dockerfile_path and r.wheel_path:  # written together
        lines.append(f"  Dockerfile    {_shell_path(r.dockerfile_path)} (installs {r.wheel_path.name}; "
                     f"docker build --platform {_DOCKER_PLATFORM[r.arch]} -f {_shell_path(r.dockerfile_path)} "
                     f"{_shell_path(r.dockerfile_path.parent)})")
    lines.append("  largest       " + ", ".join(f"{n} {_mb(s)}" for n, s in r.largest))
    if r.excluded:
        lines.append(f"  left out      {', '.join(r.excluded)} (in the Lambda runtime; --include-boto3 bundles them)")
    lines.append(f"  trimmed       {_mb(r.trimmed_bytes)} (tests, sources, headers, bytecode, build tools, "
                 f"unused pyarrow bindings)")
    lines.append(f"  verified      {r.verify_note}" if r.verified else f"  not verified  {r.verify_note}")
    if r.zipped_bytes > ZIPPED_DIRECT_LIMIT:
        lines.append(f"  note          over {_mb(ZIPPED_DIRECT_LIMIT)} zipped: deploy uploads it through "
                     f"S3 (--code-bucket, a bucket in the function's region)")
    lines += ["next:", f"  {r.deploy_command()}"]
    return "\n".join(lines)


def main_deploy(args) -> int:
    """``cylon-store lambda deploy``: deploy, print the ARN and how to launch; errors as one
    ``cylon-store: error:`` line."""
    def log(msg: str) -> None:
        print(f"... {msg}", file=sys.stderr, flush=True)

    env = dict(args.env) if args.env else None
    try:
        config = deploy(args.function, role=args.role, zip_path=args.zip, image_uri=args.image_uri,
                        memory_mb=args.memory, timeout_s=args.timeout, arch=args.arch,
                        code_bucket=args.code_bucket, env=env, python=args.python,
                        max_event_age=args.max_event_age, region=args.region, wait_s=args.wait,
                        log=log)
    except StoreError as exc:
        return _error(exc)
    name = config.get("FunctionName", args.function)
    arch = (config.get("Architectures") or [args.arch or DEFAULT_ARCH])[0]
    what = config.get("Runtime") or "container image"
    env_keys = sorted((config.get("Environment") or {}).get("Variables", {}))
    print(f"deployed {config.get('FunctionArn')}")
    print(f"  {what}, {arch}, {config.get('MemorySize')} MB, timeout {config.get('Timeout')} s, "
          f"state {config.get('State', '?')}, last update {config.get('LastUpdateStatus', '?')}; "
          f"async retries 0, events dropped after {args.max_event_age} s"
          + (f"; environment: {', '.join(env_keys)}" if env_keys else ""))
    print("launch ranks on it with:")
    print(f"  cs.launch(fn, n, store=\"s3://BUCKET/PREFIX\", launcher=\"lambda\", function=\"{name}\")")
    return 0
