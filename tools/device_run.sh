#!/usr/bin/env bash
# One device-machine call that does the whole GPU check-up and leaves logs under $OUT:
#   bash tools/device_run.sh [fa4] [precompile] [tests] [suite] [sanitize] [sanitize-random] [bench]
#                            [profile] [profile-src] [first] [maskpack] [route]
#                            [route-bench] [route-suite] [tensor] [host-queue] [row-bias]
#                            [random] [rows] [compiled] [graph-order] [listed-bias] [overlap]
#   (default: precompile tests sanitize bench)
# fa4: install FlashAttention-4 into /tmp/fa4site from the staged wheel parts
# (tools/fa4_install.sh; .whl/partA staged by an earlier call, .whl/partB carried by this one);
# precompile: every specialization for this GPU into the kernel cache, 16 processes, and the
# backward A/B builds the GPU tests build (test_backward_sm90_builds, _dq_writer);
# tests: the GPU suite (-n 16; failures also in $OUT/failures.txt as they happen; GPU_SHARD=1/2
# and 2/2: half the files each, for two calls of under 600 s); suite: tests as its two shards
# one after the other in this call (logs gpu_tests_1.log, gpu_tests_2.log; with precompile
# ~540 s on an H100); sanitize: compute-sanitizer memcheck and synccheck on a representative
# subset, racecheck (its own build) on that subset's Hopper forward tests; sanitize-random:
# memcheck over the first RANDOM_CASES (default 24) calls of tests/gpu/test_random_calls.py;
# bench: every tools/bench case, JSON + table (FA4 and Flex FLASH rows when flash_attn.cute
# is importable: see tools/fa4_install.sh; BENCH_ARGS replaces "--suite all"); profile:
# Nsight Compute sections of one forward launch (PROFILE_CASE,
# PROFILE_KERNEL: a kernel-name regex, default flash_fwd: the Hopper or the portable kernel);
# profile-src: the same launch's stall samples per SASS instruction (tools/ncu_source.py; e.g.
# PROFILE_CASE=backward PROFILE_KERNEL=flash_bwd_sm90; PROFILE_ARGS: more bench flags, e.g.
# "--seqlen 2048"); first: the first fwd+bwd of a new process split by phase, dmattn and SDPA
# (tools/first_call_split.py, after one warming process; the profile in first_call.txt);
# maskpack: the mask packing kernel's GPU test, MixedMask.from_dense_mask's time under
# DMATTN_MASK_PACK=0 and =1 (tools/mask_pack_time.py), and the mask + bias bench cases;
# route: the attn_mask route's GPU tests; route-bench: the mask cases under DMATTN_MASK_ROUTE=1
# and =0 and ncu of the route's kernels; route-suite: the whole suite with the route on;
# tensor: the Hopper forward's tensor-pipe share and time for TENSOR_CASES (default dense,kbias);
# host-queue: host time per call with the GPU held busy (tools/host_queue.py); row-bias: the
# key-broadcast bias shift's GPU tests (DMATTN_FWD_ROW_BIAS) and the qbias case on and off;
# random: RANDOM_CALLS exploratory random calls from RANDOM_SEED (NOTES "Next"); rows: the
# H200 rows NOTES "Next" lists (attn_mask routes, dense/kbias, the decode pair, qbias);
# compiled: the torch.compile(mode="reduce-overhead") step's GPU tests and host time;
# graph-order: whether a torch.cuda.graph capture fails after torch.compile's graph trees ran
# in the process, whose and in which capture mode (tools/graph_after_compile.py);
# listed-bias: DM_SM90_LISTED_BIAS + DM_SM90_ITEM_REMAT's GPU tests and A/B rounds (sm90/fwd.cu);
# overlap: DMATTN_MASK_ROUTE=overlap's GPU tests (the packing beside the forward), three of
# them under compute-sanitizer, and interleaved rounds of mask_bias / mask_bias_doc by auto, 1
# and overlap at 3 packing grids.
# At most 8 files come back from $OUT: gpu.txt and info.txt count.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DMATTN_CACHE_DIR=/tmp/dmattn-cache
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
steps=${*:-precompile tests sanitize bench}
arch=sm_$(python3 -c 'import cupy; print(cupy.cuda.Device().compute_capability)')
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1
python3 -m dmattn_cupy info | tee "$OUT/info.txt"
for step in $steps; do
  case $step in
    fa4)
      bash tools/fa4_install.sh install .whl/partB > "$OUT/fa4_install.log" 2>&1
      echo "fa4 install rc=$?: $(tail -1 "$OUT/fa4_install.log")" ;;
    precompile)
      python3 -m dmattn_cupy.precompile --arch "$arch" --debug --jobs 16 --fill-cache \
        > "$OUT/precompile.log" 2>&1; echo "precompile rc=$?: $(tail -1 "$OUT/precompile.log")"
      for d in DM_SM90_BWD_DQ_WRITER=0 DM_SM90_BWD_DQ_SLOTS=1 DM_SM90_BWD_BIAS_LDSM=0 \
               DM_SM90_BWD_DET_KEY_MAJOR=0 DM_SM90_BWD_DQ_WRITERS=1 DM_SM90_BWD_DQ_SHARED_SLOT=0; do
        DMATTN_NVRTC_DEFINES=$d python3 -m dmattn_cupy.precompile --arch "$arch" --only bwd_sm90 \
          --jobs 16 --fill-cache >> "$OUT/precompile.log" 2>&1
      done; echo "A/B builds rc=$?: $(tail -1 "$OUT/precompile.log")" ;;
    suite)
      for shard in 1 2; do
        GPU_SHARD=$shard/2 OUT=$OUT bash tools/device_run.sh tests \
          | grep -vE "^(dmattn_cupy|cuda_src|cupy|nvrtc|driver|gpu 0|torch|cache) "
        mv "$OUT/gpu_tests.log" "$OUT/gpu_tests_$shard.log"
      done ;;
    tests)
      # failures_at_once: each failure written to $OUT/failures.txt as it happens;
      # GPU_SHARD=i/n: only every n-th test file from the i-th (1-based), sorted by name
      files=tests/gpu
      if [ -n "${GPU_SHARD:-}" ]; then
        files=$(ls tests/gpu/test_*.py | sort | awk -v s="$GPU_SHARD" \
          'BEGIN { split(s, a, "/") } (NR - a[1]) % a[2] == 0')
      fi
      # shellcheck disable=SC2086
      PYTHONPATH=$PWD:$PWD/tools python3 -m pytest -m gpu -q -n 16 --maxfail=200 --timeout=200 \
        --tb=short -rf -p failures_at_once -p no:cacheprovider $files \
        > "$OUT/gpu_tests.log" 2>&1
      echo "pytest rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-160 | head -60
      tail -3 "$OUT/gpu_tests.log" ;;
    sanitize)
      # racecheck runs the racecheck build (DM_SM90_EACH_THREAD_ARRIVES=1: the Hopper forward's
      # lane-0 hand-offs become every thread's arrival, which racecheck models; the default
      # build reports them as hazards) on the Hopper forward's tests of the subset (bwd_sm90
      # it cannot run: an internal sanitizer error, sixteenth session)
      rc_defines=DM_SM90_EACH_THREAD_ARRIVES=1
      DMATTN_NVRTC_DEFINES=$rc_defines python3 -m dmattn_cupy.precompile --arch "$arch" \
        --only fwd_sm90 --jobs 16 --fill-cache > "$OUT/precompile_racecheck.log" 2>&1
      for tool in memcheck racecheck synccheck; do
        # a representative subset of every kernel: head dims, lengths around tiles, mask/bias
        # broadcasts, varlen layouts, block-sparse lists, decode split-KV, backward
        files="tests/gpu/test_forward.py tests/gpu/test_varlen.py tests/gpu/test_sparse.py
               tests/gpu/test_decode.py tests/gpu/test_backward.py tests/gpu/test_forward_sm90.py
               tests/gpu/test_row_pad.py tests/gpu/test_threads.py"
        defines=; opts=
        if [ "$tool" = racecheck ]; then
          files=tests/gpu/test_forward_sm90.py; defines=$rc_defines
          opts="--racecheck-report hazard --kernel-name kns=fwd_sm90"
        fi
        # shellcheck disable=SC2086
        DMATTN_NVRTC_DEFINES=$defines timeout 200 compute-sanitizer --tool "$tool" $opts \
          --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider $files \
          -k "d64 or causal-sq9-sk33 or fully or broadcast or varlen_layouts or \
              (every_class and bitset) or split_on_and_off or boundary or query_row or thread" \
          > "$OUT/sanitize_$tool.log" 2>&1
        echo "compute-sanitizer $tool: rc=$?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" \
          "$OUT/sanitize_$tool.log" | tail -1); $(grep -E "passed|failed" \
          "$OUT/sanitize_$tool.log" | tail -1)"
      done ;;
    sanitize-random)
      ids=$(python3 -c "print(' '.join('tests/gpu/test_random_calls.py::test_random_call[%d]' % i
                                        for i in range(${RANDOM_CASES:-24})))")
      # shellcheck disable=SC2086
      timeout 300 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q \
        -p no:cacheprovider $ids > "$OUT/sanitize_random.log" 2>&1
      echo "compute-sanitizer memcheck, random calls: rc=$?; $(grep -E "ERROR SUMMARY" \
        "$OUT/sanitize_random.log" | tail -1); $(grep -E "passed|failed" \
        "$OUT/sanitize_random.log" | tail -1)" ;;
    bench)
      # FA4 (and Flex's FLASH backend) where tools/fa4_install.sh put it
      fa4=${FA4_SITE:-/tmp/fa4site}; bench_pp=$PYTHONPATH
      [ -d "$fa4" ] && bench_pp="$PYTHONPATH:$fa4:$fa4/nvidia_cutlass_dsl/dsl_packages"
      # shellcheck disable=SC2086
      PYTHONPATH=$bench_pp python3 tools/bench ${BENCH_ARGS:---suite all} --json "$OUT/bench.json" \
        > "$OUT/bench.log" 2>&1
      echo "bench rc=$?"; grep -E "^(summary|target|== targets|peer )" "$OUT/bench.log" ;;
    profile)  # where a forward case's time goes (Nsight Compute, one launch; PROFILE_CASE)
      case_=${PROFILE_CASE:-dense}
      ncu --clock-control none --section SpeedOfLight --section WarpStateStats \
        --section SchedulerStats --section ComputeWorkloadAnalysis --section Occupancy \
        --section MemoryWorkloadAnalysis --section InstructionStats -k regex:"${PROFILE_KERNEL:-flash_fwd}" \
        -s 3 -c 1 python3 tools/bench --case "$case_" --peers none --no-smoke --quick ${PROFILE_ARGS:-} \
        > "$OUT/ncu_$case_.txt" 2>&1
      echo "ncu $case_ rc=$?"; grep -E "Throughput|Issued|Eligible|Occupancy|Duration|Executed Inst" \
        "$OUT/ncu_$case_.txt" | head -20 ;;
    profile-src)  # stall samples per SASS instruction of one launch (tools/ncu_source.py)
      case_=${PROFILE_CASE:-dense}
      ncu --clock-control none --section WarpStateStats --section SourceCounters \
        -k regex:"${PROFILE_KERNEL:-flash_fwd}" -s 2 -c 1 -o "$OUT/src_$case_" python3 tools/bench \
        --case "$case_" --peers none --no-smoke --quick ${PROFILE_ARGS:-} > "$OUT/ncu_src_$case_.log" 2>&1
      echo "ncu source $case_ rc=$?"
      # the uncompressed page (MBs) does not come back from the device machine: gzip it
      ncu -i "$OUT/src_$case_.ncu-rep" --page source --csv --print-source sass \
        | gzip > "$OUT/src_$case_.csv.gz" && rm -f "$OUT/src_$case_.ncu-rep"
      python3 tools/ncu_source.py "$OUT/src_$case_.csv.gz" --top 20 ;;
    first)
      python3 tools/first_call_split.py --runs 1 > /dev/null 2>&1   # kernels into the cache
      python3 tools/first_call_split.py --runs 2 --profile 40 > "$OUT/first_call.txt" 2>&1
      echo "first call rc=$?"; grep -E "^run " "$OUT/first_call.txt" ;;
    maskpack)  # the mask packing kernel (DMATTN_MASK_PACK): its GPU test, from_dense_mask's
      # time with and without it, and the mask + bias cases with their per-call MixedMask row
      python3 -m pytest -q -p no:cacheprovider tests/gpu/test_mask_pack.py > "$OUT/maskpack.log" 2>&1
      echo "mask_pack tests rc=$?: $(tail -1 "$OUT/maskpack.log")"
      for v in 0 1; do
        DMATTN_MASK_PACK=$v python3 tools/mask_pack_time.py >> "$OUT/maskpack.log" 2>&1
        DMATTN_MASK_PACK=$v python3 tools/bench --case mask_bias,mask_bias_mixed,mask_bias_doc,mask_bias_doc_mixed \
          --peers cudnn --no-smoke --quick >> "$OUT/maskpack.log" 2>&1
      done
      grep -E "from_dense_mask|^dmattn|^  dmattn|^sdpa-cudnn|^summary" "$OUT/maskpack.log" ;;
    route)  # the forward's attn_mask route (DMATTN_MASK_ROUTE): its GPU tests
      PYTHONPATH=$PWD:$PWD/tools python3 -m pytest -m gpu -q -n 16 --timeout=200 --tb=short -rf \
        -p no:cacheprovider tests/gpu/test_mask_route.py \
        tests/gpu/test_forward_sm90_mask_bias_values.py tests/gpu/test_graphs.py \
        tests/gpu/test_backward_sm90_dq_writer.py > "$OUT/route.log" 2>&1
      echo "route tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/route.log" | cut -c1-160 | head -30
      tail -1 "$OUT/route.log" ;;
    route-bench)  # the mask cases with the route on and off, then ncu of the route's kernels
      for v in 1 0; do
        DMATTN_MASK_ROUTE=$v python3 tools/bench --case ${ROUTE_CASES:-mask_bias,mask_bias_doc,mask_hf} \
          --peers cudnn --no-smoke --quick >> "$OUT/route.log" 2>&1
      done
      grep -E "^dmattn|^  dmattn|^sdpa-cudnn|^summary" "$OUT/route.log"
      # the route's three kernels of one mask_bias call: time and DRAM share of each
      DMATTN_MASK_ROUTE=1 ncu --clock-control none -k regex:"mask_pack|mask_lists|fwd_sm90" -c 6 \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
        python3 tools/bench --case mask_bias --peers none --no-smoke --quick \
        > "$OUT/route_ncu.txt" 2>&1
      grep -E "mask_pack|mask_lists|fwd_sm90|duration|dram__" "$OUT/route_ncu.txt" | cut -c1-120 ;;
    route-suite)  # the whole GPU suite with the route on (every Hopper attn_mask call packs),
      # cut at SUITE_S seconds (default 280; ROUTE_TESTS: test paths instead of tests/gpu);
      # failures in $OUT/failures.txt as they happen
      DMATTN_MASK_ROUTE=1 PYTHONPATH=$PWD:$PWD/tools timeout "${SUITE_S:-280}" python3 -m pytest \
        -m gpu -q -n 16 --maxfail=200 --timeout=200 --tb=short -rf -p failures_at_once \
        -p no:cacheprovider ${ROUTE_TESTS:-tests/gpu} > "$OUT/gpu_tests.log" 2>&1
      echo "pytest (route on) rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/gpu_tests.log" | cut -c1-160 | head -40
      tail -2 "$OUT/gpu_tests.log" ;;
    tensor)  # is the forward tensor-bound? HMMA pipe share of peak, per case, one launch each
      for case_ in $(echo "${TENSOR_CASES:-dense,kbias}" | tr , ' '); do
        ncu --clock-control none -k regex:flash_fwd_sm90 -s 3 -c 1 --metrics \
          gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed.sum \
          python3 tools/bench --case "$case_" --peers none --no-smoke --quick \
          > "$OUT/tensor_$case_.txt" 2>&1
        echo "tensor $case_ rc=$?"
        grep -E "duration|hmma|inst_executed" "$OUT/tensor_$case_.txt" | cut -c1-120
      done ;;
    compiled)  # the training step under torch.compile(mode="reduce-overhead"): its GPU tests
      # (with the retain_graph one, fifty-second session), then two rounds of host_fwd_bwd
      python3 -m pytest -m gpu -q -n 4 --timeout=300 --tb=short -rf -p no:cacheprovider \
        tests/gpu/test_thin_backward.py::test_retain_graph_backward_twice \
        tests/gpu/test_graphs.py::test_compiled_training_step_replays tests/gpu/test_scratch.py \
        > "$OUT/compiled.log" 2>&1
      echo "compiled-step tests rc=$?"; tail -1 "$OUT/compiled.log"
      for r in 1 2; do
        python3 tools/bench --no-smoke --case host_fwd_bwd --peers none >> "$OUT/compiled.log" 2>&1
        echo "host_fwd_bwd round $r rc=$?"
      done; grep -E "fwd\+bwd|floor|target" "$OUT/compiled.log" | cut -c1-170 ;;
    graph-order)  # a capture after torch.compile's graph trees (tools/graph_after_compile.py)
      python3 tools/graph_after_compile.py > "$OUT/graph_order.txt" 2>&1
      echo "graph-order rc=$?"; cat "$OUT/graph_order.txt" ;;
    host-queue)  # host time per call alone: calls queued behind a sleep kernel (tools/host_queue.py)
      python3 tools/host_queue.py > "$OUT/host_queue.txt" 2>&1
      echo "host queue rc=$?"; cat "$OUT/host_queue.txt" ;;
    row-bias)  # the key-broadcast bias as an lse shift (DMATTN_FWD_ROW_BIAS): its GPU tests,
      # then the qbias case with the switch on and off
      PYTHONPATH=$PWD:$PWD/tools python3 -m pytest -m gpu -q -n 16 --timeout=200 --tb=short -rf \
        -p no:cacheprovider tests/gpu/test_row_bias.py tests/gpu/test_forward_sm90.py \
        > "$OUT/row_bias.log" 2>&1
      echo "row-bias tests rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/row_bias.log" | cut -c1-160 | head -30
      tail -1 "$OUT/row_bias.log"
      for v in 1 0; do
        DMATTN_FWD_ROW_BIAS=$v python3 tools/bench --case qbias,dense --peers cudnn --no-smoke \
          --quick >> "$OUT/row_bias.log" 2>&1
      done
      grep -E "^summary" "$OUT/row_bias.log" ;;
    random)  # exploratory random calls: RANDOM_CALLS (default 4000) from RANDOM_SEED (default
      # 37000000: the first not yet run), the malformed ones from RANDOM_SEED + 1000000
      rs=${RANDOM_SEED:-37000000}
      DMATTN_RANDOM_CALLS=${RANDOM_CALLS:-4000} DMATTN_RANDOM_CALLS_SEED=$rs \
        DMATTN_MALFORMED_CALLS_SEED=$((rs + 1000000)) PYTHONPATH=$PWD:$PWD/tools python3 -m pytest \
        -m gpu -q -n 16 --timeout=200 --tb=short -rf -p no:cacheprovider \
        tests/gpu/test_random_calls.py tests/gpu/test_call_fuzz_gpu.py > "$OUT/random_$rs.log" 2>&1
      echo "random calls from $rs rc=$?"; grep -E "^(FAILED|ERROR)" "$OUT/random_$rs.log" | sort -u \
        | cut -c1-160 | head -20; tail -1 "$OUT/random_$rs.log" ;;
    rows)  # the rows NOTES "Next" lists for the H200, each one process, two interleaved rounds
      # of the attn_mask routes and of dense/kbias, then the decode forced pair and qbias
      rows() { python3 tools/bench --no-smoke "$@" 2>&1 | tee -a "$OUT/rows.log" \
        | awk 'f && NF; /^smoke check/{f=1}' | grep -v -- "-----" | cut -c1-150; }
      for r in 1 2; do
        for route in 0 auto warps; do
          echo "== round $r DMATTN_MASK_ROUTE=$route"
          DMATTN_MASK_ROUTE=$route rows --peers cudnn --case mask_bias
        done
        echo "== round $r dense,kbias"; rows --peers none --case dense,kbias
      done
      for n in 1 auto; do
        echo "== decode B16 Sk2048, DMATTN_NUM_SPLITS=$n"
        DMATTN_NUM_SPLITS=$n rows --quick --case decode_b16 --batch 16 --seqlen-k 2048 --peers cudnn
      done
      echo "== qbias"; rows --peers cudnn,flex --case qbias ;;
    listed-bias)  # DM_SM90_LISTED_BIAS (with DM_SM90_ITEM_REMAT's registers): the Hopper
      # forward's mask/bias and block-list tests under the defines, then interleaved A/B rounds
      # of the lists forward (mask_bias_mixed) and the attn_mask routes against the default
      lb="DM_SM90_ITEM_REMAT=1 DM_SM90_LISTED_BIAS=1"
      DMATTN_NVRTC_DEFINES="$lb" python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider \
        tests/gpu/test_forward_sm90_mask_bias_values.py tests/gpu/test_forward_sm90_varlen_sparse.py \
        tests/gpu/test_mixed_mask_bias.py tests/gpu/test_sparse.py > "$OUT/listed_bias_tests.log" 2>&1
      echo "listed-bias tests rc=$?: $(tail -1 "$OUT/listed_bias_tests.log")"
      grep -E "^(FAILED|ERROR)" "$OUT/listed_bias_tests.log" | cut -c1-160 | head -10
      for r in 1 2; do
        CASES=mask_bias_mixed,mask_bias,mask_bias_doc_mixed OUT=$OUT bash tools/device_ab.sh \
          "base_$r|.|" "remat_$r|.|DM_SM90_ITEM_REMAT=1" "lb_$r|.|$lb" | tee -a "$OUT/listed_bias_ab.log"
      done ;;
    overlap)  # DMATTN_MASK_ROUTE=overlap (mask_pack.overlaps: mask_rows_kernel beside the
      # forward, which waits per work item): its GPU tests and the route's, then two
      # interleaved rounds, each one process per row (a sixth of the SMs by default)
      python3 -m pytest -m gpu -q -n 16 -p no:cacheprovider tests/gpu/test_mask_overlap.py \
        tests/gpu/test_mask_route.py > "$OUT/overlap_tests.log" 2>&1
      echo "overlap tests rc=$?: $(tail -1 "$OUT/overlap_tests.log")"
      grep -E "^(FAILED|ERROR)" "$OUT/overlap_tests.log" | cut -c1-160 | head -10
      # memcheck and synccheck of both kernels, racecheck of the packing's shared counts
      for tool in memcheck synccheck racecheck; do
        opts=; [ "$tool" = racecheck ] && opts="--racecheck-report hazard --kernel-name kns=mask_rows"
        # shellcheck disable=SC2086
        timeout 200 compute-sanitizer --tool "$tool" $opts --error-exitcode 9 python3 -m pytest \
          -q -x -p no:cacheprovider tests/gpu/test_mask_overlap.py \
          -k "tail16-full-none or byte_tail-causal-key_row or dense-one_cta" \
          > "$OUT/overlap_$tool.log" 2>&1
        echo "overlap compute-sanitizer $tool: rc=$?; $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" \
          "$OUT/overlap_$tool.log" | tail -1); $(grep -E "passed|failed" "$OUT/overlap_$tool.log" | tail -1)"
      done
      orow() { python3 tools/bench --no-smoke "$@" 2>&1 | tee -a "$OUT/overlap.log" \
        | awk 'f && NF; /^smoke check/{f=1}' | grep -v -- "-----" | cut -c1-150; }
      for r in 1 2; do
        for v in "auto|" "1|" "overlap|" "overlap|11" "overlap|33"; do
          IFS="|" read -r route ctas <<< "$v"
          echo "== round $r DMATTN_MASK_ROUTE=$route DMATTN_MASK_OVERLAP_CTAS=${ctas:-default}"
          DMATTN_MASK_ROUTE=$route DMATTN_MASK_OVERLAP_CTAS=$ctas orow --peers cudnn \
            --case mask_bias,mask_bias_doc
        done
      done ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
