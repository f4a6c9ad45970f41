"""Reference S3 client for ckpt-bench: boto3 upload_file / download_file of
the same number of bytes to the same server, median of several runs.

Reads CKPT_TEST_S3_ENDPOINT, CKPT_TEST_S3_BUCKET, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY (as written by scripts/s3-server.sh). Prints one JSON
object.
"""
import json
import os
import statistics
import sys
import tempfile
import time

import boto3
from boto3.s3.transfer import TransferConfig


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 2 << 30
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    s3 = boto3.client(
        "s3",
        endpoint_url=os.environ["CKPT_TEST_S3_ENDPOINT"],
        aws_access_key_id=os.environ["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["AWS_SECRET_ACCESS_KEY"],
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
    )
    bucket = os.environ["CKPT_TEST_S3_BUCKET"]
    # Same part size and parallelism as ckpt's ObjectTier defaults.
    cfg = TransferConfig(multipart_chunksize=16 << 20, max_concurrency=4, multipart_threshold=16 << 20)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR", "/tmp")) as d:
        src = os.path.join(d, "src.bin")
        dst = os.path.join(d, "dst.bin")
        with open(src, "wb") as f:
            chunk = os.urandom(16 << 20)
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        up, down = [], []
        for i in range(iters):
            key = f"bench-boto3/{os.getpid()}-{i}"
            t = time.perf_counter()
            s3.upload_file(src, bucket, key, Config=cfg)
            up.append(time.perf_counter() - t)
            t = time.perf_counter()
            s3.download_file(bucket, key, dst, Config=cfg)
            down.append(time.perf_counter() - t)
            s3.delete_object(Bucket=bucket, Key=key)
    print(json.dumps({
        "bench": "s3-reference",
        "client": f"boto3 {boto3.__version__}",
        "bytes": size,
        "iters": iters,
        "upload_s": statistics.median(up),
        "download_s": statistics.median(down),
        "upload_mib_s": size / statistics.median(up) / (1 << 20),
        "download_mib_s": size / statistics.median(down) / (1 << 20),
    }))


if __name__ == "__main__":
    main()
