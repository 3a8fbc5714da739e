#!/usr/bin/env bash
# Every GPU measurement of the training step in one go (under 8 minutes on one H100/H200):
# ViT-B/16 and ViT-L/16 at T=10, the fast path against the reference, torch.compile on and
# off, activation checkpointing, channels-last patch embedding (B/16), the Ray Train overhead (B/16); then one table (bench/train_step.py's numbers, MFU against
# the bf16 dense peak given as PEAK_TFLOPS, default 989).
#
#   bash bench/gpu_report.sh [OUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-$(mktemp -d)}
mkdir -p "$out"
py=${PYTHON:-python}
peak=${PEAK_TFLOPS:-989}
common=(--device cuda --steps ${STEPS:-10} --warmup 3 --rounds 1 --peak-tflops "$peak" --shards "")

run() {  # name, then bench arguments
  local name=$1; shift
  echo "== $name: python bench/train_step.py $*" >&2
  "$py" bench/train_step.py "${common[@]}" "$@" --json "$out/$name.json" | tee "$out/$name.log" >&2
}

run b16 --model b16 --batch-size ${B16_BATCH:-8}
run b16_compile --model b16 --batch-size ${B16_BATCH:-8} --compile --variants fast
run b16_checkpointing --model b16 --batch-size ${B16_BATCH:-8} --checkpointing --variants fast
run b16_channels_last --model b16 --batch-size ${B16_BATCH:-8} --channels-last --variants fast
run l16 --model l16 --batch-size ${L16_BATCH:-4}
run l16_compile --model l16 --batch-size ${L16_BATCH:-4} --compile --variants fast
run l16_checkpointing --model l16 --batch-size ${L16_BATCH:-4} --checkpointing --variants fast
echo "== b16_ray: python bench/train_step.py --ray" >&2
"$py" bench/train_step.py "${common[@]}" --model b16 --batch-size ${B16_BATCH:-8} --ray 2>&1 \
  | tee "$out/b16_ray.log" | grep -E "^ray_overhead|round" >&2 || true

"$py" - "$out" "$peak" <<'PY'
import json, sys, pathlib
out, peak = pathlib.Path(sys.argv[1]), float(sys.argv[2])
print("| run | variant | ms/step | samples/s | frame-pairs/s | QA-pairs/s | peak GiB | TFLOP/s | MFU | compile s | host syncs/step |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
ratios = []
for name in ("b16", "b16_compile", "b16_checkpointing", "b16_channels_last", "l16", "l16_compile", "l16_checkpointing"):
    path = out / f"{name}.json"
    if not path.exists():
        continue
    results = json.loads(path.read_text())["results"]
    for variant, r in results.items():
        print(f"| {name} | {variant} | {r['step_s'] * 1e3:.1f} | {r['samples_per_s']:.1f} | "
              f"{r['frame_pairs_per_s']:.0f} | {r['qa_pairs_per_s']:.1f} | {r['peak_gib']:.1f} | "
              f"{r['tflops_per_s']:.0f} | {100 * r['tflops_per_s'] / peak:.1f}% | "
              f"{r['compile_s']:.0f} | {'' if r.get('host_syncs') is None else r['host_syncs']} |")
    if {"fast", "reference_trunk", "reference"} <= results.keys():
        q = {v: results[v]["qa_pairs_per_s"] for v in results}
        ratios.append(f"{name}: trunk_only_ratio {q['fast'] / q['reference_trunk']:.2f}, "
                      f"speedup_vs_reference {q['fast'] / q['reference']:.2f}")
print()
print("\n".join(ratios))
ray_log = out / "b16_ray.log"
if ray_log.exists():
    print("\n".join(l for l in ray_log.read_text().splitlines() if l.startswith("ray_overhead")))
PY
