"""Bulk detection at scale: manifests instead of listings (plain list, CSV, S3 Inventory CSV and Parquet,
an inventory manifest.json on S3), checked against the listing of the same objects on a moto S3 server;
the listing and the anti-join with the ledger run in Ray tasks, never in the driver; an incremental
re-run from a manifest finds nothing new."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
from urllib.parse import quote_plus

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from s3_server import moto_s3, ray_local, s3_bucket  # noqa: F401

from ssd_core.bulk import detect_bucket, ledger, listing, manifest, pending

ARCH = "ssdlite320_mobilenet_v3_large"
KEYS = ["in/a.jpg", "in/sub/b c+d.PNG", "in/sub/deeper/e.jpeg", "in/no_extension", "in/notes.txt", "in/.hidden.jpg",
        "in/sub/f.webp"]


def put_objects(endpoint: str, bucket: str) -> None:
    client = boto3.client("s3", endpoint_url=endpoint)
    for index, key in enumerate(KEYS):
        client.put_object(Bucket=bucket, Key=key, Body=b"x" * (10 + index))
    client.put_object(Bucket=bucket, Key="in/sub/", Body=b"")  # a folder placeholder, as consoles make


def rows(table) -> list[tuple]:
    return sorted(zip(*(table[name].to_pylist() for name in ("image_uri", "size_bytes", "etag", "sniff"))))


def read(uri: str, input_uri: str | None = None):
    files = manifest.manifest_files(uri)
    return pa.concat_tables([manifest.read_manifest_file(file, input_uri) for file in files])


def test_manifest_formats_match_the_listing(moto_s3, s3_bucket, tmp_path):  # noqa: F811
    put_objects(moto_s3, s3_bucket)
    listed = listing.list_images(f"s3://{s3_bucket}/in")
    assert len(listed) == 5  # a, b c+d, e, no_extension, f
    objects = boto3.client("s3", endpoint_url=moto_s3).list_objects_v2(Bucket=s3_bucket)["Contents"]
    inventory = [(o["Key"], o["Size"], o["ETag"].strip('"'), o["LastModified"]) for o in objects]

    # Plain list of URIs and keys relative to --input: same objects; a plain list has no size or ETag.
    lines = [f"s3://{s3_bucket}/{k}" for k, *_ in inventory[:3]] + [k.removeprefix("in/") for k, *_ in inventory[3:]]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n\n")
    plain = read(str(tmp_path / "list.txt"), f"s3://{s3_bucket}/in")
    assert plain["image_uri"].to_pylist() == listed["image_uri"].to_pylist()
    assert plain["sniff"].to_pylist() == listed["sniff"].to_pylist()

    # A CSV with a header (keys relative to --input, numbers-looking ETags stay text).
    csv = "key,size,etag\n" + "".join(f"{k.removeprefix('in/')},{s},\"{e}\"\n" for k, s, e, _ in inventory
                                      if k.startswith("in/"))
    (tmp_path / "objects.csv").write_text(csv)
    assert rows(read(str(tmp_path / "objects.csv"), f"s3://{s3_bucket}/in")) == rows(listed)

    # An S3 Inventory CSV data file: gzip, no header, URL-encoded keys.
    def inventory_csv(columns: list[str]) -> bytes:
        out = io.StringIO()
        for key, size, etag, modified in inventory:
            values = {"Bucket": s3_bucket, "Key": quote_plus(key, safe="/"), "Size": size, "ETag": etag,
                      "LastModifiedDate": modified.isoformat(), "VersionId": "v1", "IsLatest": "true",
                      "IsDeleteMarker": "false", "StorageClass": "STANDARD"}
            out.write(",".join(f'"{values[c]}"' for c in columns) + "\n")
        return gzip.compress(out.getvalue().encode())

    (tmp_path / "inventory.csv.gz").write_bytes(inventory_csv(manifest.INVENTORY_CSV_COLUMNS))
    assert rows(read(str(tmp_path / "inventory.csv.gz"))) == rows(listed)

    # An S3 Inventory Parquet data file (snake_case columns), with an older version that must not count.
    parquet = pa.table({
        "bucket": [s3_bucket] * (len(inventory) + 1),
        "key": [k for k, *_ in inventory] + ["in/a.jpg"],
        "version_id": ["v2"] * len(inventory) + ["v1"],
        "is_latest": [True] * len(inventory) + [False],
        "size": [s for _, s, *_ in inventory] + [999],
        "e_tag": [e for _, _, e, _ in inventory] + ["old"],
    })
    pq.write_table(parquet, tmp_path / "inventory.parquet")
    assert rows(read(str(tmp_path / "inventory.parquet"))) == rows(listed)

    # An inventory manifest.json on S3 naming two CSV data files, with version columns in its fileSchema.
    client = boto3.client("s3", endpoint_url=moto_s3)
    schema = ["Bucket", "Key", "VersionId", "IsLatest", "IsDeleteMarker", "Size", "LastModifiedDate", "ETag",
              "StorageClass"]
    data = inventory_csv(schema)
    lines_gz = gzip.decompress(data).splitlines(keepends=True)
    files = []
    for index, chunk in enumerate((lines_gz[:3], lines_gz[3:])):
        key = f"inventory/{s3_bucket}/daily/data/part-{index}.csv.gz"
        body = gzip.compress(b"".join(chunk))
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
        files.append({"key": key, "size": len(body), "MD5checksum": "unused"})
    document = {"sourceBucket": s3_bucket, "destinationBucket": f"arn:aws:s3:::{s3_bucket}", "version": "2016-11-30",
                "fileFormat": "CSV", "fileSchema": ", ".join(schema), "files": files}
    client.put_object(Bucket=s3_bucket, Key=f"inventory/{s3_bucket}/daily/2024-01-01T00-00Z/manifest.json",
                      Body=json.dumps(document).encode())
    uri = f"s3://{s3_bucket}/inventory/{s3_bucket}/daily/2024-01-01T00-00Z/manifest.json"
    assert [f.format for f in manifest.manifest_files(uri)] == ["inventory-csv", "inventory-csv"]
    assert rows(read(uri)) == rows(listed)


def test_manifest_errors_name_the_file(tmp_path):
    pq.write_table(pa.table({"name": ["a.jpg"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="bad.parquet: no column naming the objects"):
        read(str(tmp_path / "bad.parquet"))
    (tmp_path / "keys.txt").write_text("a.jpg\n")
    with pytest.raises(ValueError, match="relative key"):
        read(str(tmp_path / "keys.txt"))
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        manifest.manifest_files(str(tmp_path / "missing.csv"))


def commit_all(output: str, table, digest: str, rows_per_block: int) -> None:
    """Commit every listing row to ``output``'s ledger as detect would (images files only, no boxes)."""
    n = table.num_rows
    stamp = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
    for start in range(0, n, rows_per_block):
        part = table.slice(start, rows_per_block)
        m = part.num_rows
        block = ledger.block_id_of(part["image_uri"].to_pylist(), part["etag"].to_pylist(), digest)
        images = pa.table({
            "image_uri": part["image_uri"], "size_bytes": part["size_bytes"], "etag": part["etag"],
            "width": pa.array([8] * m, pa.int32()), "height": pa.array([8] * m, pa.int32()),
            "num_detections": pa.array([0] * m, pa.int32()), "status": ["ok"] * m,
            "error": pa.array([None] * m, pa.string()), "model": [ARCH] * m, "weights_digest": [digest] * m,
            "block_id": [block] * m, "processed_at": pa.array([stamp] * m, pa.timestamp("us", tz="UTC")),
        }, schema=ledger.images_schema())
        ledger.commit_block(output, "seed", block, ledger.detections_schema().empty_table(), images)


