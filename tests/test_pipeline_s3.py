"""S3 round trip: images read from and certificates written to a real S3 endpoint (moto on
127.0.0.1), then a resumed run that finds every shard done. Ray is started by the run itself,
after the test has pointed the AWS environment at the endpoint, so its workers inherit it."""

from __future__ import annotations

import io
import json

import boto3
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from pipeline.cli import main

pytestmark = pytest.mark.slow


def test_certify_from_and_to_s3_with_resume(s3_env, s3_server, cifar10_test_dir, resnet20_checkpoint):
    import ray

    assert not ray.is_initialized()
    client = boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1")
    uploaded = []
    for folder in sorted(p for p in cifar10_test_dir.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir())[:3]:
            key = f"data/cifar/{folder.name}/{path.name}"
            client.put_object(Bucket=s3_env, Key=key, Body=path.read_bytes())
            uploaded.append(f"{folder.name}/{path.name}")
    client.put_object(Bucket=s3_env, Key="models/resnet20.th",
                      Body=resnet20_checkpoint.read_bytes())
    args = ["certify", "--quiet", "--data", f"s3://{s3_env}/data/cifar", "--model",
            "cifar_resnet20", "--checkpoint", f"s3://{s3_env}/models/resnet20.th", "--patch", "5",
            "--method", "scalecert", "--method", "masking", "--out", f"s3://{s3_env}/runs/r1",
            "--shard-size", "12", "--s3-endpoint", s3_server.endpoint]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output + repr(first.exception)

    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_env, Prefix="runs/r1/")["Contents"])
    assert keys == ["runs/r1/certificates/part-00000.parquet", "runs/r1/certificates/part-00001.parquet",
                    "runs/r1/certificates/part-00002.parquet", "runs/r1/manifest.json"]
    manifest = json.loads(client.get_object(Bucket=s3_env, Key="runs/r1/manifest.json")["Body"].read())
    assert manifest["dataset"]["images"] == 30 and manifest["checkpoint_sha256"].startswith("12fca82f")
    rows = []
    for key in keys[:3]:
        body = client.get_object(Bucket=s3_env, Key=key)["Body"].read()
        rows += pq.read_table(io.BytesIO(body)).to_pylist()
    assert sorted({r["image_id"] for r in rows}) == sorted(uploaded)
    assert len(rows) == 60 and all(r["status"] == "ok" for r in rows)
    assert not ray.is_initialized()  # the run shut down the Ray it started

    etags = {k: client.head_object(Bucket=s3_env, Key=k)["ETag"] for k in keys}
    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output + repr(second.exception)
    assert "3 of 3 shards already done" in second.output
    assert {k: client.head_object(Bucket=s3_env, Key=k)["ETag"] for k in keys} == etags
