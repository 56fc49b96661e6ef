"""Suite-wide settings, and the local S3 server of the object-store tests."""

import os
import socket
import uuid

import pytest

# Two cores are shared by the test process and, in integration tests, Ray workers: one torch
# thread per process avoids oversubscription (measured: unit tests 3x slower without it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


# ---------------------------------------------------------------------------------------------
# A real S3-protocol server on the loopback address, for run directories on object storage
# ---------------------------------------------------------------------------------------------

#: the variables an S3 client reads (pyarrow's S3FileSystem, boto3); set while the server runs
S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture(scope="session")
def s3_server():
    """moto's server mode (``moto[server]``, in the dev extra) on 127.0.0.1 and a free port, with
    the standard AWS variables pointing at it; yields its endpoint URL. Skips, saying why, when
    moto is not installed."""
    pytest.importorskip("moto.server",
                        reason="moto[server] is not installed (pip install 'moto[server]', or the "
                               "dev extra): the object-store tests need a local S3 server")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, tmp_path, monkeypatch):
    """A fresh bucket on the local S3 server (its name), with the run cache in ``tmp_path``."""
    import pyarrow.fs as pafs

    name = f"hmn-{uuid.uuid4().hex[:12]}"
    pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True).create_dir(name)
    monkeypatch.setenv("HMN_RUN_CACHE", str(tmp_path / "cache"))
    return name
