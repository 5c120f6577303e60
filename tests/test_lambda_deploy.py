"""``cylon-store lambda build`` and ``cylon-store lambda deploy``.

deploy runs against moto's server over HTTP (the suite's shared one, ``moto_server``), which
manages Lambda functions without Docker and checks that the execution role exists. build runs
for real in the two ``slow`` tests: pip downloads the Lambda platform's wheels from PyPI (its
cache makes reruns fast), and the x86_64 zip is extracted and run on its own by ``verify``.
The other build tests download nothing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import moto_server
from cylon_store.cli import main as cli_main
from cylon_store.errors import ConfigError
from cylon_store.serverless import deploy as D

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "123456789012"  # moto's account
#: A secret that must never be printed (moto accepts any credentials).
SECRET = "cylon-test-secret-do-not-print"


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def moto():
    endpoint = moto_server.acquire()
    iam = moto_server.client("iam")
    trust = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "sts:AssumeRole",
                                                     "Principal": {"Service": "lambda.amazonaws.com"}}]}
    try:
        role = iam.create_role(RoleName="cylon-lambda-test", AssumeRolePolicyDocument=json.dumps(trust))
    except iam.exceptions.EntityAlreadyExistsException:
        role = iam.get_role(RoleName="cylon-lambda-test")
    yield {"endpoint": endpoint, "role": role["Role"]["Arn"], "lambda": moto_server.client("lambda"),
           "s3": moto_server.client("s3")}
    moto_server.release()


def _zip(path: Path, body: bytes = b"def handler(event, context):\n    return 1\n", *,
         record: dict | None = None, random_bytes: int = 0) -> Path:
    """A small function zip (``random_bytes`` of incompressible data make a big one cheaply)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("cylon_store/serverless/__init__.py", body)
        if random_bytes:
            zf.writestr(zipfile.ZipInfo("blob.bin"), os.urandom(random_bytes), zipfile.ZIP_STORED)
        if record is not None:
            zf.comment = json.dumps({"cylon-store-lambda": 1, **record}).encode()
    return path


def _plain_pypi(monkeypatch):
    """pip as on a machine with no pip configuration: PyPI only (no local indexes or find-links)."""
    for key in list(os.environ):
        if key.startswith("PIP_") and key not in ("PIP_CERT", "PIP_DEFAULT_TIMEOUT"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)


