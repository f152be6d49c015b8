"""The trial table of a Tune run (numbers, one row per trial), its files, and the placement record."""
from __future__ import annotations

import io
import json
import posixpath

from tune.faults import fault_point
from tune.storage import Storage
from tune.trainable import ERROR_KEY, SET_FILE, trial_number_of


def trial_table(results, space_keys: list[str]):
    """One row per trial: sampled params, objective, reporting metrics, time, where its set is.

    Rows run best first: highest validation accuracy, a tie going to the trial started first (`trial`,
    Tune's trial number), so the best trial is the same on every read of the same results. `set_path`
    is relative to the Tune run's folder (where trials.md lies)."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id", r.path.split("/")[-1] if r.path else "?")}
        row["trial"] = trial_number_of(r.path or "", row["trial_id"])
        row.update({k.split(".")[-1]: (r.config or {}).get(k) for k in space_keys})
        row.update({"val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "test_std": m.get("test_std"),
                    "iteration": m.get("iteration"), "seconds": m.get("time_total_s"),
                    "distill_s": m.get("distill_seconds"), "eval_s": m.get("eval_seconds"),
                    "cache_fill_s": m.get("phase_seconds/cache_fill"), "peak_rss_mb": m.get("peak_rss_mb"),
                    **({"peak_cuda_mb": m["peak_cuda_mb"]} if "peak_cuda_mb" in m else {}),
                    "resumed_from": m.get("resumed_from"), "zoo_pretrain_calls": m.get("zoo_pretrain_calls"),
                    "node": (m.get("node") or "")[:12], "reused_from": m.get("reused_from") or "",
                    "status": "ERROR" if (r.error or m.get(ERROR_KEY)) else ("DONE" if "test_acc" in m else "STOPPED"),
                    "error": m.get(ERROR_KEY) or "",
                    # where the set lies under the run's folder, for a reader; code reads it through the checkpoint
                    "set_path": set_path(r) if (r.checkpoint and "test_acc" in m) else ""})
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(["val_acc", "trial"], ascending=[False, True], na_position="last").reset_index(drop=True)


def set_path(result) -> str:
    """The trial's distilled set relative to its Tune run's folder (`<trial folder>/checkpoint_N/distilled.pt`)."""
    run_folder = posixpath.dirname(result.path.rstrip("/"))
    return posixpath.relpath(posixpath.join(result.checkpoint.path, SET_FILE), run_folder)


def markdown(table) -> str:
    """The table as Markdown with empty cells where a value is missing (never `nan` text)."""
    cells = table.astype(object).where(table.notna(), None)
    return cells.to_markdown(index=False, floatfmt=".4g", missingval="")


def write_tables(table, storage: Storage, name: str) -> tuple[str, str, str]:
    """NAME/trials.md, NAME/trials.parquet and NAME/trials.csv, each replaced whole (never half-written).
    The CSV is for MLflow's artifact view, which previews a CSV whole (a Markdown table: its first row)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, engine="pyarrow", index=False)
    fault_point("tables_enospc", "write", path=storage.uri(name, "trials.md"))
    md = storage.write_text(markdown(table) + "\n", name, "trials.md")
    pq = storage.write_bytes(buffer.getvalue(), name, "trials.parquet")
    csv = storage.write_text(table.to_csv(index=False), name, "trials.csv")
    return md, pq, csv


def record_placement(storage: Storage, name: str, data_ref, zoo_info: dict) -> dict:
    """NAME.cluster.json: the cluster's nodes, the nodes holding the dataset object, zoo actors."""
    import ray
    from ray.experimental import get_object_locations

    try:
        where = get_object_locations([data_ref], timeout_ms=5000).get(data_ref, {})
    except Exception:  # a lookup failure must not fail the search
        where = {}
    placement = {"nodes": [{"node_id": n["NodeID"], "alive": n["Alive"],
                            "resources": {k: v for k, v in n["Resources"].items() if not k.startswith("node:")}}
                           for n in ray.nodes()],
                 "dataset_object": {"node_ids": where.get("node_ids", []), "bytes": where.get("object_size")},
                 "zoo_nodes": sorted({m["node"] for m in zoo_info.get("models", [])})}
    storage.write_text(json.dumps(placement, indent=1), f"{name}.cluster.json")
    return placement
