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

import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from cluster.ray_session import ray_session
from schemas import failures, storage
from schemas.config import EncodeConfig, parse_config
from schemas.errors import InputError
from schemas.failures import EnvironmentFailure, console_errors_held, file_size_limit
from schemas.manifest import Report
from schemas.model_folder import encode_parts, resolve_model
from stages.formats import PairFormat, get_format
from stages.jobs import encode_all
from stages.memory_fit import refuse_what_cannot_fit
from stages.output_dir import OutputDir, normalised, output_config
from stages.publish import write_manifest, write_report
from stages.ray_driver import encoder_pool_size
from stages.read_pairs import Prescan, prescan

# a local cluster's logs, spill files and the encode's tars need files at least this large (`ulimit -f`)
MIN_FILE_SIZE_LIMIT = 2**30


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


def refuse_unwritable_out(config: EncodeConfig) -> None:
    """A local --out that this user cannot create or write into fails now, not after the Ray cluster is up."""
    if storage.is_remote(config.out):
        return
    path = Path(config.out)
    while not path.exists() and path != path.parent:
        path = path.parent
    if not path.is_dir():
        raise InputError(f"--out {config.out}: {path} is a file, not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(
            f"--out {config.out}: {path} is not writable (permission denied, or a read-only file system)"
        )


def refuse_small_file_size_limit(config: EncodeConfig) -> None:
    """Under a small `ulimit -f` the local cluster's processes die writing their logs, and Ray reports a GCS that
    timed out; say what it is instead. A cluster that is joined has its own limits."""
    limit = file_size_limit()
    if limit is None or limit >= MIN_FILE_SIZE_LIMIT or config.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    raise EnvironmentFailure(
        f"the file-size limit (`ulimit -f`) is {limit} bytes: a local Ray cluster's logs and spill files need "
        f"{MIN_FILE_SIZE_LIMIT // 2**20} MiB per file or more; raise it (`ulimit -f unlimited`) or join a cluster "
        "with --ray-address"
    )


@dataclass(frozen=True)
class Inputs:
    """What preflight found: the config with its paths normalised, the model folder and the counted input files."""

    config: EncodeConfig
    model_dir: str
    fmt: PairFormat
    files: list[str]
    scan: Prescan


def preflight(config: EncodeConfig) -> Inputs:
    """Every check that can fail on the user's input or this machine's limits, before anything is written: OUT
    outside SRC and writable, `ulimit -f`, the model's parts and weight files, the format and its columns, every
    input file (prescan), and at least one trainable row. (The memory fit needs the cluster: `run` checks it.)"""
    config = normalised(config)
    refuse_out_inside_src(config)
    refuse_unwritable_out(config)
    refuse_small_file_size_limit(config)
    folder = resolve_model(config.model, encode_parts)
    model_dir, family = str(folder.path), folder.family
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


def run(config: EncodeConfig, held: list[str] | None = None) -> Report | None:
    """Encode `config.src` into `config.out`; None when OUT already holds every SRC file with the same config.
    `held` collects Ray Data's error records, kept off the console for main's one-line report.

    The config marker is only written once Ray is up, the work is planned and it fits the encoder actors' memory,
    so a failed first attempt never blocks a corrected rerun.
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
        # its console handler exists once it is imported; the hold also covers what Ray Data's threads log while
        # a failed run shuts Ray down
        import ray.data  # noqa: F401

        with (
            console_errors_held("ray.data", [] if held is None else held),
            ray_session(config.ray_address, config.verbose) as started_ray,
        ):
            refuse_what_cannot_fit(config, inputs.model_dir)
            output.write_marker(output_config(config))
            pool = encoder_pool_size(config.num_encoders, started_ray)
            work = replace(config, model=inputs.model_dir, num_encoders=pool)
            chunks, counts = encode_all(work, output, plan, inputs.fmt, inputs.scan)
            manifest = write_manifest(config, inputs.model_dir, output, chunks)
    return write_report(config, output, manifest, chunks, counts, time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when done, 2 for a user's mistake, 74 for an environment failure (schemas/failures.py), 130 when
    interrupted; a traceback only for a bug."""
    config, held = None, []
    try:
        config = parse_config(EncodeConfig, argv, __doc__.split("\n")[0])
        run(config, held)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("encode: interrupted; the same command resumes where it stopped", file=sys.stderr)
        return 130
    except Exception as e:
        out = OutputDir(normalised(config).out) if config is not None else None
        where, logs = (out.root, out.logs_dir) if out is not None else (".", tempfile.gettempdir())
        code = failures.report(e, where, logs, "encode", held)
        if code is None:
            sys.stderr.write("".join(held))
            raise
        # the run is over: what Ray's threads log while the process exits would only bury the line
        logging.getLogger("ray").setLevel(logging.CRITICAL)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