def _run_cli(args, env_extra=None, *, block_boto3=False, timeout=120):
    """``python -m cylon_store.cli ARGS`` from the repository's root (as a user runs it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(env_extra or {})
    if block_boto3:  # the base install: importing boto3/botocore fails
        code = ("import sys; sys.modules['boto3'] = sys.modules['botocore'] = None; "
                "from cylon_store.cli import main; sys.exit(main(sys.argv[1:]))")
        cmd = [sys.executable, "-c", code, *args]
    else:
        cmd = [sys.executable, "-m", "cylon_store.cli", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _moto_env(moto) -> dict:
    return {"AWS_ENDPOINT_URL_LAMBDA": moto["endpoint"], "AWS_ENDPOINT_URL_S3": moto["endpoint"],
            "AWS_ENDPOINT_URL_IAM": moto["endpoint"], "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": moto_server.REGION}


# -- command line: help and argument errors ----------------------------------------------------

def test_help_works_with_the_base_install():
    for sub, expect in (("build", ["boto3, botocore, s3transfer, jmespath, urllib3", "--include-boto3",
                                   "250 MB unzipped", "--layer", "--docker"]),
                        ("deploy", ["MaximumRetryAttempts=0", "fences duplicate deliveries",
                                    "--code-bucket", "launcher=\"lambda\"", "cylon-store[lambda]"])):
        proc = _run_cli(["lambda", sub, "--help"], block_boto3=True)
        assert proc.returncode == 0, proc.stderr
        text = " ".join(proc.stdout.split())
        for phrase in expect:
            assert phrase in text, (sub, phrase)
    # Importing the module loads no AWS SDK.
    code = "import sys, cylon_store.serverless.deploy; print('boto3' in sys.modules, 'botocore' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False"], out


def test_deploy_without_boto3_names_the_extra(tmp_path):
    z = _zip(tmp_path / "f.zip")
    proc = _run_cli(["lambda", "deploy", "--function", "f", "--role",
                     f"arn:aws:iam::{ACCOUNT}:role/r", "--zip", str(z)], block_boto3=True)
    assert proc.returncode == 1
    assert proc.stderr.strip() == ("cylon-store: error: cylon-store lambda deploy needs boto3: "
                                   "pip install 'cylon-store[lambda]'")


@pytest.mark.parametrize("argv, message", [
    (["build", "--arch", "i386"], "argument --arch: invalid choice: 'i386'"),
    (["build", "--python", "3.9"], "argument --python: invalid choice: '3.9'"),
    (["build", "--extras", "s3,lambda"], "extra 'lambda' does not belong in a Lambda function: "
                                         "awslambdaric is built into the Lambda runtime"),
    (["build", "--extras", "test"], "extra 'test' does not belong in a Lambda function"),
    (["build", "--extras", "s4"], "unknown extra 's4': choose from s3, dynamodb, redis"),
    (["deploy", "--zip", "{zip}", "--role", "{role}"], "the following arguments are required: --function"),
    (["deploy", "--function", "f", "--zip", "{zip}", "--role", "admin"], "argument --role: 'admin' is not an IAM role ARN"),
    (["deploy", "--function", "bad name", "--zip", "{zip}", "--role", "{role}"], "is not a Lambda function name"),
    (["deploy", "--function", "f", "--role", "{role}"], "one of the arguments --zip --image-uri is required"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--image-uri", "x"],
     "argument --image-uri: not allowed with argument --zip"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--arch", "aarch64"],
     "argument --arch: invalid choice: 'aarch64'"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--memory", "64"],
     "argument --memory: must be 128 to 10,240 MB, got 64"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--memory", "10241"],
     "argument --memory: must be 128 to 10,240 MB, got 10,241"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--timeout", "901"],
     "argument --timeout: must be 1 to 900 seconds, got 901"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--env", "NOVALUE"],
     "argument --env: expected KEY=VALUE, got 'NOVALUE'"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--env", "AWS_REGION=x"],
     "environment variable AWS_REGION is reserved"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{missing}"], "argument --zip: no such file"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{notzip}"], "argument --zip: not a zip file"),
    (["deploy", "--function", "f", "--role", "{role}", "--zip", "{zip}", "--max-event-age", "30"],
     "argument --max-event-age: must be 60 to 21,600 seconds, got 30"),
])
def test_cli_rejects_bad_arguments(argv, message, tmp_path, capsys):
    fill = {"zip": str(_zip(tmp_path / "f.zip")), "role": f"arn:aws:iam::{ACCOUNT}:role/r",
            "missing": str(tmp_path / "nope.zip"), "notzip": str(tmp_path / "plain.txt")}
    (tmp_path / "plain.txt").write_text("not a zip")
    with pytest.raises(SystemExit) as info:
        cli_main(["lambda"] + [a.format(**fill) for a in argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


# -- build without downloads -------------------------------------------------------------------

def test_platform_tags_follow_the_runtime_glibc():
    x86 = D.platform_tags("x86_64", "3.11")
    assert x86[0] == "manylinux2014_x86_64" and x86[-1] == "manylinux_2_26_x86_64"
    assert "manylinux_2_28_x86_64" not in x86  # Amazon Linux 2 has glibc 2.26
    assert D.platform_tags("x86_64", "3.12")[-1] == "manylinux_2_34_x86_64"  # Amazon Linux 2023
    cmd = D.pip_install_command("/tmp/site", ["pkg"], arch="arm64", python="3.11")
    platforms = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--platform"]
    assert platforms == D.platform_tags("arm64", "3.11")
    assert all(p.endswith("_aarch64") for p in platforms) and "manylinux2014_aarch64" in platforms
    for flag in ("--only-binary=:all:", "--no-compile"):
        assert flag in cmd
    for flag, value in (("--target", "/tmp/site"), ("--implementation", "cp"), ("--python-version", "3.11")):
        assert cmd[cmd.index(flag) + 1] == value
    assert cmd[-1] == "pkg"
    with pytest.raises(ConfigError, match="choose x86_64 or arm64"):
        D.platform_tags("ppc64le")


def _fake_tree(site: Path, big_bytes: int) -> None:
    """A site folder with a distribution 'big' holding one sparse file, and a small one."""
    for name, size in (("big", big_bytes), ("small", 1000)):
        (site / name).mkdir(parents=True)
        with open(site / name / "data.bin", "wb") as fh:
            fh.truncate(size)  # sparse: costs no disk
        info = site / f"{name}-1.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Name: {name}\nVersion: 1.0\n")
        (info / "RECORD").write_text(f"{name}/data.bin,,{size}\n{name}-1.0.dist-info/METADATA,,\n"
                                     f"{name}-1.0.dist-info/RECORD,,\n")


def test_check_limits_names_the_largest_packages(tmp_path):
    _fake_tree(tmp_path / "ok", 10 * D.MB)
    total, packages = D.check_limits(tmp_path / "ok")
    assert [name for name, _ in packages] == ["big 1.0", "small 1.0"]  # each with its dist-info
    assert 10 * D.MB < packages[0][1] < 10 * D.MB + 1000
    assert total == sum(size for _, size in packages)
    _fake_tree(tmp_path / "over", D.UNZIPPED_LIMIT + 5 * D.MB)
    with pytest.raises(D.LambdaLimitError) as info:
        D.check_limits(tmp_path / "over")
    text = str(info.value)
    assert "255.0 MB unzipped, over Lambda's 250.0 MB limit" in text
    assert "largest packages: big 1.0 255.0 MB, small 1.0 0.0 MB" in text
    assert info.value.largest[0][0] == "big 1.0" and info.value.unzipped > D.UNZIPPED_LIMIT


def test_build_over_the_limit_writes_nothing(tmp_path, monkeypatch):
    """The whole build up to the size check, with pip replaced by a fake tree: no zip, no
    temporary file, not even the output folder."""
    wheel = tmp_path / "cylon_store-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(D, "_project_wheel", lambda *a: wheel)
    monkeypatch.setattr(D, "_install_dependencies",
                        lambda site, spec, **kw: _fake_tree(site, D.UNZIPPED_LIMIT + D.MB))
    out = tmp_path / "out"
    with pytest.raises(D.LambdaLimitError, match=r"largest packages: big 1\.0 251\.0 MB.*Nothing was written"):
        D.build(out, layer=True, docker=True)
    assert not out.exists()


def test_zip_is_deterministic_and_records_its_build(tmp_path):
    site = tmp_path / "site"
    (site / "pkg").mkdir(parents=True)
    (site / "pkg" / "a.py").write_text("x = 1\n")
    (site / "pkg" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(site / "pkg" / "run.sh", 0o700)
    files = D._files(site)
    one = D._write_zip(site, files, tmp_path / "one.zip", "", json.dumps({"cylon-store-lambda": 1, "arch": "arm64"}))
    two = D._write_zip(site, files, tmp_path / "two.zip", "python/", json.dumps({"cylon-store-lambda": 1}))
    assert one.read_bytes() == D._write_zip(site, files, tmp_path / "again.zip", "",
                                            json.dumps({"cylon-store-lambda": 1, "arch": "arm64"})).read_bytes()
    with zipfile.ZipFile(one) as zf:
        modes = {i.filename: (i.external_attr >> 16) & 0o777 for i in zf.infolist()}
    assert modes == {"pkg/a.py": 0o644, "pkg/run.sh": 0o755}  # readable by Lambda's user
    with zipfile.ZipFile(two) as zf:
        assert zf.namelist() == ["python/pkg/a.py", "python/pkg/run.sh"]
    assert D.read_build_record(one)["arch"] == "arm64"
    assert D.read_build_record(_zip(tmp_path / "plain.zip")) is None


def test_elf_check_names_wrong_machine_and_missing_libraries(tmp_path):
    import pyarrow
    ext = next(Path(pyarrow.__file__).parent.glob("_csv.*.so"))
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / ext.name).write_bytes(ext.read_bytes())
    here, other = ("x86_64", "arm64") if os.uname().machine == "x86_64" else ("arm64", "x86_64")
    with pytest.raises(D.BuildError, match=r"would not load; missing libraries: _csv\..*needs libarrow"):
        D.check_elf(lonely, here)
    with pytest.raises(D.BuildError, match=f"1 shared object\\(s\\) are not built for {other}: _csv"):
        D.check_elf(lonely, other)


def test_dockerfile_template_is_the_canonical_one():
    canonical = (ROOT / "docker" / "lambda.Dockerfile").read_text()
    assert canonical == D.render_dockerfile()
    generated = D.render_dockerfile(python="3.11", extras="s3,dynamodb,redis",
                                    wheel="cylon_store-0.1.0-py3-none-any.whl",
                                    dockerfile="dist-lambda/cylon-store-lambda-py311.Dockerfile")
    # The same image: they differ only in what is copied in (source tree or built wheel) and in
    # the build command of the header.
    differ = [(a, b) for a, b in zip(canonical.splitlines(), generated.splitlines()) if a != b]
    assert len(canonical.splitlines()) == len(generated.splitlines())
    assert all(a.startswith(("#   docker build", "COPY", "RUN")) for a, _ in differ), differ
    for text in (canonical, generated):
        assert "FROM public.ecr.aws/lambda/python:3.11\n" in text
        assert 'CMD ["cylon_store.serverless.handler"]' in text
        assert '[s3,dynamodb,redis]" ' in text
    assert "COPY cylon_store-0.1.0-py3-none-any.whl /tmp/cylon-store/cylon_store-0.1.0-py3-none-any.whl" in generated
    assert "FROM public.ecr.aws/lambda/python:3.12\n" in D.render_dockerfile(python="3.12")


def test_repack_of_an_installed_distribution(tmp_path):
    """Without a source tree, build repacks the installed distribution's own files."""
    from importlib import metadata
    dist = next((d for d in metadata.distributions(name="cylon-store")
                 if any(str(f).endswith(".dist-info/METADATA") for f in d.files or ())
                 and any(str(f) == "cylon_store/__init__.py" for f in d.files or ())), None)
    if dist is None:
        pytest.skip("no installed (non-editable) cylon-store wheel")
    wheel = D.wheel_from_installed(dist, tmp_path)
    assert wheel.name == f"cylon_store-{dist.version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        for must in ("cylon_store/__init__.py", "cylon_store/kernel/join.py",
                     "cylon_store/adapters/memory.py", f"{info}/WHEEL", f"{info}/RECORD"):
            assert must in names, must
        assert not any("__pycache__" in n or n.endswith(".pyc") for n in names)
        rows = list(csv.reader(io.StringIO(zf.read(f"{info}/RECORD").decode())))
        assert {r[0] for r in rows} == names
        import base64
        import hashlib
        for name, digest, size in rows:
            if digest:
                data = zf.read(name)
                assert digest == "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
                assert int(size) == len(data)