def test_pending_is_found_in_ray_tasks_in_bounded_parts(tmp_path, monkeypatch, ray_local):  # noqa: F811
    """The driver never lists, reads a manifest or the ledger, nor anti-joins: those functions raise in
    this process (Ray's workers are other processes and use the real ones). What comes back is object
    references to parts, each smaller than the whole, and blocks of at most the asked rows."""
    import ray

    root = tmp_path / "in"
    names = [f"d{d}/s{s}/img{i:03d}.jpg" for d in range(3) for s in range(2) for i in range(40)] + ["top.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    reference = listing.list_images(str(root))
    digest = ledger.weights_digest(None, ARCH)
    output = str(tmp_path / "out")
    commit_all(output, reference.slice(0, 200), digest, rows_per_block=16)
    expected_pending = set(reference["image_uri"].to_pylist()[200:])

    def forbidden(*args, **kwargs):
        raise AssertionError("called in the driver")

    for module, name in ((listing, "list_images"), (listing, "list_top_level"), (manifest, "read_manifest_file"),
                         (ledger, "read_ledger"), (ledger, "pending_objects")):
        monkeypatch.setattr(module, name, forbidden)
    found = pending.find_pending(str(root), output, digest, partitions=4)
    assert (found.num_seen, found.num_rows) == (len(names), len(names) - 200)
    assert all(isinstance(ref, ray.ObjectRef) for ref in found.refs)
    parts = ray.get(found.refs)
    assert all(part.num_rows < found.num_rows for part in parts) and len(parts) > 1
    assert {uri for part in parts for uri in part["image_uri"].to_pylist()} == expected_pending
    assert sum(part.num_rows for part in parts) == len(expected_pending)
    pending_rows = [row for part in parts for row in rows(part)]
    assert sorted(pending_rows) == [row for row in rows(reference) if row[0] in expected_pending]
    blocks = found.dataset(block_rows=7).iter_batches(batch_size=None, batch_format="pyarrow")
    sizes = [len(block) for block in blocks]
    assert sum(sizes) == len(expected_pending) and max(sizes) <= 7


def test_incremental_rerun_from_a_manifest_finds_nothing_new(moto_s3, s3_bucket, tmp_path, ray_local):  # noqa: F811
    """A manifest and a listing of the same objects are interchangeable: after a ledger of the listing,
    the manifest's run has nothing to do; a changed ETag in the manifest is new again."""
    put_objects(moto_s3, s3_bucket)
    listed = listing.list_images(f"s3://{s3_bucket}/in")
    digest = ledger.weights_digest(None, ARCH)
    output = f"s3://{s3_bucket}/out"
    commit_all(output, listed, digest, rows_per_block=2)
    inventory = pa.table({
        "bucket": [s3_bucket] * len(listed),
        "key": [uri.removeprefix(f"s3://{s3_bucket}/") for uri in listed["image_uri"].to_pylist()],
        "size": listed["size_bytes"], "e_tag": listed["etag"],
    })
    with pa.BufferOutputStream() as sink:
        pq.write_table(inventory, sink)
        body = sink.getvalue().to_pybytes()
    boto3.client("s3", endpoint_url=moto_s3).put_object(Bucket=s3_bucket, Key="manifests/all.parquet", Body=body)
    summary = detect_bucket(None, output, input_manifest=f"s3://{s3_bucket}/manifests/all.parquet", arch=ARCH,
                            progress=False)
    assert (summary["images_seen"], summary["images_new"], summary["images_skipped"]) == (len(listed), 0, len(listed))
    assert summary["model"] == ARCH
    changed = inventory.set_column(3, "e_tag", pa.array(["changed"] + listed["etag"].to_pylist()[1:]))
    pq.write_table(changed, tmp_path / "changed.parquet")
    found = pending.find_pending(None, output, digest, manifest_uri=str(tmp_path / "changed.parquet"),
                                 storage_options={"endpoint_url": moto_s3})
    assert found.num_rows == 1
