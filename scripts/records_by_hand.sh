#!/bin/bash
# By-hand checks of issue 16's findings (docs/reliability.md) on any tree of this repository:
#   bash scripts/records_by_hand.sh TREE TAG inf|zoo|two|sigint|sweep
# digits at the smoke budget, Ray on 1 CPU; outputs under ${OUT:-/tmp/records-by-hand}/TAG.
WT=$(cd "$1" && pwd); TAG=$2; WHAT=$3; D=${OUT:-/tmp/records-by-hand}/$TAG; mkdir -p $D
PY=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
cd $WT && export PYTHONPATH=$WT RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 MPLBACKEND=Agg
TINY="--set distill.iterations=6 --set distill.checkpoint_every=1 --set distill.log_every=1 --set distill.batch_real=8 --set distill.aug_pool=1 --set zoo.max_per_class=10 --set eval.runs=1 --set eval.epochs=1"
S="$PY -m tune.search --dataset digits --budget smoke --num-cpus 1 --cross-arch none $TINY"
q() {  # each run: trial id (or parent), status, parent run, number of test_acc / iteration values
  (cd /tmp && $PY - "$1" 2>&1 <<'PY' | grep -v INFO
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db")
for e in c.search_experiments():
    for r in c.search_runs([e.experiment_id]):
        print("  ", r.data.tags.get("dsdm.trial_id", "parent"), r.info.run_id[:8], r.info.status,
              "under=" + str(r.data.tags.get("mlflow.parentRunId"))[:8],
              {k: len(c.get_metric_history(r.info.run_id, k)) for k in ("test_acc", "iteration")})
PY
  )
}
summ() { echo "$1: rc=$2 lines=$(grep -c . $3) first=[$(grep -v 'INFO\|WARNING authentication\|A new study' $3 | head -1 | cut -c1-220)] last=[$(grep . $3 | tail -1 | cut -c1-260)]"; }
case $WHAT in
inf)  # findings 6 and 11
  nice -n 10 timeout 300 $S --num-samples 1 --max-failures 1 --storage $D/s --fix lambda2=inf > $D/inf.out 2> $D/inf.err; rc=$?
  summ inf $rc $D/inf.err; q $D/s ;;
zoo)  # finding 7: SIGINT once zoo model 1 is done, then follow the advice
  nice -n 10 $S --num-samples 1 --storage $D/s > $D/zoo1.out 2> $D/zoo1.err & pid=$!
  for i in $(seq 600); do grep -q "zoo model 1/2 done\|zoo model 2/2 done" $D/zoo1.out && break; sleep 0.2; done; kill -INT $pid; wait $pid; rc=$?
  summ zoo1 $rc $D/zoo1.err
  extra=""; grep -q "with --resume" $D/zoo1.err && extra="--resume"
  nice -n 10 timeout 300 $S --num-samples 1 --storage $D/s $extra > $D/zoo2.out 2> $D/zoo2.err; rc=$?
  summ "zoo2($extra)" $rc $D/zoo2.err; q $D/s ;;
two)  # finding 3: two searches at once, same folder and name
  nice -n 10 $S --num-samples 1 --storage $D/s --name same > $D/a.out 2> $D/a.err & a=$!
  nice -n 10 $S --num-samples 1 --storage $D/s --name same > $D/b.out 2> $D/b.err & b=$!
  wait $a; ra=$?; wait $b; rb=$?; summ a $ra $D/a.err; summ b $rb $D/b.err; q $D/s
  ls $D/s/same | grep experiment_state ;;
sigint)  # finding 1: 2 trials, SIGINT once trial 2 reported iteration 2, then --resume
  nice -n 10 $S --num-samples 2 --storage $D/s > $D/r1.out 2> $D/r1.err & pid=$!
  for i in $(seq 1500); do n=$(cat $D/s/*/run_trial_*_2_*/result.json 2>/dev/null | wc -l); [ "$n" -ge 2 ] && break; sleep 0.2; done; kill -INT $pid; wait $pid; rc=$?
  summ r1 $rc $D/r1.err; q $D/s
  nice -n 10 timeout 600 $S --num-samples 2 --storage $D/s --resume > $D/r2.out 2> $D/r2.err; rc=$?
  summ r2 $rc $D/r2.err; q $D/s
  grep -c "Failed to fetch metrics\|already reported" $D/r2.err ;;
sweep)  # an ablation sweep: SIGINT once its trial reported an iteration (the Tune phase), then SIGINT in the zoo phase
  A="$PY -m ablations.pretrain_epochs --dataset digits --budget smoke --num-cpus 1 --set distill.iterations=6 --set eval.runs=1 --set eval.epochs=1 --set distill.checkpoint_every=1"
  nice -n 10 $A --storage $D/sw --results $D/res > $D/sw1.out 2> $D/sw1.err & pid=$!
  for i in $(seq 1500); do n=$(cat $D/sw/*/run_cell_*/result.json 2>/dev/null | wc -l); [ "$n" -ge 1 ] && break; sleep 0.2; done; kill -INT $pid; wait $pid; rc=$?
  summ sweep-tune-phase $rc $D/sw1.err; ls $D/res/pretrain_epochs 2>/dev/null; q $D/sw
  nice -n 10 $A --storage $D/sz --results $D/resz > $D/sz1.out 2> $D/sz1.err & pid=$!
  for i in $(seq 600); do grep -q "zoo model 1/2 done\|zoo model 2/2 done" $D/sz1.out && break; sleep 0.2; done; kill -INT $pid; wait $pid; rc=$?
  summ sweep-zoo-phase $rc $D/sz1.err
  nice -n 10 timeout 300 $A --storage $D/sz --results $D/resz --resume > $D/sz2.out 2> $D/sz2.err; rc=$?
  summ "sweep-zoo-phase then --resume" $rc $D/sz2.err ;;
esac
