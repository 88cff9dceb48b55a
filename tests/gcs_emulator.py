"""Run ``gcp-storage-emulator`` in memory with the generation semantics TensorStore relies on.

The emulator ignores the ``ifGenerationMatch`` / ``ifGenerationNotMatch`` preconditions and sends no
``x-goog-generation`` header with a download; orbax's OCDBT manifest reads need both (a conditional
re-read of an unchanged object must answer 304, and every read must name its generation). This
launcher adds them before the server builds its routes:

    python tests/gcs_emulator.py PORT BUCKET
"""

import sys
from http import HTTPStatus

from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _condition(request, name):
    value = request.query.get(name)
    return None if not value else value[0]


def _current(storage, request, bucket, name):
    try:
        return storage.get_file_obj(bucket, name)
    except NotFound:
        return None


def _failed_precondition(request, obj):
    """True when the request's generation preconditions do not hold for ``obj`` (None: no object)."""
    generation = obj["generation"] if obj else "0"
    match, not_match = _condition(request, "ifGenerationMatch"), _condition(request, "ifGenerationNotMatch")
    return (match is not None and match != generation) or (not_match is not None and not_match == generation)


_download, _insert = objects.download, objects.insert


def download(request, response, storage, *args, **kwargs):
    obj = _current(storage, request, request.params["bucket_name"], request.params["object_id"])
    if obj is not None:
        if _condition(request, "ifGenerationNotMatch") == obj["generation"]:
            response.status = HTTPStatus.NOT_MODIFIED
            response["x-goog-generation"] = obj["generation"]
            return
        if _failed_precondition(request, obj):
            response.status = HTTPStatus.PRECONDITION_FAILED
            return
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj.get("metageneration", "1")
    return _download(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
    name = (request.query.get("name") or [None])[0]
    if name is not None and _failed_precondition(request, _current(storage, request, request.params["bucket_name"], name)):
        response.status = HTTPStatus.PRECONDITION_FAILED
        return
    return _insert(request, response, storage, *args, **kwargs)


objects.download, objects.insert = download, insert

if __name__ == "__main__":
    from gcp_storage_emulator.server import create_server  # builds its routes from the patched handlers

    port, bucket = int(sys.argv[1]), sys.argv[2]
    create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