# -- deploy on moto ---------------------------------------------------------------------------

def test_deploy_creates_then_updates(moto, tmp_path):
    lam = moto["lambda"]
    first = D.deploy("cs-create-update", role=moto["role"], zip_path=_zip(tmp_path / "a.zip"), client=lam)
    assert first["State"] == "Active" and first["LastUpdateStatus"] == "Successful"
    assert first["FunctionArn"] == f"arn:aws:lambda:us-east-1:{ACCOUNT}:function:cs-create-update"
    assert (first["Runtime"], first["Handler"]) == ("python3.11", "cylon_store.serverless.handler")
    assert (first["MemorySize"], first["Timeout"], first["Architectures"]) == (1769, 900, ["x86_64"])
    invoke = lam.get_function_event_invoke_config(FunctionName="cs-create-update")
    assert (invoke["MaximumRetryAttempts"], invoke["MaximumEventAgeInSeconds"]) == (0, D.DEFAULT_MAX_EVENT_AGE)

    second = D.deploy("cs-create-update", role=moto["role"], client=lam, memory_mb=3008, timeout_s=300,
                      zip_path=_zip(tmp_path / "b.zip", b"def handler(e, c):\n    return 2\n"),
                      env={"CYLON_STORE_COMPRESSION": "zstd"})
    assert second["CodeSha256"] != first["CodeSha256"]
    assert (second["MemorySize"], second["Timeout"]) == (3008, 300)
    assert second["Environment"]["Variables"] == {"CYLON_STORE_COMPRESSION": "zstd"}
    assert second["LastUpdateStatus"] == "Successful"
    # Without env, an update leaves the function's environment as it is.
    third = D.deploy("cs-create-update", role=moto["role"], client=lam, zip_path=tmp_path / "b.zip")
    assert third["Environment"]["Variables"] == {"CYLON_STORE_COMPRESSION": "zstd"}
    assert lam.get_function_event_invoke_config(FunctionName="cs-create-update")["MaximumRetryAttempts"] == 0


