#!/usr/bin/env python3
"""Regenerates the fidelity fixtures in tests/fixtures/.

Each fixture is a model written by `hyserve init-model` (recorded by its arguments and the
SHA-256 of its weight files) plus the logits of an independent reference on a fixed prompt:

  large-tiny-{f32,bf16}  Hunyuan-Large (CLA) tiny; reference: numpy_ref.py (plain NumPy,
                         written from the spec); bf16 emulates the reference's rounding.
  a13b-tiny-{f32,bf16}   Hunyuan-A13B-style tiny; reference: transformers' own
                         hunyuan_v1_moe (hf_ref.py, needs torch + transformers, CPU).

Usage:
  python3 scripts/reference/make_fixtures.py --bin target/release/hyserve [--only NAME ...]
      [--models DIR]         # keep the generated models here (default: a temp dir)
      [--models-only]        # only write the models (to run the references elsewhere)
      [--from-models DIR]    # use models written earlier (e.g. on another machine)

The transformers fixtures were produced on a GPU host (torch 2.11, transformers 5.17, run on
its CPU) with the models written here; see BENCHMARKS.md / the fixture's meta.json.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROMPT = [300, 301, 302, 303, 304, 305, 306, 307]
MAX_TOKENS = 32

FIXTURES = {
    "large-tiny-f32": dict(arch="hunyuan-large", seed=1, weights_dtype="f32", compute_dtype="f32",
                           reference="numpy", tolerance=1e-4, require_identical_tokens=True),
    "large-tiny-bf16": dict(arch="hunyuan-large", seed=1, weights_dtype="bf16", compute_dtype="bf16",
                            reference="numpy-bf16", tolerance=2e-2, require_identical_tokens=False),
    "a13b-tiny-f32": dict(arch="hunyuan-a13b", seed=2, weights_dtype="f32", compute_dtype="f32",
                          reference="transformers", tolerance=1e-4, require_identical_tokens=True),
    "a13b-tiny-bf16": dict(arch="hunyuan-a13b", seed=2, weights_dtype="bf16", compute_dtype="bf16",
                           reference="transformers-bf16", tolerance=2e-2, require_identical_tokens=False),
}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_model(bin_path, name, spec, models):
    out = os.path.join(models, name)
    shutil.rmtree(out, ignore_errors=True)
    subprocess.run([bin_path, "init-model", "--arch", spec["arch"], "--preset", "tiny",
                    "--dtype", spec["weights_dtype"], "--seed", str(spec["seed"]), "--out", out],
                   check=True)
    return out


def run_reference(name, spec, model, outdir):
    logits, gen = os.path.join(outdir, "logits.npy"), os.path.join(outdir, "ref.json")
    ids = ",".join(map(str, PROMPT))
    common = ["--model", model, "--prompt-ids", ids, "--max-tokens", str(MAX_TOKENS),
              "--out-logits", logits, "--out-json", gen]
    ref = spec["reference"]
    if ref.startswith("numpy"):
        cmd = [sys.executable, os.path.join(HERE, "numpy_ref.py")] + common
        if ref == "numpy-bf16":
            cmd.append("--bf16")
        desc = "scripts/reference/numpy_ref.py" + (" --bf16" if ref == "numpy-bf16" else "")
    else:
        dtype = "bfloat16" if ref == "transformers-bf16" else "float32"
        cmd = [sys.executable, os.path.join(HERE, "hf_ref.py"), "--dtype", dtype, "--device", "cpu"] + common
        import transformers  # noqa: F401  (fail early with a clear error)
        import torch
        desc = (f"scripts/reference/hf_ref.py --dtype {dtype} --device cpu "
                f"(transformers {transformers.__version__}, torch {torch.__version__})")
    subprocess.run(cmd, check=True)
    with open(gen) as f:
        generated = json.load(f)["generated_ids"]
    os.remove(gen)
    return desc, generated


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "hyserve"))
    ap.add_argument("--only", nargs="*", default=list(FIXTURES))
    ap.add_argument("--models")
    ap.add_argument("--models-only", action="store_true")
    ap.add_argument("--from-models")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures"))
    args = ap.parse_args()
    models = args.from_models or args.models or tempfile.mkdtemp(prefix="hyserve-fixtures-")
    os.makedirs(models, exist_ok=True)
    for name in args.only:
        spec = FIXTURES[name]
        model = os.path.join(models, name) if args.from_models else write_model(args.bin, name, spec, models)
        if args.models_only:
            continue
        outdir = os.path.join(args.out, name)
        os.makedirs(outdir, exist_ok=True)
        desc, generated = run_reference(name, spec, model, outdir)
        weights = sorted(f for f in os.listdir(model) if f.endswith((".safetensors", ".bin")))
        meta = dict(name=name, preset="tiny", prompt_ids=PROMPT, generated_ids=generated,
                    reference_command=desc,
                    weights_sha256={f: sha256(os.path.join(model, f)) for f in weights}, **spec)
        with open(os.path.join(outdir, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
            f.write("\n")
        print(f"{name}: {len(generated)} tokens, reference {desc}")


if __name__ == "__main__":
    main()
