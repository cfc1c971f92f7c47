"""MLflow URIs wherever prance takes a checkpoint or selector path.

``runs:/<run_id>/<path>`` (e.g. a sweep trial's ``runs:/<id>/selector``) and
``models:/<name>/<version>`` (or ``models:/<name>@<alias>``) are downloaded with
``mlflow.artifacts.download_artifacts`` from the tracking store ``tracking_uri``
(default: ``$PRANCE_MLFLOW_URI``, ``$MLFLOW_TRACKING_URI``, else the sweep's default
``sqlite:///runs/sweeps/mlflow.db``); the Model Registry is the same store. A folder is
reduced to the one ``.safetensors`` file it holds (``prefer`` wins when there are several).
Anything else is returned as it is: a local path.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from prance.errors import PranceError, first_line

SCHEMES = ("runs:/", "models:/")


def is_mlflow_uri(path: str | os.PathLike | None) -> bool:
    return isinstance(path, str) and path.strip().startswith(SCHEMES)


def add_mlflow_uri_arg(parser) -> None:
    """``--mlflow-uri`` of every command that takes a runs:/ or models:/ path (the errors of
    :func:`check_store` name it)."""
    parser.add_argument("--mlflow-uri", help="tracking store for runs:/ and models:/ paths (default $PRANCE_MLFLOW_URI, "
                                             "$MLFLOW_TRACKING_URI, else sqlite:///runs/sweeps/mlflow.db)")


def default_tracking_uri() -> str:
    from prance import tracking

    uri = os.environ.get("PRANCE_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    return tracking.resolve_uri(uri, "runs/sweeps") if uri else tracking.default_uri("runs/sweeps")


def check_store(uri: str) -> None:
    """PranceError when the tracking store cannot answer: a server that does not respond, a
    sqlite database that does not exist (MLflow would create an empty one and then say the
    run is not found)."""
    from prance import tracking

    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_absolute():
            db = db.resolve()
        if not db.is_file():
            raise PranceError(f"MLflow store {uri} does not exist (pass --mlflow-uri, or set PRANCE_MLFLOW_URI)")
        return
    tracking.check_reachable(uri)


def local_path(path: str, tracking_uri: str | None = None, prefer: str | None = None, what: str = "artifact") -> str:
    """``path`` itself, or for an MLflow URI the downloaded local file."""
    if not is_mlflow_uri(path):
        return path
    path = path.strip()
    uri = tracking_uri or default_tracking_uri()
    check_store(uri)
    import mlflow.artifacts

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one JSON value on stdout, no bars
    dst = tempfile.mkdtemp(prefix="prance-mlflow-")
    import mlflow

    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    try:  # models:/ resolves through the process-wide registry URI whatever download_artifacts is passed
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=path, dst_path=dst, tracking_uri=uri, registry_uri=uri))
    except Exception as e:  # unknown run or model, missing artifact, store errors: one line
        raise PranceError(f"cannot fetch {what} {path} from MLflow store {uri}: {first_line(e)}") from None
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])
    if local.is_dir():
        found = sorted(local.rglob("*.safetensors"))
        if prefer is not None and any(f.name == prefer for f in found):
            found = [f for f in found if f.name == prefer]
        if len(found) != 1:
            names = ", ".join(f.name for f in found) or "none"
            raise PranceError(f"{what} {path} is a folder with {len(found)} .safetensors files ({names}): name the file in the URI")
        local = found[0]
    return str(local)