def test_deploy_takes_arch_and_runtime_from_the_build_record(moto, tmp_path):
    z = _zip(tmp_path / "arm.zip", record={"arch": "arm64", "python": "3.12"})
    config = D.deploy("cs-arm", role=moto["role"], zip_path=z, client=moto["lambda"], arch=None)
    assert config["Architectures"] == ["arm64"] and config["Runtime"] == "python3.12"
    with pytest.raises(ConfigError, match="arm.zip was built for arm64, not x86_64"):
        D.deploy("cs-arm", role=moto["role"], zip_path=z, client=moto["lambda"], arch="x86_64")


def test_big_zip_goes_through_the_code_bucket(moto, tmp_path, monkeypatch):
    big = _zip(tmp_path / "big.zip", random_bytes=D.ZIPPED_DIRECT_LIMIT + D.MB)
    with pytest.raises(ConfigError, match=r"big\.zip is 51\.0 MB, over the 50\.0 MB .*pass --code-bucket BUCKET"):
        D.deploy("cs-big", role=moto["role"], zip_path=big, client=moto["lambda"])
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto["endpoint"])
    with pytest.raises(D.DeployError, match="code bucket 'cs-no-such-bucket' does not exist"):
        D.deploy("cs-big", role=moto["role"], zip_path=big, client=moto["lambda"], code_bucket="cs-no-such-bucket")
    moto["s3"].create_bucket(Bucket="cs-code")
    config = D.deploy("cs-big", role=moto["role"], zip_path=big, client=moto["lambda"], code_bucket="cs-code")
    assert config["State"] == "Active" and config["CodeSize"] == big.stat().st_size
    keys = [o["Key"] for o in moto["s3"].list_objects_v2(Bucket="cs-code")["Contents"]]
    assert len(keys) == 1 and keys[0].startswith("cylon-store/lambda/cs-big/big-") and keys[0].endswith(".zip")


