"""A fresh machine that knows only the bucket and the MLflow server's URL reads what the runs left.

    python -m scripts.rehearsal.reader STORAGE_URI MLFLOW_URL NAME [NAME ...]

For each search or sweep NAME: its trial table, zoo record (with the zoo's manifest) and
placement from the storage; its MLflow parent run, the parent's files (tables, plot) and the
best trial's distilled set and grid from the server (artifacts proxied to the bucket). Prints
one JSON object; exit 1 if anything is missing or unreadable.
"""
from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path


def read(storage: str, mlflow_url: str, name: str) -> dict:
    import pyarrow.parquet as pq
    from mlflow.tracking import MlflowClient

    from dsdm.synthetic import SyntheticSet
    from tune.recorder import SEARCH_TAG, TRIAL_TAG
    from tune.resume import search_id_of
    from tune.storage import Storage

    store = Storage(storage, None)
    out: dict = {"name": name, "problems": []}
    table = pq.read_table(io.BytesIO(store.read_bytes(name, "trials.parquet"))).to_pandas()
    out["trials"] = len(table)
    out["done"] = int((table["status"] == "DONE").sum())
    out["table_md"] = len(store.read_text(name, "trials.md").splitlines())
    zoo = json.loads(store.read_text(f"{name}.zoo.json"))
    out["zoo_files"] = len(zoo.get("manifest", {}).get("files", {}))
    if not out["zoo_files"]:
        out["problems"].append("zoo record without the zoo's manifest")
    client = MlflowClient(tracking_uri=mlflow_url)
    search_id = search_id_of(store, name)
    runs = [r for e in client.search_experiments() for r in
            client.search_runs([e.experiment_id], filter_string=f"tags.`{SEARCH_TAG}` = '{search_id}'")]
    parent = next((r for r in runs if TRIAL_TAG not in r.data.tags), None)
    if parent is None:
        out["problems"].append("no MLflow parent run")
        return out
    out["parent_files"] = sorted(a.path for a in client.list_artifacts(parent.info.run_id))
    if not any(f.endswith((".md", ".parquet")) for f in out["parent_files"]):
        out["problems"].append("the parent run has no tables")
    best = table[table["status"] == "DONE"].iloc[0]["trial_id"]
    trial = next((r for r in runs if r.data.tags.get(TRIAL_TAG) == best), None)
    if trial is None:
        out["problems"].append(f"no MLflow run for trial {best}")
        return out
    with tempfile.TemporaryDirectory() as folder:
        path = client.download_artifacts(trial.info.run_id, "distilled.pt", folder)
        synset = SyntheticSet.load(Path(path))
        out["best_set"] = list(synset.images.shape)
        grid = Path(client.download_artifacts(trial.info.run_id, "grid.png", folder)).read_bytes()
        out["grid_png"] = grid[:8] == b"\x89PNG\r\n\x1a\n"
        for f in out["parent_files"]:
            if f.endswith(".png"):
                out["plot_png"] = Path(client.download_artifacts(parent.info.run_id, f, folder)).read_bytes()[:4] == b"\x89PNG"
    out["artifact_uri"] = trial.info.artifact_uri
    if mlflow_url.startswith("http") and not out["artifact_uri"].startswith("mlflow-artifacts:"):
        out["problems"].append(f"artifacts at {out['artifact_uri']}, not through the server")
    return out


def main(argv: list[str]) -> int:
    storage, url, names = argv[0], argv[1], argv[2:]
    results = []
    for name in names:
        try:
            results.append(read(storage, url, name))
        except Exception as exc:  # report, do not stop: every name is read
            results.append({"name": name, "problems": [f"{type(exc).__name__}: {str(exc)[:300]}"]})
    print(json.dumps(results, default=str))
    return 1 if any(r["problems"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
