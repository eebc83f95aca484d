"""Object storage on S3-compatible servers (AWS S3, MinIO, SeaweedFS): the only package that imports boto3/botocore.

It owns the client settings (path-style addressing, checksums only where S3
requires them, timeouts, retries with backoff), bucket set-up and reachability
checks with errors a person can act on, and the streaming multipart upload the
decode stage pours MP4 bytes into.

``StreamingMultipartUpload`` lifecycle:

1. ``write(data)`` buffers; whenever ``part_size`` bytes are buffered one part
   is uploaded (the multipart upload itself is created with the first part, so
   an object smaller than one part becomes a single ``PutObject``);
2. ``complete()`` uploads the rest as the last part and completes the upload --
   only now does the object appear, whole, at its key (S3 semantics), so a
   retried job overwrites instead of duplicating;
3. ``abort()`` (or leaving a ``with`` block by an exception, or without
   ``complete()``) aborts the multipart upload, so no orphan parts are billed
   or left behind.

One package, three modules (``client``: settings, errors, retries; ``objects``: buckets and whole
objects; ``multipart``: the streaming upload): boto3 enters the project through this package only
(an import contract in pyproject.toml), and everything else imports from the package itself.
"""


from scheduler.core.object_store.client import (
    DEFAULT_PART_SIZE,
    DEFAULT_RETRY_SECONDS,
    MAX_PART_SIZE,
    MAX_PARTS,
    MIN_PART_SIZE,
    IncompleteUpload,
    MiB,
    ObjectStoreError,
    S3Client,
    S3Config,
    UploadResult,
    make_s3_client,
)
from scheduler.core.object_store.multipart import StreamingMultipartUpload
from scheduler.core.object_store.objects import (
    ObjectHead,
    abort_incomplete_uploads,
    check_reachable,
    delete_objects,
    delete_objects_under,
    download_to,
    ensure_bucket,
    get_bytes,
    head_object,
    iter_object,
    list_bucket_names,
    list_incomplete_uploads,
    object_exists,
    put_bytes,
    remove_bucket,
    s3_uri,
)

__all__ = [
    "DEFAULT_PART_SIZE",
    "DEFAULT_RETRY_SECONDS",
    "MAX_PARTS",
    "MAX_PART_SIZE",
    "MIN_PART_SIZE",
    "IncompleteUpload",
    "MiB",
    "ObjectHead",
    "ObjectStoreError",
    "S3Client",
    "S3Config",
    "StreamingMultipartUpload",
    "UploadResult",
    "abort_incomplete_uploads",
    "check_reachable",
    "delete_objects",
    "delete_objects_under",
    "download_to",
    "ensure_bucket",
    "get_bytes",
    "head_object",
    "iter_object",
    "list_bucket_names",
    "list_incomplete_uploads",
    "make_s3_client",
    "object_exists",
    "put_bytes",
    "remove_bucket",
    "s3_uri",
]