def test_deploy_an_image(moto, tmp_path):
    ecr = moto_server.client("ecr")
    ecr.create_repository(repositoryName="cylon-store-lambda")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7023,
                           "digest": "sha256:" + "a" * 64}, "layers": []}
    ecr.put_image(repositoryName="cylon-store-lambda", imageManifest=json.dumps(manifest), imageTag="v1")
    uri = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/cylon-store-lambda:v1"
    config = D.deploy("cs-image", role=moto["role"], image_uri=uri, client=moto["lambda"])
    assert config["PackageType"] == "Image" and config["State"] == "Active" and not config.get("Runtime")
    with pytest.raises(ConfigError, match="runs a container image; a function cannot switch"):
        D.deploy("cs-image", role=moto["role"], zip_path=_zip(tmp_path / "x.zip"), client=moto["lambda"])


def test_cli_deploy_prints_the_arn(moto, tmp_path):
    z = _zip(tmp_path / "cli.zip")
    proc = _run_cli(["lambda", "deploy", "--function", "cs-cli", "--role", moto["role"], "--zip", str(z),
                     "--memory", "512", "--env", "A=1", "B=two"], _moto_env(moto))
    assert proc.returncode == 0, proc.stderr
    assert f"deployed arn:aws:lambda:us-east-1:{ACCOUNT}:function:cs-cli" in proc.stdout
    assert 'cs.launch(fn, n, store="s3://BUCKET/PREFIX", launcher="lambda", function="cs-cli")' in proc.stdout
    assert "512 MB" in proc.stdout and "environment: A, B" in proc.stdout
    config = moto["lambda"].get_function_configuration(FunctionName="cs-cli")
    assert config["Environment"]["Variables"] == {"A": "1", "B": "two"}
    assert SECRET not in proc.stdout + proc.stderr

    # AWS says no: one line, no traceback, no credentials.
    proc = _run_cli(["lambda", "deploy", "--function", "cs-cli-norole", "--zip", str(z),
                     "--role", f"arn:aws:iam::{ACCOUNT}:role/does-not-exist"], _moto_env(moto))
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if not ln.startswith("... ")]
    assert len(errors) == 1 and errors[0].startswith(
        "cylon-store: error: creating Lambda function 'cs-cli-norole' (region us-east-1): "
        "InvalidParameterValueException"), proc.stderr
    assert "Traceback" not in proc.stderr and SECRET not in proc.stdout + proc.stderr


