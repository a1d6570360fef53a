#!/usr/bin/env bash
# The GPU machine's side of an offline run (README.md beside this file). Run from the folder the transfers
# land in; everything the run needs lives under $SLKIT_OFFLINE (default /tmp/slkit-offline) while the
# machine is up:  code/ (slkit, notebooks, params, data)  site/ (wheels)  pieces/  cache/ (the model)
# runs/<run>/ (the run directory)  run.log  run.pid.  vLLM goes to /tmp/vsite (../shared/tools/vllm-device).
#   offline.sh setup CODE_DIR WHEEL_DIR [VLLM_C4]  copy the code, install the wheels and vLLM's dependencies
#                                         (VLLM_C4/deps: the gguf package among them), print the GPU and packages
#   offline.sh keep FILE...               move carried pieces into pieces/ (one transfer at a time)
#   offline.sh vllm-install               join pieces/vllm-*.whl.part* and install vLLM in the background
#   offline.sh model BUILTIN GGUF_NAME    join pieces/GGUF_NAME.part*, check, convert it for BUILTIN
#   offline.sh model-bg BUILTIN GGUF_NAME  the same, detached (model.log); `start` waits for it
#   offline.sh start RECIPE [--set K=V]   start `slkit run` detached (it outlives this command), once vLLM's
#                                         install and a model-bg conversion have ended
#   offline.sh loop-bench ARGS...         start bench/loop.py run --workdir $W ARGS detached, like start
#   offline.sh loop-collect OUT_DIR       bench/loop.py's rows so far and the runs' small files -> OUT_DIR
#   offline.sh watch SECONDS              wait that long, or until the run ends, and show where it is
#   offline.sh train-speed ARGS...        start bench/train_speed.py ARGS detached (GPU idle while pieces arrive)
#   offline.sh results RUN_NAME OUT_DIR   the run's small files so far (no adapters, checkpoints, training sets)
#                                         packed into OUT_DIR in pieces, the run left running
#   offline.sh bundle RUN_NAME OUT_DIR [MIB]  stop the run, pack runs/RUN_NAME (no checkpoints) into pieces
#   offline.sh unbundle DIR RUN_NAME      put a bundled run directory back under runs/ (to resume it)
set -uo pipefail
W=${SLKIT_OFFLINE:-/tmp/slkit-offline}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$W/pieces" "$W/runs"
VSITE=${VLLM_SITE:-/tmp/vsite}
export PYTHONPATH=$W/code:$W/site:$VSITE${PYTHONPATH:+:$PYTHONPATH} SLKIT_CACHE=$W/cache \
  PYTHONUNBUFFERED=1 VLLM_ATTENTION_BACKEND=FLASH_ATTN VLLM_USE_FLASHINFER_SAMPLER=0 TOKENIZERS_PARALLELISM=false
