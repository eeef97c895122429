"""Export trained runs as a suite folder (the layout `Engine.load` and `multimodal eval` read), e.g. the shipped
`multimodal/assets/`:

    tokenizer.json          the world tokenizer
    vlm/                    the VLM (native, kind "vlm")
    diffusion/              the relay pipeline: config.json, base/, relay/ (text encoder: the VLM's GLM core)
    diffusion/single/       the single-stage 64x64 baseline, used only by `multimodal eval draw`
    judge/                  the judge (kind "judge")

The diffusion run must have been trained on the very text encoder the VLM ships with: their fingerprints must agree.
Its denoisers are exported from the run's moving average of weights (`ema/`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion.pipeline import RelayConfig, save_dit, save_relay_pipeline
from multimodal.checkpoint import NATIVE_WEIGHTS, load_into, read_native_config, read_state_dict
from multimodal.training.diffusion import KIND as DIFFUSION_KIND
from multimodal.training.diffusion import RELAY_SAMPLING, Stages, recorded_stage_configs
from multimodal.training.vlm import text_encoder_fingerprint
from vlm.convert import load_vlm, save_vlm


def export_suite(vlm_run: Path, diffusion_run: Path, judge_run: Path, tokenizer: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    vlm = load_vlm(vlm_run / "model")
    meta = read_native_config(diffusion_run / "ema", DIFFUSION_KIND)
    if meta["text_encoder_fingerprint"] != text_encoder_fingerprint(vlm):
        raise ValueError(
            f"The diffusion run in {diffusion_run} was trained on another text encoder than the VLM in {vlm_run} has."
        )
    weights = read_state_dict(diffusion_run / "ema" / NATIVE_WEIGHTS)
    stages = load_into(Stages(recorded_stage_configs(meta)), weights)
    save_vlm(vlm, out_dir / "vlm")
    encoder = {"checkpoint": "../vlm", "tokenizer": "../tokenizer.json", "format": "vlm",
               "text_encoder_fingerprint": meta["text_encoder_fingerprint"]}
    relay_config = RelayConfig.from_dict(meta["relay"] | RELAY_SAMPLING)
    save_relay_pipeline(out_dir / "diffusion", stages.base, stages.relay, relay_config, encoder)
    save_dit(stages.single, out_dir / "diffusion" / "single")
    if (out_dir / "judge").exists():
        shutil.rmtree(out_dir / "judge")
    shutil.copytree(judge_run / "model", out_dir / "judge")
    if tokenizer.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    return out_dir
