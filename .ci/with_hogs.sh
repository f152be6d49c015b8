#!/usr/bin/env bash
# Run a command while two busy loops hog the cores (issue 12: the fault tests must pass on a
# loaded machine), N times in a row; report each run's exit code and wall time.
#   .ci/with_hogs.sh 3 python -m pytest tests/test_faults.py tests/test_cluster.py -q
set -uo pipefail
times=$1; shift
hogs=()
for _ in 1 2; do
    python3 -c "while True: pass" &
    hogs+=($!)
done
trap 'kill "${hogs[@]}" 2>/dev/null; wait "${hogs[@]}" 2>/dev/null' EXIT
failed=0
for i in $(seq 1 "$times"); do
    start=$(date +%s)
    "$@"
    rc=$?
    echo "with_hogs: run $i/$times exit $rc wall $(( $(date +%s) - start ))s (2 busy loops)"
    [ "$rc" -eq 0 ] || failed=1
done
exit $failed