# -- real builds (pip downloads the Lambda platform's wheels) ---------------------------------

@pytest.mark.slow
def test_build_x86_64_fits_and_runs_on_its_own(tmp_path, monkeypatch):
    _plain_pypi(monkeypatch)
    out = tmp_path / "dist-lambda"
    result = D.build(out, layer=True, docker=True)
    assert result.verified, result.verify_note
    assert result.unzipped_bytes < D.UNZIPPED_LIMIT
    assert result.zip_path == out / "cylon-store-lambda-py311-x86_64.zip"
    assert result.zipped_bytes == result.zip_path.stat().st_size
    assert [n for n, _ in result.largest][:2] == [f"pyarrow {_version(result, 'pyarrow')}",
                                                  f"numpy {_version(result, 'numpy')}"]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        result.zip_path.name, result.layer_path.name, result.dockerfile_path.name, result.wheel_path.name])
    assert result.dockerfile_path.read_text() == D.render_dockerfile(
        python="3.11", wheel=result.wheel_path.name, dockerfile=result.dockerfile_path)

    with zipfile.ZipFile(result.zip_path) as zf:
        names = zf.namelist()
        assert sum(i.file_size for i in zf.infolist()) == result.unzipped_bytes
        assert D.read_build_record(result.zip_path)["arch"] == "x86_64"
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        listed = {row[0] for r in records for row in csv.reader(io.StringIO(zf.read(r).decode())) if row}
        zf.extractall(tmp_path / "extracted")
    with zipfile.ZipFile(result.layer_path) as zf:
        assert zf.namelist() == ["python/" + n for n in names]
    assert "cylon_store/serverless/__init__.py" in names and "cylon_store/kernel/join.py" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith((".pyc", ".pyx", ".pxd", ".h", ".a"))]
    assert not [n for n in names if n.endswith("direct_url.json")]  # no build-machine paths
    assert not [n for n in names if "/tests/" in n or n.startswith(("pyarrow/include/", "pyarrow/src/", "bin/"))]
    assert not [n for n in names if n.split("/")[0] in ("boto3", "botocore", "s3transfer", "urllib3", "dateutil")]
    assert listed == set(names), "every RECORD lists exactly the files that remain"
    # The artifact itself, not only the tree it was made from, runs on its own.
    assert "join/groupby/sort on 2 ranks" in D.verify(tmp_path / "extracted")

    summary = D.format_summary(result)
    assert "next:\n  cylon-store lambda deploy --function cylon-store --role" in summary
    assert f"--zip {D._shell_path(result.zip_path)} --arch x86_64" in summary


def _version(result, name):
    return next(n.split()[1] for n, _ in result.packages if n.split()[0] == name)


@pytest.mark.slow
def test_build_arm64_on_any_machine(tmp_path, monkeypatch):
    _plain_pypi(monkeypatch)
    result = D.build(tmp_path, arch="arm64", extras="")
    assert result.zip_path.name == "cylon-store-lambda-py311-arm64.zip"
    assert result.unzipped_bytes < D.UNZIPPED_LIMIT and D.read_build_record(result.zip_path)["arch"] == "arm64"
    if os.uname().machine == "x86_64":
        assert not result.verified and "arm64 build on an x86_64 machine" in result.verify_note
    with zipfile.ZipFile(result.zip_path) as zf:
        lib = next(n for n in zf.namelist() if n.startswith("pyarrow/lib.cpython-311-") and n.endswith(".so"))
        assert "aarch64" in lib
        data = zf.read(lib)
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[0x12:0x14], "little") == 183  # EM_AARCH64
