"""Preference pairs (Pick-a-Pic parquet, hub preference parquet, WebDataset tars) → winner-first VAE latents (WebDataset tars) + caption embeddings + manifest, with Ray Data.

CLI: python -m stages.encode --src SRC --out OUT --model MODEL --resolution R [EncodeConfig flags]
     (also under `ray job submit --working-dir . -- python -m stages.encode ...`)

SRC and OUT are local paths or any fsspec URL (s3://bucket/prefix with AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...).
OUT's layout and its rules: stages/output_dir.py. A rerun skips committed chunks; input files added to SRC since
are encoded as new chunks and the manifest is republished over all of them.

The steps: preflight (every check that can fail on the user's input, before anything is written) → plan (OUT
locked, its config compared with an earlier run's, the files assigned to chunks) → jobs (stages/jobs.py) → publish
(stages/publish.py).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.ray_session import ray_session
from schemas import storage
from schemas.config import EncodeConfig, parse_config
from schemas.errors import InputError
from schemas.families import FAMILIES
from schemas.manifest import Report
from schemas.sample import model_family
from stages.formats import PairFormat, get_format
from stages.jobs import encode_all
from stages.output_dir import OutputDir, normalised, output_config
from stages.publish import write_manifest, write_report
from stages.ray_driver import encoder_pool_size
from stages.read_pairs import Prescan, prescan

# what the encode loads from a hub model: configs, tokenizers and safetensors weights, never the UNet
MODEL_SUBFOLDERS = (
    "vae",
    "text_encoder",
    "text_encoder_2",
    "text_encoder_3",
    "tokenizer",
    "tokenizer_2",
    "tokenizer_3",
)
MODEL_PATTERNS = ["model_index.json"] + [
    f"{sub}/*.{ext}" for sub in MODEL_SUBFOLDERS for ext in ("json", "txt", "model", "safetensors")
]


def refuse_out_inside_src(config: EncodeConfig) -> None:
    """An OUT below SRC would read back its own checkpoint parquet as input after a crash."""
    out = config.out.rstrip("/")
    for part in config.src.split(","):
        root = part
        while any(c in root.rsplit("/", 1)[-1] for c in "*?[{"):
            # a glob's fixed leading folders
            root = root.rsplit("/", 1)[0]
        if not storage.is_remote(root):
            root, out = str(Path(root).resolve()), str(Path(out).resolve())
        if out == root or out.startswith(root.rstrip("/") + "/"):
            raise InputError(
                f"--out {config.out} is inside --src {part}: the encode's own files would be read back as input "
                "(and a crashed run could never resume); choose an --out outside it"
            )


def resolve_model(model: str) -> str:
    """A local diffusers folder, or a hub id fetched into (or found in) the Hugging Face cache, as from_pretrained
    does; returns the folder the stages load from (on a multi-node cluster it must be on shared storage)."""
    if not Path(model).is_dir():
        from huggingface_hub import constants, snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        if Path(model).exists() or model.startswith(("/", ".")) or model.count("/") != 1:
            raise InputError(f"--model {model}: no such model folder (nor a hub id like owner/name)")
        try:
            model_dir = snapshot_download(model, allow_patterns=MODEL_PATTERNS, ignore_patterns=["*.fp16.*"])
        except LocalEntryNotFoundError as e:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
            raise InputError(
                f"--model {model}: no local folder of that name, and not in the Hugging Face cache "
                f"({constants.HF_HUB_CACHE}) while offline: {why} ({type(e).__name__}). Download it once with "
                "network access, or pass a local snapshot folder"
            ) from e
        except Exception as e:
            # the hub client raises HTTP, connection and repository errors alike
            raise InputError(
                f"--model {model}: fetching it from the hub failed ({type(e).__name__}: {e})"
            ) from e
    else:
        model_dir = model
    for sub in ("vae", "text_encoder", "tokenizer"):
        if not (Path(model_dir) / sub / ("vocab.json" if sub == "tokenizer" else "config.json")).is_file():
            raise InputError(f"--model {model}: not a diffusers model folder (no {sub}/ in {model_dir})")
    return str(Path(model_dir).resolve())


@dataclass(frozen=True)
class Inputs:
    """What preflight found: the config with its paths normalised, the model folder and the counted input files."""

    config: EncodeConfig
    model_dir: str
    fmt: PairFormat
    files: list[str]
    scan: Prescan


def preflight(config: EncodeConfig) -> Inputs:
    """Every check that can fail on the user's input, before anything is written: OUT outside SRC, the model, the
    format and its columns, every input file (prescan), and at least one trainable row."""
    config = normalised(config)
    refuse_out_inside_src(config)
    model_dir = resolve_model(config.model)
    family = FAMILIES[model_family(model_dir)]
    if config.max_sequence_length and not family.is_flow:
        raise InputError(
            f"--max-sequence-length applies to the T5-conditioned families (SD3, FLUX); --model {config.model} "
            f"is {family.name}"
        )
    fmt = get_format(config.format, config.src, config.columns)
    files = fmt.list_inputs()
    scan = prescan(fmt, files, config.tie_policy)
    dropped = scan.dropped(files)
    if scan.rows_read - sum(dropped.values()) == 0:
        raise InputError(
            f"--src {config.src}: no trainable rows ({scan.rows_read} rows read, dropped {dict(dropped) or 0}); "
            "nothing was written"
        )
    return Inputs(config, model_dir, fmt, files, scan)


def run(config: EncodeConfig) -> Report | None:
    """Encode `config.src` into `config.out`; None when OUT already holds every SRC file with the same config.

    The config marker is only written once Ray is up and the work is planned, so a failed first attempt never
    blocks a corrected rerun.
    """
    t0 = time.perf_counter()
    inputs = preflight(config)
    config, output = inputs.config, OutputDir(inputs.config.out)
    with output.lock():
        output.check_config(output_config(config))
        plan = output.plan_chunks(inputs.files, inputs.scan, config.chunk_files)
        todo = output.uncommitted(plan)
        if not todo and storage.exists(output.manifest):
            print(f"encode: {output.manifest} already holds all {len(inputs.files)} files; nothing to do")
            return None
        print(
            f"encode: {len(inputs.files)} {config.format} files, {inputs.scan.rows_read} rows, "
            f"{len(inputs.scan.captions)} unique captions, {len(todo)} of {len(plan)} chunks to encode → "
            f"{output.root}",
            flush=True,
        )
        with ray_session(config.ray_address, config.verbose) as started_ray:
            output.write_marker(output_config(config))
            pool = encoder_pool_size(config.num_encoders, started_ray)
            work = replace(config, model=inputs.model_dir, num_encoders=pool)
            chunks, counts = encode_all(work, output, plan, inputs.fmt, inputs.scan)
            manifest = write_manifest(config, inputs.model_dir, output, chunks)
    return write_report(config, output, manifest, chunks, counts, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    try:
        run(parse_config(EncodeConfig, argv, __doc__.split("\n")[0]))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encode: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
