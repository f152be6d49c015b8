"""The trial table of a Tune run (numbers, one row per trial), its files, and the placement record."""
from __future__ import annotations

import io
import json
import posixpath

from tune.faults import fault_point
from tune.storage import Storage
from tune.trainable import SET_FILE


def trial_table(results, space_keys: list[str]):
    """One row per trial: sampled params, objective, reporting metrics, time, where its set is."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id", r.path.split("/")[-1] if r.path else "?")}
        row.update({k.split(".")[-1]: (r.config or {}).get(k) for k in space_keys})
        row.update({"val_acc": m.get("val_acc"), "test_acc": m.get("test_acc"), "test_std": m.get("test_std"),
                    "iteration": m.get("iteration"), "seconds": m.get("time_total_s"),
                    "distill_s": m.get("distill_seconds"), "eval_s": m.get("eval_seconds"),
                    "resumed_from": m.get("resumed_from"), "zoo_pretrain_calls": m.get("zoo_pretrain_calls"),
                    "node": (m.get("node") or "")[:12], "reused_from": m.get("reused_from") or "",
                    "status": "ERROR" if r.error else ("DONE" if "test_acc" in m else "STOPPED"),
                    # where the set lies in the storage, for a reader; code reads it through the checkpoint
                    "set_path": posixpath.join(r.checkpoint.path, SET_FILE) if (r.checkpoint and "test_acc" in m) else ""})
        rows.append(row)
    return pd.DataFrame(rows).sort_values("val_acc", ascending=False, na_position="last").reset_index(drop=True)


def write_tables(table, storage: Storage, name: str) -> tuple[str, str]:
    """NAME/trials.md and NAME/trials.parquet, each replaced whole (never half-written)."""
    buffer = io.BytesIO()
    table.to_parquet(buffer, engine="pyarrow", index=False)
    fault_point("tables_enospc", "write", path=storage.uri(name, "trials.md"))
    md = storage.write_text(table.to_markdown(index=False, floatfmt=".4g") + "\n", name, "trials.md")
    pq = storage.write_bytes(buffer.getvalue(), name, "trials.parquet")
    return md, pq


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
