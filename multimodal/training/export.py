"""Export trained runs as a suite folder (the layout `Engine.load` and `multimodal eval` read), e.g. the shipped
`multimodal/assets/`:

    tokenizer.json          the world tokenizer (the painter's and the judge's)
    vlm/                    the VLM (native, kind "vlm"), with its own tokenizer.json where it was trained on another
    diffusion/              the relay pipeline: config.json, base/, relay/ (text encoder: the VLM's GLM core)
    diffusion/single/       the single-stage 64x64 baseline, used only by `multimodal eval draw`
    judge/                  the judge (kind "judge")

Each of the runs `vlm/`, `diffusion/` and `judge/` that the runs folder holds replaces its part of the suite; the
parts it lacks must already be in the suite folder (so a VLM trained further can replace the shipped one alone).
The diffusion model must have been trained on the very text encoder the suite's VLM has: their fingerprints must
agree. Denoisers are exported from the run's moving average of weights (`ema/`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from diffusion.pipeline import PIPELINE_KIND, RelayConfig, save_dit, save_relay_pipeline
from multimodal.checkpoint import NATIVE_WEIGHTS, load_into, read_native_config, read_state_dict
from multimodal.training.diffusion import KIND as DIFFUSION_KIND
from multimodal.training.diffusion import RELAY_SAMPLING, Stages, recorded_stage_configs
from multimodal.training.vlm import text_encoder_fingerprint
from vlm.convert import load_vlm, save_vlm

PARTS = ("vlm", "diffusion", "judge")


def export_suite(runs: Path, tokenizer: Path, out_dir: Path) -> Path:
    present = [part for part in PARTS if (runs / part).is_dir()]
    missing = [part for part in PARTS if part not in present and not (out_dir / part).is_dir()]
    if missing:
        raise FileNotFoundError(f"Neither {runs} nor the suite {out_dir} has the {' and '.join(missing)} part.")
    vlm = load_vlm(runs / "vlm" / "model" if "vlm" in present else out_dir / "vlm")
    if "diffusion" in present:
        fingerprint = read_native_config(runs / "diffusion" / "ema", DIFFUSION_KIND)["text_encoder_fingerprint"]
    else:
        fingerprint = read_native_config(out_dir / "diffusion", PIPELINE_KIND)["text_encoder"][
            "text_encoder_fingerprint"]
    if fingerprint != text_encoder_fingerprint(vlm):
        raise ValueError(f"The suite's diffusion model was trained on another text encoder than its VLM has "
                         f"(runs {runs}, suite {out_dir}).")

    out_dir.mkdir(parents=True, exist_ok=True)
    if "vlm" in present:
        save_vlm(vlm, out_dir / "vlm")
        # the chat model's own tokenizer, where its run was trained on another than the suite's (see
        # `multimodal.training.tokenizer.name_pieces`); the painter keeps the one its pipeline records
        trained_on, chat_tokenizer = runs / "vlm" / "model" / "tokenizer.json", out_dir / "vlm" / "tokenizer.json"
        if trained_on.exists():
            shutil.copyfile(trained_on, chat_tokenizer)
        else:
            chat_tokenizer.unlink(missing_ok=True)
    if "diffusion" in present:
        _export_diffusion(runs / "diffusion", out_dir / "diffusion")
    if "judge" in present:
        if (out_dir / "judge").exists():
            shutil.rmtree(out_dir / "judge")
        shutil.copytree(runs / "judge" / "model", out_dir / "judge")
    if tokenizer.resolve() != (out_dir / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    return out_dir


def _export_diffusion(run: Path, out_dir: Path) -> None:
    meta = read_native_config(run / "ema", DIFFUSION_KIND)
    stages = load_into(Stages(recorded_stage_configs(meta)), read_state_dict(run / "ema" / NATIVE_WEIGHTS))
    encoder = {"checkpoint": "../vlm", "tokenizer": "../tokenizer.json", "format": "vlm",
               "text_encoder_fingerprint": meta["text_encoder_fingerprint"]}
    relay_config = RelayConfig.from_dict(meta["relay"] | RELAY_SAMPLING)
    save_relay_pipeline(out_dir, stages.base, stages.relay, relay_config, encoder)
    save_dit(stages.single, out_dir / "single")