# The machine reaches nothing: whatever would ask the hub or send usage statistics must not wait on a timeout.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
step=${1:-}; shift || true
preflight() {
  # What a run imports only at its training stage or server start: missing here, it would fail minutes in.
  local imports=${SLKIT_PREFLIGHT_IMPORTS:-trl,slkit.training.trainer,vllm.entrypoints.openai.api_server,model_hosting_container_standards}
  python3 -c "import $imports" 2>&1 | grep -v Warning | tail -n 3; return "${PIPESTATUS[0]}"
}
case "$step" in
  setup)
    rm -rf "$W/code" && cp -r "$1" "$W/code" || exit 3
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" "$2"/*.whl || exit 3
    if [ -n "${3:-}" ]; then
      # vLLM's dependencies now, its wheel later (vllm-install): the model converts (it needs the gguf package)
      # while vLLM's pieces are still arriving.
      rm -rf /tmp/vc4 && cp -r "$3" /tmp/vc4 || exit 3
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$VSITE" \
        /tmp/vc4/deps/*.whl || exit 3
    fi
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|pandas|seaborn|matplotlib|pyyaml|pydantic|tqdm|numpy|datasets|gguf|liger.kernel|bitsandbytes) '
    ;;
  vllm-install)
    # The wheel arrives in pieces of pieces.sh (tools/device/README.md); joining, checking and installing take
    # ~30 s, detached, so the next transfers need not wait. `start` waits for it.
    wheel=$(ls "$W/pieces" | sed -n 's/\.parts\.sha256$//p' | grep '^vllm-.*\.whl$' | head -n 1)
    [ -n "$wheel" ] || { echo "no vllm-*.whl.parts.sha256 in $W/pieces: keep the pieces first"; exit 3; }
    (setsid nohup bash -c "bash '$here/pieces.sh' join '$W/pieces' '$wheel' /tmp && rm -f '$W/pieces/$wheel'.part* \
      && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target '$VSITE' \
         '/tmp/$wheel' && rm -f '/tmp/$wheel' && python3 -c 'import vllm; print(\"vllm\", vllm.__version__, \"installed in $VSITE\")' \
      && bash '$0' preflight && echo 'preflight ok'" > /tmp/vinstall.log 2>&1 < /dev/null &)
    echo "installing $wheel (/tmp/vinstall.log)"
    ;;
  keep)
    mv -f "$@" "$W/pieces/" && echo "pieces: $(ls "$W/pieces" | grep -c 'part[0-9]')"
    ;;
  model)
    # The `gguf` package (in vLLM's dependencies, installed by setup) imports mistral_common, whose language codes need pycountry.
    # From $W, as the run starts: `-c` puts the working directory first on sys.path, and from the transfer's
    # folder (a checkout) this check imported that checkout's slkit instead of $W/code's.
    ( cd "$W" && python3 -c 'import papermill, ipykernel, gguf, slkit; print("papermill", papermill.__version__, "ipykernel", ipykernel.__version__, "slkit from", slkit.__file__)' ) || exit 3
    bash "$here/pieces.sh" join "$W/pieces" "$2" "$W" || exit 3
    rm -f "$W/pieces/$2".part[0-9]*
    # From $W: `python3 -m` puts the working directory first on sys.path, and a checkout there has its own slkit/.
    # The conversion dequantises in one process per core (~40 s expected for the 1.5B); should that pool ever hang,
    # the one-process path (112 s measured) runs instead of the call waiting out its limit.
    ( cd "$W" && time timeout 240 python3 -m slkit setup --model "$1" --gguf "$W/$2" ) 2>&1 | grep -v Warning \
      || ( cd "$W" && time SLKIT_CONVERT_WORKERS=1 python3 -m slkit setup --model "$1" --gguf "$W/$2" ) 2>&1 \
      | grep -v Warning || exit 3
    rm -f "$W/$2"
    echo "model ready"
    ;;
  preflight)
    preflight
    ;;
  model-bg)
    (setsid nohup bash "$0" model "$@" > "$W/model.log" 2>&1 < /dev/null &)
    echo "converting $2 for $1 in the background ($W/model.log)"
    ;;
  start)
    cd "$W" || exit 3
    if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo "already running: pid $(cat run.pid)"; exit 0; fi
    for _ in $(seq 150); do  # vLLM's install and a background conversion, when they are still running
      installed=$(grep -c 'preflight ok' /tmp/vinstall.log 2>/dev/null); model=1
      [ -f model.log ] && { grep -q 'model ready' model.log || model=0; }
      [ "$installed" = 1 ] && [ $model = 1 ] && break
      pgrep -f 'offline.sh (model|preflight)|pieces.sh join|pip install|import vllm' > /dev/null || break; sleep 2
    done
    grep -v Warning /tmp/vinstall.log | tail -n 2; [ -f model.log ] && grep -v Warning model.log | tail -n 3
    [ -f model.log ] && ! grep -q 'model ready' model.log && { echo "the model's conversion failed (above)"; exit 3; }
    grep -q 'preflight ok' /tmp/vinstall.log 2>/dev/null || preflight || exit 3  # vllm-install ran it (~25 s)
    setsid nohup python3 -m slkit run "$@" --no-progress >> run.log 2>&1 < /dev/null &
    echo $! > run.pid; echo "started pid $!: slkit run $*"
    ;;
  loop-bench)
    # bench/loop.py (issue 24): one macro-iteration per variant, one after the other, in one detached process.
    cd "$W" || exit 3
    if [ -f run.pid ] && kill -0 "$(cat run.pid)" 2>/dev/null; then echo "already running: pid $(cat run.pid)"; exit 0; fi
    preflight || exit 3
    setsid nohup python3 "$W/code/bench/loop.py" run --workdir "$W" "$@" >> run.log 2>&1 < /dev/null &
    echo $! > run.pid; echo "started pid $!: bench/loop.py run --workdir $W $*"
    ;;
  loop-collect)
    # Small enough for any call's $OUT (the records and adapters stay here): rows.jsonl, logs, summaries, timings.
    ( cd "$W" && python3 "$W/code/bench/loop.py" collect --workdir "$W" --out "$1" ) || exit 3
    cp "$W/run.log" "$1/run.log" 2>/dev/null; true
    ;;
  train-speed)
    cd "$W" || exit 3
    setsid nohup python3 "$W/code/bench/train_speed.py" "$@" > train-speed.log 2>&1 < /dev/null &
    echo "started pid $!: bench/train_speed.py $* (log: $W/train-speed.log)"
    ;;
  results)
    run=$1 out=$2
    mkdir -p "$out"
    tar -C "$W/runs" --exclude='adapters' --exclude='.*-checkpoints' --exclude='checkpoint-*' --exclude='*_sft.jsonl' \
      --exclude='tensorboard' --exclude='*.lock' -czf "$W/$run-results.tgz" "$run" || exit 3
    bash "$here/pieces.sh" split "$W/$run-results.tgz" "$out" 15 && rm -f "$W/$run-results.tgz"
    cp "$W/run.log" "$out/run.log" 2>/dev/null; ls -la "$out"
    ;;
  watch)
    end=$((SECONDS + $1))
    while [ $SECONDS -lt $end ] && kill -0 "$(cat "$W/run.pid")" 2>/dev/null; do sleep 5; done
    kill -0 "$(cat "$W/run.pid")" 2>/dev/null && echo "run: running" || echo "run: ended"
    ls -t "$W"/runs/*/*/*.done.json 2>/dev/null | head -3
    cat "$W"/runs/*/*/progress.json 2>/dev/null | tail -c 300; echo
    tail -n 4 "$W"/runs/*/engine_timings.jsonl 2>/dev/null
    grep -v -E 'Warning|warn\(|^\s*$' "$W/run.log" | tail -n 8
    nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader
    ;;
  bundle)
    run=$1 out=$2 mib=${3:-15}
    # Stop the stage's kernel (its PID is in <stage>.lock) and the run, so the records are not torn mid-copy;
    # the rerun resumes from them.
    for lock in "$W/runs/$run"/*/*.lock; do [ -f "$lock" ] && kill -TERM "$(cut -d' ' -f1 "$lock")" 2>/dev/null; done
    [ -f "$W/run.pid" ] && kill -TERM "$(cat "$W/run.pid")" 2>/dev/null; sleep 3
    tar -C "$W/runs" --exclude='checkpoint-*' -czf "$W/$run.tgz" "$run" || exit 3
    bash "$here/pieces.sh" split "$W/$run.tgz" "$out" "$mib"
    ;;
  unbundle)
    bash "$here/pieces.sh" join "$1" "$2.tgz" "$W" && tar -C "$W/runs" -xzf "$W/$2.tgz" && rm "$W/$2.tgz" || exit 3
    # A <stage>.lock holds the PID of the kernel that ran the stage on the machine the run came from; here
    # that number may belong to anything, this run included (slkit stops the PID it names before resuming).
    rm -f "$W/runs/$2"/*/*.lock
    echo "runs/$2 ready: $(ls "$W/runs/$2")"
    ;;
  *) sed -n "2,/^set /{/^#/p}" "$0"; exit 2 ;;
esac
